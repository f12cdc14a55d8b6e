"""Block events in bounded, time-ordered pieces: what every streaming consumer reads.

A :class:`BlockChunk` holds consecutive call-level block events (one row per probe
call) as numpy columns.  Chunks of one source come in time order, and a run of events
with the same timestamp is never split between two chunks (a consumer can use
``searchsorted`` on times inside a chunk without looking ahead).  Event ``i`` owns
``ids[offsets[i]:offsets[i + 1]]``.

``pool`` is the global pool index (``PoolInfo.index``); ``req`` is a bundle-wide
request key (-1: none), dense per process: see the reader.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from kvprof.trace.reader import BlockStream

DEFAULT_CHUNK_EVENTS = 1 << 17


@dataclass
class BlockChunk:
    t: np.ndarray  # int64
    kind: np.ndarray  # uint8
    pool: np.ndarray  # int32, global pool index
    req: np.ndarray  # int64, request key, -1 none
    arg: np.ndarray  # int64
    arg2: np.ndarray  # int64
    n: np.ndarray  # int64, ids of each event
    ids: np.ndarray  # int32, back to back

    def __len__(self) -> int:
        return len(self.t)

    @property
    def offsets(self) -> np.ndarray:
        off = np.zeros(len(self.n) + 1, dtype=np.int64)
        np.cumsum(self.n, out=off[1:])
        return off

    def take(self, rows: np.ndarray) -> BlockChunk:
        """The events ``rows`` (sorted indices or a boolean mask) with their ids."""
        if rows.dtype == bool:
            mask = rows
        else:
            mask = np.zeros(len(self.t), dtype=bool)
            mask[rows] = True
        if mask.all():
            return self
        idmask = np.repeat(mask, self.n)
        return BlockChunk(
            self.t[mask],
            self.kind[mask],
            self.pool[mask],
            self.req[mask],
            self.arg[mask],
            self.arg2[mask],
            self.n[mask],
            self.ids[idmask],
        )

    def split(self, at: int) -> tuple[BlockChunk, BlockChunk]:
        """Events [0, at) and [at, len)."""
        cut = int(self.n[:at].sum())
        a = BlockChunk(
            self.t[:at],
            self.kind[:at],
            self.pool[:at],
            self.req[:at],
            self.arg[:at],
            self.arg2[:at],
            self.n[:at],
            self.ids[:cut],
        )
        b = BlockChunk(
            self.t[at:],
            self.kind[at:],
            self.pool[at:],
            self.req[at:],
            self.arg[at:],
            self.arg2[at:],
            self.n[at:],
            self.ids[cut:],
        )
        return a, b

    @staticmethod
    def concat(parts: list[BlockChunk]) -> BlockChunk:
        parts = [p for p in parts if len(p)] or parts[:1]
        if len(parts) == 1:
            return parts[0]
        return BlockChunk(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("t", "kind", "pool", "req", "arg", "arg2", "n", "ids")
            )
        )

    @staticmethod
    def empty() -> BlockChunk:
        e = np.zeros(0, dtype=np.int64)
        return BlockChunk(e, e.astype(np.uint8), e.astype(np.int32), e, e, e, e, e.astype(np.int32))


def tie_safe(chunks: Iterable[BlockChunk]) -> Iterator[BlockChunk]:
    """Re-cut time-ordered chunks so that no run of equal timestamps spans two of them:
    the tail run of each chunk is held back and put in front of the next."""
    held: BlockChunk | None = None
    for c in chunks:
        if not len(c):
            continue
        if held is not None:
            c = BlockChunk.concat([held, c])
            held = None
        last = c.t[-1]
        cut = int(np.searchsorted(c.t, last, side="left"))
        if cut == 0:  # the whole chunk is one timestamp: hold all of it
            held = c
            continue
        out, held = c.split(cut)
        yield out
    if held is not None and len(held):
        yield held


def from_stream(
    stream: BlockStream, pools: list[int] | None = None, chunk_events: int = DEFAULT_CHUNK_EVENTS
) -> Iterator[BlockChunk]:
    """Chunks of an in-memory :class:`kvprof.trace.reader.BlockStream` (tests, simulators),
    restricted to the global pool indices ``pools`` (None: all), in stream order."""
    if pools is None:
        sel = np.arange(len(stream.t))
    else:
        sel = np.flatnonzero(np.isin(stream.pool, np.asarray(pools, dtype=np.int64)))
    off = stream.offsets
    n = stream.n.astype(np.int64)

    def pieces() -> Iterator[BlockChunk]:
        for a in range(0, len(sel), chunk_events):
            rows = sel[a : a + chunk_events]
            starts = off[rows]
            reps = n[rows]
            within = np.arange(int(reps.sum()), dtype=np.int64) - np.repeat(np.cumsum(reps) - reps, reps)
            ids = stream.ids[np.repeat(starts, reps) + within].astype(np.int32)
            yield BlockChunk(
                stream.t[rows].astype(np.int64),
                stream.kind[rows].astype(np.uint8),
                stream.pool[rows].astype(np.int32),
                stream.req[rows].astype(np.int64),
                stream.arg[rows].astype(np.int64),
                stream.arg2[rows].astype(np.int64),
                reps,
                ids,
            )

    return tie_safe(pieces())
