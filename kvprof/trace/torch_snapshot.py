"""Reading PyTorch CUDA memory snapshots safely, without torch, at about the speed of pickle.load.

A snapshot (``torch.cuda.memory._dump_snapshot()``) is a pickle of plain data: dicts,
lists, tuples, strings, numbers, booleans and None.

Safety.  The pickle is read by the C unpickler with ``find_class`` and
``persistent_load`` refusing everything, so a hostile pickle (``GLOBAL os.system`` +
``REDUCE``, ``INST``, ``OBJ``, extension codes, persistent ids) fails before anything
runs; only protocols 2 to 5 are read.  Plain data can still hurt the reader itself: a
tuple nested 200,000 deep used as a dict key overflows the C stack when the unpickler
hashes it (a segfault no exception catches), a ``LONG_BINPUT`` index of 2**31 asks for a
32 GB memo, ints that all hash alike make building a dict quadratic, one big list
referenced many times through the memo stands for billions of items.  So the unpickling
and everything that touches the unpickled objects run in a forked child process with a
bounded address space (RLIMIT_AS), bounded CPU time (RLIMIT_CPU, then SIGKILL), no core
file and stderr closed; the child hands back compact columns through a pipe and ends
with ``os._exit``, without tearing its objects down.  A child that crashes, runs out of
memory or time, or refuses the file becomes one ``BundleError`` line in the parent.
Items are counted with every shared reference before anything is expanded: a pickle may
hold at most one segment, block or trace entry per ``ITEM_BYTES`` of its bytes.  Where
``os.fork`` does not exist (Windows) the pickle is read in this process, unisolated.

Speed.  No pure-Python pass over opcodes, entries or frames: the child reads each field
of every entry with ``map(dict.get, ...)`` into ``array`` columns (C loops), formats
each frame dict once (PyTorch shares frame dicts between entries) and sends per
allocation the indices of its first ``STACK_DEPTH`` frame texts; the cyclic GC is off
while it builds the objects.  The parent puts call sites together on first use
(numpy for many allocations).

The result is one normalized shape for the formats seen from 2023 to 2026:

* ``segments``: a list (a bare list at top level is the oldest format) of dicts with
  ``device``, ``address``, ``total_size``, ``stream``, ``segment_type``,
  ``segment_pool_id`` (a tuple of at most 4 ints; absent or None: (0, 0)),
  ``is_expandable`` and ``blocks``: a sequence of dicts (``size``, ``state``,
  ``requested_size``, ``address``) built on access from the block columns; blocks
  without ``frames`` take ``requested_size`` from the legacy ``history[0]``
  (``real_size``) or default to their size;
* ``columns``: a :class:`Columns`, what the analysis reads: per block its size,
  requested size, state and address; per trace entry its action code (``ACTIONS``),
  ``addr``, ``size`` and ``time_us`` (``NO_TIME``, or NaN in a float column, when
  absent); per OOM entry its ``stream`` and ``device_free``; per allocation its call
  site, an index into ``stacks``;
* ``device_traces``: one sequence per device of entry dicts built on access;
* ``allocator_settings``, ``external_annotations`` when present (plain data, bounded).

Numbers are 64-bit signed integers (absent or not numbers: a default; booleans count as
0 and 1); larger ones are refused as implausible, and so are negative sizes, blocks that
add up to more than their segment, sizes that add up to 2**62 or more, and times beyond
2**62 microseconds (their differences must fit 64 bits).
"""

from __future__ import annotations

import faulthandler
import gc
import io
import marshal
import os
import pickle
import signal
import struct
import sys
from collections.abc import Callable, Iterator
from array import array
from itertools import chain, compress, islice, repeat
from operator import contains, itemgetter, not_
from typing import Any

from kvprof.errors import BundleError

try:
    import resource
except ImportError:  # not POSIX
    resource = None  # type: ignore[assignment]  # checked before use

PICKLE_MAGIC = b"\x80"
MAX_BYTES = 4 << 30  # refuse to read more than this into memory
MAX_ITEMS = 50_000_000  # segments, blocks and trace entries together, counted with repeats
ITEM_BYTES = 8  # at most one segment, block or trace entry per 8 bytes of pickle (a real one takes 25 or more)
SLACK_ITEMS = 10_000
STACK_DEPTH = 4  # frames that name a call site
MAX_TOTAL = 1 << 62  # all sizes together: the analysis adds them in 64-bit integers
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
NO_TIME = I64_MIN  # an entry without time_us, in an integer time column
TIME_LIMIT = 1 << 62  # |time_us| below this: the differences of two times fit 64 bits
NO_FRAMES = "(no frames recorded)"
CALL_SITES_NUMPY = 20_000  # allocations from which their call sites are put together with numpy (when imported)

ACTIONS = (
    "other",
    "alloc",
    "free_requested",
    "free_completed",
    "free",
    "segment_alloc",
    "segment_free",
    "segment_map",
    "segment_unmap",
    "oom",
    "snapshot",
)
ACTION_CODE = {a: i for i, a in enumerate(ACTIONS)}
(
    OTHER,
    ALLOC,
    FREE_REQUESTED,
    FREE_COMPLETED,
    FREE,
    SEGMENT_ALLOC,
    SEGMENT_FREE,
    SEGMENT_MAP,
    SEGMENT_UNMAP,
    OOM,
    SNAPSHOT,
) = range(len(ACTIONS))

PREFETCH_NUMPY_BYTES = 5 << 20  # a pickle this large may hold a trace long enough for the numpy replay (60k+ entries)
# the isolated reader's limits: address space beyond what the process had at the fork, CPU seconds
CHILD_MEMORY_BASE = 1 << 30
CHILD_MEMORY_PER_BYTE = 16  # a real snapshot's objects take about 6 bytes per byte of pickle
CHILD_CPU_BASE_S = 10
CHILD_CPU_PER_MIB_S = 1

_NoneType = type(None)
_ONLY = [
    bytes(int(i == code) for i in range(256)) for code in range(len(ACTIONS))
]  # bytes.translate: a code's 0/1 mask


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*
        raise pickle.UnpicklingError(
            f"it asks to import {str(module)[:100]}.{str(name)[:100]}; snapshots hold plain data only, so nothing was run"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it uses persistent ids; snapshots hold plain data only")


class _Implausible(Exception):
    pass


def looks_like_pickle(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(1) == PICKLE_MAGIC
    except OSError:
        return False


# -- entry points -------------------------------------------------------------------------------
_cache: tuple[Any, ...] = ()  # (key, snapshot) of the last file read: report reads a snapshot twice


def load(path: str) -> dict[str, Any]:
    """The normalized snapshot at `path`; BundleError (one line) for anything unreadable."""
    global _cache
    try:
        st = os.stat(path)
        if st.st_size > MAX_BYTES:
            raise BundleError(f"{path}: {st.st_size:,} bytes is too large for a memory snapshot")
        with open(path, "rb") as fh:
            head = fh.read(2)
    except FileNotFoundError:
        raise BundleError(f"no such file: {path}") from None
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror}") from None
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if _cache and _cache[0] == key:
        cached: dict[str, Any] = _cache[1]
        return cached
    _check_head(head, path)

    def read() -> Any:
        with open(path, "rb") as fh:
            return _NoGlobals(fh).load()

    snap = _assemble(*_isolated(read, path, st.st_size))
    _cache = (key, snap)
    return snap


def loads(data: bytes, name: str = "snapshot") -> dict[str, Any]:
    _check_head(data[:2], name)
    return _assemble(*_isolated(lambda: _NoGlobals(io.BytesIO(data)).load(), name, len(data)))


def normalize(obj: Any, name: str = "snapshot") -> dict[str, Any]:
    """The normalized form of an already unpickled snapshot (trusted objects, in this process)."""
    return _assemble(*_read_columns(lambda: obj, name, MAX_ITEMS * ITEM_BYTES))


def _check_head(head: bytes, name: str) -> None:
    if len(head) < 2 or head[:1] != PICKLE_MAGIC:
        raise BundleError(f"{name}: not a PyTorch memory snapshot (not a pickle of protocol 2 or later)")
    if not 2 <= head[1] <= 5:
        raise BundleError(f"{name}: pickle protocol {head[1]} is not supported (snapshots use 2 to 5)")


def _budget(nbytes: int) -> int:
    return min(MAX_ITEMS, SLACK_ITEMS + nbytes // ITEM_BYTES)


# -- the isolated reader ------------------------------------------------------------------------
def _one_line(text: str) -> str:
    return " ".join(text.split())


def _read_columns(read: Callable[[], Any], name: str, nbytes: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, columns) of what `read` unpickles; BundleError, in one line, for any refusal."""
    try:
        try:
            obj = read()
        except pickle.UnpicklingError as exc:
            raise BundleError(f"{name}: refused to load this pickle: {str(exc)[:300]}") from None
        except (MemoryError, RecursionError):
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the unpickler says about a damaged file
            why = (
                "it is truncated"
                if isinstance(exc, EOFError)
                else f"it is damaged ({type(exc).__name__}: {str(exc)[:200]})"
            )
            raise BundleError(f"{name}: cannot read this snapshot: {why}") from None
        return _extract(obj, name, _budget(nbytes))
    except _Implausible as exc:
        raise BundleError(f"{name}: not a plausible memory snapshot: {exc}") from None
    except MemoryError:
        raise BundleError(
            f"{name}: refused to load this pickle: it needs more memory than the reader allows "
            f"({_allowance[0] >> 20:,} MiB)"
            if _allowance[0]
            else f"{name}: refused to load this pickle: out of memory"
        ) from None
    except RecursionError:
        raise BundleError(f"{name}: refused to load this pickle: it nests containers too deep for a snapshot") from None


_allowance = [0]  # the child's address space beyond the parent's, once set


def _limit_child(nbytes: int) -> None:
    """Resource limits of the reader child: no core file, bounded CPU seconds and address space."""
    if resource is None:
        return
    inf = resource.RLIM_INFINITY

    def lower(which: int, value: int, hard_margin: int | None = None) -> None:
        soft, hard = resource.getrlimit(which)
        if hard != inf:
            value = min(value, hard)
        if soft != inf and soft <= value:
            return  # already lower
        if hard_margin is not None:
            hard = value + hard_margin if hard == inf else min(hard, value + hard_margin)
        resource.setrlimit(which, (value, hard))

    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass
    try:
        lower(
            resource.RLIMIT_CPU, CHILD_CPU_BASE_S + CHILD_CPU_PER_MIB_S * (nbytes >> 20), hard_margin=5
        )  # SIGXCPU, then SIGKILL
    except (ValueError, OSError):
        pass
    try:
        with open("/proc/self/statm") as fh:
            vsz = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        allowance = CHILD_MEMORY_BASE + CHILD_MEMORY_PER_BYTE * nbytes
        lower(resource.RLIMIT_AS, vsz + allowance)
        _allowance[0] = allowance
    except (OSError, ValueError, IndexError):
        pass


def _child(wfd: int, read: Callable[[], Any], name: str, nbytes: int) -> None:
    """The forked reader: never returns, never runs the parent's cleanup."""
    code = 70
    try:
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            faulthandler.disable()  # a crash report would not be one line; the parent says what happened
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            os.close(null)
        except (OSError, ValueError):
            pass
        gc.disable()  # the unpickled objects hold no cycles; the collector would walk them over and over
        _limit_child(nbytes)
        try:
            meta, cols = _read_columns(read, name, nbytes)
        except BundleError as exc:
            meta, cols = {"error": str(exc)}, {}
        _send(wfd, meta, cols)
        code = 0
    except BaseException:  # noqa: BLE001 - the parent reports the exit status
        pass
    finally:
        os._exit(code)


def _send(fd: int, meta: dict[str, Any], cols: dict[str, Any]) -> None:
    meta = dict(meta, columns=[(k, v.format, len(v)) for k, v in cols.items()])
    head = marshal.dumps(meta)
    _write_all(fd, struct.pack("<Q", len(head)) + head)
    for v in cols.values():
        _write_all(fd, memoryview(v).cast("B"))


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while len(view):
        n = os.write(fd, view[: 1 << 20])
        view = view[n:]


def _read_exact(fh: io.RawIOBase, n: int) -> bytearray | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = fh.readinto(view[got:])
        if not k:
            return None
        got += k
    return buf


def _isolated(read: Callable[[], Any], name: str, nbytes: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, columns) of the snapshot `read` unpickles, read in a child process with limits."""
    if not hasattr(os, "fork"):  # no isolation available: this process's own limits apply
        try:
            return _read_columns(read, name, nbytes)
        except BundleError as exc:
            raise BundleError(_one_line(str(exc))) from None
    rfd, wfd = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(rfd)
        os.close(wfd)
        raise BundleError(f"{name}: cannot start the snapshot reader process: {exc.strerror}") from None
    if pid == 0:
        os.close(rfd)
        _child(wfd, read, name, nbytes)  # never returns
    os.close(wfd)
    if nbytes >= PREFETCH_NUMPY_BYTES:  # the analysis of a trace this long uses numpy: import it while the child reads
        try:
            import numpy  # noqa: F401
        except ImportError:
            pass
    meta: dict[str, Any] | None = None
    cols: dict[str, Any] | None = None
    try:
        with os.fdopen(rfd, "rb", buffering=0) as fh:
            head = _read_exact(fh, 8)
            if head is not None:
                blob = _read_exact(fh, struct.unpack("<Q", head)[0])
                meta = marshal.loads(blob) if blob is not None else None
            if meta is not None and "error" not in meta:
                cols = {}
                for key, code, n in meta.pop("columns"):
                    buf = _read_exact(fh, n * array(code).itemsize)
                    if buf is None:
                        meta = None
                        break
                    cols[key] = memoryview(buf).cast(code)
    except BaseException:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
        os.waitpid(pid, 0)
        raise
    _, status = os.waitpid(pid, 0)
    if meta is not None and "error" in meta:
        raise BundleError(_one_line(meta["error"]))
    if meta is None or cols is None or status != 0:
        raise BundleError(f"{name}: refused to load this pickle: {_death(status)}; nothing in it was run")
    return meta, cols


def _death(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            sname = signal.Signals(sig).name
        except ValueError:
            sname = f"signal {sig}"
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            return f"reading it took longer than the reader allows ({sname})"
        if sig in (signal.SIGSEGV, signal.SIGBUS):
            return (
                f"it crashed the isolated reader ({sname}), as containers nested hundreds of thousands deep do "
                "(snapshots nest about 6)"
            )
        return f"the isolated reader was stopped by {sname}"
    return f"the isolated reader failed (exit status {os.WEXITSTATUS(status) if os.WIFEXITED(status) else status})"


# -- columns from the unpickled objects ----------------------------------------------------------
def _get(dicts: list[Any], key: str) -> list[Any]:
    """d.get(key) of every dict, in a C loop."""
    return list(map(dict.get, dicts, repeat(key)))


def _first_bad(values: list[Any], ok: Callable[[Any], bool]) -> int:
    return next(i for i, v in enumerate(values) if not ok(v))


def _ints(vals: list[Any], default: Any, what: str, nonneg: bool = False) -> array[int]:
    """A 64-bit column: absent and non-integer values take `default` (one value, or a column of
    them; booleans count as 0 and 1); numbers beyond 64 bits, and negative ones where sizes are
    meant, are refused."""
    try:
        col = array("q", vals)  # a C loop: the common case, every value an integer
    except (TypeError, OverflowError):
        if isinstance(default, (list, array, memoryview)):
            vals = [v if type(v) is int else d for v, d in zip(vals, default)]
        elif set(map(type, vals)) <= {int, bool, _NoneType}:
            vals = list(map({None: default}.get, vals, vals))
        else:
            vals = [v if type(v) is int else default for v in vals]
        try:
            col = array("q", vals)
        except OverflowError:
            v = max(vals, key=abs)
            raise _Implausible(
                f"a number of {v.bit_length()} bits in {what}, where sizes and addresses have at most 63"
            ) from None
    if nonneg and col and min(col) < 0:
        raise _Implausible(f"a negative size ({min(col):,}) in {what}")
    return col


def _times(vals: list[Any]) -> array[Any]:
    """time_us: an int64 column (NO_TIME when absent), or float64 (NaN when absent) when the
    trace has floats.  Times are within 2**62 of zero, so that their differences fit 64 bits."""
    col: array[int] | None
    try:
        col = array("q", vals)
    except (TypeError, OverflowError):
        col = None
    if col is None and set(map(type, vals)) <= {int, bool, _NoneType}:
        try:
            col = array("q", map({None: NO_TIME}.get, vals, vals))
        except OverflowError:
            col = None
    if col is not None:
        lo, hi = (min(col), max(col)) if col else (0, 0)
        if lo == NO_TIME:
            lo = min(filter(NO_TIME.__ne__, col), default=0)
        if hi >= TIME_LIMIT or lo <= -TIME_LIMIT:
            raise _Implausible("a time_us beyond 2**62 microseconds")
        return col
    nan = float("nan")
    out = []
    for v in vals:  # odd traces only: floats, strings, numbers beyond 64 bits
        if type(v) is int:
            if not -TIME_LIMIT < v < TIME_LIMIT:
                raise _Implausible("a time_us beyond 2**62 microseconds")
            out.append(float(v))
        elif type(v) is float and v == v and abs(v) < 1e18:
            out.append(v)
        else:
            out.append(nan)
    return array("d", out)


def _int_scalar(v: Any, default: int = 0) -> int:
    if type(v) is not int:
        return default
    if not I64_MIN <= v <= I64_MAX:
        raise _Implausible(f"a number of {v.bit_length()} bits where sizes and addresses have at most 63")
    return v


def _frame_text(f: dict[str, Any]) -> str:
    fn, nm = f.get("filename"), f.get("name")
    fn = fn[:4096] if isinstance(fn, str) else "?"
    nm = nm[:4096] if isinstance(nm, str) else "?"
    base = fn.replace("\\", "/").rsplit("/", 1)[-1]
    return f"{nm} ({base}:{_int_scalar(f.get('line'), 0)})"


def _frame_columns(frame_lists: list[Any]) -> tuple[bytes, array[int], list[Any]]:
    """Each item's first STACK_DEPTH frame dicts as (count per item, their indices in a table of
    frame texts, the table): C loops, and each frame dict (PyTorch shares them) formatted once.
    The call sites are put together in the parent (Columns.stacks)."""
    if all(map(isinstance, frame_lists, repeat(list))):
        heads = list(map(itemgetter(slice(0, STACK_DEPTH)), frame_lists))
    else:
        heads = [x[:STACK_DEPTH] if isinstance(x, list) else [] for x in frame_lists]
    flat = list(chain.from_iterable(heads))
    if not all(map(isinstance, flat, repeat(dict))):  # odd lists: the first dicts of each, once per list
        firsts: dict[int, list[Any]] = {}
        for x in frame_lists:
            if isinstance(x, list) and id(x) not in firsts:
                firsts[id(x)] = list(islice(filter(lambda f: isinstance(f, dict), x), STACK_DEPTH))
        heads = [firsts[id(x)] if isinstance(x, list) else [] for x in frame_lists]
        flat = list(chain.from_iterable(heads))
    fids = list(map(id, flat))
    frames = dict(zip(fids, flat))
    text_ids, texts = _table(list(map(_frame_text, frames.values())))
    text_of = dict(zip(frames, text_ids))
    return bytes(map(len, heads)), array("i", map(text_of.__getitem__, fids)), texts


def _table(values: list[Any]) -> tuple[array[int], list[Any]]:
    """(index per value, distinct values in first-seen order) of hashable flat values."""
    table = dict.fromkeys(values)
    pos = dict(zip(table, range(len(table))))
    return array("i", map(pos.__getitem__, values)), list(table)


def _plain(v: Any, depth: int = 0) -> Any:
    """allocator_settings and annotations: str keys, scalar values, two levels of nesting, bounded."""
    if isinstance(v, bool) or v is None or isinstance(v, float):
        return v
    if isinstance(v, int):
        return v if I64_MIN <= v <= I64_MAX else None
    if isinstance(v, str):
        return v[:4096]
    if depth >= 2:
        return None
    if isinstance(v, dict):
        out: dict[str, Any] = {}
        for k, x in islice(v.items(), 1000):
            if isinstance(k, str):
                out[k[:256]] = _plain(x, depth + 1)
            elif isinstance(k, int) and not isinstance(k, bool) and I64_MIN <= k <= I64_MAX:
                out[str(k)] = _plain(x, depth + 1)
        return out
    if isinstance(v, (list, tuple)):
        return [_plain(x, depth + 1) for x in islice(v, 1000)]
    return None


def _extract(obj: Any, name: str, budget: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, columns) of an unpickled snapshot; BundleError or _Implausible when it is not one."""
    if isinstance(obj, list):  # the oldest format: the segment list itself
        obj = {"segments": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("segments"), list):
        what = type(obj).__name__ if not isinstance(obj, dict) else "a dict without a 'segments' list"
        raise BundleError(f"{name}: not a PyTorch memory snapshot (top level is {what})")

    def too_many(n: int) -> BundleError:
        return BundleError(
            f"{name}: refused: {n:,} or more segments, blocks and trace entries (counting shared references), "
            f"more than a snapshot of this size holds (at most {budget:,})"
        )

    segs = obj["segments"]
    raw_traces = obj.get("device_traces", [])
    if not isinstance(raw_traces, list):
        raise BundleError(f"{name}: device_traces is malformed (expected a list per device)")
    if len(segs) + len(raw_traces) > budget:
        raise too_many(len(segs) + len(raw_traces))

    def seg_ok(s: Any) -> bool:
        return isinstance(s, dict) and isinstance(s.get("blocks"), list) and isinstance(s.get("total_size"), int)

    if not all(map(isinstance, segs, repeat(dict))):
        raise BundleError(
            f"{name}: segment {_first_bad(segs, seg_ok)} is malformed (needs total_size and a blocks list)"
        )
    block_lists = _get(segs, "blocks")
    totals = _get(segs, "total_size")
    if not (all(map(isinstance, block_lists, repeat(list))) and all(map(isinstance, totals, repeat(int)))):
        raise BundleError(
            f"{name}: segment {_first_bad(segs, seg_ok)} is malformed (needs total_size and a blocks list)"
        )
    nblocks = list(map(len, block_lists))
    items = len(segs) + sum(nblocks)
    if items > budget:
        raise too_many(items)
    if not all(map(isinstance, raw_traces, repeat(list))):
        d = _first_bad(raw_traces, lambda x: isinstance(x, list))
        raise BundleError(f"{name}: device_traces[{d}] is malformed (expected a list of entries)")
    dev_lens = list(map(len, raw_traces))
    items += sum(dev_lens)
    if items > budget:
        raise too_many(items)

    cols: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    # segments
    cols["seg_device"] = _ints(_get(segs, "device"), 0, "a segment's device")
    cols["seg_address"] = _ints(_get(segs, "address"), -1, "a segment's address")
    cols["seg_total"] = _ints(totals, 0, "a segment's total_size", nonneg=True)
    cols["seg_stream"] = _ints(_get(segs, "stream"), 0, "a segment's stream")
    cols["seg_blocks"] = array("q", nblocks)
    kinds = _get(segs, "segment_type")
    if not set(map(type, kinds)) <= {str}:
        kinds = [k if isinstance(k, str) else "unknown" for k in kinds]
    cols["seg_type"], meta["seg_types"] = _table(list(map(itemgetter(slice(0, 64)), kinds)))
    pools = list(map(dict.get, segs, repeat("segment_pool_id"), repeat((0, 0))))
    if not set(map(type, pools)) <= {tuple, list}:  # a bare number is a pool of its own; None, no pool named
        pools = [(p,) if type(p) is int else (0, 0) if p is None else p for p in pools]
    if (
        not set(map(type, pools)) <= {tuple, list}
        or max(map(len, pools), default=0) > 4
        or not set(map(type, chain.from_iterable(pools))) <= {int}
    ):
        i = _first_bad(pools, lambda p: type(p) in (tuple, list) and len(p) <= 4 and all(type(x) is int for x in p))
        raise BundleError(f"{name}: segment {i} is malformed (segment_pool_id is not a pair of numbers)")
    flat_pools = list(chain.from_iterable(pools))
    if flat_pools and (max(flat_pools) > I64_MAX or min(flat_pools) < I64_MIN):
        raise _Implausible("a segment_pool_id beyond 64 bits")
    cols["seg_pool"], meta["seg_pools"] = _table(list(map(tuple, pools)))
    cols["seg_expandable"] = array("b", map(bool, _get(segs, "is_expandable")))

    # blocks
    blocks = list(chain.from_iterable(block_lists))
    sizes = _get(blocks, "size") if all(map(isinstance, blocks, repeat(dict))) else None
    states: Any = _get(blocks, "state") if sizes is not None else None
    if sizes is None or not all(map(isinstance, sizes, repeat(int))) or not set(map(type, states)) <= {str}:
        k = _first_bad(
            blocks, lambda b: isinstance(b, dict) and isinstance(b.get("size"), int) and isinstance(b.get("state"), str)
        )
        i = 0
        while k >= nblocks[i]:
            k -= nblocks[i]
            i += 1
        raise BundleError(f"{name}: block {k} of segment {i} is malformed (needs size and state)")
    size = _ints(sizes, 0, "a block's size", nonneg=True)
    cols["blk_size"] = size
    cols["blk_state"], meta["blk_states"] = _table(list(map(itemgetter(slice(0, 64)), states)))
    cols["blk_address"] = _ints(_get(blocks, "address"), -1, "a block's address")
    with_frames = list(map(contains, blocks, repeat("frames")))
    requested = _get(blocks, "requested_size")
    if not all(with_frames):  # legacy blocks: requested_size from history[0]["real_size"] when they have one
        for j in compress(range(len(blocks)), map(not_, with_frames)):
            h = blocks[j].get("history")
            if isinstance(h, list) and h and isinstance(h[0], dict):
                requested[j] = h[0].get("real_size")
    cols["blk_requested"] = _ints(requested, size, "a block's requested_size", nonneg=True)
    if blocks:
        it = iter(size)
        used = list(map(sum, map(islice, repeat(it), nblocks)))
        over = list(map(int.__gt__, used, cols["seg_total"]))
        if any(over):
            i = over.index(True)
            raise _Implausible(
                f"the blocks of segment {i} add up to {used[i]:,} bytes, more than its total_size of "
                f"{cols['seg_total'][i]:,}"
            )

    # the trace
    entries = list(chain.from_iterable(raw_traces))
    acts: Any
    codes: bytes | None
    try:
        acts = _get(entries, "action")
        codes = bytes(map(ACTION_CODE.get, acts, repeat(OTHER)))
    except TypeError:  # an entry that is not a dict, an action that is not a string
        acts = codes = None
    if codes is None or not set(map(type, compress(acts, codes.translate(_ONLY[OTHER])))) <= {str}:
        k = _first_bad(entries, lambda e: isinstance(e, dict) and isinstance(e.get("action"), str))
        d = 0
        while k >= dev_lens[d]:
            k -= dev_lens[d]
            d += 1
        raise BundleError(f"{name}: a trace entry of device {d} is malformed (needs an action)")
    meta["dev_lens"] = dev_lens
    cols["action"] = memoryview(codes).cast("b")
    cols["addr"] = _ints(_get(entries, "addr"), -1, "a trace entry's addr")
    cols["size"] = _ints(_get(entries, "size"), 0, "a trace entry's size", nonneg=True)
    cols["time"] = _times(_get(entries, "time_us"))
    ooms = list(compress(entries, codes.translate(_ONLY[OOM])))  # what only OOMs need
    cols["oom_stream"] = _ints(_get(ooms, "stream"), 0, "a trace entry's stream")
    cols["oom_device_free"] = _ints(_get(ooms, "device_free"), -1, "a trace entry's device_free")
    allocs = list(compress(entries, codes.translate(_ONLY[ALLOC])))
    nframes, cols["alloc_frames"], meta["frame_texts"] = _frame_columns(_get(allocs, "frames"))
    cols["alloc_nframes"] = memoryview(nframes).cast("b")
    if sum(cols["size"]) + sum(cols["seg_total"]) + sum(cols["blk_requested"]) + sum(size) >= MAX_TOTAL:
        raise _Implausible("its sizes add up to more than 2**62 bytes")

    if isinstance(obj.get("allocator_settings"), dict):
        meta["allocator_settings"] = _plain(obj["allocator_settings"])
    if isinstance(obj.get("external_annotations"), list):
        meta["external_annotations"] = _plain(obj["external_annotations"])
    return meta, {k: memoryview(v) for k, v in cols.items()}


# -- the normalized snapshot ----------------------------------------------------------------------
class Columns:
    """The blocks' and the trace's columns (memoryviews of int64, int32, int8 or float64)."""

    # set from the columns (_extract's cols), by name
    seg_device: memoryview
    seg_address: memoryview
    seg_total: memoryview
    seg_stream: memoryview
    seg_blocks: memoryview
    seg_type: memoryview
    seg_pool: memoryview
    seg_expandable: memoryview
    blk_size: memoryview
    blk_state: memoryview
    blk_address: memoryview
    blk_requested: memoryview
    action: memoryview
    addr: memoryview
    size: memoryview
    time: memoryview
    oom_stream: memoryview
    oom_device_free: memoryview
    alloc_frames: memoryview
    alloc_nframes: memoryview

    def __init__(self, meta: dict[str, Any], cols: dict[str, memoryview]):
        self.__dict__.update(cols)
        self.seg_types, self.seg_pools = meta["seg_types"], [tuple(p) for p in meta["seg_pools"]]
        self.blk_states, self.frame_texts = meta["blk_states"], meta["frame_texts"]
        self._stacks: tuple[Any, list[str]] | None = None
        self.dev_lens = meta["dev_lens"]
        starts = [0]
        for n in self.seg_blocks:
            starts.append(starts[-1] + n)
        self.seg_starts = starts  # blocks of segment i: seg_starts[i]:seg_starts[i + 1]
        self.time_is_float = self.time.format == "d"
        self._ordinals: tuple[dict[int, int], dict[int, int]] | None = None

    @property
    def entries(self) -> int:
        return len(self.action)

    @property
    def alloc_stack(self) -> Any:
        """Per allocation, the index of its call site in `stacks`."""
        if self._stacks is None:
            self._stacks = _call_sites(self)
        return self._stacks[0]

    @property
    def stacks(self) -> list[str]:
        """The call sites: 'name (file:line) < ...' of the first STACK_DEPTH frames, or NO_FRAMES."""
        if self._stacks is None:
            self._stacks = _call_sites(self)
        return self._stacks[1]

    def entry(self, i: int) -> dict[str, Any]:
        if self._ordinals is None:
            at = range(len(self.action))
            self._ordinals = (
                {j: k for k, j in enumerate(compress(at, map(ALLOC.__eq__, self.action)))},
                {j: k for k, j in enumerate(compress(at, map(OOM.__eq__, self.action)))},
            )
        allocs, ooms = self._ordinals
        out: dict[str, Any] = {
            "action": ACTIONS[self.action[i]],
            "addr": self.addr[i],
            "size": self.size[i],
            "time_us": self.time_of(i),
        }
        if i in allocs:
            out["stack"] = self.stacks[self.alloc_stack[allocs[i]]]
        if i in ooms:
            out["stream"], out["device_free"] = self.oom_stream[ooms[i]], self.oom_device_free[ooms[i]]
        return out

    def time_of(self, i: int) -> Any:
        t = self.time[i]
        return (None if t != t else t) if self.time_is_float else (None if t == NO_TIME else t)


def _call_sites(c: Columns) -> tuple[Any, list[str]]:
    """(call site index per allocation, call sites) from the allocations' frame text indices:
    numpy for many allocations when it is imported, C loops otherwise."""
    n = len(c.alloc_nframes)
    texts = c.frame_texts
    ids: Any  # a memoryview or an array of int32
    if n >= CALL_SITES_NUMPY and "numpy" in sys.modules and len(texts) < 1 << 15:
        import numpy as np

        lens = np.frombuffer(c.alloc_nframes, dtype=np.int8).astype(np.int64)
        flat = np.frombuffer(c.alloc_frames, dtype=np.int32).astype(np.int64) + 1
        row = np.repeat(np.arange(n), lens)
        col = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
        key = np.zeros(n, dtype=np.int64)
        np.bitwise_or.at(key, row, flat << (16 * (STACK_DEPTH - 1 - col)))
        uniq, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # first-seen order, as the C loops give it
        rank = np.empty(len(uniq), dtype=np.int64)
        rank[order] = np.arange(len(uniq))
        ids = memoryview(rank[inverse.reshape(-1)].astype(np.int32))  # type: ignore[arg-type]  # a buffer: numpy says so for Python 3.12+
        keys = [
            tuple(t - 1 for t in (int(k) >> 16 * (STACK_DEPTH - 1 - j) & 0xFFFF for j in range(STACK_DEPTH)) if t)
            for k in uniq[order].tolist()
        ]
    else:
        it = iter(c.alloc_frames)
        ids, keys = _table(list(map(tuple, map(islice, repeat(it), c.alloc_nframes))))
    names = [" < ".join(map(texts.__getitem__, k)) or NO_FRAMES for k in keys]
    same, table = _table(names)  # frames that read alike are one call site, as before
    if len(table) < len(names):
        ids = array("i", map(same.__getitem__, ids))
    return ids, table


class _Blocks:
    """The blocks of one segment as dicts, built on access."""

    __slots__ = ("_c", "_lo", "_hi")

    def __init__(self, c: Columns, lo: int, hi: int):
        self._c, self._lo, self._hi = c, lo, hi

    def __len__(self) -> int:
        return self._hi - self._lo

    def _row(self, j: int) -> dict[str, Any]:
        c = self._c
        return {
            "size": c.blk_size[j],
            "state": c.blk_states[c.blk_state[j]],
            "requested_size": c.blk_requested[j],
            "address": c.blk_address[j],
        }

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self._row(self._lo + j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._row(self._lo + i)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return map(self._row, range(self._lo, self._hi))


class _Entries:
    """The trace entries of one device as dicts, built on access: action, addr, size, time_us;
    an allocation's call site (stack); an OOM's stream and device_free."""

    __slots__ = ("_c", "_lo", "_hi")

    def __init__(self, c: Columns, lo: int, hi: int):
        self._c, self._lo, self._hi = c, lo, hi

    def __len__(self) -> int:
        return self._hi - self._lo

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._c.entry(self._lo + i)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return map(self._c.entry, range(self._lo, self._hi))


def _assemble(meta: dict[str, Any], cols: dict[str, Any]) -> dict[str, Any]:
    c = Columns(meta, cols)
    st = c.seg_starts
    segments = [
        {
            "device": dev,
            "address": addr,
            "total_size": total,
            "stream": stream,
            "segment_type": c.seg_types[kind],
            "segment_pool_id": c.seg_pools[pool],
            "is_expandable": bool(exp),
            "blocks": _Blocks(c, st[i], st[i + 1]),
        }
        for i, (dev, addr, total, stream, kind, pool, exp) in enumerate(
            zip(c.seg_device, c.seg_address, c.seg_total, c.seg_stream, c.seg_type, c.seg_pool, c.seg_expandable)
        )
    ]
    traces, at = [], 0
    for n in c.dev_lens:
        traces.append(_Entries(c, at, at + n))
        at += n
    out: dict[str, Any] = {"segments": segments, "device_traces": traces, "columns": c}
    for key in ("allocator_settings", "external_annotations"):
        if key in meta:
            out[key] = meta[key]
    return out
