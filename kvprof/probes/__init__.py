"""Probes: what `kvprof record --probe NAME` turns on inside each recorded process.

Each probe has a ``start(writer)`` run once per process (and again in forked
children) that must be cheap, import nothing heavy, and never raise: a probe
that cannot attach records why in process.json and steps aside.
"""

from __future__ import annotations

from kvprof import runtime

DEFAULT_PROBES = ("blocks",)
# Engine adapters of the blocks probe: modules with MODULES (names whose import
# triggers the adapter) and install(module) (patches by feature detection).
ENGINE_ADAPTERS = ["kvprof.probes.vllm", "kvprof.probes.nanovllm", "kvprof.probes.sglang"]


def _start_blocks(writer) -> None:
    import importlib

    from kvprof.probes import importhook

    runtime.probe_note("blocks", status="waiting for an engine or a kvprof.blocks.Pool", engines={})
    for adapter in ENGINE_ADAPTERS:
        try:
            mod = importlib.import_module(adapter)
        except Exception as exc:
            runtime.probe_note("blocks", **{f"adapter_error:{adapter}": repr(exc)})
            continue
        for name in mod.MODULES:
            importhook.when_imported(name, mod.install)


def _start_markers(writer) -> None:
    runtime.probe_note("markers", status="attached")


_gc_state = {"installed": False, "start": 0}


def _gc_callback(phase, info, _now=runtime.now) -> None:
    # Runs inside every collection: two clock reads and one record written, nothing that
    # allocates much (an allocation here could start a collection of its own).
    if phase == "start":
        _gc_state["start"] = _now()
        return
    w = runtime.writer
    t0 = _gc_state["start"]
    if w is None or not t0:
        return
    w.gc_pause(t0, _now() - t0, info.get("generation", 0), info.get("collected", 0), info.get("uncollectable", 0))


def _start_pyspy(writer) -> None:
    # py-spy samples from outside (kvprof record starts the target under it): nothing to do here
    runtime.probe_note("pyspy", status="sampled from outside by py-spy")


def _start_gc(writer) -> None:
    import gc

    if not _gc_state["installed"]:
        gc.callbacks.append(_gc_callback)
        _gc_state["installed"] = True
    runtime.probe_note(
        "gc",
        status="attached",
        thresholds=list(gc.get_threshold()),
        enabled=gc.isenabled(),
        frozen=gc.get_freeze_count() if hasattr(gc, "get_freeze_count") else None,
    )
    if hasattr(gc, "get_freeze_count"):  # the program may gc.freeze() later: what it had frozen at the end
        runtime.on_exit(
            lambda: runtime.probe_note(
                "gc", frozen_at_exit=gc.get_freeze_count(), thresholds_at_exit=list(gc.get_threshold())
            )
        )


def _start_tracemalloc(writer) -> None:
    from kvprof.probes import heap

    heap.start_tracemalloc(writer)


def _start_memray(writer) -> None:
    from kvprof.probes import heap

    heap.start_memray(writer)


def _start_torch(writer) -> None:
    from kvprof.probes import cuda

    cuda.start(writer)


def _start_nvml(writer) -> None:
    # sampled from outside by the recorder (kvprof record): nothing to do in the target
    pass


PROBES = {
    "blocks": (
        _start_blocks,
        "KV block-pool events: vLLM v1, nano-vllm, SGLang, and pools declared through kvprof.blocks",
    ),
    "markers": (_start_markers, "kvprof.mark() calls (always on)"),
    "pyspy": (
        _start_pyspy,
        "CPU samples of every recorded process by py-spy, run by the recorder (speedscope JSON in pyspy/)",
    ),
    "gc": (
        _start_gc,
        "Garbage-collector pauses: generation, start, duration, collected and uncollectable objects (gc.callbacks)",
    ),
    "tracemalloc": (
        _start_tracemalloc,
        "Python heap by call site: tracemalloc snapshots at markers, on a timer and at exit",
    ),
    "memray": (
        _start_memray,
        "Every allocation (Python and native) with its stack: memray's tracker, its capture file kept",
    ),
    "torch": (
        _start_torch,
        "PyTorch's CUDA caching allocator: memory history, snapshots at exit, markers and OOMs, memory_stats at markers",
    ),
    "nvml": (_start_nvml, "GPU memory per device and per process from NVML, sampled by the recorder"),
}

# Probes with per-child work after fork, as "module:function" called with the new writer.
AFTER_FORK = {
    "torch": "kvprof.probes.cuda:after_fork",
    "tracemalloc": "kvprof.probes.heap:after_fork_tracemalloc",
    "memray": "kvprof.probes.heap:after_fork_memray",
}


def known() -> list[str]:
    return list(PROBES)


# Probes that must start before others: memray first, so tracemalloc does not trace
# memray's own start-up, and both before the engine adapters import anything.
START_ORDER = {"memray": 0, "tracemalloc": 1}


def start_all(names, writer) -> None:
    for name in sorted(names, key=lambda n: START_ORDER.get(n, 2)):
        entry = PROBES.get(name)
        if entry is None:
            runtime.probe_note(name, status="unavailable", reason="unknown probe")
            continue
        try:
            entry[0](writer)
        except Exception as exc:
            runtime.probe_note(name, status="failed", reason=repr(exc))


def after_fork(names, writer) -> None:
    # Patches made in the parent survive fork; only the bookkeeping is new.
    import importlib

    for name in names:
        runtime.probe_note(name, status="inherited from parent (fork)")
        spec = AFTER_FORK.get(name)
        if spec:
            mod, _, fn = spec.partition(":")
            try:
                getattr(importlib.import_module(mod), fn)(writer)
            except Exception as exc:
                runtime.probe_note(name, status="failed after fork", reason=repr(exc))


def engine_note(engine: str, **fields) -> None:
    """Record which hooks of an engine attached, for the manifest."""
    w = runtime.writer
    if w is None:
        return
    entry = w.info["probes"].setdefault("blocks", {})
    entry["status"] = "attached"
    entry.setdefault("engines", {})[engine] = fields
    w.write_process_info()
