"""Heap probes: ``--probe tracemalloc`` and ``--probe memray``, in every recorded process.

tracemalloc: started as early as the startup hook runs, with ``depth`` frames per
trace.  A snapshot groups the live traces by stack and writes, in the columnar
heap streams, only the sites that changed since the process's previous snapshot.
Snapshots are taken at markers (every ``every``-th one, in the thread that called
``kvprof.mark``, so they show the heap at that point of the program), on a timer
(``interval`` seconds, from a daemon thread) and at exit.  kvprof's own
allocations (its modules and tracemalloc's) are left out of the figures.

memray: memray's Tracker, writing memray's own capture file into the process's
directory of the bundle (``memray.bin``), so memray's reporters still open it.
Forked children continue into ``memray.bin.<pid>`` (memray's follow_fork);
spawned children start their own tracker through the startup hook.

Options come from ``kvprof record`` through ``runtime.options``:
``{"tracemalloc": {"depth", "interval", "every"}, "memray": {"native", "python_allocators"}}``.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from kvprof import runtime
from kvprof.owncode import is_own_code

DEFAULT_DEPTH = 16
DEFAULT_INTERVAL_S = 2.0
REASON_START, REASON_MARK, REASON_TIMER, REASON_EXIT = 0, 1, 2, 3
# besides kvprof's own code (kvprof.owncode.OWN_CODE): the profilers; memray's package joins
# when the memray probe runs
_PROFILER_PARTS = ["/tracemalloc.py", "/linecache.py"]


class _TraceState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stacks: dict = {}  # raw traceback tuple -> stack id
        self.skip: set = set()  # stack ids of kvprof's / tracemalloc's own allocations
        self.prev: dict = {}  # stack id -> (size, count) at the previous snapshot
        self.seq = 0
        self.marks_seen = 0
        self.every = 1
        self.interval = DEFAULT_INTERVAL_S
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.cost_ns = 0
        self.active = False
        self.fork_lock: Any = None  # the held lock, across a fork


_state: _TraceState | None = None


def _own(tb: tuple) -> bool:
    """Allocations made inside kvprof's recording code or a profiler, anywhere on the stack."""
    for filename, _ in tb:
        if is_own_code(filename) or any(part in filename for part in _PROFILER_PARTS):
            return True
    return False


def _intern_stack(st: _TraceState, w, tb: tuple) -> int:
    sid = st.stacks.get(tb)
    if sid is None:
        sid = len(st.stacks)
        st.stacks[tb] = sid
        # innermost frame first, as tracemalloc keeps them
        w.meta({"type": "stack", "id": sid, "frames": [[f, int(ln)] for f, ln in tb]})
        if _own(tb):
            st.skip.add(sid)
    return sid


def snapshot(reason: int, mark_id: int = -1, mark_value: int = 0, t: int | None = None) -> None:
    """Group the live traces by stack and queue the changed sites (never raises)."""
    import numpy as np
    import tracemalloc
    from operator import itemgetter

    from kvprof.trace import format as fmt

    st, w = _state, runtime.writer
    if st is None or w is None or not st.active or not tracemalloc.is_tracing():
        return
    with st.lock:
        c0 = time.perf_counter_ns()
        t = runtime.now() if t is None else t
        traced, peak = tracemalloc.get_traced_memory()
        traces = tracemalloc._get_traces()  # type: ignore[attr-defined]  # CPython's, private  # (domain, size, traceback, total_nframe)
        # Aggregation that allocates almost nothing per trace: every allocation made here
        # is itself traced, and tracing one costs microseconds.
        tbs = list(map(itemgetter(2), traces))
        keys = list(dict.fromkeys(tbs))
        index = {tb: i for i, tb in enumerate(keys)}
        idx = np.fromiter(map(index.__getitem__, tbs), np.int64, len(tbs))
        sizes = np.fromiter(map(itemgetter(1), traces), np.int64, len(traces))
        del traces, tbs
        size_by = np.bincount(idx, weights=sizes, minlength=len(keys)).astype(np.int64)
        count_by = np.bincount(idx, minlength=len(keys)).astype(np.int64)
        sids = np.array([_intern_stack(st, w, tb) for tb in keys], dtype=np.int64)
        keep = np.array([s not in st.skip for s in sids.tolist()], dtype=bool) if len(sids) else np.zeros(0, bool)
        sids, size_by, count_by = sids[keep], size_by[keep], count_by[keep]
        now = dict(zip(sids.tolist(), zip(size_by.tolist(), count_by.tolist())))
        prev = st.prev
        changed = [(s, v) for s, v in now.items() if prev.get(s) != v]
        gone = [s for s in prev if s not in now]
        rows = np.zeros(len(changed) + len(gone), dtype=fmt.HEAP_SITE_DTYPE)
        rows["seq"] = st.seq
        if changed:
            rows["stack"][: len(changed)] = [s for s, _ in changed]
            rows["size"][: len(changed)] = [v[0] for _, v in changed]
            rows["count"][: len(changed)] = [v[1] for _, v in changed]
        if gone:
            rows["stack"][len(changed) :] = gone
        st.prev = now
        cost = time.perf_counter_ns() - c0
        st.cost_ns += cost
        w.heap_snapshot(
            (
                t,
                st.seq,
                reason,
                mark_id,
                mark_value,
                int(size_by.sum()),
                int(count_by.sum()),
                traced,
                peak,
                tracemalloc.get_tracemalloc_memory(),
                len(rows),
                cost,
            ),
            rows,
        )
        st.seq += 1
        # the peak restarts from the program's own memory: after this snapshot's work, with
        # its per-trace arrays (megabytes for a big heap) already released
        del idx, sizes, index, keys
        tracemalloc.reset_peak()


def _on_mark(mark_id: int, value: int, t: int) -> None:
    st = _state
    if st is None or not st.active:
        return
    st.marks_seen += 1
    if st.marks_seen % st.every == 0:
        snapshot(REASON_MARK, mark_id, value, t)


def _timer() -> None:
    from kvprof.signals import block_process_signals

    block_process_signals()
    st = _state
    while st is not None and not st.stop.wait(st.interval):
        try:
            snapshot(REASON_TIMER)
        except Exception as exc:  # keep the target alive; say why once
            if runtime.writer is not None:
                runtime.writer.error(f"tracemalloc snapshot failed: {exc!r}")
            return


def _start_timer(st: _TraceState) -> None:
    if st.interval > 0:
        st.stop = threading.Event()
        st.thread = threading.Thread(target=_timer, name="kvprof-heap", daemon=True)
        st.thread.start()


def _at_exit_tracemalloc() -> None:
    st = _state
    if st is None or not st.active:
        return
    st.stop.set()
    snapshot(REASON_EXIT)
    st.active = False
    w = runtime.writer
    if w is not None:
        w.probe_status("tracemalloc", snapshots=st.seq, snapshot_seconds=round(st.cost_ns / 1e9, 6))


def start_tracemalloc(writer) -> None:
    global _state
    import tracemalloc

    import numpy  # noqa: F401  the snapshots need it: imported before tracing starts, so its own memory is not the program's

    opts = runtime.options.get("tracemalloc") or {}
    depth = int(opts.get("depth") or DEFAULT_DEPTH)
    st = _TraceState()
    st.every = max(1, int(opts.get("every") or 1))
    st.interval = float(opts.get("interval", DEFAULT_INTERVAL_S))
    already = tracemalloc.is_tracing()
    if already:
        depth = tracemalloc.get_traceback_limit()
    else:
        tracemalloc.start(depth)
    st.active = True
    _state = st
    if hasattr(os, "register_at_fork"):
        # no snapshot may be half done when the process forks: the timer thread's
        # allocations racing a fork corrupt memray's capture of the parent (memray 1.20)
        os.register_at_fork(before=_fork_before, after_in_parent=_fork_after_parent)
    runtime.on_mark(_on_mark)
    runtime.on_exit(_at_exit_tracemalloc)
    snapshot(REASON_START)
    _start_timer(st)
    runtime.probe_note(
        "tracemalloc",
        status="attached",
        depth=depth,
        interval_s=st.interval,
        every=st.every,
        started_by="the target (PYTHONTRACEMALLOC or -X tracemalloc)" if already else "kvprof",
    )


def _fork_before() -> None:
    st = _state
    if st is not None:
        st.lock.acquire()
        st.fork_lock = st.lock


def _fork_after_parent() -> None:
    st = _state
    lock = getattr(st, "fork_lock", None) if st is not None else None
    if st is not None and lock is not None:
        st.fork_lock = None
        lock.release()


def after_fork_tracemalloc(writer) -> None:
    """In a forked child: traces are inherited, threads and the lock are not."""
    st = _state
    if st is None or not st.active:
        return
    st.lock = threading.Lock()  # the parent's was held across the fork
    st.fork_lock = None
    st.prev, st.stacks, st.skip = {}, {}, set()  # the child's streams start afresh
    st.seq, st.cost_ns, st.marks_seen = 0, 0, 0
    runtime.on_exit(_at_exit_tracemalloc)
    snapshot(REASON_START)
    _start_timer(st)
    runtime.probe_note("tracemalloc", status="attached (inherited from parent through fork)")


# -- memray ------------------------------------------------------------------------
MEMRAY_FILE = "memray.bin"
_memray: dict[str, Any] = {"tracker": None, "path": None, "active": False, "marks": 0}
# Every kvprof.mark while memray tracks the process allocates (and drops) one buffer of
# MARK_BASE + 1 + (n % MARK_SPAN) bytes in _memray_mark, n the marker's ordinal in the
# process: memray's capture then says where each marker fell among the allocations, which
# its records (without timestamps) do not; kvprof.analysis.memray_reader replays the records up to each.
# The size is above pymalloc's 512-byte limit, so the buffer is a malloc memray sees.
MARK_BASE = 4093
MARK_SPAN = 1024


def _memray_mark(n: int) -> None:
    bytearray(MARK_BASE + n % MARK_SPAN)


def _memray_on_mark(name_id, value, t) -> None:
    n = _memray["marks"]
    _memray["marks"] = n + 1
    if _memray.get("active") or _memray.get("followed"):
        _memray_mark(n)


def _memray_exit() -> None:
    tracker = _memray["tracker"]
    if tracker is None or not _memray.get("active"):
        return
    _memray["tracker"] = None
    _memray["active"] = False
    t0 = time.perf_counter()
    tracker.__exit__(None, None, None)
    w = runtime.writer
    if w is not None:
        path = _memray.get("mine") or _memray["path"]
        size = os.path.getsize(path) if path and os.path.exists(path) else None
        w.probe_status("memray", status="complete", bytes_written=size, stop_seconds=round(time.perf_counter() - t0, 6))


def import_memray_first() -> None:
    """Import memray before kvprof registers its own after-fork hook (the startup hook calls
    this before ``runtime.start``).

    Python runs after-fork hooks in a child in the order they were registered, and memray
    registers its own (which moves the inherited tracker onto the child's file,
    ``memray.bin.<pid>``) when it is imported.  It must run before kvprof's, which starts
    the child's writer thread: until memray's has run the tracker is still the parent's,
    whose file memray maps shared, and that thread's first records would land in the
    *parent's* capture over what the parent writes after the fork, leaving it unreadable
    (tests/test_heap.py::test_memrays_fork_hook_runs_before_kvprofs and
    test_children_that_keep_allocating_leave_the_parents_capture_whole).  Never raises:
    without memray, start_memray says why."""
    try:
        import memray  # noqa: F401
    except Exception:
        return
    _memray["imported_first"] = True


def start_memray(writer) -> None:
    imported_first = bool(_memray.get("imported_first"))
    try:
        import memray
    except ImportError:
        runtime.probe_note(
            "memray",
            status="unavailable",
            reason="memray is not installed in this Python (pip install 'kvprof[memray]')",
        )
        return
    if not imported_first:
        # started some other way than by the startup hook: forked children may write into
        # this process's capture before memray moves them onto their own (import_memray_first)
        runtime.probe_note(
            "memray", fork_order="memray's after-fork hook runs after kvprof's: a forked child may corrupt this capture"
        )
    opts = runtime.options.get("memray") or {}
    path = os.path.join(writer.dir, MEMRAY_FILE)
    tracker = memray.Tracker(
        destination=memray.FileDestination(path, overwrite=True, compress_on_exit=True),
        native_traces=bool(opts.get("native")),
        trace_python_allocators=bool(opts.get("python_allocators")),
        follow_fork=True,
    )
    _memray.update(tracker=tracker, path=path, mine=path, marks=0)
    runtime.on_mark(_memray_on_mark)
    _PROFILER_PARTS.append(os.path.dirname(os.path.abspath(memray.__file__)) + os.sep)
    runtime.probe_note(
        "memray",
        status="waiting for __main__",
        file=MEMRAY_FILE,
        native=bool(opts.get("native")),
        python_allocators=bool(opts.get("python_allocators")),
        memray_version=getattr(memray, "__version__", None),
        marker_buffer_bytes=[MARK_BASE + 1, MARK_BASE + MARK_SPAN],
    )
    # Started right away (inside the startup hook) memray records no Python frames for the
    # program; start it as the program's __main__ begins instead, as `memray run` does.
    _when_main_starts(_memray_activate)


def _memray_activate() -> None:
    tracker = _memray["tracker"]
    if tracker is None:
        return
    try:
        tracker.__enter__()
    except Exception as exc:  # another tracker is active (the target runs memray itself)
        _memray["tracker"] = None
        runtime.probe_note("memray", status="unavailable", reason=f"memray could not start: {exc}")
        return
    _memray["active"] = True
    runtime.on_exit(_memray_exit)
    runtime.probe_note("memray", status="attached")


_MAIN_EVENTS = frozenset({"cpython.run_file", "cpython.run_module", "cpython.run_command", "cpython.run_stdin"})


def _when_main_starts(fn) -> None:
    """Call fn once, just before the interpreter runs the program's __main__ (script, -m, -c,
    a spawned multiprocessing child), from a helper thread while the main thread waits.

    memray started from the thread it then tracks (inside the startup hook, or inside an
    audit or profile callback) anchors that thread's stacks at the frame that started it
    and loses the frames around it; started from another thread it reads the main
    thread's real stack (memray 1.20)."""
    import sys

    done: list[str] = []

    def starter(go, ready):
        go.wait()
        try:
            fn()
        finally:
            ready.set()

    def hook(event, args):
        if done or event not in _MAIN_EVENTS:
            return
        done.append(event)
        go, ready = threading.Event(), threading.Event()
        threading.Thread(target=starter, args=(go, ready), name="kvprof-memray-start", daemon=True).start()
        go.set()
        if not ready.wait(30):
            runtime.probe_note("memray", status="failed", reason="memray's tracker did not start within 30 s")

    sys.addaudithook(hook)


def after_fork_memray(writer) -> None:
    """memray follows forks itself (follow_fork): the child's capture is the parent's name + .pid.

    The child must not stop the inherited Tracker object: its exit compresses the file it
    was created for, which is the parent's, still being written.  memray finishes the
    child's own capture itself."""
    if not ((_memray["tracker"] is not None and _memray.get("active")) or _memray.get("followed")):
        return
    # memray names every descendant's capture after the first tracker's file: a grandchild's
    # is memray.bin.<its pid> beside its grandparent's, like a child's
    child = f"{_memray['path']}.{os.getpid()}"
    _memray.update(
        tracker=None, active=False, mine=child, followed=True, marks=0
    )  # the child's marker stream starts empty
    runtime.remove_exit_hook(_memray_exit)
    runtime.probe_note("memray", status="attached (memray follows the fork)", file=os.path.relpath(child, writer.dir))
