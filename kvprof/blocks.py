"""Public API: report the block state of your own paged KV-cache pool to kvprof.

Usage::

    import kvprof.blocks

    pool = kvprof.blocks.Pool(num_blocks=1024, block_size=16, name="gpu")
    pool.request_arrived("r1", prompt_tokens=300)
    pool.prefix_query("r1", query_tokens=300, hit_tokens=256)
    pool.hit([3, 4, 5], request="r1")      # cached blocks reused by r1
    pool.alloc([7, 8], request="r1")       # fresh blocks taken from the free pool
    pool.request_state("r1", filled_tokens=300, blocks_held=5)
    pool.cache([7])                         # block 7 is full and hashed
    pool.free([3, 4, 5, 7, 8], request="r1")
    pool.request_finished("r1")

Every method is a no-op costing one attribute check when the process is not
being recorded by ``kvprof record``, so the calls can stay in production code.

State rules (the analyzer relies on them, see docs/metrics.md):

* ``alloc`` takes blocks whose reference count is 0; any cached content in
  them is evicted by that allocation.
* ``hit`` adds one reference to blocks holding a cached prefix; a block at
  reference 0 leaves the free pool.
* ``free`` drops one reference per block; at 0 the block is free again, and
  stays a cache candidate if it was ``cache``-d and not ``evict``-ed.
* ``request_state`` tells how many token slots of the request's blocks hold a
  token; it is what internal fragmentation is computed from.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvprof import runtime
from kvprof.trace.format import EventKind as K
from kvprof.trace.stage import PACK_N, TAG_BLOCK as _TAG
from kvprof.trace.stage import pack_block as _pack_block

_now = runtime.now
_PACK = [s.pack for s in PACK_N]  # a block event with 0..3 ids
_PACK0 = _PACK[0]
_STATE = int(K.REQ_STATE)

__all__ = ["Pool"]


def _ids(blocks: Iterable[int]):
    # written before the call returns: the caller's own sequence will do (an iterator is read once)
    return blocks if type(blocks) in (list, tuple) else list(blocks)


class Pool:
    """A block pool of ``num_blocks`` blocks of ``block_size`` token slots.

    ``reserved`` lists block ids that are never free or used capacity (a null
    block).  ``clock`` optionally replaces the monotonic clock (a callable
    returning nanoseconds), for simulations that want reproducible timings.
    ``bytes_per_block`` (when known) lets reports speak in bytes.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        name: str = "pool",
        *,
        reserved: Iterable[int] = (),
        engine: str = "custom",
        clock=None,
        bytes_per_block: int | None = None,
        **extra,
    ):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        self.name = name
        self._clock = clock
        self.index = runtime.declare_pool(
            {
                "name": name,
                "engine": engine,
                "num_blocks": self.num_blocks,
                "block_size": self.block_size,
                "bytes_per_block": bytes_per_block,
                "clock": "simulated" if clock is not None else "monotonic",
                **extra,
            }
        )
        reserved = list(reserved)
        if reserved:
            self._emit(K.RESERVE, None, 0, 0, reserved)

    def _emit(self, kind, request, arg, arg2, ids):
        # The hot path, inlined: one struct pack and one mmap write (see kvprof/trace/writer.py);
        # anything unusual (a value that does not fit, a full segment) goes the careful way.
        w = runtime.writer
        if w is None:
            return
        if request is None:
            rid = -1
        else:
            rid = w._strings.get(request) if type(request) is str else None
            if rid is None:
                rid = w.intern_request(request)
        t = self._clock() if self._clock else _now()
        n = len(ids)
        try:
            data = (
                _PACK[n](t, kind, self.index, rid, arg, arg2, n, *ids, _TAG)
                if n <= 3
                else _pack_block(t, kind, self.index, rid, arg, arg2, ids)
            )
        except Exception:
            w.block(t, kind, self.index, rid, arg, arg2, ids)  # clamps or drops, and says so
            return
        try:
            w.write(data)
        except ValueError:  # the segment is full
            w._rotate_and_write(data)

    # -- block state changes ----------------------------------------------------
    def alloc(self, block_ids: Iterable[int], request=None) -> None:
        """Blocks taken from the free pool (evicting any cached content in them)."""
        self._emit(K.ALLOC, request, 0, 0, _ids(block_ids))

    def free(self, block_ids: Iterable[int], request=None) -> None:
        """One reference dropped on each block."""
        self._emit(K.FREE, request, 0, 0, _ids(block_ids))

    def hit(self, block_ids: Iterable[int], request=None) -> None:
        """Cached blocks reused through the prefix cache (one reference added each)."""
        self._emit(K.HIT, request, 0, 0, _ids(block_ids))

    def cache(self, block_ids: Iterable[int]) -> None:
        """Full blocks hashed into the prefix cache."""
        self._emit(K.CACHE, None, 0, 0, _ids(block_ids))

    def evict(self, block_ids: Iterable[int]) -> None:
        """Cached content dropped without an allocation (cache reset, explicit evict)."""
        self._emit(K.EVICT, None, 0, 0, _ids(block_ids))

    # -- requests ------------------------------------------------------------------
    def request_arrived(self, request, prompt_tokens: int, max_new_tokens: int = -1) -> None:
        self._emit(K.REQ_ARRIVE, request, prompt_tokens, max_new_tokens, ())

    def prefix_query(self, request, query_tokens: int, hit_tokens: int, preempted: bool = False) -> None:
        """A prefix-cache lookup of ``query_tokens`` tokens, ``hit_tokens`` of them found.
        ``preempted``: the lookup of a preempted request coming back, which vLLM counts apart
        (``blocks.prefix_cache.preempted_*``) from first admissions (``blocks.prefix_cache.*``)."""
        self._emit(K.REQ_QUERY_PREEMPTED if preempted else K.REQ_QUERY, request, query_tokens, hit_tokens, ())

    def request_state(self, request, filled_tokens: int, blocks_held: int) -> None:
        """The request's block table now has ``blocks_held`` blocks holding ``filled_tokens`` tokens."""
        # the most frequent call (every running request, every step): _emit inlined once more
        w = runtime.writer
        if w is None:
            return
        rid = w._strings.get(request) if type(request) is str else None
        if rid is None:
            rid = -1 if request is None else w.intern_request(request)
        t = self._clock() if self._clock else _now()
        try:
            data = _PACK0(t, _STATE, self.index, rid, filled_tokens, blocks_held, 0, _TAG)
        except Exception:
            w.block(t, _STATE, self.index, rid, filled_tokens, blocks_held, ())  # clamps or drops, and says so
            return
        try:
            w.write(data)
        except ValueError:  # the segment is full
            w._rotate_and_write(data)

    def request_finished(self, request) -> None:
        self._emit(K.REQ_FINISH, request, 0, 0, ())

    def preempted(self, request) -> None:
        self._emit(K.REQ_PREEMPT, request, 0, 0, ())

    def allocation_failed(self, request=None, blocks_needed: int = -1, free_blocks: int = -1) -> None:
        self._emit(K.ALLOC_FAIL, request, blocks_needed, free_blocks, ())

    def mark(self, name: str, value: int = 0) -> None:
        """A user marker on this pool's clock (use it instead of kvprof.mark with a simulated clock)."""
        if runtime.writer is not None:
            runtime.mark(name, value, self._clock() if self._clock else None)

    def step(self, number: int = 0) -> None:
        """An engine step begins (used for per-step churn)."""
        self._emit(K.STEP, None, number, 0, ())
