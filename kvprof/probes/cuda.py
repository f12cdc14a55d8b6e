"""--probe torch: PyTorch's CUDA caching allocator, from inside each recorded process.

When torch is imported (kvprof never imports it itself), the probe waits for CUDA's first
use in that process (so it never initialises CUDA itself) and then turns on the
allocator's memory history (``torch.cuda.memory._record_memory_history``,
``--torch-max-entries``, ``--torch-stacks``), and writes snapshots
(``torch.cuda.memory._snapshot()``, frames cut to ``--torch-stack-depth``) as pickles
under ``procs/<pid>/torch/``: at exit (SIGTERM included), at the markers named by
``--torch-snapshot-at``, and when the allocator reports an out-of-memory (its OOM
observer).  At every marker it samples ``torch.cuda.memory_stats()`` into meta.jsonl
(``{"type": "torch_stats"}``).  A process that never used CUDA says so once in its
process record, at exit, and records nothing.
"""

from __future__ import annotations

import os
import pickle
import threading

from kvprof import runtime

STATS_KEYS = {
    "allocated": "allocated_bytes.all.current",
    "reserved": "reserved_bytes.all.current",
    "active": "active_bytes.all.current",
    "inactive_split": "inactive_split_bytes.all.current",
    "allocated_peak": "allocated_bytes.all.peak",
    "reserved_peak": "reserved_bytes.all.peak",
    "num_ooms": "num_ooms",
    "num_alloc_retries": "num_alloc_retries",
}
DEFAULTS = {"max_entries": 100_000, "stacks": "python", "depth": 16, "snapshot_at": [], "max_snapshots": 20}

_state: dict = {"torch": None, "enabled": False, "dumps": 0, "mark_dumps": 0, "lock": threading.Lock(), "names": set()}


def _options() -> dict:
    opts = dict(DEFAULTS)
    opts.update(runtime.options.get("torch") or {})
    return opts


def start(writer) -> None:
    from kvprof.probes import importhook

    runtime.probe_note("torch", status="waiting for torch to be imported")
    importhook.when_imported("torch", _on_torch)


def after_fork(writer) -> None:
    # the child inherits the allocator's history setting (and, if CUDA was initialised in
    # the parent, cannot use CUDA at all); only the dump counter is its own
    _state["dumps"] = _state["mark_dumps"] = 0


def _on_torch(torch) -> None:
    # Nothing here may initialise CUDA (not even torch.cuda.is_available(), which can): a
    # process that forks after importing torch would lose CUDA in its children.  The
    # history is turned on when CUDA is first used, through torch.cuda._lazy_call, whose
    # callables run right after torch.cuda._lazy_init's _cuda_init() and before the
    # allocation that triggered it.
    _state["torch"] = torch
    _state["names"] = set(_options()["snapshot_at"])
    runtime.on_exit(_at_exit)
    version = str(getattr(torch, "__version__", "?"))
    lazy = getattr(getattr(torch, "cuda", None), "_lazy_call", None)
    if lazy is None:  # a torch without the hook: turn it on now if there is a device
        try:
            if torch.cuda.is_available():
                _enable()
        except Exception as exc:  # noqa: BLE001
            runtime.probe_note("torch", status="failed", reason=f"cannot turn on the memory history: {exc!r}")
        return
    lazy(_enable)
    runtime.probe_note("torch", status="waiting for CUDA to be first used", torch_version=version)


def _enable() -> None:
    torch = _state["torch"]
    if torch is None or _state.get("enabled"):
        return
    opts = _options()
    memory = torch.cuda.memory
    stacks = opts["stacks"]
    try:
        memory._record_memory_history(
            enabled="all",
            context=None if stacks == "none" else "all",
            stacks="all" if stacks == "all" else "python",
            max_entries=int(opts["max_entries"]),
        )
    except TypeError:  # torch before 2.1: the older keyword API
        memory._record_memory_history(
            True, trace_alloc_max_entries=int(opts["max_entries"]), trace_alloc_record_context=stacks != "none"
        )
    _state["enabled"] = True
    observer = "attached"
    try:
        torch._C._cuda_attach_out_of_memory_observer(_on_oom)
    except Exception as exc:  # noqa: BLE001 - snapshots at exit and markers still work
        observer = f"unavailable: {exc!r}"
    runtime.on_mark(_on_mark)
    runtime.probe_note(
        "torch",
        status="attached",
        torch_version=str(getattr(torch, "__version__", "?")),
        max_entries=int(opts["max_entries"]),
        stacks=stacks,
        depth=int(opts["depth"]),
        snapshot_at=sorted(_state["names"]),
        oom_observer=observer,
    )


def _trim(snapshot: dict, depth: int) -> dict:
    """Cut every frame list to ``depth`` frames (innermost first, as PyTorch records them)."""
    for seg in snapshot.get("segments") or []:
        for b in seg.get("blocks") or []:
            if "frames" in b:
                b["frames"] = b["frames"][:depth]
            for h in b.get("history") or []:
                if "frames" in h:
                    h["frames"] = h["frames"][:depth]
    for trace in snapshot.get("device_traces") or []:
        for e in trace:
            if "frames" in e:
                e["frames"] = e["frames"][:depth]
    return snapshot


def dump(reason: str, mark: str | None = None) -> str | None:
    """Write a snapshot now; returns its path in the bundle, or None."""
    torch, w = _state["torch"], runtime.writer
    if torch is None or w is None:
        return None
    opts = _options()
    with _state["lock"]:
        if reason == "mark":  # --torch-max-snapshots caps marker snapshots; exit and OOM ones always
            if _state.get("mark_dumps", 0) >= int(opts["max_snapshots"]):
                return None
            _state["mark_dumps"] = _state.get("mark_dumps", 0) + 1
        _state["dumps"] += 1
        n = _state["dumps"]
    t = runtime.now()
    snap = _trim(torch.cuda.memory._snapshot(), int(opts["depth"]))
    d = os.path.join(w.dir, "torch")
    os.makedirs(d, exist_ok=True)
    name = f"{n:03d}-{reason}.pickle"
    tmp = os.path.join(d, "." + name)
    with open(tmp, "wb") as fh:
        pickle.dump(snap, fh, protocol=4)
    os.replace(tmp, os.path.join(d, name))  # whole or absent: a crash never leaves half a snapshot
    w.meta({"type": "torch_snapshot", "t": t, "reason": reason, "mark": mark, "file": f"torch/{name}"})
    return name


def _stats(torch) -> dict | None:
    if not torch.cuda.is_initialized():  # sampling must not be what starts CUDA
        return None
    out = {}
    for dev in range(torch.cuda.device_count()):
        s = torch.cuda.memory_stats(dev)
        out[str(dev)] = {k: int(s.get(v, 0)) for k, v in STATS_KEYS.items()}
    return out


def _on_mark(sid: int, value: int, t: int) -> None:
    torch, w = _state["torch"], runtime.writer
    if torch is None or w is None:
        return
    stats = _stats(torch)
    if stats is not None:
        w.meta({"type": "torch_stats", "t": t, "mark": sid, "devices": stats})
    for name in _state["names"]:
        if w.intern(name) == sid:
            dump("mark", name)


def _on_oom(device, alloc, device_allocated, device_free) -> None:
    w = runtime.writer
    if w is not None:
        w.meta(
            {
                "type": "torch_oom",
                "t": runtime.now(),
                "device": int(device),
                "requested": int(alloc),
                "device_allocated": int(device_allocated),
                "device_free": int(device_free),
            }
        )
    dump("oom")


def _at_exit() -> None:
    torch = _state["torch"]
    if torch is None:
        return
    if not _state.get("enabled"):  # at exit, asking costs nothing any more
        try:
            reason = (
                "CUDA was never used by this process"
                if torch.cuda.is_available()
                else "torch.cuda.is_available() is False"
            )
        except Exception as exc:  # noqa: BLE001
            reason = f"torch.cuda.is_available() failed: {exc!r}"
        runtime.probe_note(
            "torch",
            status="no CUDA",
            reason=f"{reason}: nothing recorded",
            torch_version=str(getattr(torch, "__version__", "?")),
        )
        return
    w = runtime.writer
    stats = _stats(torch)
    if stats is not None and w is not None:
        w.meta({"type": "torch_stats", "t": runtime.now(), "mark": -1, "devices": stats})
    dump("exit")
