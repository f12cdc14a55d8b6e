"""In-process writer: one per recorded process, format version 2 (kvprof/trace/stage.py).

Invariant: a record is on its way to disk the moment the call that made it returns.
Every record is appended by one ``mmap.write`` to a staging segment mapped
MAP_SHARED from a file in the process's directory, so the kernel keeps it whatever
kills the process (any signal, ``os._exit``, a crash in native code).  One C call
per entry, made with the GIL held: threads and signal handlers never interleave
inside an entry, and no lock is taken on the hot path.  Segment space is reserved
with ``posix_fallocate`` before use, so a full disk can refuse a new segment (the
events are then counted as dropped and said in process.json) but never fault a
write into the mapping.

Side records (interned strings, pools, stacks, probe notes) go to meta.jsonl with
one ``write`` each before the call that needed them returns.  A background thread
compresses full segments into the chunk log (``events.kvc``) and removes them;
``close()`` does the same for the last one.  Layouts: kvprof/trace/stage.py.  This
module imports no numpy.  Nothing here raises into the target: a failing write
disables the writer and records why in process.json.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import signal
import struct
import sys
import threading
import time
import zlib
from typing import Any

from kvprof.signals import block_process_signals, rescue_missed_sigterm
from kvprof.trace import format as fmt
from kvprof.trace import hostinfo, stage
from kvprof.trace.atomic import write_text

TICK_S = 0.1  # the writer thread's period (the SIGTERM rescue's too)
FIRST_SEGMENT = 256 << 10  # bytes; each new segment doubles, up to MAX_SEGMENT
MAX_SEGMENT = 4 << 20
NUMPY_FROM = 1 << 20  # segments this big are transposed by numpy (no GIL held while it copies)

I32 = (-(1 << 31), (1 << 31) - 1)
U32 = (0, (1 << 32) - 1)
U16 = (0, (1 << 16) - 1)
I64 = (-(1 << 63), (1 << 63) - 1)
U8 = (0, 255)
_BLOCK_RANGES = (I64, U8, U16, I32, I64, I64)

_PACK_N = stage.PACK_N
TAG_BLOCK = stage.TAG_BLOCK
IDS_INLINE = stage.IDS_INLINE


def _same_file(fd: int, ident: tuple[int, int] | None) -> bool:
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return ident is not None and (st.st_dev, st.st_ino) == ident


def _fit(value: Any, bounds: tuple[int, int]) -> int | None:
    """An integer field clamped to its column's range; None when it is no integer at all."""
    try:
        v = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return min(max(v, bounds[0]), bounds[1])


class Segment:
    """One staging file, mapped MAP_SHARED, its space reserved."""

    __slots__ = ("path", "seq", "size", "mm")

    def __init__(self, directory: str, seq: int, size: int):
        self.path = os.path.join(directory, stage.stage_name(seq))
        self.seq = seq
        self.size = size
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.posix_fallocate(fd, 0, size)
            self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(self.path)
            except OSError:
                pass
            raise
        os.close(fd)


class ProcessWriter:
    """Writes the streams of one process into ``<bundle>/procs/<pid>-<start_ns>/``.

    Producers call :meth:`block`, :meth:`mark`, :meth:`gc_pause` and :meth:`heap_snapshot`
    (or, on the hottest paths, ``writer.write(PACK0(...))`` themselves)."""

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
            "format": stage.PROCESS_FORMAT,
            "probes": {name: {"status": "requested"} for name in probes},
            "errors": [],
            **hostinfo.process_fields(getattr(sys, "argv", None)),  # host, clock offset, Ray node: docs/distributed.md
        }
        self._strings: dict[str, int] = {}
        self._in_meta: set[int] = set()  # string ids declared in meta.jsonl (the rest are staged records)
        self._sids = itertools.count()
        self._meta_lock = threading.RLock()
        self._seg_lock = threading.RLock()
        self._chunk_lock = threading.Lock()
        self._drain_lock = threading.RLock()
        self._draining = False
        self._seqs = itertools.count()
        self._segsize = FIRST_SEGMENT
        self._full: list[Segment] = []  # segments waiting to be compressed
        self._fds: dict[str, int] = {}
        self._ids: dict[str, tuple[int, int]] = {}  # (st_dev, st_ino) of each open file
        self.counts = {"blocks": 0, "marks": 0, "gc": 0, "heap_snaps": 0, "heap_sites": 0}
        self.dropped = 0  # entries that found no space (a full disk) or carried no usable value
        self._notes: set[str] = set()
        self.closed = False
        self.closing = False  # the exit hook runs (probes' exit work, then close)
        self.finished = False  # close() has written everything
        self.exit_signal = None  # set by a signal handler that interrupted close()
        self.failed = False
        self._deferred: list[bytes] = []  # entries written by a signal handler during a rotation
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._info_lock = threading.RLock()
        self.write_process_info()
        self._seg = self._new_segment()
        self.write = self._seg.mm.write if self._seg is not None else self._drop
        self._thread = threading.Thread(target=self._run, name="kvprof-writer", daemon=True)
        self._thread.start()

    # -- side records ----------------------------------------------------------------
    def intern(self, s: Any) -> int:
        """Map a name (a marker's, a probe's) to a small per-process integer, declared in
        meta.jsonl before this returns (the reader needs marker names before it reads any
        stream, to cut windows)."""
        key = s if type(s) is str else str(s)
        sid = self._strings.get(key)
        if sid is None or sid not in self._in_meta:
            with self._meta_lock:
                sid = self._strings.get(key)
                if sid is None:
                    sid = next(self._sids)
                    self._strings[key] = sid
                if sid not in self._in_meta:
                    self._meta_line({"type": "string", "id": sid, "s": key})
                    self._in_meta.add(sid)
        return sid

    def intern_request(self, s: Any) -> int:
        """Map a request id to a small per-process integer; the string goes into the staging
        stream (one record, no system call: a new request per call is the common case).
        Concurrent threads interning one id agree on its number (the dict's setdefault)."""
        key = s if type(s) is str else str(s)
        sid = self._strings.get(key)
        if sid is None:
            new = next(self._sids)
            # the table keeps a copy made here, not the program's string: that string stays the
            # program's to free, and tracemalloc charges the copy to kvprof (own code, left out
            # of the leak suspects; tests/test_writers.py)
            key = key.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")
            sid = self._strings.setdefault(key, new)
            if sid == new:
                data = stage.pack_string(sid, key)
                try:
                    self.write(data)
                except ValueError:
                    self._rotate_and_write(data)
        return sid

    def meta(self, record: dict[str, Any]) -> None:
        with self._meta_lock:
            self._meta_line(record)

    def _meta_line(self, record: dict[str, Any]) -> None:
        if self.failed:
            return
        try:
            line = json.dumps(record, default=str) + "\n"
            self._append(fmt.META_JSONL, line.encode("utf-8", "backslashreplace"))
        except Exception as exc:  # never raise into the target
            self._fail(exc)

    def probe_status(self, name: str, **fields: Any) -> None:
        entry = self.info["probes"].setdefault(name, {})
        entry.update(fields)
        self.write_process_info()

    def error(self, message: str) -> None:
        self.info["errors"].append(message)
        self.write_process_info()

    def note_once(self, message: str) -> None:
        """An error message recorded once per process."""
        if message not in self._notes:
            self._notes.add(message)
            self.info["errors"].append(message)

    def write_process_info(self) -> None:
        # Serialised by json's C encoder (no indent), in one call: no bytecode runs in it,
        # so neither a signal handler in this thread nor another thread can change the
        # dict half way through.  The RLock keeps two threads' renames in order; a
        # handler in this thread re-enters.  (tests/test_record.py::
        # test_a_sigterm_during_the_last_write_of_the_record_still_ends_it;
        # tests/test_gc_probe.py::test_pool_workers_terminated_at_exit_keep_their_events)
        with self._info_lock:
            try:
                text = json.dumps(self.info, default=str)
                write_text(os.path.join(self.dir, fmt.PROCESS_JSON), text, sync=True)
            except Exception as exc:  # never raise into the target
                self.failed = isinstance(exc, OSError) or self.failed

    # -- producers ---------------------------------------------------------------------
    def block(
        self, t: int, kind: int, pool: int, req: int, arg: int, arg2: int, ids: list[int] | tuple[int, ...] = ()
    ) -> None:
        """One block-stream event (``req`` already interned, -1 for none)."""
        try:
            n = len(ids)
            if n <= IDS_INLINE:
                data = _PACK_N[n].pack(t, kind, pool, req, arg, arg2, n, *ids, TAG_BLOCK)
            else:
                data = stage.pack_block(t, kind, pool, req, arg, arg2, ids)
        except (struct.error, TypeError, ValueError, OverflowError):
            clean = self._clean_block(t, kind, pool, req, arg, arg2, ids)
            if clean is None:
                return
            data = clean
        try:
            self.write(data)
        except ValueError:
            self._rotate_and_write(data)

    def _clean_block(self, t: Any, kind: Any, pool: Any, req: Any, arg: Any, arg2: Any, ids: Any) -> bytes | None:
        """An event some value of which does not fit its column: integers are clamped to the
        column's range, arguments that are no integers become 0; an event whose time, kind,
        pool or block ids are no integers is dropped.  Each case is said once in process.json."""
        fields = [_fit(v, b) for v, b in zip((t, kind, pool, req, arg, arg2), _BLOCK_RANGES)]
        try:
            clean_ids = [_fit(b, I32) for b in (ids or ())]
        except TypeError:  # not iterable
            clean_ids = [None]
        if any(v is None for v in fields[:3]) or None in clean_ids:
            self.dropped += 1
            self.note_once("block events whose time, kind, pool or block ids were not integers were dropped")
            return None
        if any(v is None for v in fields[3:]):
            self.note_once("block event arguments that were not integers were recorded as 0")
            fields = [0 if v is None else v for v in fields]
        self.note_once("block event values outside their column's range were clamped")
        return stage.pack_block(*fields, clean_ids)  # type: ignore[arg-type, call-arg]  # Nones ruled out above

    def mark(self, t: int, name_id: int, value: int) -> None:
        try:
            data = stage.MARK_REC.pack(t, name_id, value, stage.TAG_MARK)
        except (struct.error, TypeError, ValueError, OverflowError):
            v = _fit(value, I64)
            self.note_once("marker values outside 64-bit integers were clamped")
            data = stage.MARK_REC.pack(_fit(t, I64) or 0, name_id, 0 if v is None else v, stage.TAG_MARK)
        try:
            self.write(data)
        except ValueError:
            self._rotate_and_write(data)

    def gc_pause(self, t: int, duration: int, generation: int, collected: int, uncollectable: int) -> None:
        try:
            data = stage.GC_REC.pack(t, duration, generation, collected, uncollectable, stage.TAG_GC)
        except (struct.error, TypeError, ValueError, OverflowError):
            return
        try:
            self.write(data)
        except ValueError:
            self._rotate_and_write(data)

    def heap_snapshot(self, snap: tuple[int, ...], sites: Any) -> None:
        """A tracemalloc snapshot record (HEAP_SNAP_DTYPE fields) and its site rows: the
        sites first, as one chunk of their own, so a snapshot never lacks its sites."""
        if sites is not None and len(sites):
            try:
                self._write_chunk(stage.encode_chunk(stage.PAYLOAD_HEAP_SITES, sites.tobytes()))
                self.counts["heap_sites"] += len(sites)
            except Exception as exc:
                self._fail(exc)
                return
        try:
            data = stage.HEAP_REC.pack(*snap[:6], stage.TAG_HEAP_A, *snap[6:], stage.TAG_HEAP_B)
        except (struct.error, TypeError, ValueError, OverflowError):
            self.note_once("a heap snapshot with values outside its columns was dropped")
            return
        try:
            self.write(data)
        except ValueError:
            self._rotate_and_write(data)

    def _drop(self, data: bytes) -> None:
        self.dropped += 1

    # -- segments ---------------------------------------------------------------------
    def _new_segment(self) -> Segment | None:
        size = self._segsize
        try:
            seg = Segment(self.dir, next(self._seqs), size)
        except OSError as exc:
            self.note_once(f"the disk is full ({exc.strerror or exc}): the events after this were dropped")
            self.write_process_info()
            return None
        self._segsize = min(size * 2, MAX_SEGMENT)
        return seg

    def _rotate_and_write(self, data: bytes) -> None:
        """The active segment is full (or gone): map the next one and write there."""
        if self.closed:
            self.dropped += 1
            return
        if self._seg_lock._is_owned():  # type: ignore[attr-defined]  # CPython's RLock (private)  # a signal handler interrupted this thread's rotation
            self._deferred.append(data)
            return
        with self._seg_lock:
            old = self._seg
            try:  # another thread may have rotated already
                if old is not None and self.write.__self__ is not old.mm:  # type: ignore[union-attr]  # a bound method
                    self.write(data)
                    return
            except (ValueError, AttributeError):
                pass
            seg = self._new_segment() if len(data) <= MAX_SEGMENT else None
            if seg is None:
                self.dropped += 1
                self.write = self._drop
                return
            self._seg = seg
            self.write = seg.mm.write
            if old is not None:
                self._full.append(old)
                self._wake.set()
            pending, self._deferred = self._deferred, []
            for entry in [data] + pending:
                try:
                    seg.mm.write(entry)
                except ValueError:
                    self.dropped += 1

    # -- chunks ---------------------------------------------------------------------------
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

    def _write_chunk(self, data: bytes) -> None:
        with self._chunk_lock:
            self._append(stage.CHUNKS, data)

    def _compress(self, seg: Segment) -> None:
        """One chunk of a segment's records, then the segment goes.  The byte planes of a big
        segment are made by numpy, which lets go of the GIL while it copies (and zlib while it
        compresses), so the target's threads are not held up; numpy is imported here, in this
        thread, the first time a segment of a megabyte or more is full (a process that records
        little never imports it).  Small segments: plain bytes slicing."""
        count = stage.written_records(seg.mm)
        if count:
            size = count * stage.RECORD
            if size >= NUMPY_FROM:
                import numpy as np

                planes = np.frombuffer(seg.mm, dtype=np.uint8, count=size).reshape(count, stage.RECORD).T.copy()
                tags = planes[stage.RECORD - 1].tobytes()
                body = zlib.compress(planes, 1)
                del planes
            else:
                raw = seg.mm[:size]
                tags = raw[stage.RECORD - 1 :: stage.RECORD]
                body = zlib.compress(stage.shuffle(raw, stage.RECORD), 1)
                del raw
            self._write_chunk(stage.chunk_from_body(stage.PAYLOAD_RECORDS, body, count, size, (seg.seq, count), tags))
            self.counts["blocks"] += tags.count(TAG_BLOCK)
            self.counts["marks"] += tags.count(stage.TAG_MARK)
            self.counts["gc"] += tags.count(stage.TAG_GC)
            self.counts["heap_snaps"] += tags.count(stage.TAG_HEAP_A)
        try:
            seg.mm.close()
        except BufferError:  # a view of it is still alive: the mapping goes with the process
            pass
        os.unlink(seg.path)

    def flush(self) -> bool:
        """Compress the full segments now (their records are safe on disk without this).
        False when it could not: a signal handler that interrupted this thread's own
        compression (the segments then stay as they are: the reader reads them), or a
        writer that failed."""
        if self.failed:
            return False
        with self._drain_lock:
            if self._draining:
                return False
            self._draining = True
            try:
                while self._full:
                    seg = self._full[0]
                    try:
                        self._compress(seg)
                    except Exception as exc:  # never raise into the target; the segment stays readable
                        self._fail(exc)
                        return False
                    self._full.pop(0)
            finally:
                self._draining = False
        return True

    def quiet(self) -> threading.RLock:
        """While held, the writer thread starts no compression (the probes' exit work runs
        then: a heap profiler stopping sees none of kvprof's buffers in flight)."""
        return self._drain_lock

    def _fail(self, exc: BaseException) -> None:
        self.failed = True
        self.info["errors"].append(f"writer failed: {exc!r}")
        self.write_process_info()

    def _run(self) -> None:
        block_process_signals()
        while not self._stop.is_set():
            self._wake.wait(TICK_S)
            self._wake.clear()
            if self._stop.is_set():
                break
            rescue_missed_sigterm()
            if self._full:
                self.flush()

    def pending(self) -> int:
        return len(self._full)

    # -- end -------------------------------------------------------------------------------
    def close(self, exit_status: dict[str, Any] | None = None) -> None:
        if self.closed:
            return
        self.finished = False
        with self._seg_lock:  # no rotation half done by another thread
            self.closed = True
            last, self._seg = self._seg, None
            self.write = self._drop  # late events of other threads: counted, not written
        self._stop.set()
        self._wake.set()
        if self.flush() and last is not None:
            with self._drain_lock:
                if not self._draining:
                    try:
                        self._compress(last)
                    except Exception as exc:  # the segment stays readable
                        self._fail(exc)
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self.info["end_ns"] = time.monotonic_ns()
        self.info["end_time"] = time.time()
        self.info["clock"]["wall_minus_mono_ns"]["end"] = hostinfo.wall_minus_mono_ns()
        self.info["counts"] = dict(self.counts)
        if self.dropped:
            self.info["dropped"] = self.dropped
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
        """In a forked child: let go of the parent's mappings and files without writing."""
        self.closed = True
        self._stop.set()
        self.write = self._drop
        for seg in [self._seg, *self._full]:
            if seg is not None:
                try:
                    seg.mm.close()
                except (ValueError, BufferError, OSError):
                    pass
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
