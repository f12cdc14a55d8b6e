"""Reading PyTorch CUDA memory snapshots safely, without torch.

A snapshot (``torch.cuda.memory._dump_snapshot()``) is a pickle of plain data:
dicts, lists, tuples, strings, numbers, booleans and None.  ``load`` refuses
every global, so a hostile pickle (``GLOBAL os.system`` + ``REDUCE``, ``INST``,
``OBJ``, extension codes, persistent ids) fails before anything runs, and only
protocols 2 to 5 are read.  It then normalizes the formats seen from 2023 to
2026 into one shape:

* ``segments``: a list (a bare list at top level is the oldest format), each with
  ``device``, ``address``, ``total_size``, ``stream``, ``segment_type``,
  ``segment_pool_id`` and ``blocks`` (``size``, ``state``, ``requested_size``,
  ``frames``); blocks without ``frames`` take ``requested_size`` and frames from
  the legacy ``history[0]`` (``real_size``) or default to their size;
* ``device_traces``: one list per device of entries with ``action``, ``addr``,
  ``size``, ``stream``, ``time_us`` (None when absent) and ``frames``;
* ``allocator_settings``, ``external_annotations`` when present.
"""

from __future__ import annotations

import io
import os
import pickle

from kvprof.errors import BundleError

PICKLE_MAGIC = b"\x80"
MAX_BYTES = 4 << 30  # refuse to read more than this into memory


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):  # GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*
        raise pickle.UnpicklingError(f"it asks to import {module}.{name}; snapshots hold plain data only, so nothing was run")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it uses persistent ids; snapshots hold plain data only")


def looks_like_pickle(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(1) == PICKLE_MAGIC
    except OSError:
        return False


def load(path: str) -> dict:
    """The normalized snapshot at `path`; BundleError (one line) for anything unreadable."""
    try:
        size = os.path.getsize(path)
        if size > MAX_BYTES:
            raise BundleError(f"{path}: {size:,} bytes is too large for a memory snapshot")
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise BundleError(f"no such file: {path}") from None
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror}") from None
    return loads(data, path)


def loads(data: bytes, name: str = "snapshot") -> dict:
    if len(data) < 2 or data[:1] != PICKLE_MAGIC:
        raise BundleError(f"{name}: not a PyTorch memory snapshot (not a pickle of protocol 2 or later)")
    if not 2 <= data[1] <= 5:
        raise BundleError(f"{name}: pickle protocol {data[1]} is not supported (snapshots use 2 to 5)")
    _check_nesting(data, name)
    try:
        obj = _NoGlobals(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise BundleError(f"{name}: refused to load this pickle: {exc}") from None
    except (EOFError, ValueError, IndexError, KeyError, TypeError, AttributeError, OverflowError, MemoryError, RecursionError) as exc:
        why = "it is truncated" if isinstance(exc, EOFError) else f"it is damaged ({type(exc).__name__}: {exc})"
        raise BundleError(f"{name}: cannot read this snapshot: {why}") from None
    return normalize(obj, name)


MAX_DEPTH = 32  # real snapshots nest containers about 6 deep
MAX_ITEMS = 50_000_000  # blocks, trace entries and frames together, counted with repeats


class _Implausible(Exception):
    pass


def _check_nesting(data: bytes, name: str) -> None:
    """Refuse a pickle whose containers nest deeper than a snapshot's, before loading it:
    the unpickler builds any depth, and hashing a tuple nested 200,000 deep (a dict key)
    overflows the C stack, which no exception catches.  The scan follows the pickle
    machine's stack with each item's nesting depth instead of the item; tuples and
    frozensets, the hashable containers, are immutable, so their depth is exact."""
    import pickletools

    stack: list = []
    marks: list = []
    memo: dict = {}
    leaf = 0

    def pop_mark():
        at = marks.pop() if marks else 0
        items = stack[at:]
        del stack[at:]
        return items

    try:
        for op, arg, _pos in pickletools.genops(data):
            code = op.name
            if code in ("MARK",):
                marks.append(len(stack))
            elif code in ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_SET"):
                stack.append(1)
            elif code in ("TUPLE", "LIST", "DICT", "FROZENSET"):
                items = pop_mark()
                stack.append(1 + max(items, default=0))
            elif code in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(code[-1])
                items = stack[-n:] if n <= len(stack) else stack[:]
                del stack[len(stack) - len(items):]
                stack.append(1 + max(items, default=0))
            elif code in ("APPENDS", "SETITEMS", "ADDITEMS"):
                items = pop_mark()
                if stack:
                    stack[-1] = max(stack[-1], 1 + max(items, default=0))
            elif code == "APPEND":
                item = stack.pop() if stack else 0
                if stack:
                    stack[-1] = max(stack[-1], item + 1)
            elif code == "SETITEM":
                v = stack.pop() if stack else 0
                k = stack.pop() if stack else 0
                if stack:
                    stack[-1] = max(stack[-1], v + 1, k + 1)
            elif code in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1] if stack else 0
            elif code == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else 0
            elif code in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, 0))
            elif code == "POP":
                if stack:
                    stack.pop()
            elif code == "POP_MARK":
                pop_mark()
            elif code == "DUP":
                stack.append(stack[-1] if stack else 0)
            elif code in ("PROTO", "FRAME", "STOP"):
                pass
            elif op.stack_after and not op.stack_before:  # a scalar (numbers, strings, None, booleans)
                stack.append(leaf)
            else:  # an opcode plain data never uses: the unpickler refuses it with its own reason
                return
            if stack and stack[-1] > MAX_DEPTH:
                raise BundleError(f"{name}: refused to load this pickle: it nests containers more than {MAX_DEPTH} deep "
                                  "(snapshots nest about 6)")
    except BundleError:
        raise
    except Exception:  # a damaged pickle: the unpickler says what is wrong
        return


def _int(v, default=0) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        return default
    if not -(1 << 63) <= v < (1 << 64):
        raise _Implausible(f"a number of {v.bit_length()} bits where sizes and addresses have at most 64")
    return v


def _frames(v) -> list:
    if not isinstance(v, list):
        return []
    out = []
    for f in v:
        if isinstance(f, dict):  # the fields the analysis reads, as plain strings and numbers
            fn, nm = f.get("filename"), f.get("name")
            out.append({"filename": fn[:4096] if isinstance(fn, str) else "?", "line": _int(f.get("line"), 0),
                        "name": nm[:4096] if isinstance(nm, str) else "?"})
    return out


def _plain(v, depth: int = 0):
    """allocator_settings and annotations: str keys, scalar values, one level of nesting."""
    if isinstance(v, bool) or v is None or isinstance(v, float):
        return v
    if isinstance(v, int):
        return v if -(1 << 63) <= v < (1 << 64) else None
    if isinstance(v, str):
        return v[:4096]
    if depth >= 2:
        return None
    if isinstance(v, dict):
        return {str(k)[:256]: _plain(x, depth + 1) for k, x in list(v.items())[:1000] if isinstance(k, (str, int)) and not isinstance(k, bool)}
    if isinstance(v, (list, tuple)):
        return [_plain(x, depth + 1) for x in list(v)[:1000]]
    return None


def _count_items(obj) -> int:
    """Blocks, trace entries and frames, with every repeat of a shared list counted: a
    pickle can reference one big list many times for free (its memo), so a few hundred
    kilobytes could otherwise stand for billions of blocks."""
    n = 0
    segs = obj.get("segments") if isinstance(obj, dict) else None
    for seg in segs if isinstance(segs, list) else ():
        blocks = seg.get("blocks") if isinstance(seg, dict) else None
        if isinstance(blocks, list):
            n += len(blocks)
            if n > MAX_ITEMS:
                return n
    traces = obj.get("device_traces") if isinstance(obj, dict) else None
    for dev in traces if isinstance(traces, list) else ():
        if isinstance(dev, list):
            n += len(dev)
            for e in dev:
                fr = e.get("frames") if isinstance(e, dict) else None
                n += len(fr) if isinstance(fr, list) else 0
                if n > MAX_ITEMS:
                    return n
    return n


def normalize(obj, name: str = "snapshot") -> dict:
    if isinstance(obj, list):  # the oldest format: the segment list itself
        obj = {"segments": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("segments"), list):
        what = type(obj).__name__ if not isinstance(obj, dict) else "a dict without a 'segments' list"
        raise BundleError(f"{name}: not a PyTorch memory snapshot (top level is {what})")
    if _count_items(obj) > MAX_ITEMS:
        raise BundleError(f"{name}: refused: more than {MAX_ITEMS:,} blocks and trace entries (counting shared references), "
                          "more than a snapshot holds")
    try:
        return _normalize(obj, name)
    except _Implausible as exc:
        raise BundleError(f"{name}: not a plausible memory snapshot: {exc}") from None


def _normalize(obj, name: str) -> dict:
    segments = []
    for i, seg in enumerate(obj["segments"]):
        if not isinstance(seg, dict) or not isinstance(seg.get("blocks"), list) or not isinstance(seg.get("total_size"), int):
            raise BundleError(f"{name}: segment {i} is malformed (needs total_size and a blocks list)")
        blocks = []
        for j, b in enumerate(seg["blocks"]):
            if not isinstance(b, dict) or not isinstance(b.get("size"), int) or not isinstance(b.get("state"), str):
                raise BundleError(f"{name}: block {j} of segment {i} is malformed (needs size and state)")
            if "frames" in b:
                frames, requested = _frames(b["frames"]), _int(b.get("requested_size"), b["size"])
            elif isinstance(b.get("history"), list) and b["history"] and isinstance(b["history"][0], dict):
                h = b["history"][0]
                frames, requested = _frames(h.get("frames")), _int(h.get("real_size"), b["size"])
            else:
                frames, requested = [], _int(b.get("requested_size"), b["size"])
            blocks.append({"size": _int(b["size"]), "state": b["state"][:64], "requested_size": requested, "frames": frames,
                           "address": _int(b.get("address"), -1)})
        pool = seg.get("segment_pool_id", (0, 0))
        segments.append({
            "device": _int(seg.get("device")),
            "address": _int(seg.get("address"), -1),
            "total_size": _int(seg["total_size"]),
            "stream": _int(seg.get("stream")),
            "segment_type": seg.get("segment_type") if isinstance(seg.get("segment_type"), str) else "unknown",
            "segment_pool_id": tuple(pool) if isinstance(pool, (list, tuple)) else (pool,),
            "is_expandable": bool(seg.get("is_expandable", False)),
            "blocks": blocks,
        })
    traces = []
    raw_traces = obj.get("device_traces", [])
    if not isinstance(raw_traces, list):
        raise BundleError(f"{name}: device_traces is malformed (expected a list per device)")
    for d, dev in enumerate(raw_traces):
        if not isinstance(dev, list):
            raise BundleError(f"{name}: device_traces[{d}] is malformed (expected a list of entries)")
        entries = []
        for e in dev:
            if not isinstance(e, dict) or not isinstance(e.get("action"), str):
                raise BundleError(f"{name}: a trace entry of device {d} is malformed (needs an action)")
            t = e.get("time_us")
            if isinstance(t, int) and not isinstance(t, bool):
                t = _int(t)
            elif isinstance(t, float) and not (t == t and abs(t) < 1e18):
                t = None
            entries.append({
                "action": e["action"], "addr": _int(e.get("addr"), -1), "size": _int(e.get("size")), "stream": _int(e.get("stream")),
                "time_us": t if isinstance(t, (int, float)) and not isinstance(t, bool) else None,
                "frames": _frames(e.get("frames")), "device_free": _int(e.get("device_free"), -1),
            })
        traces.append(entries)
    out = {"segments": segments, "device_traces": traces}
    if isinstance(obj.get("allocator_settings"), dict):
        out["allocator_settings"] = _plain(obj["allocator_settings"])
    if isinstance(obj.get("external_annotations"), list):
        out["external_annotations"] = _plain(obj["external_annotations"])
    return out
