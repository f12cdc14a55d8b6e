from __future__ import annotations

import typer


def run(
    bundle: str = typer.Argument(..., metavar="BUNDLE", help="A .kvprof bundle."),
    format: str = typer.Option(
        "perfetto",
        "--format",
        metavar="FORMAT",
        help="perfetto: Chrome trace-event JSON (ui.perfetto.dev, chrome://tracing); parquet: a directory of Parquet tables, one per stream, plus metrics and findings (docs/parquet.md; needs pyarrow).",
    ),
    output: str = typer.Option(
        ..., "-o", "--output", metavar="FILE|DIR", help="The file to write ('-': stdout); for parquet, the directory."
    ),
):
    """Export a bundle for other tools: Perfetto / Chrome tracing, or Parquet for SQL and dataframes.

    Exit status: 0; 2 bad input.
    """
    from kvprof.commands._checks import require

    require(format in ("perfetto", "parquet"), f"--format must be perfetto or parquet, not {format!r}")
    from kvprof.inputs import check_input
    from kvprof.report.progress import PassProgress

    check_input(bundle)
    if format == "parquet":
        from kvprof.report import parquet

        with PassProgress("exporting") as progress:
            rows = parquet.export(bundle, output, progress=progress)
        typer.echo(f"kvprof: wrote {len(rows)} tables to {output} ({rows['block_events']:,} block events)")
        return
    from kvprof.report import perfetto

    with PassProgress("exporting") as progress:
        perfetto.export(bundle, output, progress=progress)
