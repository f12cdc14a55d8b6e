"""Format version 2 on disk, the reading side: staging records and chunks as numpy arrays.
The layouts, and why they are what they are, are in kvprof/trace/stage.py.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from kvprof.trace import format as fmt
from kvprof.trace.stage import (
    IDS_INLINE,
    IDS_PER_CONT,
    PAYLOAD_HEAP_SITES,
    RECORD,
    STRING_INLINE,
    STRING_PER_CONT,
    TAG_BLOCK,
    TAG_GC,
    TAG_HEAP_A,
    TAG_HEAP_B,
    TAG_IDS,
    TAG_MARK,
    TAG_STRING,
    TAG_STRING_CONT,
    MAX_TAG,
    WIDTH,
    ChunkError,
    ChunkHeader,
)

# numpy views of staging records, by tag
_STAGE_BLOCK = np.dtype(
    {
        "names": ["t", "kind", "pool", "req", "arg", "arg2", "n", "ids"],
        "formats": ["<i8", "u1", "<u2", "<i4", "<i8", "<i8", "<u4", ("<i4", 3)],
        "offsets": [0, 8, 9, 11, 15, 23, 31, 35],
        "itemsize": RECORD,
    }
)
_STAGE_MARK = np.dtype(
    {"names": ["t", "name", "value"], "formats": ["<i8", "<i4", "<i8"], "offsets": [0, 8, 12], "itemsize": RECORD}
)
_STAGE_GC = np.dtype(
    {
        "names": ["t", "duration", "generation", "collected", "uncollectable"],
        "formats": ["<i8", "<i8", "u1", "<i8", "<i8"],
        "offsets": [0, 8, 16, 17, 25],
        "itemsize": RECORD,
    }
)
_STAGE_HEAP = np.dtype(
    {
        "names": [
            "t",
            "seq",
            "reason",
            "mark",
            "mark_value",
            "live",
            "blocks",
            "traced",
            "peak",
            "overhead",
            "rows",
            "cost",
        ],
        "formats": ["<i8", "<u4", "u1", "<i4", "<i8", "<i8", "<i8", "<i8", "<i8", "<i8", "<u4", "<i8"],
        "offsets": [0, 8, 12, 13, 17, 25, 48, 56, 64, 72, 80, 84],
        "itemsize": 2 * RECORD,
    }
)


def unshuffle(data: bytes, width: int) -> np.ndarray:
    n = len(data) // width
    out: np.ndarray = np.frombuffer(data, dtype=np.uint8, count=n * width).reshape(width, n).T.copy()
    return out


def decode_chunk(head: ChunkHeader, body: bytes) -> np.ndarray:
    """The records of one chunk: (N, 48) uint8 staging records, or HEAP_SITE_DTYPE rows."""
    if len(body) != head.comp_len or zlib.crc32(body) != head.crc:
        raise ChunkError("chunk payload damaged")
    d = zlib.decompressobj()
    try:
        raw = d.decompress(body, head.raw_len)
    except zlib.error as exc:
        raise ChunkError(f"chunk payload damaged: {exc}") from None
    if len(raw) != head.raw_len or d.unconsumed_tail:
        raise ChunkError("chunk payload has the wrong size")
    recs = unshuffle(raw, WIDTH[head.payload])
    if head.payload == PAYLOAD_HEAP_SITES:
        return recs.reshape(-1).view(fmt.HEAP_SITE_DTYPE)
    return recs


def valid_records(buf: bytes | np.ndarray) -> np.ndarray:
    """The records of a staging segment's bytes as an (N, 48) uint8 array, cut at the first
    never-written record and at an entry the process did not finish writing."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    n = len(raw) // RECORD
    recs = raw[: n * RECORD].reshape(n, RECORD)
    tags = recs[:, RECORD - 1]
    zero = np.flatnonzero((tags == 0) | (tags > MAX_TAG))
    end = int(zero[0]) if len(zero) else n
    recs, tags = recs[:end], tags[:end]
    return recs[: _consistent_prefix(recs, tags)]


def _consistent_prefix(recs: np.ndarray, tags: np.ndarray) -> int:
    """Records up to the first entry whose continuation records are not all there."""
    n = len(tags)
    if not n:
        return 0
    # every record's expected followers: a block event needs ceil((n-3)/11) id records, heap half A needs B
    need = np.zeros(n, dtype=np.int64)
    blk = np.flatnonzero(tags == TAG_BLOCK)
    if len(blk):
        nid = recs[blk, 31:35].copy().view("<u4").ravel().astype(np.int64)
        need[blk] = -(-np.maximum(nid - IDS_INLINE, 0) // IDS_PER_CONT)
    need[tags == TAG_HEAP_A] = 1
    st = np.flatnonzero(tags == TAG_STRING)
    if len(st):
        slen = recs[st, 4:6].copy().view("<u2").ravel().astype(np.int64)
        need[st] = -(-np.maximum(slen - STRING_INLINE, 0) // STRING_PER_CONT)
    follower = (tags == TAG_IDS) | (tags == TAG_HEAP_B) | (tags == TAG_STRING_CONT)
    # runs of followers and the record that heads each run
    head = np.flatnonzero(~follower)
    run = np.diff(np.r_[head, n]) - 1
    cont_tag = np.where(
        tags[head] == TAG_BLOCK,
        TAG_IDS,
        np.where(tags[head] == TAG_HEAP_A, TAG_HEAP_B, np.where(tags[head] == TAG_STRING, TAG_STRING_CONT, 0)),
    )
    bad = run != need[head]
    if len(head) and head[0] != 0:  # followers with no head at the start: corrupt from the first record
        return 0
    # the followers of a run must all be the kind its head expects
    if len(head):
        owner = np.repeat(np.arange(len(head)), run + 1)
        wrong = follower & (tags != cont_tag[owner])
        if wrong.any():
            first = int(owner[np.flatnonzero(wrong)[0]])
            bad[first] = True
    if bad.any():
        return int(head[np.flatnonzero(bad)[0]])
    return n


def split_records(recs: np.ndarray) -> dict[int, tuple[Any, np.ndarray | None]]:
    """Stream rows from valid staging records: {tag: (rows, ids)} with ids for blocks only."""
    out: dict[int, tuple[Any, np.ndarray | None]] = {}
    if not len(recs):
        return out
    tags = recs[:, RECORD - 1]
    blk = np.flatnonzero(tags == TAG_BLOCK)
    if len(blk):
        view = np.ascontiguousarray(recs[blk]).reshape(-1).view(_STAGE_BLOCK)
        rows = np.empty(len(blk), dtype=fmt.BLOCK_EVENT_DTYPE)
        for name in ("t", "kind", "pool", "req", "arg", "arg2", "n"):
            rows[name] = view[name]
        # ids: inline ones, then the following continuation records, in record order
        idrec = (tags == TAG_BLOCK) | (tags == TAG_IDS)
        pos = np.flatnonzero(idrec)
        cand = np.zeros((len(pos), IDS_PER_CONT), dtype=np.int32)
        isblk = tags[pos] == TAG_BLOCK
        cand[isblk, :IDS_INLINE] = view["ids"]
        cont = pos[~isblk]
        if len(cont):
            cand[~isblk] = np.ascontiguousarray(recs[cont, : 4 * IDS_PER_CONT]).view("<i4")
        # how many ids of each record are real: per owning event, n split over its records
        owner = np.cumsum(isblk) - 1
        nev = view["n"].astype(np.int64)
        first_of = np.flatnonzero(isblk)
        k = np.arange(len(pos)) - first_of[owner]  # 0 for the event record, 1.. for continuations
        before = np.where(k == 0, 0, IDS_INLINE + (k - 1) * IDS_PER_CONT)
        width = np.where(k == 0, IDS_INLINE, IDS_PER_CONT)
        take = np.clip(nev[owner] - before, 0, width)
        mask = np.arange(IDS_PER_CONT)[None, :] < take[:, None]
        out[TAG_BLOCK] = (rows, cand[mask])
    for tag, dtype, target in ((TAG_MARK, _STAGE_MARK, fmt.MARK_DTYPE), (TAG_GC, _STAGE_GC, fmt.GC_DTYPE)):
        sel = np.flatnonzero(tags == tag)
        if len(sel):
            view = np.ascontiguousarray(recs[sel]).reshape(-1).view(dtype)
            rows = np.empty(len(sel), dtype=target)
            for name in target.names:
                rows[name] = view[name]
            out[tag] = (rows, None)
    st = np.flatnonzero(tags == TAG_STRING)
    if len(st):  # interned request ids: few (one per request), read one by one
        out[TAG_STRING] = (_strings(recs, st), None)
    sel = np.flatnonzero(tags == TAG_HEAP_A)
    if len(sel):
        pairs = np.concatenate([recs[sel], recs[sel + 1]], axis=1).reshape(-1)
        view = pairs.view(_STAGE_HEAP)
        rows = np.empty(len(sel), dtype=fmt.HEAP_SNAP_DTYPE)
        for name in fmt.HEAP_SNAP_DTYPE.names:
            rows[name] = view[name]
        out[TAG_HEAP_A] = (rows, None)
    return out


def _strings(recs: np.ndarray, heads: np.ndarray) -> dict[int, str]:
    """{string id: text} of the interned strings whose records start at ``heads``."""
    out = {}
    sids = recs[heads, 0:4].copy().view("<i4").ravel().tolist()
    lens = recs[heads, 4:6].copy().view("<u2").ravel().tolist()
    for h, sid, n in zip(heads.tolist(), sids, lens):
        data = recs[h, 6 : 6 + min(n, STRING_INLINE)].tobytes()
        k = 1
        while len(data) < n:
            data += recs[h + k, : min(STRING_PER_CONT, n - len(data))].tobytes()
            k += 1
        out[sid] = data.decode("utf-8", "replace")
    return out
