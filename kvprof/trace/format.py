"""Trace bundle format, versions 1 and 2: the one place that says what is on disk.

A bundle is a directory::

    NAME.kvprof/
      manifest.json                 written atomically by `kvprof record`
      procs/<pid>-<start_ns>/       one directory per recorded process
        process.json                pid, ppid, role, argv, probes (atomic rewrite)
        meta.jsonl                  side records: interned strings, pools, probe notes
        STREAM.kvc                  version 2: compressed columnar chunks of one stream
        stage-NNNNNN.kvs            version 2: records not yet compressed (MAP_SHARED)
        blocks.bin, block_ids.bin,  version 1: raw records, one file per stream
        marks.bin, gc.bin, heap_snaps.bin, heap_sites.bin
        memray.bin                  memray's own capture file (--probe memray)
        torch/NNN-REASON.pickle     PyTorch allocator snapshots (--probe torch)
      nvml_gpus.bin, nvml_procs.bin GPU memory sampled by the recorder (--probe nvml)

The record dtypes below are the logical rows of every stream in both versions.
Version 1 stores them raw (``numpy.fromfile(path, dtype)`` opens a file);
version 2 stages each record in a memory-mapped segment the kernel keeps when
the process dies, then compresses full segments into chunks.  See
docs/trace-format.md and kvprof/trace/codec.py.
"""

from __future__ import annotations

from typing import Any

FORMAT_NAME = "kvprof.bundle"
FORMAT_VERSION = 2  # what the writer writes; the reader reads 1 and 2
MANIFEST = "manifest.json"
PROCS_DIR = "procs"
PROCESS_JSON = "process.json"
META_JSONL = "meta.jsonl"

HEAP_REASONS = {0: "start", 1: "mark", 2: "timer", 3: "exit"}
NVML_GPUS = "nvml_gpus.bin"
NVML_PROCS = "nvml_procs.bin"

# The record dtypes are numpy's; they are built on first use (module __getattr__), so a
# recorded process, which writes with struct alone (kvprof/trace/stage.py), never imports numpy.
_DTYPE_NAMES = (
    "BLOCK_EVENT_DTYPE",
    "BLOCK_ID_DTYPE",
    "MARK_DTYPE",
    "GC_DTYPE",
    "HEAP_SNAP_DTYPE",
    "HEAP_SITE_DTYPE",
    "NVML_GPU_DTYPE",
    "NVML_PROC_DTYPE",
    "STREAM_DTYPES",
)


def _build_dtypes() -> dict[str, Any]:
    import numpy as np

    # One record per hook call.  Block ids of the call live in block_ids.bin; the
    # n-th event owns the next `n` ids after those of the events before it.
    BLOCK_EVENT_DTYPE = np.dtype(
        [
            ("t", "<i8"),  # monotonic clock, ns (or the pool's simulated clock)
            ("kind", "u1"),  # EventKind
            ("pool", "<u2"),  # pool index inside the process (meta.jsonl "pool")
            ("req", "<i4"),  # interned request id, -1 when none
            ("arg", "<i8"),  # kind-specific, see EVENT_ARGS
            ("arg2", "<i8"),  # kind-specific, see EVENT_ARGS
            ("n", "<u4"),  # number of block ids in block_ids.bin
        ]
    )
    BLOCK_ID_DTYPE = np.dtype("<i4")

    MARK_DTYPE = np.dtype(
        [
            ("t", "<i8"),  # monotonic clock, ns
            ("name", "<i4"),  # interned marker name
            ("value", "<i8"),  # optional integer payload (kvprof.mark(name, value))
        ]
    )

    GC_DTYPE = np.dtype(
        [
            ("t", "<i8"),  # monotonic clock when the collection started, ns
            ("duration", "<i8"),  # ns from gc.callbacks "start" to "stop"
            ("generation", "u1"),  # the oldest generation collected
            ("collected", "<i8"),  # unreachable objects found
            ("uncollectable", "<i8"),  # objects that could not be freed (gc.garbage)
        ]
    )

    # --probe tracemalloc.  One HEAP_SNAP record per snapshot (at a marker, on the timer,
    # at exit); HEAP_SITE records are deltas: the sites whose live size or count changed
    # since the process's previous snapshot (size 0, count 0 when a site emptied).  A
    # site is a stack of frames declared once in meta.jsonl ({"type": "stack", ...}).
    HEAP_SNAP_DTYPE = np.dtype(
        [
            ("t", "<i8"),  # monotonic clock, ns
            ("seq", "<u4"),  # snapshot number in this process, from 0
            ("reason", "u1"),  # HEAP_REASONS
            ("mark", "<i4"),  # interned marker name that triggered it, -1 otherwise
            ("mark_value", "<i8"),
            ("live", "<i8"),  # traced bytes alive, kvprof's own allocations excluded
            ("blocks", "<i8"),  # traced memory blocks alive, same filter
            ("traced", "<i8"),  # tracemalloc.get_traced_memory() current, unfiltered
            ("peak", "<i8"),  # traced peak since the previous snapshot (reset_peak), unfiltered
            ("overhead", "<i8"),  # tracemalloc's own memory (get_tracemalloc_memory)
            ("rows", "<u4"),  # HEAP_SITE records that follow for this snapshot
            ("cost", "<i8"),  # ns spent taking it (in the thread that took it)
        ]
    )
    HEAP_SITE_DTYPE = np.dtype(
        [
            ("seq", "<u4"),  # the snapshot it belongs to
            ("stack", "<i4"),  # stack id (meta.jsonl)
            ("size", "<i8"),  # live bytes of the site
            ("count", "<i8"),  # live memory blocks of the site
        ]
    )

    # --probe nvml, sampled by the recorder: bundle-level files (not per process).
    NVML_GPU_DTYPE = np.dtype(
        [
            ("t", "<i8"),  # monotonic clock, ns
            ("gpu", "<u2"),  # NVML device index
            ("used", "<i8"),  # bytes used on the device (all processes)
            ("total", "<i8"),  # device memory, bytes
        ]
    )
    NVML_PROC_DTYPE = np.dtype(
        [
            ("t", "<i8"),
            ("gpu", "<u2"),
            ("pid", "<i8"),  # host pid as NVML reports it (in a container: maybe the host's)
            ("used", "<i8"),  # bytes the process uses on that GPU, -1 when NVML cannot tell
        ]
    )

    STREAM_DTYPES = {
        "blocks.bin": BLOCK_EVENT_DTYPE,
        "block_ids.bin": BLOCK_ID_DTYPE,
        "marks.bin": MARK_DTYPE,
        "gc.bin": GC_DTYPE,
        "heap_snaps.bin": HEAP_SNAP_DTYPE,
        "heap_sites.bin": HEAP_SITE_DTYPE,
    }
    return {name: value for name, value in locals().items() if name in _DTYPE_NAMES}


def __getattr__(name: str) -> Any:
    if name in _DTYPE_NAMES:
        built = _build_dtypes()
        globals().update(built)
        return built[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class EventKind:
    """Block-stream event kinds.  Values are part of the on-disk format."""

    # Block state changes (ids = the blocks concerned).
    ALLOC = 1  # free blocks taken for use (ref 0 -> 1); cached content in them is evicted
    FREE = 2  # ref count of each block drops by one; at 0 the block returns to the free pool
    HIT = 3  # prefix-cache hit: ref count +1 (a free-cached block becomes in-use)
    CACHE = 4  # blocks now hold a hashed, reusable prefix
    EVICT = 5  # blocks lose their cached content without being allocated (reset, evict)
    RESERVE = 6  # blocks set aside (vLLM's null block): never free or used capacity
    # Request events (req set, no ids unless stated).
    REQ_ARRIVE = 10  # arg = prompt tokens, arg2 = max new tokens (-1 unknown)
    REQ_QUERY = 11  # prefix-cache lookup: arg = queried tokens, arg2 = hit tokens
    REQ_STATE = 12  # arg = tokens whose KV is (being) written, arg2 = blocks in its table
    REQ_FINISH = 13  # request done; its table is released
    REQ_PREEMPT = 14  # request preempted (its blocks are freed, it will be recomputed)
    ALLOC_FAIL = 15  # allocation refused: arg = blocks needed (-1 unknown), arg2 = free blocks seen
    REQ_QUERY_PREEMPTED = 16  # prefix-cache lookup of a preempted request coming back: arg = queried, arg2 = hit tokens
    # Engine events.
    STEP = 20  # one engine/scheduler step began; arg = step number


KIND_NAMES = {v: k.lower() for k, v in vars(EventKind).items() if not k.startswith("_")}

EVENT_ARGS = {
    EventKind.ALLOC: ("-", "-"),
    EventKind.FREE: ("-", "-"),
    EventKind.HIT: ("-", "-"),
    EventKind.CACHE: ("-", "-"),
    EventKind.EVICT: ("-", "-"),
    EventKind.RESERVE: ("-", "-"),
    EventKind.REQ_ARRIVE: ("prompt tokens", "max new tokens or -1"),
    EventKind.REQ_QUERY: ("queried tokens", "hit tokens"),
    EventKind.REQ_STATE: ("filled tokens", "blocks held"),
    EventKind.REQ_FINISH: ("-", "-"),
    EventKind.REQ_PREEMPT: ("-", "-"),
    EventKind.ALLOC_FAIL: ("blocks needed or -1", "free blocks seen or -1"),
    EventKind.REQ_QUERY_PREEMPTED: ("queried tokens", "hit tokens"),
    EventKind.STEP: ("step number", "-"),
}

ROLE_MAIN = "main"
ROLE_CHILD = "child"
