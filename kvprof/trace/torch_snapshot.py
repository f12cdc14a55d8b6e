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
    try:
        obj = _NoGlobals(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise BundleError(f"{name}: refused to load this pickle: {exc}") from None
    except (EOFError, ValueError, IndexError, KeyError, TypeError, AttributeError, OverflowError, MemoryError, RecursionError) as exc:
        why = "it is truncated" if isinstance(exc, EOFError) else f"it is damaged ({type(exc).__name__}: {exc})"
        raise BundleError(f"{name}: cannot read this snapshot: {why}") from None
    return normalize(obj, name)


def _int(v, default=0) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def _frames(v) -> list:
    if not isinstance(v, list):
        return []
    return [f for f in v if isinstance(f, dict)]


def normalize(obj, name: str = "snapshot") -> dict:
    if isinstance(obj, list):  # the oldest format: the segment list itself
        obj = {"segments": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("segments"), list):
        what = type(obj).__name__ if not isinstance(obj, dict) else "a dict without a 'segments' list"
        raise BundleError(f"{name}: not a PyTorch memory snapshot (top level is {what})")
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
            blocks.append({"size": b["size"], "state": b["state"], "requested_size": requested, "frames": frames,
                           "address": _int(b.get("address"), -1)})
        pool = seg.get("segment_pool_id", (0, 0))
        segments.append({
            "device": _int(seg.get("device")),
            "address": _int(seg.get("address"), -1),
            "total_size": seg["total_size"],
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
            entries.append({
                "action": e["action"], "addr": _int(e.get("addr"), -1), "size": _int(e.get("size")), "stream": _int(e.get("stream")),
                "time_us": t if isinstance(t, (int, float)) and not isinstance(t, bool) else None,
                "frames": _frames(e.get("frames")), "device_free": _int(e.get("device_free"), -1),
            })
        traces.append(entries)
    out = {"segments": segments, "device_traces": traces}
    if isinstance(obj.get("allocator_settings"), dict):
        out["allocator_settings"] = obj["allocator_settings"]
    if isinstance(obj.get("external_annotations"), list):
        out["external_annotations"] = obj["external_annotations"]
    return out
