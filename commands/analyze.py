from __future__ import annotations

import typer


def run(
    bundle: str = typer.Argument(..., help="A .kvprof bundle directory."),
    json_out: str = typer.Option(None, "--json", help="Write the analysis (schema kvprof.analysis/1) to this file ('-' for stdout)."),
    window: str = typer.Option(None, "--window", help="Only events between two markers: START[:END] marker names."),
    no_report: bool = typer.Option(False, "--no-report", help="Do not print the terminal report."),
    width: int = typer.Option(None, "--width", help="Terminal report width (default: the terminal's)."),
):
    """Analyze a recorded bundle: block pools, fragmentation, prefix cache, churn, leaks."""
    from kvprof.analysis import analyze_path
    from kvprof.report import json_report, terminal

    result = analyze_path(bundle, window=window)
    if json_out:
        json_report.write(result, json_out)
    if not no_report and json_out != "-":
        terminal.render(result, width=width)
