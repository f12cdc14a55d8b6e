from __future__ import annotations

import typer


def run(
    bundle: str = typer.Argument(..., metavar="BUNDLE", help="A .kvprof bundle."),
    format: str = typer.Option("perfetto", "--format", metavar="FORMAT", help="perfetto: Chrome trace-event JSON (ui.perfetto.dev, chrome://tracing)."),
    output: str = typer.Option(..., "-o", "--output", metavar="FILE", help="The file to write ('-': stdout)."),
):
    """Export a bundle's timelines for other viewers (Perfetto / Chrome tracing).

    Exit status: 0; 2 bad input.
    """
    from kvprof.errors import UsageError

    if format != "perfetto":
        raise UsageError(f"--format must be perfetto, not {format!r}")
    from kvprof.inputs import check_input
    from kvprof.report import perfetto

    from kvprof.report.progress import PassProgress

    check_input(bundle)
    with PassProgress("exporting") as progress:
        perfetto.export(bundle, output, progress=progress)
