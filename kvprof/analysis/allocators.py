"""Simulated block allocators for `kvprof whatif`.

Each allocator owns the free blocks of a pool of ``n`` ids; reserved ids are never
free.  Free blocks may hold cached content (the replay keeps that apart); to the
allocator they are simply free.  All allocators have the same interface:

* ``alloc(k)`` -> list of k ids (contiguous for the run allocators; a buddy allocator
  hands out a whole power-of-two chunk, so it may return more), or None;
* ``free(b)`` returns one block; ``take(b)`` removes one free block (a prefix-cache hit);
* ``free_count``, ``free_mask`` (bool per id, for external fragmentation);
* ``largest_run()``: the longest run the allocator could hand out at once.

``free-queue`` is vLLM's FreeKVCacheBlockQueue (and nano-vllm's deque): blocks leave
from the head, return at the tail in the order given, a hit takes a block out of the
middle; any set of blocks serves a request (paged).  ``first-fit``, ``best-fit`` and
``buddy`` serve each allocation call from one run of consecutive ids, as an allocator
of contiguous KV memory would.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from kvprof.analysis.blocks import true_runs

POLICIES = ("free-queue", "first-fit", "best-fit", "buddy")
CONTIGUOUS = frozenset({"first-fit", "best-fit", "buddy"})  # serve each allocation from one run of ids


def make(
    policy: str, n: int, reserved: Iterable[int] = (), uncached_first: bool = False, order: str = "fifo"
) -> FreeQueue | FirstFit | BestFit | Buddy:
    cls: type[FreeQueue | FirstFit | BestFit | Buddy] | None = {
        "free-queue": FreeQueue,
        "first-fit": FirstFit,
        "best-fit": BestFit,
        "buddy": Buddy,
    }.get(policy)
    if cls is None:
        raise ValueError(f"unknown allocator policy {policy!r} (one of: {', '.join(POLICIES)})")
    if cls is FreeQueue:
        return cls(n, reserved, uncached_first, order)
    return cls(n, reserved)


class FreeQueue:
    """The free block queue of a paged pool (an OrderedDict: O(1) at both ends and in the
    middle).  Blocks leave from the head.  Freed blocks go to the tail, in the order a
    request frees them (tail block first, so it is evicted first); with
    ``uncached_first`` (vLLM 0.32's BlockPool.free_blocks), blocks holding no cached
    content go to the head instead, to be reused at once."""

    contiguous = False

    def __init__(self, n: int, reserved: Iterable[int] = (), uncached_first: bool = False, order: str = "fifo"):
        from collections import OrderedDict

        self.n = n
        self.uncached_first = uncached_first
        self.order = order  # "fifo" (vLLM, nano-vllm, the demo's lru), "lifo", "lowest" (lowest id first)
        self.heap: list[int] = []
        res = set(reserved)
        self.queue = OrderedDict.fromkeys(b for b in range(n) if b not in res)
        self.free_mask = np.zeros(n, dtype=bool)
        self.free_mask[list(self.queue)] = True
        if order == "lowest":
            self.heap = list(self.queue)
            heapq.heapify(self.heap)

    @property
    def free_count(self) -> int:
        return len(self.queue)

    def can_alloc(self, k: int) -> bool:
        return k <= len(self.queue)

    def alloc(self, k: int) -> list[int] | None:
        if k > len(self.queue):
            return None
        if self.order == "lowest":
            out: list[int] = []
            while len(out) < k:
                b = heapq.heappop(self.heap) if self.heap else min(self.queue)
                if b in self.queue and b not in out:
                    out.append(b)
            for b in out:
                del self.queue[b]
        else:
            pop = self.queue.popitem
            last = self.order == "lifo"
            out = [pop(last=last)[0] for _ in range(k)]
        self.free_mask[out] = False
        return out

    def free(self, b: int) -> None:
        self.queue[b] = None
        self.free_mask[b] = True
        if self.order == "lowest":
            heapq.heappush(self.heap, b)

    def free_many(self, blocks: Sequence[int], cached: Any) -> None:
        """One free call: ``cached[i]`` says whether blocks[i] still holds cached content."""
        if not self.uncached_first:
            for b in blocks:
                self.free(b)
            return
        front = [b for b, c in zip(blocks, cached) if not c]
        for b, c in zip(blocks, cached):
            if c:
                self.free(b)
        q = self.queue
        for b in reversed(front):  # prepend, keeping their order
            q[b] = None
            q.move_to_end(b, last=False)
            self.free_mask[b] = True

    def take(self, b: int) -> None:
        del self.queue[b]
        self.free_mask[b] = False

    def largest_run(self) -> int:
        return len(self.queue)  # paged: any blocks serve


class _RunAllocator:
    """Free ids as a mask; subclasses choose the run (``_pick``)."""

    contiguous = True
    _pick: Callable[[np.ndarray, np.ndarray, int], int | None]  # (run starts, run lengths, k) -> the first id

    def __init__(self, n: int, reserved: Iterable[int] = ()):
        self.n = n
        self.free_mask = np.ones(n, dtype=bool)
        for b in reserved:
            if 0 <= b < n:
                self.free_mask[b] = False
        self._count = int(self.free_mask.sum())

    @property
    def free_count(self) -> int:
        return self._count

    def can_alloc(self, k: int) -> bool:
        return k <= self.largest_run()

    def alloc(self, k: int) -> list[int] | None:
        if k > self._count:
            return None
        starts, lengths = true_runs(self.free_mask)
        s = self._pick(starts, lengths, k)
        if s is None:
            return None
        self.free_mask[s : s + k] = False
        self._count -= k
        return list(range(s, s + k))

    def free(self, b: int) -> None:
        self.free_mask[b] = True
        self._count += 1

    def free_many(self, blocks: Sequence[int], cached: Any) -> None:
        for b in blocks:
            self.free(b)

    def take(self, b: int) -> None:
        self.free_mask[b] = False
        self._count -= 1

    def largest_run(self) -> int:
        _, lengths = true_runs(self.free_mask)
        return int(lengths.max()) if len(lengths) else 0


class FirstFit(_RunAllocator):
    """The lowest-addressed run that is long enough."""

    def _pick(self, starts: np.ndarray, lengths: np.ndarray, k: int) -> int | None:
        ok = np.flatnonzero(lengths >= k)
        return int(starts[ok[0]]) if len(ok) else None


class BestFit(_RunAllocator):
    """The shortest run that is long enough (lowest address among equals)."""

    def _pick(self, starts: np.ndarray, lengths: np.ndarray, k: int) -> int | None:
        ok = np.flatnonzero(lengths >= k)
        if not len(ok):
            return None
        return int(starts[ok[np.argmin(lengths[ok])]])  # argmin: first (lowest) of the shortest


class Buddy:
    """Binary buddy allocator over ids 0..n-1 (n need not be a power of two: the pool is
    covered by maximal aligned power-of-two chunks).  An allocation of k blocks takes a
    chunk of 2**ceil(log2 k) blocks; a freed block merges with its buddy whenever both are
    wholly free, up to the largest aligned chunk that fits in the pool."""

    contiguous = True

    def __init__(self, n: int, reserved: Iterable[int] = ()):
        self.n = n
        self.max_order = max(0, int(n).bit_length() - 1)
        self.free_sets: list[set[int]] = [set() for _ in range(self.max_order + 1)]
        self.heaps: list[list[int]] = [[] for _ in range(self.max_order + 1)]
        self.free_mask = np.zeros(n, dtype=bool)
        self._count = 0
        start = 0
        while start < n:  # maximal aligned chunks covering [0, n)
            o = self.max_order
            while o > 0 and (start % (1 << o) or start + (1 << o) > n):
                o -= 1
            self._push(start, o)
            start += 1 << o
        self.free_mask[:] = True
        self._count = n
        for b in reserved:
            if 0 <= b < n:
                self.take(b)

    @property
    def free_count(self) -> int:
        return self._count

    def _push(self, start: int, order: int) -> None:
        self.free_sets[order].add(start)
        heapq.heappush(self.heaps[order], start)

    def _pop(self, order: int) -> int | None:
        h, s = self.heaps[order], self.free_sets[order]
        while h:
            start = heapq.heappop(h)
            if start in s:  # lazy deletion: merged or split chunks stay in the heap
                s.remove(start)
                return start
        return None

    @staticmethod
    def order_for(k: int) -> int:
        return max(0, (k - 1).bit_length())

    def can_alloc(self, k: int) -> bool:
        o = self.order_for(k)
        return any(self.free_sets[j] for j in range(o, self.max_order + 1))

    def alloc(self, k: int) -> list[int] | None:
        o = self.order_for(k)
        if o > self.max_order:
            return None
        for j in range(o, self.max_order + 1):
            if self.free_sets[j]:
                start: int = self._pop(j)  # type: ignore[assignment]  # not None: free_sets[j] is not empty
                while j > o:  # split, keeping the lower half
                    j -= 1
                    self._push(start + (1 << j), j)
                size = 1 << o
                self.free_mask[start : start + size] = False
                self._count -= size
                return list(range(start, start + size))
        return None

    def free(self, b: int) -> None:
        self.free_mask[b] = True
        self._count += 1
        start, o = b, 0
        while o < self.max_order:
            buddy = start ^ (1 << o)
            if buddy not in self.free_sets[o]:
                break
            self.free_sets[o].remove(buddy)
            start = min(start, buddy)
            o += 1
        self._push(start, o)

    def take(self, b: int) -> None:
        """Remove one free block: find the free chunk holding it and split it around b."""
        for o in range(self.max_order + 1):
            start = b & ~((1 << o) - 1)
            if start in self.free_sets[o]:
                self.free_sets[o].remove(start)
                while o > 0:
                    o -= 1
                    half = 1 << o
                    if b < start + half:
                        self._push(start + half, o)
                    else:
                        self._push(start, o)
                        start += half
                self.free_mask[b] = False
                self._count -= 1
                return
        raise KeyError(f"block {b} is not free")

    def free_many(self, blocks: Sequence[int], cached: Any) -> None:
        for b in blocks:
            self.free(b)

    def largest_run(self) -> int:
        for o in range(self.max_order, -1, -1):
            if self.free_sets[o]:
                return 1 << o
        return 0

    def chunks(self) -> list[tuple[int, int]]:
        """(start, order) of every free chunk (for tests)."""
        return [(s, o) for o, ss in enumerate(self.free_sets) for s in ss]
