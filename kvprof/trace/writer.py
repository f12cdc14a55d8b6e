"""In-process writer: one per recorded process, many streams, no locks on the hot path.

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
import sys
import threading
import time
from itertools import chain
from operator import itemgetter

import numpy as np

from kvprof.trace import format as fmt
from kvprof.trace.atomic import write_json_atomic

FLUSH_INTERVAL_S = 0.5
MAX_PENDING = 65536


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
        self.marks: collections.deque = collections.deque()
        self._meta: collections.deque = collections.deque()
        self._flush_lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self.counts = {"blocks": 0, "block_ids": 0, "marks": 0}
        self.closed = False
        self.failed = False
        self._stop = threading.Event()
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
        try:
            write_json_atomic(os.path.join(self.dir, fmt.PROCESS_JSON), self.info)
        except OSError:
            self.failed = True

    # -- flushing ------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL_S):
            self.flush()

    def pending(self) -> int:
        return len(self.blocks) + len(self.marks)

    def _append(self, name: str, data: bytes) -> None:
        fd = self._fds.get(name)
        if fd is None:
            fd = os.open(os.path.join(self.dir, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._fds[name] = fd
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    @staticmethod
    def _drain(dq: collections.deque) -> list:
        out = []
        pop = dq.popleft
        try:
            for _ in range(len(dq)):
                out.append(pop())
        except IndexError:
            pass
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
        meta = self._drain(self._meta)
        if meta:
            self._append(fmt.META_JSONL, "".join(json.dumps(m) + "\n" for m in meta).encode())
        if blocks:
            # columns straight from the tuples (t, kind, pool, req, arg, arg2, ids)
            count = len(blocks)
            rows = np.empty(count, dtype=fmt.BLOCK_EVENT_DTYPE)
            for i, name in enumerate(("t", "kind", "pool", "req", "arg", "arg2")):
                rows[name] = np.fromiter(map(itemgetter(i), blocks), dtype=np.int64, count=count)
            id_lists = list(map(itemgetter(6), blocks))
            rows["n"] = np.fromiter(map(len, id_lists), dtype=np.int64, count=count)
            nids = int(rows["n"].sum())
            if nids:
                ids = np.fromiter(chain.from_iterable(id_lists), dtype=fmt.BLOCK_ID_DTYPE, count=nids)
                self._append("block_ids.bin", ids.tobytes())
                self.counts["block_ids"] += nids
            self._append("blocks.bin", rows.tobytes())
            self.counts["blocks"] += count
        if marks:
            self._append("marks.bin", np.array(marks, dtype=fmt.MARK_DTYPE).tobytes())
            self.counts["marks"] += len(marks)

    def close(self, exit_status: dict | None = None) -> None:
        if self.closed:
            return
        self.closed = True
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
