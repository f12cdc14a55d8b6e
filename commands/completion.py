"""Shell completion (bash, zsh, fish): `kvprof --install-completion`, `--show-completion`.

typer writes the shell's script and answers the shell's questions; subcommands and
options complete from the commands' declarations.  This module adds what typer cannot
know: probe names for ``--probe`` (comma-separated lists too), the export formats, and
bundle paths for every argument that takes a run (``.kvprof`` bundles, the files kvprof
reads, and directories to descend into).

No ``from __future__ import annotations`` here: typer tells a completion function's
parameters apart by their annotations, which must be real types.
"""

import os

# what the run arguments read besides bundle directories (kvprof.analysis.is_recording, compare.load_run)
RUN_FILE_SUFFIXES = (".pickle", ".pkl", ".bin", ".json")
# parameter metavars that name a run: completed with bundle paths
RUN_METAVARS = ("BUNDLE", "BASE NEW", "RUN")
EXPORT_FORMATS = {
    "perfetto": "Chrome trace-event JSON (ui.perfetto.dev)",
    "parquet": "one Parquet table per stream (docs/parquet.md)",
}


def complete_probe(incomplete: str) -> list[tuple[str, str]]:
    """Probe names; after a comma, the rest of a list (``blocks,g`` -> ``blocks,gc``)."""
    from kvprof import probes

    head, _, last = incomplete.rpartition(",")
    taken = set(head.split(",")) if head else set()
    prefix = head + "," if head else ""
    return [
        (prefix + name, probes.PROBES[name][1])
        for name in probes.known()
        if name.startswith(last) and name not in taken
    ]


def complete_format(incomplete: str) -> list[tuple[str, str]]:
    return [(name, text) for name, text in EXPORT_FORMATS.items() if name.startswith(incomplete)]


def complete_run(incomplete: str) -> list[str]:
    """Bundle directories (``*.kvprof``), the files kvprof reads, and directories to look
    in.  A lone directory is opened, level by level, so the shell (which puts a space after
    a single answer) never ends a path at ``dir/ ``."""
    out = _entries(incomplete)
    while len(out) == 1 and out[0].endswith("/"):
        deeper = _entries(out[0])
        if not deeper:
            break
        out = deeper
    return out


def _entries(incomplete: str) -> list[str]:
    directory, prefix = os.path.split(incomplete)
    try:
        names = sorted(os.listdir(os.path.expanduser(directory) or "."))
    except OSError:
        return []
    out = []
    for name in names:
        if not name.startswith(prefix) or (name.startswith(".") and not prefix.startswith(".")):
            continue
        shown = os.path.join(directory, name)
        full = os.path.expanduser(shown)
        if os.path.isdir(full):
            out.append(shown if name.endswith(".kvprof") else shown + "/")
        elif name.endswith(RUN_FILE_SUFFIXES):
            out.append(shown)
    return out


def attach(run) -> None:
    """Give a command's parameters their completers (where the command set none): runs by
    their metavar, ``--probe`` and ``--format`` by name."""
    import inspect

    for p in inspect.signature(run).parameters.values():
        info = p.default
        if (
            not hasattr(info, "autocompletion")
            or info.autocompletion is not None
            or getattr(info, "shell_complete", None)
        ):
            continue
        if getattr(info, "metavar", None) in RUN_METAVARS:
            info.autocompletion = complete_run
        elif p.name == "probe":
            info.autocompletion = complete_probe
        elif p.name == "format":
            info.autocompletion = complete_format
