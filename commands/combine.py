from __future__ import annotations

import typer


def run(
    output: str = typer.Argument(..., metavar="OUT", help="The combined bundle to write (OUT.kvprof)."),
    parts: list[str] = typer.Argument(
        ...,
        metavar="PART...",
        help="Bundles, or parts of one (record --ray-output, a node's directory), from any hosts.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at OUT."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No closing lines."),
):
    """Merge bundles or parts recorded on several hosts into one, clocks aligned.

    Exit status: 0; 2 bad input.
    """
    import sys

    from kvprof.combine import combine, summary_lines

    summary = combine(output, list(parts or []), force=force)  # none: one line, whichever parser read the line
    if not quiet:
        for line in summary_lines(summary):
            sys.stderr.write(line + "\n")
