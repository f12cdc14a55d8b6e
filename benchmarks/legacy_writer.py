"""kvprof's format-1 writer, kept for benchmarks/bench_writer.py only (the comparison the
nothing-lost issue asked for).  Unchanged below this paragraph.

In-process writer: one per recorded process, many streams, no locks on the hot path.

Invariant: every event handed to `emit_*` reaches disk within about
FLUSH_INTERVAL_S seconds or MAX_PENDING events, whichever comes first, and
every chunk is appended with a single ``os.write`` of whole records.  Side
records (interned strings, pools) are flushed before the binary records that
refer to them, and block ids before the events that own them, so a crash at
any point leaves a prefix the reader can use.

Hot path: callers append tuples to a ``collections.deque`` (atomic under the
GIL); a daemon thread drains it.  Nothing here may raise into the target: a
failing write disables the writer and records why in process.json.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import threading
import time
from itertools import chain, repeat, starmap
from operator import itemgetter

import numpy as np

from kvprof.signals import HELD_SIGNALS, rescue_missed_sigterm
from kvprof.trace import format as fmt
from kvprof.trace.atomic import write_text

FLUSH_INTERVAL_S = 0.5
MAX_PENDING = 65536

# Lazy block events: engine probes whose hot calls carry block *objects* append
# ``(t, kind, owner, req, objects)`` to ``ProcessWriter.lazy`` and register, for the
# owner's type, a resolver that turns a batch of such tuples into columns at flush
# time.  Reading ids block by block on the target's hot path costs more than doing
# it once per chunk, vectorised.  A resolver is called as ``resolver(writer, items)``
# and returns ``(rows, ids)``: a BLOCK_EVENT_DTYPE array and the matching BLOCK_ID_DTYPE
# array (``rows["n"]`` ids per row, in row order).
#
# Lazy tuples hold references to live, garbage-collector-tracked objects, so they
# must not pile up: once LAZY_BATCH are queued the appending thread resolves them
# (``resolve_lazy``) into plain arrays, before they survive into the collector's
# older generations and make its full collections frequent and slow.
LAZY_RESOLVERS: dict[type, object] = {}
LAZY_BATCH = 2048


def block_process_signals() -> None:
    """In a kvprof thread: leave process-directed signals to the main thread.  A SIGTERM
    delivered to a helper thread would not interrupt the main thread's blocking call, so
    the target's handler (and kvprof's flush-and-die) would run late or never."""
    if hasattr(signal, "pthread_sigmask"):
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        except (OSError, ValueError):
            pass


def _same_file(fd: int, ident) -> bool:
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return ident is not None and (st.st_dev, st.st_ino) == ident


class ProcessWriter:
    """Writes the streams of one process into ``<bundle>/procs/<pid>-<start_ns>/``."""

    def __init__(self, bundle: str, role: str, probes: list[str]):
        self.pid = os.getpid()
        self.start_ns = time.monotonic_ns()
        self.dir = os.path.join(bundle, fmt.PROCS_DIR, f"{self.pid}-{self.start_ns}")
        os.makedirs(self.dir, exist_ok=True)
        self.info = {
            "pid": self.pid,
            "ppid": os.getppid(),
            "role": role,
            "argv": list(sys.argv) if hasattr(sys, "argv") else [],
            "executable": sys.executable,
            "start_ns": self.start_ns,
            "start_time": time.time(),
            "end_ns": None,
            "probes": {name: {"status": "requested"} for name in probes},
            "errors": [],
        }
        self._strings: dict[str, int] = {}
        self.blocks: collections.deque = collections.deque()
        self.lazy: collections.deque = collections.deque()
        self._resolved: collections.deque = collections.deque()  # (rows, ids) chunks not yet written
        self.marks: collections.deque = collections.deque()
        self.gc: collections.deque = collections.deque()  # (t, duration, generation, collected, uncollectable)
        self.heap: collections.deque = collections.deque()  # (HEAP_SNAP tuple, HEAP_SITE array)
        self._meta: collections.deque = collections.deque()
        self._flush_lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._ids: dict[str, tuple] = {}  # (st_dev, st_ino) of each open stream file
        self.counts = {"blocks": 0, "block_ids": 0, "marks": 0, "gc": 0, "heap_snaps": 0, "heap_sites": 0}
        self.closed = False
        self.closing = False  # the exit hook runs (probes' exit work, then close)
        self.finished = False  # close() has written everything
        self.exit_signal = None  # set by a signal handler that interrupted close()
        self.failed = False
        self._stop = threading.Event()
        self._info_lock = threading.RLock()
        self.write_process_info()
        self._thread = threading.Thread(target=self._run, name="kvprof-writer", daemon=True)
        self._thread.start()

    # -- interning and side records ------------------------------------------------
    def intern(self, s) -> int:
        """Map a string (request id, marker name) to a small per-process integer."""
        key = s if type(s) is str else str(s)
        sid = self._strings.get(key)
        if sid is None:
            sid = len(self._strings)
            self._strings[key] = sid
            self._meta.append({"type": "string", "id": sid, "s": key})
        return sid

    def meta(self, record: dict) -> None:
        self._meta.append(record)

    def probe_status(self, name: str, **fields) -> None:
        entry = self.info["probes"].setdefault(name, {})
        entry.update(fields)
        self.write_process_info()

    def error(self, message: str) -> None:
        self.info["errors"].append(message)
        self.write_process_info()

    def write_process_info(self) -> None:
        # Serialised by json's C encoder (no indent), in one call: no bytecode runs in it,
        # so neither a signal handler in this thread nor another thread can change the
        # dict half way through (a SIGTERM handler adding a key during the pure-Python
        # indenting encoder used to fail the final write, and end_ns was lost).  The
        # RLock keeps two threads' renames in order; a handler in this thread re-enters.
        with self._info_lock:
            try:
                text = json.dumps(self.info, default=str)
                write_text(os.path.join(self.dir, fmt.PROCESS_JSON), text, sync=True)
            except Exception as exc:  # never raise into the target
                self.failed = isinstance(exc, OSError) or self.failed

    # -- flushing ------------------------------------------------------------------
    def _run(self) -> None:
        block_process_signals()
        ticks = 0
        while not self._stop.wait(FLUSH_INTERVAL_S / 5):
            rescue_missed_sigterm()
            ticks += 1
            if ticks % 5 == 0:
                self.flush()

    def pending(self) -> int:
        return len(self.blocks) + len(self.lazy) + len(self.marks) + len(self.gc) + len(self.heap)

    def _append(self, name: str, data: bytes) -> None:
        fd = self._fds.get(name)
        if fd is not None and not _same_file(fd, self._ids.get(name)):
            # the program closed kvprof's descriptor (a daemon's closerange) and the number
            # may now be one of its own files: never write there, open ours again
            self._fds.pop(name, None)
            fd = None
        if fd is None:
            fd = os.open(os.path.join(self.dir, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._fds[name] = fd
            st = os.fstat(fd)
            self._ids[name] = (st.st_dev, st.st_ino)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    @staticmethod
    def _drain(dq: collections.deque) -> list:
        # popleft is atomic; another thread may be draining the same deque (lazy
        # batches), so stop quietly when it runs dry
        out: list = []
        try:
            out.extend(starmap(dq.popleft, repeat((), len(dq))))
        except IndexError:  # extend keeps what it took before the deque ran dry
            pass
        return out

    def resolve_lazy(self) -> None:
        """Turn the queued lazy events into arrays (called by the appending thread at
        LAZY_BATCH and by flush); strings they intern are queued before they return."""
        # No lock: the target's thread must never wait on the flush thread's disk
        # writes.  Concurrent callers drain disjoint events; the reader orders by time.
        items = self._drain(self.lazy)
        if items:
            self._resolved.extend(self._resolve_lazy(items))

    def _resolve_lazy(self, items: list) -> list:
        """Columns of the lazy events, one (rows, ids) pair per owner type."""
        owners = set(map(type, map(itemgetter(2), items)))
        if len(owners) == 1:
            groups = {owners.pop(): items}
        else:
            groups = {}
            for item in items:
                groups.setdefault(type(item[2]), []).append(item)
        out = []
        for owner, group in groups.items():
            resolver = next((LAZY_RESOLVERS[c] for c in owner.__mro__ if c in LAZY_RESOLVERS), None)
            try:
                if resolver is None:
                    raise LookupError(f"no resolver registered for {owner.__name__}")
                out.append(resolver(self, group))
            except Exception as exc:  # lose this batch, not the writer
                self.info["errors"].append(f"{len(group)} block events of {owner.__name__} dropped: {exc!r}")
        return out

    def flush(self) -> None:
        if self.failed:
            return
        with self._flush_lock:
            try:
                self._flush_locked()
            except Exception as exc:  # never raise into the target
                self.failed = True
                self.info["errors"].append(f"writer failed: {exc!r}")
                self.write_process_info()

    def _flush_locked(self) -> None:
        # Order matters for crash safety: drain events first (so every string they
        # reference has already been queued), write side records, then ids, then events.
        blocks = self._drain(self.blocks)
        marks = self._drain(self.marks)
        gcs = self._drain(self.gc)
        heap = self._drain(self.heap)
        # resolving may intern strings and declare pools: before the side records
        self.resolve_lazy()
        columns = self._drain(self._resolved)
        meta = self._drain(self._meta)
        if meta:
            self._append(fmt.META_JSONL, "".join(json.dumps(m) + "\n" for m in meta).encode())
        if blocks:
            # columns straight from the tuples (t, kind, pool, req, arg, arg2, ids):
            # zip transposes them at C speed, np.array converts each column
            count = len(blocks)
            rows = np.empty(count, dtype=fmt.BLOCK_EVENT_DTYPE)
            cols = list(zip(*blocks))
            for i, name in enumerate(("t", "kind", "pool", "req", "arg", "arg2")):
                rows[name] = self._int64(cols[i], name)
            id_lists = cols[6]
            rows["n"] = np.array(list(map(len, id_lists)), dtype=np.int64)
            nids = int(rows["n"].sum())
            if nids:
                ids = np.array(list(chain.from_iterable(id_lists)), dtype=fmt.BLOCK_ID_DTYPE)
                self._append("block_ids.bin", ids.tobytes())
                self.counts["block_ids"] += nids
            self._append("blocks.bin", rows.tobytes())
            self.counts["blocks"] += count
        if columns:
            # one write per file for all resolved chunks
            ids = [c[1] for c in columns if len(c[1])]
            rows = [c[0] for c in columns if len(c[0])]
            if ids:
                data = np.concatenate(ids).astype(fmt.BLOCK_ID_DTYPE, copy=False)
                self._append("block_ids.bin", data.tobytes())
                self.counts["block_ids"] += len(data)
            if rows:
                data = np.concatenate(rows)
                self._append("blocks.bin", data.tobytes())
                self.counts["blocks"] += len(data)
        if marks:
            self._append("marks.bin", np.array(marks, dtype=fmt.MARK_DTYPE).tobytes())  # values clamped by runtime.mark
            self.counts["marks"] += len(marks)
        if gcs:
            self._append("gc.bin", np.array(gcs, dtype=fmt.GC_DTYPE).tobytes())
            self.counts["gc"] += len(gcs)
        if heap:
            # sites before the snapshots that own them: a crash between the two writes
            # leaves sites whose snapshot is missing, which the reader ignores
            sites = [h[1] for h in heap if len(h[1])]
            if sites:
                data = np.concatenate(sites)
                self._append("heap_sites.bin", data.tobytes())
                self.counts["heap_sites"] += len(data)
            self._append("heap_snaps.bin", np.array([h[0] for h in heap], dtype=fmt.HEAP_SNAP_DTYPE).tobytes())
            self.counts["heap_snaps"] += len(heap)

    def _int64(self, values, what: str) -> np.ndarray:
        """A column as int64; a value out of range (a pool API argument of 2**63) is clamped
        and said once, instead of failing the flush and with it the rest of the recording."""
        try:
            return np.array(values, dtype=np.int64)
        except (OverflowError, ValueError, TypeError):
            lo, hi = -(1 << 63), (1 << 63) - 1

            def fit(v):
                try:
                    return min(max(int(v), lo), hi)
                except (TypeError, ValueError, OverflowError):
                    return 0

            message = f"{what} values outside 64-bit integers were clamped"
            if message not in self.info["errors"]:
                self.info["errors"].append(message)
            return np.array([fit(v) for v in values], dtype=np.int64)

    def close(self, exit_status: dict | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.finished = False
        self._stop.set()
        self.flush()
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self.info["end_ns"] = time.monotonic_ns()
        self.info["end_time"] = time.time()
        self.info["counts"] = dict(self.counts)
        if exit_status:
            self.info.update(exit_status)
        self.write_process_info()
        self.finished = True
        sig = self.exit_signal
        if sig is not None:  # a signal arrived while this close ran: die of it now
            self.info["terminated_by_signal"] = sig
            self.write_process_info()
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)

    def abandon(self) -> None:
        """In a forked child: drop the parent's buffers and file handles without writing."""
        self.closed = True
        self._stop.set()
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
