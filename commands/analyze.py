from __future__ import annotations

import typer


def run(
    bundle: str = typer.Argument(..., metavar="BUNDLE", help="A .kvprof bundle directory."),
    json_out: str = typer.Option(
        None,
        "--json",
        metavar="FILE",
        help="Write the analysis (schema kvprof.analysis/1) to this file ('-' for stdout).",
    ),
    window: str = typer.Option(
        None, "--window", metavar="START[:END]", help="Only events between two markers: START[:END] marker names."
    ),
    no_report: bool = typer.Option(False, "--no-report", help="Do not print the terminal report."),
    width: int = typer.Option(
        None, "--width", metavar="COLUMNS", min=40, help="Terminal report width (default: the terminal's)."
    ),
    budget: str = typer.Option(
        None,
        "--budget",
        metavar="FILE",
        help="Check the run against the absolute limits (max, min) of this budget TOML; exit 1 on a breach.",
    ),
    html_out: str = typer.Option(
        None, "--html", metavar="FILE", help="Also write the self-contained HTML report (as `kvprof report`)."
    ),
):
    """Analyze a recorded bundle: block pools, fragmentation, prefix cache, churn, leaks.

    Exit status: 0, or 1 when --budget is given and a limit is broken; 2 bad input.
    """
    from kvprof.analysis import analyze_path
    from kvprof.commands._checks import require
    from kvprof.errors import EXIT_OK, EXIT_REGRESSED
    from kvprof.inputs import check_input
    from kvprof.trace.atomic import check_output
    from kvprof.report import json_report, terminal

    check_input(bundle)
    require(
        html_out != "-",
        "--html - would mix HTML into the terminal report: give a file, or use `kvprof report BUNDLE -o -`",
    )
    for path in (json_out, html_out):
        check_output(path)
    from kvprof.report.progress import PassProgress

    with PassProgress("analyzing") as progress:
        result = analyze_path(bundle, window=window, series=bool(html_out), whatif=bool(html_out), progress=progress)
    if json_out:
        json_report.write(result, json_out)
    if html_out:
        from kvprof.report import html

        html.write(result, result.series, html_out)
    if budget is not None:
        from kvprof import budgets as budgets_mod
        from kvprof.compare import Run, check_run
        from kvprof.report import compare as render

        verdict = check_run(Run(label=bundle, metrics=result.metrics), budgets_mod.load_file(budget))
    if not no_report and json_out != "-":
        terminal.render(result, width=width)
    if budget is not None:
        if json_out != "-":
            render.terminal(verdict, width=width)
        return EXIT_OK if verdict.passed else EXIT_REGRESSED
