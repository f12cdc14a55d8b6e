from __future__ import annotations

import typer


def run(
    runs: list[str] = typer.Argument(
        None,
        metavar="BASE NEW",
        help="Two runs: each a .kvprof bundle, a PyTorch snapshot, a memray capture, or an analysis JSON (kvprof analyze --json).",
    ),
    base: list[str] = typer.Option(
        None, "--base", metavar="RUN", help="A BASE run; repeat for repeated runs (medians are compared)."
    ),
    new: list[str] = typer.Option(None, "--new", metavar="RUN", help="A NEW run; repeat for repeated runs."),
    budget: str = typer.Option(
        None,
        "--budget",
        metavar="FILE",
        help="Budget TOML with a [budgets] table (default: [tool.kvprof.budgets] of the nearest pyproject.toml).",
    ),
    markdown: str = typer.Option(
        None,
        "--markdown",
        metavar="FILE",
        help="Write a Markdown table here ('-' for stdout; also appended to $GITHUB_STEP_SUMMARY when set).",
    ),
    junit: str = typer.Option(
        None, "--junit", metavar="FILE", help="Write JUnit XML here ('-' for stdout): one test case per checked metric."
    ),
    json_out: str = typer.Option(
        None, "--json", metavar="FILE", help="Write the comparison (schema kvprof.compare/1) here ('-' for stdout)."
    ),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only the verdict line on the terminal."),
    show_all: bool = typer.Option(False, "--all", help="List unchanged metrics too."),
    width: int = typer.Option(
        None, "--width", metavar="COLUMNS", min=40, help="Terminal width (default: the terminal's)."
    ),
):
    """Compare runs against budgets; fail on a regression.

    Exit status: 0 within budget, 1 a metric regressed or broke a budget,
    2 bad input or usage.
    """
    from kvprof import budgets as budgets_mod
    from kvprof.commands._checks import require
    from kvprof.trace.atomic import check_output
    from kvprof.compare import compare, load_run
    from kvprof.errors import EXIT_OK, EXIT_REGRESSED
    from kvprof.report import compare as render

    runs, base, new = list(runs or []), list(base or []), list(new or [])
    require(not (runs and (base or new)), "give BASE NEW as two arguments, or --base/--new options, not both")
    if runs:
        require(len(runs) == 2, f"expected BASE and NEW, got {len(runs)} argument(s); repeated runs go in --base/--new")
        base, new = [runs[0]], [runs[1]]
    require(base and new, "nothing to compare: give BASE NEW, or --base RUN ... --new RUN ...")
    outputs = (markdown, junit, json_out)
    require(outputs.count("-") <= 1, "only one of --markdown, --junit and --json can be '-' (stdout)")
    for path in outputs:
        check_output(path)
    budgets = budgets_mod.discover(budget)
    result = compare([load_run(p) for p in base], [load_run(p) for p in new], budgets)
    render.write_all(result, markdown, junit, json_out)
    if "-" not in outputs:  # stdout holds that output alone
        _terminal(render, result, quiet, width, show_all)
    return EXIT_OK if result.passed else EXIT_REGRESSED


def _terminal(render, result, quiet: bool, width, show_all: bool) -> None:
    if quiet:
        typer.echo(render.title(result))
    else:
        render.terminal(result, width=width, show_all=show_all)
