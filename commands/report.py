from __future__ import annotations

import typer


def run(
    source: str = typer.Argument(..., metavar="BUNDLE", help="A .kvprof bundle, a PyTorch memory snapshot or a memray capture."),
    output: str = typer.Option(..., "-o", "--output", metavar="FILE", help="The HTML file to write (- for stdout)."),
    window: str = typer.Option(None, "--window", metavar="START[:END]", help="Only events between two markers."),
    no_whatif: bool = typer.Option(False, "--no-whatif", help="Skip the block-size replay (its chart)."),
):
    """Write a self-contained HTML report with plots (no network needed to open it).

    Exit status: 0; 2 bad input.
    """
    from kvprof.analysis import analyze_path
    from kvprof.analysis.timeseries import collect
    from kvprof.inputs import check_input
    from kvprof.report import html

    check_input(source)
    result = analyze_path(source, window=window)
    html.write(result, collect(source, result, whatif=not no_whatif), output)
    if output != "-":
        typer.echo(f"kvprof: report written to {output}")
