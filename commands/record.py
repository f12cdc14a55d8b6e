from __future__ import annotations

import typer

COMMAND_SETTINGS = {
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True, "allow_interspersed_args": False},
}


def run(
    command: list[str] = typer.Argument(None, metavar="[--] CMD [ARGS]...", help="Command, script.py, or arguments of -m MODULE."),
    output: str = typer.Option(None, "-o", "--output", help="Bundle path (default: NAME-DATE-TIME.kvprof)."),
    probe: list[str] = typer.Option(None, "--probe", "-p", help="Probe to turn on (repeatable; default: blocks). Markers are always on."),
    module: str = typer.Option(None, "-m", help="Run a module, as python -m does."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at the output path."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No closing line."),
    pyspy_rate: int = typer.Option(100, "--pyspy-rate", metavar="HZ", help="--probe pyspy: samples per second."),
    pyspy_native: bool = typer.Option(False, "--pyspy-native", help="--probe pyspy: native (C/C++) frames too."),
):
    """Run a command and record its memory behaviour into a trace bundle."""
    import sys

    from kvprof.record import record, summary_line

    command = [c for c in (command or [])]
    if command and command[0] == "--":
        command = command[1:]
    probes = []
    for p in probe or []:
        probes.extend(x.strip() for x in p.split(",") if x.strip())
    if pyspy_rate <= 0:
        from kvprof.errors import UsageError

        raise UsageError("--pyspy-rate must be a positive number of samples per second")
    result = record(command, output=output, probes=probes or None, module=module, force=force,
                    pyspy_options={"rate": pyspy_rate, "native": pyspy_native})
    if not quiet:
        sys.stderr.write(summary_line(result) + "\n")
    raise typer.Exit(result.exit_code)
