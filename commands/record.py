from __future__ import annotations

import typer

COMMAND_SETTINGS = {
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True, "allow_interspersed_args": False},
}


def run(
    command: list[str] = typer.Argument(
        None, metavar="[--] CMD [ARGS]...", help="Command, script.py, or arguments of -m MODULE."
    ),
    output: str = typer.Option(None, "-o", "--output", help="Bundle path (default: NAME-DATE-TIME.kvprof)."),
    probe: list[str] = typer.Option(
        None, "--probe", "-p", help="Probe to turn on (repeatable; default: blocks). Markers are always on."
    ),
    module: str = typer.Option(None, "-m", help="Run a module, as python -m does."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at the output path."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No closing line."),
    pyspy_rate: int = typer.Option(100, "--pyspy-rate", metavar="HZ", help="--probe pyspy: samples per second."),
    pyspy_native: bool = typer.Option(False, "--pyspy-native", help="--probe pyspy: native (C/C++) frames too."),
    tracemalloc_depth: int = typer.Option(
        16, "--tracemalloc-depth", metavar="N", help="--probe tracemalloc: frames kept per allocation."
    ),
    tracemalloc_interval: float = typer.Option(
        2.0,
        "--tracemalloc-interval",
        metavar="S",
        help="--probe tracemalloc: seconds between timer snapshots (0: markers and exit only).",
    ),
    tracemalloc_every: int = typer.Option(
        1, "--tracemalloc-every", metavar="N", help="--probe tracemalloc: snapshot at every N-th marker."
    ),
    memray_native: bool = typer.Option(False, "--memray-native", help="--probe memray: native (C/C++) stacks too."),
    memray_python_allocators: bool = typer.Option(
        False, "--memray-python-allocators", help="--probe memray: pymalloc allocations one by one."
    ),
    torch_max_entries: int = typer.Option(
        100_000, "--torch-max-entries", metavar="N", help="--probe torch: allocator events kept in the history ring."
    ),
    torch_stacks: str = typer.Option(
        "python",
        "--torch-stacks",
        metavar="python|all|none",
        help="--probe torch: stacks recorded per event (all: C++ too).",
    ),
    torch_stack_depth: int = typer.Option(
        16, "--torch-stack-depth", metavar="N", help="--probe torch: frames kept per stack in the snapshots."
    ),
    torch_snapshot_at: list[str] = typer.Option(
        None,
        "--torch-snapshot-at",
        metavar="MARKER",
        help="--probe torch: also snapshot at each such marker (repeatable).",
    ),
    torch_max_snapshots: int = typer.Option(
        20,
        "--torch-max-snapshots",
        metavar="N",
        help="--probe torch: most marker snapshots per process (exit and OOM snapshots always).",
    ),
    nvml_interval: float = typer.Option(
        0.5, "--nvml-interval", metavar="S", help="--probe nvml: seconds between samples."
    ),
    ray_output: str = typer.Option(
        None,
        "--ray-output",
        metavar="DIR",
        help="Ray workers record into DIR, a directory every node reaches (default: the bundle); merge it with kvprof combine.",
    ),
):
    """Run a command and record its memory behaviour into a trace bundle."""
    import sys

    from kvprof.commands._checks import require
    from kvprof.errors import UsageError
    from kvprof.record import record, summary_line

    command = [c for c in (command or [])]
    if command and command[0] == "--":
        command = command[1:]
    elif command and command[0].startswith("-") and not module:
        # an option kvprof does not know, before the command: a typo, not a program to run
        raise UsageError(
            f"no such option: {command[0]} (a command that starts with '-' goes after --; see `kvprof record --help`)"
        )
    probes: list[str] = []
    for p in probe or []:
        probes.extend(x.strip() for x in p.split(",") if x.strip())
    require(pyspy_rate > 0, "--pyspy-rate must be a positive number of samples per second")
    require(1 <= tracemalloc_depth <= 1000, "--tracemalloc-depth must be between 1 and 1000 frames")
    require(not tracemalloc_interval < 0, "--tracemalloc-interval must be 0 (off) or a positive number of seconds")
    require(tracemalloc_every >= 1, "--tracemalloc-every must be 1 or more")
    require(torch_max_entries >= 1, "--torch-max-entries must be 1 or more")
    require(
        torch_stacks in ("python", "all", "none"), f"--torch-stacks must be python, all or none, not {torch_stacks!r}"
    )
    require(1 <= torch_stack_depth <= 1000, "--torch-stack-depth must be between 1 and 1000 frames")
    require(torch_max_snapshots >= 0, "--torch-max-snapshots must be 0 or more")
    require(nvml_interval > 0, "--nvml-interval must be a positive number of seconds")
    options = {}
    if "torch" in probes:
        options["torch"] = {
            "max_entries": torch_max_entries,
            "stacks": torch_stacks,
            "depth": torch_stack_depth,
            "snapshot_at": list(torch_snapshot_at or []),
            "max_snapshots": torch_max_snapshots,
        }
    if "nvml" in probes:
        options["nvml"] = {"interval": nvml_interval}
    if "tracemalloc" in probes:
        options["tracemalloc"] = {
            "depth": tracemalloc_depth,
            "interval": tracemalloc_interval,
            "every": tracemalloc_every,
        }
    if "memray" in probes:
        options["memray"] = {"native": memray_native, "python_allocators": memray_python_allocators}
    result = record(
        command,
        output=output,
        probes=probes or None,
        module=module,
        force=force,
        pyspy_options={"rate": pyspy_rate, "native": pyspy_native},
        probe_options=options or None,
        ray_output=ray_output,
    )
    if not quiet:
        sys.stderr.write(summary_line(result) + "\n")
        ray = result.manifest.get("ray") or {}
        if ray.get("output_processes"):  # Ray workers recorded apart (docs/distributed.md)
            sys.stderr.write(
                f"kvprof: Ray workers: {ray['output_processes']['processes']} process(es) in {ray['output']}; "
                f"merge: kvprof combine OUT.kvprof {result.bundle} {ray['output']}\n"
            )
    return result.exit_code
