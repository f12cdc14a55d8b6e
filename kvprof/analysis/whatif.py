"""`kvprof whatif`: replay a recorded request stream through simulated block pools.

Two steps:

1. A :class:`ScheduleBuilder` turns one pool's recorded events, fed as time-ordered
   :class:`kvprof.trace.chunks.BlockChunk` pieces (the analysis engine feeds it during its
   own pass over the bundle; :func:`extract` does it from an in-memory stream), into a
   *schedule*: per request, when it was admitted, how many tokens each allocation was for,
   which earlier requests' prefixes it shares (from the owners of the blocks it hit), which
   tokens it had cached, when it released its blocks, when it was preempted and finished.
   Nothing in it depends on the block size except through token counts.  The schedule is
   numpy arrays: per operation a one-byte opcode and four int32 (time step, request, two
   operands), plus int32 payloads (positions, query hints): about 17 bytes an operation.
2. :func:`replay` runs that schedule through a pool of another block size, pool size and
   allocator, and measures it with the definitions `kvprof analyze` uses.  The replay is a
   compiled kernel (numba, kvprof/analysis/whatif_kernel.py); configurations run in
   parallel threads (:func:`replay_many`).

The schedule is the recorded one: requests arrive, grow and finish when they did.  What
the configuration changes is what fits.  Where the simulated pool is short at a moment
the engine was short too, the engine's own preemptions are replayed; where it has room,
they are skipped (the victim keeps its blocks); where it is short and the engine was not,
the replay preempts the newest running request (recompute, as vLLM does), and that
request resumes at its next recorded allocation or step once blocks are free.  With the
recorded configuration every decision matches the engine's, so the replay reproduces the
recorded peak, fragmentation and prefix-cache hits exactly (tests hold it to that, and the
compiled replay to the pure-Python one kept in tests/whatif_reference.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvprof.analysis import allocators as allocators  # re-exported: commands/whatif.py uses W.allocators
from kvprof.analysis.blocks import true_runs
from kvprof.trace.format import EventKind as K

if TYPE_CHECKING:
    from kvprof.trace.chunks import BlockChunk
    from kvprof.trace.reader import BlockStream, PoolInfo

UNLIMITED = -1
RECOVERIES = ("preempt", "seeds")
_POLICY_IDS = {"free-queue": 0, "first-fit": 1, "best-fit": 2, "buddy": 3}
_ORDER_IDS = {"fifo": 0, "lifo": 1, "lowest": 2}


_NOTED = False


def _kernel() -> Any:  # the whatif_kernel module (numba's compiled functions)
    """The compiled kernels (imported here, never at kvprof's start: numba takes ~0.3 s)."""
    global _NOTED
    try:
        from kvprof.analysis import whatif_kernel
    except ImportError as exc:  # numba missing or broken
        raise ValueError(f"kvprof whatif needs numba (pip install 'numba>=0.60'): {exc}") from None
    if not _NOTED:
        _NOTED = True
        import sys

        if (
            sys.stderr is not None
            and sys.stderr.isatty()
            and whatif_kernel.cache_is_cold(whatif_kernel.build_chunk, whatif_kernel.replay)
        ):
            print(
                "kvprof: compiling the what-if replay, once for this install (about 30 s)", file=sys.stderr, flush=True
            )
    return whatif_kernel


@dataclass
class Schedule:
    pool: str
    engine: str
    block_size: int
    num_blocks: int
    reserved_ids: list[Any]
    bytes_per_block: int | None
    t_start: int
    t_end: int
    requests: int
    prefix_caching: bool
    final_lengths: np.ndarray  # tokens of each request at its last state
    unsupported: dict[str, Any] = field(default_factory=dict)  # events the replay cannot use, by kind
    engine_policy: str | None = (
        None  # the pool's own free order, when it declared one (the demo's lru, lifo, lowest-id)
    )
    # the operations (see whatif_kernel, "the schedule builder")
    code: np.ndarray | None = None  # uint8, one per operation
    ops: np.ndarray | None = None  # int32 rows: time step (uint32 bits), local request (0: none), a, b
    payload: np.ndarray | None = None  # int32
    operations: int = 0  # operations (the slots left unused not counted)
    request_keys: np.ndarray | None = None  # local request index -> the bundle's request key
    max_tokens: np.ndarray | None = None  # per local request: the most tokens any of its operations names
    # content classes of (request, recorded block index): blocks whose token prefixes the
    # recorded hits show equal.  Request r's nodes are blocks 0..L-1, class_of[class_off[r] + j];
    # a block beyond them is a class of its own
    class_off: np.ndarray | None = None
    class_of: np.ndarray | None = None
    foreign_ids: int = 0  # 1 + the largest id of blocks taken without a request
    foreign_blocks: int = 0  # blocks taken without a request, all told
    foreign_largest: int = 0  # the most blocks one allocation without a request took
    events: int = 0  # the pool's events fed
    states: int = 0  # its request states

    def free_order(self) -> tuple[bool, str]:
        """The engine's own free queue: (uncached blocks reused first, order blocks leave in)."""
        if self.engine == "vllm":
            return True, "fifo"  # vLLM 0.32 BlockPool.free_blocks: uncached to the head, cached to the tail
        return False, {"lifo": "lifo", "lowest-id": "lowest", "first-fit": "lowest"}.get(
            self.engine_policy or "", "fifo"
        )

    def free_order_label(self) -> str:
        first, order = self.free_order()
        return {"fifo": "LRU queue", "lifo": "LIFO stack", "lowest": "lowest id first"}[order] + (
            ", uncached blocks reused first" if first else ""
        )

    bytes_per_token_given: float | None = None  # --bytes-per-token, over the bundle's own figure

    @property
    def bytes_per_token(self) -> float | None:
        if self.bytes_per_token_given:
            return self.bytes_per_token_given
        return self.bytes_per_block / self.block_size if self.bytes_per_block else None

    @property
    def nbytes(self) -> int:
        """Bytes the schedule's arrays hold."""
        return sum(
            x.nbytes
            for x in (
                self.code,
                self.ops,
                self.payload,
                self.request_keys,
                self.max_tokens,
                self.class_off,
                self.class_of,
                self.final_lengths,
            )
            if x is not None
        )


def _grown(arr: np.ndarray, size: int, fill: Any) -> np.ndarray:
    """arr with ``size`` rows, the new ones ``fill`` (a value, or one per column)."""
    out = np.empty((size,) + arr.shape[1:], dtype=arr.dtype)
    out[len(arr) :] = fill
    out[: len(arr)] = arr
    return out


class ScheduleBuilder:
    """The schedule of one pool, built from its events chunk by chunk.

        builder = ScheduleBuilder(info)        # info: the pool's PoolInfo
        for chunk in chunks:                   # time-ordered BlockChunks of that pool
            builder.feed(chunk)
        schedule = builder.finish()

    ``info`` is the pool's PoolInfo (read: index, label, engine, num_blocks, block_size,
    bytes_per_block, extra).  Chunks are :class:`kvprof.trace.chunks.BlockChunk`, in time
    order; they may be cut anywhere (the schedule is the same), and events of other pools
    in them are skipped.  Memory: the schedule so far (~19 bytes an operation, grown in
    place by half) and what is live: per request a few integers, per recorded block id an
    owner, the positions of the blocks requests hold.
    """

    def __init__(self, info: PoolInfo | Any) -> None:  # a PoolInfo, or a stand-in with its fields
        self.info = info
        self.B0 = int(info.block_size)
        self._K = K = _kernel()
        st = np.zeros(K.N_BUILD_SCALARS, np.int64)
        st[K.S_PFREE] = -1
        nb = max(int(info.num_blocks), 1)
        self._a = {  # the builder's arrays, in build_chunk's order
            "st": st,
            "code": np.zeros(1 << 12, np.uint8),
            "ops": np.zeros((1 << 12, 4), np.int32),
            "pay": np.zeros(1 << 12, np.int32),
            "BLK": _grown(np.zeros((0, K.N_BUILD_BLOCK), np.int32), nb, K.BUILD_BLOCK_INIT),
            "RQ": _grown(np.zeros((0, K.N_BUILD_REQ), np.int64), 1024, K.BUILD_REQ_INIT),
            "PN": np.zeros((1024, 2), np.int64),
            "HMK": np.full(1 << 12, K.EMPTY, np.int64),
            "HMV": np.zeros(1 << 12, np.int64),
            "UN": np.zeros((1024, 3), np.int64),
            "X": np.zeros((256, 7), np.int64),
        }
        # request keys -> local index (0: no request), dense keys through an array
        self._keymap = np.full(1024, -1, np.int32)  # key + 1 -> local
        self._keymap[0] = 0
        self._keys = [np.array([-1], np.int64)]
        self._nloc = 1
        self._done = False

    # -- request keys ---------------------------------------------------------------------------
    def _local(self, keys: np.ndarray) -> np.ndarray:
        idx = np.maximum(keys, -1) + 1
        top = int(idx.max()) if len(idx) else 0
        if top >= len(self._keymap):
            self._keymap = _grown(self._keymap, max(top + 1, 2 * len(self._keymap)), -1)
        loc: np.ndarray = self._keymap[idx]
        new = loc < 0
        if new.any():
            cand = idx[new]
            lo = int(cand.min())  # new requests of a chunk are mostly a run of keys: mark over that range
            seen = np.zeros(int(cand.max()) - lo + 1, dtype=bool)
            seen[cand - lo] = True
            fresh = np.flatnonzero(seen) + lo
            self._keymap[fresh] = np.arange(self._nloc, self._nloc + len(fresh), dtype=np.int32)
            self._keys.append(fresh.astype(np.int64) - 1)
            self._nloc += len(fresh)
            loc = self._keymap[idx]
        return loc

    def _ensure(self, name: str, size: int, fill: Any = 0) -> None:
        """Room for ``size`` rows: grown by half in place (realloc: no second buffer at the
        peak, where a copy would hold the old and the new array at once)."""
        arr = self._a[name]
        old = len(arr)
        if size > old:
            arr.resize((max(size, old + (old >> 1)),) + arr.shape[1:], refcheck=False)
            arr[old:] = fill

    # -- feeding ---------------------------------------------------------------------------------
    def feed(self, chunk: BlockChunk) -> None:
        """Take the next time-ordered chunk of this pool's events (other pools' are skipped)."""
        if self._done:
            raise RuntimeError("ScheduleBuilder.feed after finish")
        if not len(chunk):
            return
        mine = chunk.pool == self.info.index
        if not mine.all():
            if not mine.any():
                return
            chunk = chunk.take(mine)
        K, a = self._K, self._a
        st = a["st"]
        nev, nids = len(chunk), len(chunk.ids)
        rl = self._local(np.asarray(chunk.req, np.int64))
        ids = np.asarray(chunk.ids, np.int32)
        if nids and int(ids.min()) < 0:
            raise ValueError(f"pool {self.info.label}: negative block ids in the trace")
        # capacities: the most one chunk can add
        self._ensure("code", int(st[K.S_NOPS]) + 3 * nev + 2 * nids + 4)
        self._ensure("ops", int(st[K.S_NOPS]) + 3 * nev + 2 * nids + 4)
        self._ensure("pay", int(st[K.S_NPAY]) + 2 * nev + nids + 4)
        self._ensure("BLK", int(ids.max()) + 1 if nids else 0, K.BUILD_BLOCK_INIT)
        self._ensure("RQ", self._nloc, K.BUILD_REQ_INIT)
        self._ensure("PN", int(st[K.S_PTOP]) + 2 * nev + 1)
        self._ensure("UN", int(st[K.S_NUNION]) + nids + 1)
        self._ensure("X", int(chunk.n.max()) + 1)
        live = int(st[K.S_HM_COUNT]) + nids
        if 2 * live > len(a["HMK"]):
            size = len(a["HMK"])
            while 2 * live > size:
                size *= 2
            nk, nv = np.full(size, K.EMPTY, np.int64), np.zeros(size, np.int64)
            K.hm_rehash(a["HMK"], a["HMV"], nk, nv)
            a["HMK"], a["HMV"] = nk, nv
        K.build_chunk(
            a["st"],
            a["code"],
            a["ops"],
            a["pay"],
            a["BLK"],
            a["RQ"],
            a["PN"],
            a["HMK"],
            a["HMV"],
            a["UN"],
            a["X"],
            self.B0,
            np.asarray(chunk.t, np.int64),
            np.asarray(chunk.kind, np.uint8),
            rl,
            np.asarray(chunk.arg, np.int64),
            np.asarray(chunk.arg2, np.int64),
            np.asarray(chunk.n, np.int64),
            ids,
        )

    @property
    def events(self) -> int:
        return int(self._a["st"][self._K.S_EVENTS])

    @property
    def states(self) -> int:
        return int(self._a["st"][self._K.S_STATES])

    def finish(self) -> Schedule:
        """The schedule; the builder's working state is released."""
        K, a, info = self._K, self._a, self.info
        st = a["st"]
        self._done = True
        nops, npay, nloc, nu = int(st[K.S_NOPS]), int(st[K.S_NPAY]), self._nloc, int(st[K.S_NUNION])

        def trim(arr: np.ndarray, n: int) -> np.ndarray:  # in place (realloc: no copy, no second buffer at the peak)
            arr.resize((n,) + arr.shape[1:], refcheck=False)
            return arr

        cls_off, cls = K.build_classes(a["UN"], nu, nloc)
        RQ = a["RQ"][:nloc]
        has = RQ[:, K.Q_HASFINAL] != 0
        unsupported = {}
        for slot, name in (
            (K.S_UNS_HIT, "hit without a request"),
            (K.S_UNS_FREE, "free of a block no request holds"),
            (K.S_UNS_EVICT, "explicit eviction"),
        ):
            if st[slot]:
                unsupported[name] = int(st[slot])
        keys = np.concatenate(self._keys)
        have = bool(st[K.S_HAVE_T])
        sched = Schedule(
            pool=info.label,
            engine=info.engine,
            block_size=self.B0,
            num_blocks=info.num_blocks,
            reserved_ids=np.flatnonzero(a["BLK"][:, K.W_RESERVED]).tolist(),
            bytes_per_block=info.bytes_per_block or info.extra.get("bytes_per_block"),
            t_start=int(st[K.S_TFIRST]) if have else 0,
            t_end=int(st[K.S_TLAST]) if have else 0,
            requests=int((keys >= 0).sum()),
            prefix_caching=bool(st[K.S_CACHED]),
            final_lengths=RQ[has, K.Q_FINAL].copy(),
            unsupported=unsupported,
            engine_policy=info.extra.get("free_order")
            or info.extra.get("policy"),  # "policy": bundles before the rename
            code=trim(a["code"], nops),
            ops=trim(a["ops"], nops),
            payload=trim(a["pay"], npay),
            operations=int(st[K.S_NREAL]),
            request_keys=keys,
            max_tokens=RQ[:, K.Q_MAXTOK].copy(),
            class_off=cls_off,
            class_of=cls,
            foreign_ids=int(st[K.S_FMAX]),
            foreign_blocks=int(st[K.S_NFALLOC]),
            foreign_largest=int(st[K.S_FALLOCMAX]),
            events=int(st[K.S_EVENTS]),
            states=int(st[K.S_STATES]),
        )
        self._a = {}
        return sched


def extract(stream: BlockStream, pool_index: int) -> Schedule:
    """The replayable schedule of one pool (a global pool index of ``stream``, an in-memory
    :class:`kvprof.trace.reader.BlockStream`)."""
    from kvprof.trace import chunks

    builder = ScheduleBuilder(stream.pools[pool_index])
    for chunk in chunks.from_stream(stream, [pool_index]):
        builder.feed(chunk)
    return builder.finish()


@dataclass
class Config:
    block_size: int
    num_blocks: int  # UNLIMITED: as many as the replay needs
    policy: str = "free-queue"
    recovery: str = "preempt"
    prefix_cache: bool = True


@dataclass
class ReplayResult:
    block_size: int
    num_blocks: int | None
    policy: str
    recovery: str
    prefix_cache: bool
    recorded: bool
    metrics: dict[str, Any]  # analyze's metric names, plus the what-if ones (whatif.*)


def pool_size(sched: Schedule, cfg: Config) -> int:
    """Blocks the replay's pool has: the configuration's, or, unlimited, enough for every
    request's final length at once (nothing can fail)."""
    if cfg.num_blocks != UNLIMITED:
        return int(cfg.num_blocks)
    B = cfg.block_size
    need = int((-(-np.maximum(sched.final_lengths, 1) // B)).sum()) + len(sched.reserved_ids) + 64
    return max(need + sched.foreign_blocks, 2)


def replay(sched: Schedule, cfg: Config) -> ReplayResult:
    if cfg.policy not in allocators.POLICIES:
        raise ValueError(f"unknown allocator policy {cfg.policy!r}")
    K = _kernel()
    B, n = int(cfg.block_size), pool_size(sched, cfg)
    limited = cfg.num_blocks != UNLIMITED
    reserved = np.array([b for b in sched.reserved_ids if b < n], dtype=np.int32)
    uncached_first, order = sched.free_order()
    M, N, F = K.replay(
        sched.code,
        sched.ops,
        sched.payload,
        sched.class_off,
        sched.class_of,
        sched.max_tokens,
        int(sched.block_size),
        int(sched.t_start),
        int(sched.t_end),
        int(sched.foreign_ids),
        int(sched.foreign_largest),
        B,
        n,
        _POLICY_IDS[cfg.policy],
        _ORDER_IDS[order],
        bool(uncached_first),
        cfg.recovery == "seeds",
        bool(cfg.prefix_cache and sched.prefix_caching),
        bool(limited),
        reserved,
    )
    mask = None
    if limited and M[K.C_PEAK] >= 0:
        mask = N[M[K.O_TRK] : M[K.O_TRK] + n * K.N_TRK].reshape(n, K.N_TRK)[:, K.T_PMASK]
    m = _metrics(sched, cfg, K, n, reserved, M, F, mask)
    recorded = (
        cfg.block_size == sched.block_size
        and cfg.num_blocks == sched.num_blocks
        and cfg.policy == "free-queue"
        and (cfg.prefix_cache or not sched.prefix_caching)
    )
    return ReplayResult(
        cfg.block_size,
        None if cfg.num_blocks == UNLIMITED else cfg.num_blocks,
        cfg.policy,
        cfg.recovery if cfg.policy in allocators.CONTIGUOUS else "n/a",
        cfg.prefix_cache and sched.prefix_caching,
        recorded,
        m,
    )


def _metrics(
    sched: Schedule,
    cfg: Config,
    K: Any,
    n: int,
    reserved: np.ndarray,
    SC: np.ndarray,
    FL: np.ndarray,
    peak_mask: np.ndarray | None,
) -> dict[str, Any]:
    """analyze's metrics, and the what-if ones, from the kernel's counters (SC), integrals (FL)
    and the free mask at the watermark."""
    B = cfg.block_size
    limited = cfg.num_blocks != UNLIMITED
    capacity = n - len(reserved)
    span = sched.t_end - sched.t_start
    peak = max(int(SC[K.C_PEAK]), 0)
    ext = runs = compaction = None
    if peak_mask is not None:
        mask = peak_mask.astype(bool)
        free_total = int(mask.sum())
        starts, lengths = true_runs(mask)
        runs = len(lengths)
        ext = (1.0 - int(lengths.max()) / free_total) if free_total else 0.0
        used = ~mask
        used[reserved] = False
        # compaction at the watermark: in-use blocks above the first `peak` usable ids must move
        usable = np.ones(n, dtype=bool)
        usable[reserved] = False
        lowmask = np.zeros(n, dtype=bool)
        lowmask[np.flatnonzero(usable)[:peak]] = True
        compaction = int((used & ~lowmask).sum())
    bpb = sched.bytes_per_token * B if sched.bytes_per_token else None
    lengths = sched.final_lengths[sched.final_lengths > 0]
    mean_blocks = (int((-(-lengths // B)).sum()) / len(lengths)) if len(lengths) else None
    i_blocks, i_slots, i_waste = float(FL[K.F_BLOCKS]), float(FL[K.F_SLOTS]), float(FL[K.F_WASTE])
    w, s = int(SC[K.C_IAP_W]), int(SC[K.C_IAP_S])
    at_peak = (min(w, s) / s) if SC[K.C_IAP_SET] and s > 0 else None
    query, hits = int(SC[K.C_QUERY]), int(SC[K.C_HIT])
    return {
        "blocks.peak_blocks": peak,
        "blocks.capacity": capacity if limited else None,
        "blocks.usage.high_watermark": (peak / capacity) if limited and capacity else None,
        "blocks.usage.time_weighted": (i_blocks / (span * capacity)) if span > 0 and capacity and limited else None,
        "blocks.internal_fragmentation.time_weighted": (i_waste / i_slots) if i_slots > 0 else None,
        "blocks.internal_fragmentation.at_peak": at_peak,
        "blocks.external_fragmentation.at_peak": ext if limited else None,
        "blocks.free_runs.at_peak": runs if limited else None,
        "blocks.prefix_cache.query_tokens": query,
        "blocks.prefix_cache.hit_tokens": hits,
        "blocks.prefix_cache.hit_rate": (hits / query) if query else None,
        "blocks.evictions": int(SC[K.C_EVICT]),
        "blocks.allocation_failures": int(SC[K.C_FAILS]),
        "blocks.fragmentation_that_hurts": int(SC[K.C_FRAG]),
        "blocks.preemptions": int(SC[K.C_PREEMPT]),
        "whatif.recomputed_tokens": int(SC[K.C_RECOMP]),
        "whatif.unserved_requests": int(SC[K.C_UNSERVED]),
        "whatif.max_running_requests": int(SC[K.C_MAXRUN]),
        "whatif.requests_held": (int(capacity // mean_blocks) if mean_blocks and limited else None),
        "whatif.peak_bytes": (peak * bpb) if bpb else None,
        "whatif.compaction_blocks_at_peak": compaction if limited else None,
        "whatif.compaction_bytes_at_peak": (compaction * bpb) if (bpb and compaction is not None and limited) else None,
        "whatif.defrag_blocks_moved": int(SC[K.C_MOVED]),
    }


# -- many configurations, across cores ------------------------------------------------------------
_WARM = False


def _warm() -> None:
    """Compile (or load from the cache) the replay kernel in this thread, before workers call it."""
    global _WARM
    if _WARM:
        return
    from types import SimpleNamespace

    info = SimpleNamespace(
        index=0, label="warm", engine="custom", num_blocks=2, block_size=1, bytes_per_block=None, extra={}
    )
    empty = ScheduleBuilder(info).finish()
    replay(empty, Config(1, 2))
    _WARM = True


def replay_many(sched: Schedule, configs: list[Config], jobs: int | None = None) -> list[ReplayResult]:
    """Replay every configuration; in parallel threads (the kernel releases the GIL; the
    schedule is shared) when there are several and more than one core."""
    jobs = jobs or os.cpu_count() or 1
    if len(configs) <= 1 or jobs <= 1:
        return [replay(sched, c) for c in configs]
    from concurrent.futures import ThreadPoolExecutor

    _warm()
    with ThreadPoolExecutor(max_workers=min(jobs, len(configs))) as ex:
        # the longest first (small blocks: more of them to move), so the cores finish together
        order = sorted(range(len(configs)), key=lambda i: configs[i].block_size)
        futures = {i: ex.submit(replay, sched, configs[i]) for i in order}
        return [futures[i].result() for i in range(len(configs))]


# -- block-size advice ---------------------------------------------------------------------------------
def advice(sched: Schedule, unlimited_rows: list[ReplayResult], metadata_bytes: int) -> dict[str, Any]:
    """The empirical optimum on the recorded lengths beside the closed form
    B* = sqrt(2 L m_metadata / m_token) (L: mean final length)."""
    bytes_per_token = sched.bytes_per_token
    lengths = sched.final_lengths[sched.final_lengths > 0]
    L = (int(lengths.sum()) / len(lengths)) if len(lengths) else None
    out: dict[str, Any] = {
        "mean_length": L,
        "metadata_bytes_per_block": metadata_bytes,
        "bytes_per_token": bytes_per_token,
    }
    if bytes_per_token and L:
        out["closed_form_block_size"] = math.sqrt(2 * L * metadata_bytes / bytes_per_token)
    costs = []
    for row in unlimited_rows:
        peak = row.metrics["blocks.peak_blocks"]
        if bytes_per_token:
            cost = peak * (row.block_size * bytes_per_token + metadata_bytes)
            costs.append({"block_size": row.block_size, "peak_blocks": peak, "peak_bytes": cost})
        else:
            costs.append({"block_size": row.block_size, "peak_blocks": peak, "peak_slots": peak * row.block_size})
    out["by_block_size"] = costs
    if costs:
        keyname = "peak_bytes" if bytes_per_token else "peak_slots"
        best = min(costs, key=lambda c: (c[keyname], c["block_size"]))
        out["empirical_block_size"] = best["block_size"]
        out["empirical_basis"] = (
            "KV bytes + block metadata at the replayed peak"
            if bytes_per_token
            else "token slots at the replayed peak (bytes per token unknown: metadata not weighed)"
        )
    return out


# -- the command's library side -------------------------------------------------------------------------
FIDELITY_METRICS = (
    "blocks.peak_blocks",
    "blocks.internal_fragmentation.time_weighted",
    "blocks.internal_fragmentation.at_peak",
    "blocks.prefix_cache.hit_tokens",
    "blocks.prefix_cache.query_tokens",
    "blocks.preemptions",
    "blocks.allocation_failures",
    "blocks.usage.time_weighted",
)
DEFAULT_SIZES = (8, 16, 32, 64, 128)
MAX_BLOCKS = 1 << 24  # pool sizes a replay takes (per-block state in memory, ~60 bytes a block)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    if not m or (m.group(2) and m.group(2).lower() not in _UNITS) or (m.group(2) == "" and "." in m.group(1)):
        raise ValueError(f"not a size: {text!r} (examples: 40GiB, 512MiB, 1e9 is not accepted: write 1GB)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower() or "b"])
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


@dataclass
class WhatifOptions:
    block_sizes: tuple[Any, ...] = ()  # empty: DEFAULT_SIZES plus the recorded size
    num_blocks: int | None = None  # fixed count for every size; None: see kv_memory / same memory
    unlimited: bool = False  # only the replay without a capacity limit
    kv_memory: int | None = None  # bytes of KV memory: blocks = kv_memory / (B * bytes per token)
    policies: tuple[Any, ...] = ("free-queue",)
    recoveries: tuple[Any, ...] = RECOVERIES
    prefix_cache: bool = True
    pool: str | None = None
    metadata_bytes: int = 64
    bytes_per_token: float | None = None
    jobs: int | None = None


def pick_pool(stream: BlockStream, label: str | None) -> PoolInfo | None:
    pools = [p for p in stream.pools if np.any((stream.pool == p.index) & (stream.kind == K.REQ_STATE))] or list(
        stream.pools
    )
    if not pools:
        return None
    if label is None:
        return max(pools, key=lambda p: int((stream.pool == p.index).sum()))
    named = [p for p in stream.pools if label in (p.label, p.name)]
    if len(named) > 1:
        raise ValueError(f"several pools are named {label!r}: give one of {', '.join(p.label for p in named)}")
    if named:
        return named[0]
    raise ValueError(f"no pool {label!r} in this bundle (pools: {', '.join(p.label for p in stream.pools)})")


def pick_schedule(schedules: list[Schedule], label: str | None) -> Schedule | None:
    """pick_pool's choice among schedules built for each pool (ScheduleBuilder.finish): the
    busiest pool with request states, or the one named ``label``."""
    pools = [s for s in schedules if s.states] or list(schedules)
    if not pools:
        return None
    if label is None:
        return max(pools, key=lambda s: s.events)
    named = [s for s in schedules if label in (s.pool, s.pool.rsplit("@", 1)[0])]
    if len(named) > 1:
        raise ValueError(f"several pools are named {label!r}: give one of {', '.join(s.pool for s in named)}")
    if named:
        return named[0]
    raise ValueError(f"no pool {label!r} in this bundle (pools: {', '.join(s.pool for s in schedules)})")


def run(stream: BlockStream, opts: WhatifOptions, analyzed: dict[str, Any] | None = None) -> dict[str, Any]:
    """sections.whatif for one pool of an in-memory stream (tests; the commands go through
    the analysis pass, which extracts the schedule on the way: :func:`run_schedule`).
    ``analyzed``: analyze's metric values (name -> value) for that pool over the whole run,
    when the caller has them already; else they are computed here."""
    import time

    info = pick_pool(stream, opts.pool)
    if info is None:
        raise ValueError("this bundle has no block pool to replay (record with the blocks probe)")
    t0 = time.perf_counter()
    sched = extract(stream, info.index)

    def analyze_pool() -> dict[str, Any]:  # analyze's figures for this pool, through analyze's own metric mapping
        from kvprof.analysis import block_metrics
        from kvprof.analysis.blocks import analyze_blocks

        entries: dict[str, Any] = {}
        block_metrics(entries, analyze_blocks(stream, [info.index]), 1, None)
        return {k: v["value"] for k, v in entries.items()}

    return run_schedule(sched, opts, analyzed if analyzed is not None else analyze_pool, started=t0)


def run_schedule(
    sched: Schedule,
    opts: WhatifOptions,
    analyzed: dict[str, Any] | Callable[[], dict[str, Any]],
    started: float | None = None,
) -> dict[str, Any]:
    """sections.whatif from a schedule already built (ScheduleBuilder.finish): the analysis
    engine's way, which feeds the builder during its own pass over the bundle.
    ``analyzed``: analyze's metric values (name -> value) for the schedule's pool over the
    whole run, or a function returning them (called once the replays are done)."""
    import dataclasses
    import time

    t0 = started if started is not None else time.perf_counter()
    if not len(sched.final_lengths):
        raise ValueError(f"pool {sched.pool} has no request states to replay (its probe reports no token counts)")
    if opts.bytes_per_token:
        sched.bytes_per_token_given = opts.bytes_per_token  # the rows' peak and compaction bytes use it too
    bpt = sched.bytes_per_token
    sizes = sorted(set(opts.block_sizes) if opts.block_sizes else set(DEFAULT_SIZES) | {sched.block_size})
    if opts.kv_memory and not bpt:
        raise ValueError(
            "--kv-memory needs the bytes one token takes: the bundle does not say (give --bytes-per-token)"
        )

    def capacity(b: int) -> int:
        if opts.num_blocks:
            n = opts.num_blocks
        elif opts.kv_memory:
            assert bpt is not None  # checked above
            n = max(int(opts.kv_memory // (b * bpt)), 2)
        else:
            n = max(sched.num_blocks * sched.block_size // b, 2)  # the recorded KV memory
        if n > MAX_BLOCKS:
            raise ValueError(
                f"more than {MAX_BLOCKS:,} blocks of {b} tokens: the replay keeps per-block state in memory and stops there "
                "(use --num-blocks unlimited for the blocks a run needs)"
            )
        return n

    configs = [
        Config(sched.block_size, sched.num_blocks, "free-queue", "preempt", True)
    ]  # the recorded configuration: fidelity
    configs += [Config(b, UNLIMITED, "free-queue", "preempt", opts.prefix_cache) for b in sizes]
    fixed = []
    if not opts.unlimited:
        for b in sizes:
            for pol in opts.policies:
                recs = opts.recoveries if pol in allocators.CONTIGUOUS else ("preempt",)
                for rec in recs:
                    fixed.append(Config(b, capacity(b), pol, rec, opts.prefix_cache))
    # a configuration asked for twice (the recorded one is also a row with the default
    # capacity) is replayed once
    wanted = configs + fixed
    unique = {dataclasses.astuple(c): c for c in reversed(wanted)}
    done = dict(zip(unique, replay_many(sched, list(unique.values()), opts.jobs)))
    results = [done[dataclasses.astuple(c)] for c in wanted]
    recorded, needed, rows = results[0], results[1 : 1 + len(sizes)], results[1 + len(sizes) :]
    if callable(analyzed):
        analyzed = analyzed()
    fidelity = {}
    for name in FIDELITY_METRICS:
        x, y = analyzed[name], recorded.metrics[name]
        same = (
            (x == y)
            if not (isinstance(x, float) and isinstance(y, float))
            else math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-15)
        )
        fidelity[name] = {"analyze": x, "replay": y, "equal": bool(same)}
    mode = (
        "unlimited"
        if opts.unlimited
        else f"{opts.num_blocks} blocks"
        if opts.num_blocks
        else f"{opts.kv_memory} bytes of KV memory"
        if opts.kv_memory
        else "the recorded KV memory (blocks × block size kept)"
    )
    return {
        "pool": sched.pool,
        "engine": sched.engine,
        "recorded": {
            "block_size": sched.block_size,
            "num_blocks": sched.num_blocks,
            "reserved": len(sched.reserved_ids),
            "policy": f"free-queue ({sched.free_order_label()})",
            "prefix_caching": sched.prefix_caching,
            "bytes_per_block": sched.bytes_per_block,
            "requests": sched.requests,
            "operations": sched.operations,
        },
        "capacity": mode,
        "bytes_per_token": bpt,
        "rows": [dataclasses.asdict(r) for r in rows],
        "blocks_needed": [dataclasses.asdict(r) for r in needed],
        "fidelity": fidelity,
        "advice": advice(sched, needed, opts.metadata_bytes),
        "unsupported_events": sched.unsupported,
        "seconds": time.perf_counter() - t0,
    }
