from __future__ import annotations

import typer


def run(
    source: str = typer.Argument(
        ..., metavar="BUNDLE", help="A .kvprof bundle, a PyTorch memory snapshot or a memray capture."
    ),
    output: str = typer.Option(..., "-o", "--output", metavar="FILE", help="The HTML file to write (- for stdout)."),
    window: str = typer.Option(None, "--window", metavar="START[:END]", help="Only events between two markers."),
    no_whatif: bool = typer.Option(False, "--no-whatif", help="Skip the block-size replay (its chart)."),
):
    """Write a self-contained HTML report with plots (no network needed to open it).

    Exit status: 0; 2 bad input.
    """
    from kvprof.analysis import analyze_path
    from kvprof.inputs import check_input
    from kvprof.trace.atomic import check_output
    from kvprof.report import html
    from kvprof.report.progress import PassProgress

    check_input(source)
    check_output(output)
    with PassProgress("analyzing") as progress:
        result = analyze_path(source, window=window, series=True, whatif=not no_whatif, progress=progress)
    html.write(result, result.series, output)
    if output != "-":
        typer.echo(f"kvprof: report written to {output}")
