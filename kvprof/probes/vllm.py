"""vLLM v1 adapter of the `blocks` probe (tested on vLLM 0.32).

Patched class attributes, each by feature detection (a missing method is
reported in process.json, never fatal):

* ``BlockPool``: get_new_blocks (alloc), free_blocks and unpin_blocks (free),
  touch (prefix-cache hit), cache_full_blocks / cache_partial_block (cache),
  evict_blocks, reset_prefix_cache, move_block_hashes (evict / cache).
* ``KVCacheManager``: __init__ (declares the pool with its block size),
  allocate_slots (attributes allocations and hits to the request; ``None``
  is an allocation failure), free (attributes frees), record_prefix_cache_stats
  (the lookup vLLM counts in ``prefix_cache_queries/hits``).
* ``Scheduler``: add_request (arrival), schedule (a step; afterwards the token
  count and block-table length of each running request), _preempt_request,
  _free_request (finish).

Blocks are ``slots=True`` dataclasses, so nothing is stored on them; pools are
kept in a side table keyed by ``id(pool)``.  Every wrapper does one call's
worth of work (a list of block ids), never per-block hooks.
"""

from __future__ import annotations

import functools

from kvprof import runtime
from kvprof.trace.format import EventKind as K

MODULES = ["vllm.v1.core.block_pool", "vllm.v1.core.kv_cache_manager", "vllm.v1.core.sched.scheduler"]

_pools: dict[int, int] = {}  # id(BlockPool) -> kvprof pool index
_keep: list = []  # keep declared pools alive so their ids stay unique
_current_req = None  # request id while KVCacheManager works for one request
_attached: dict[str, list] = {"attached": [], "missing": []}
_last_state: dict = {}  # request id -> (filled, held) last reported


def _vllm_version() -> str:
    try:
        import vllm

        return str(getattr(vllm, "__version__", "unknown"))
    except Exception:  # pragma: no cover - vllm import always works once its modules load
        return "unknown"


def _note() -> None:
    from kvprof.probes import engine_note

    engine_note("vllm", version=_vllm_version(), attached=sorted(set(_attached["attached"])), missing=sorted(set(_attached["missing"])))


def _patch(cls, name: str, make) -> None:
    original = getattr(cls, name, None)
    label = f"{cls.__name__}.{name}"
    if original is None or getattr(original, "__kvprof__", False):
        if original is None:
            _attached["missing"].append(label)
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper.__kvprof__ = True
    setattr(cls, name, wrapper)
    _attached["attached"].append(label)


def _pool_index(pool, block_size: int | None = None, **extra) -> int:
    idx = _pools.get(id(pool))
    if idx is None:
        num = int(getattr(pool, "num_gpu_blocks", 0) or len(getattr(pool, "blocks", ())))
        bs = int(block_size or getattr(pool, "hash_block_size", 0) or 16)
        medium = str(getattr(pool, "medium", "GPU"))
        idx = runtime.declare_pool(
            {
                "name": "vllm" if medium.upper() == "GPU" else f"vllm-{medium.lower()}",
                "engine": "vllm",
                "engine_version": _vllm_version(),
                "num_blocks": num,
                "block_size": bs,
                "medium": medium,
                "prefix_caching": bool(getattr(pool, "enable_caching", False)),
                **extra,
            }
        )
        _pools[id(pool)] = idx
        _keep.append(pool)
        null = getattr(pool, "null_block", None)
        if null is not None:
            runtime.emit(K.RESERVE, idx, None, 0, 0, [null.block_id])
    return idx


def _ids(blocks) -> list:
    return [b.block_id for b in blocks]


# -- BlockPool ---------------------------------------------------------------------------
def _install_block_pool(mod) -> None:
    cls = getattr(mod, "BlockPool", None)
    if cls is None:
        _attached["missing"].append("BlockPool")
        return

    def get_new_blocks(orig):
        def wrapper(self, num_blocks, *a, **k):
            blocks = orig(self, num_blocks, *a, **k)
            if runtime.writer is not None and blocks:
                runtime.emit(K.ALLOC, _pool_index(self), _current_req, 0, 0, _ids(blocks))
            return blocks

        return wrapper

    def touch(orig):
        def wrapper(self, blocks, *a, **k):
            if runtime.writer is None:
                return orig(self, blocks, *a, **k)
            blocks = list(blocks)
            orig(self, blocks, *a, **k)
            if blocks:
                # older releases pass one list per KV-cache group
                flat = [b for grp in blocks for b in grp] if isinstance(blocks[0], (list, tuple)) else blocks
                runtime.emit(K.HIT, _pool_index(self), _current_req, 0, 0, [b.block_id for b in flat if not b.is_null])

        return wrapper

    def free_blocks(orig):
        def wrapper(self, ordered_blocks, *a, **k):
            if runtime.writer is None:
                return orig(self, ordered_blocks, *a, **k)
            blocks = list(ordered_blocks)  # often an iterator: materialise once
            orig(self, blocks, *a, **k)
            # blocks of other pools are forwarded to them and recorded there
            ids = [b.block_id for b in blocks if b.pool is self or b.pool is None]
            if ids:
                runtime.emit(K.FREE, _pool_index(self), _current_req, 0, 0, ids)

        return wrapper

    def unpin_blocks(orig):
        def wrapper(self, blocks, *a, **k):
            if runtime.writer is None:
                return orig(self, blocks, *a, **k)
            blocks = list(blocks)
            out = orig(self, blocks, *a, **k)
            if blocks:
                runtime.emit(K.FREE, _pool_index(self), _current_req, 0, 0, _ids(blocks))
            return out

        return wrapper

    def cache_full_blocks(orig):
        def wrapper(self, request, blocks, num_cached_blocks, num_full_blocks, *a, **k):
            out = orig(self, request, blocks, num_cached_blocks, num_full_blocks, *a, **k)
            if runtime.writer is not None and num_full_blocks > num_cached_blocks:
                ids = [b.block_id for b in blocks[num_cached_blocks:num_full_blocks] if not b.is_null and b.block_hash is not None]
                if ids:
                    runtime.emit(K.CACHE, _pool_index(self), getattr(request, "request_id", None), 0, 0, ids)
            return out

        return wrapper

    def cache_partial_block(orig):
        def wrapper(self, request, block, *a, **k):
            out = orig(self, request, block, *a, **k)
            if runtime.writer is not None and out is not None:
                runtime.emit(K.CACHE, _pool_index(self), getattr(request, "request_id", None), 0, 0, [block.block_id])
            return out

        return wrapper

    def _hashed(self, block) -> bool:
        return block.block_hash is not None or block.block_id in getattr(self, "cached_block_hashes_by_block", {})

    def evict_blocks(orig):
        def wrapper(self, block_ids, *a, **k):
            if runtime.writer is None:
                return orig(self, block_ids, *a, **k)
            block_ids = set(block_ids)
            had = [i for i in block_ids if i < len(self.blocks) and _hashed(self, self.blocks[i])]
            out = orig(self, block_ids, *a, **k)
            if had:
                runtime.emit(K.EVICT, _pool_index(self), None, 0, 0, had)
            return out

        return wrapper

    def reset_prefix_cache(orig):
        def wrapper(self, *a, **k):
            if runtime.writer is None:
                return orig(self, *a, **k)
            had = [b.block_id for b in self.blocks if not b.is_null and _hashed(self, b)]
            ok = orig(self, *a, **k)
            if ok and had:
                runtime.emit(K.EVICT, _pool_index(self), None, 0, 0, had)
            return ok

        return wrapper

    def move_block_hashes(orig):
        def wrapper(self, src_block, dst_block, *a, **k):
            out = orig(self, src_block, dst_block, *a, **k)
            if runtime.writer is not None:
                idx = _pool_index(self)
                runtime.emit(K.EVICT, idx, None, 0, 0, [src_block.block_id])
                runtime.emit(K.CACHE, idx, None, 0, 0, [dst_block.block_id])
            return out

        return wrapper

    for name, make in [
        ("get_new_blocks", get_new_blocks),
        ("touch", touch),
        ("free_blocks", free_blocks),
        ("unpin_blocks", unpin_blocks),
        ("cache_full_blocks", cache_full_blocks),
        ("cache_partial_block", cache_partial_block),
        ("evict_blocks", evict_blocks),
        ("reset_prefix_cache", reset_prefix_cache),
        ("move_block_hashes", move_block_hashes),
    ]:
        _patch(cls, name, make)


# -- KVCacheManager ----------------------------------------------------------------------
def _install_kv_cache_manager(mod) -> None:
    cls = getattr(mod, "KVCacheManager", None)
    if cls is None:
        _attached["missing"].append("KVCacheManager")
        return

    def init(orig):
        def wrapper(self, *a, **k):
            orig(self, *a, **k)
            if runtime.writer is None:
                return
            pool = getattr(self, "block_pool", None)
            managers = getattr(getattr(self, "coordinator", None), "single_type_managers", ()) or ()
            sizes = sorted({int(m.block_size) for m in managers if getattr(m, "block_size", None)})
            if pool is not None:
                extra = {"kv_cache_groups": len(managers)}
                if getattr(self, "max_model_len", None):
                    extra["max_model_len"] = int(self.max_model_len)
                _pool_index(pool, sizes[0] if sizes else None, **extra)

        return wrapper

    def allocate_slots(orig):
        def wrapper(self, request, *a, **k):
            global _current_req
            if runtime.writer is None:
                return orig(self, request, *a, **k)
            prev, _current_req = _current_req, request.request_id
            try:
                out = orig(self, request, *a, **k)
            finally:
                _current_req = prev
            if out is None:
                pool = self.block_pool
                runtime.emit(K.ALLOC_FAIL, _pool_index(pool), request.request_id, -1, pool.get_num_free_blocks(), ())
            return out

        return wrapper

    def free(orig):
        def wrapper(self, request, *a, **k):
            global _current_req
            if runtime.writer is None:
                return orig(self, request, *a, **k)
            prev, _current_req = _current_req, request.request_id
            try:
                return orig(self, request, *a, **k)
            finally:
                _current_req = prev

        return wrapper

    def record_prefix_cache_stats(orig):
        def wrapper(self, request, num_hits, *a, **k):
            out = orig(self, request, num_hits, *a, **k)
            if runtime.writer is not None:
                enabled = getattr(self, "prefix_cache_lookup_enabled", None)
                # as vLLM counts prefix_cache_queries/hits: lookups of requests never preempted
                if (enabled is None or enabled(request)) and getattr(request, "num_preemptions", 0) <= 0:
                    runtime.emit(K.REQ_QUERY, _pool_index(self.block_pool), request.request_id, int(request.num_tokens), int(num_hits), ())
            return out

        return wrapper

    for name, make in [("__init__", init), ("allocate_slots", allocate_slots), ("free", free), ("record_prefix_cache_stats", record_prefix_cache_stats)]:
        _patch(cls, name, make)


# -- Scheduler ---------------------------------------------------------------------------
def _install_scheduler(mod) -> None:
    cls = getattr(mod, "Scheduler", None)
    if cls is None:
        _attached["missing"].append("Scheduler")
        return

    def _pool_of(sched):
        pool = getattr(getattr(sched, "kv_cache_manager", None), "block_pool", None)
        return _pool_index(pool) if pool is not None else 0

    def add_request(orig):
        def wrapper(self, request, *a, **k):
            out = orig(self, request, *a, **k)
            if runtime.writer is not None:
                max_tokens = getattr(getattr(request, "sampling_params", None), "max_tokens", None)
                runtime.emit(K.REQ_ARRIVE, _pool_of(self), request.request_id, int(getattr(request, "num_prompt_tokens", 0)), -1 if max_tokens is None else int(max_tokens), ())
            return out

        return wrapper

    def schedule(orig):
        step = [0]

        def wrapper(self, *a, **k):
            if runtime.writer is None:
                return orig(self, *a, **k)
            pool = _pool_of(self)
            runtime.emit(K.STEP, pool, None, step[0], 0, ())
            step[0] += 1
            out = orig(self, *a, **k)
            managers = getattr(getattr(self.kv_cache_manager, "coordinator", None), "single_type_managers", ())
            table = managers[0].req_to_blocks if managers else {}
            last = _last_state
            for req in self.running:
                rid = req.request_id
                state = (req.num_computed_tokens, len(table.get(rid, ())))
                if last.get(rid) != state:
                    last[rid] = state
                    runtime.emit(K.REQ_STATE, pool, rid, state[0], state[1], ())
            return out

        return wrapper

    def preempt(orig):
        def wrapper(self, request, *a, **k):
            out = orig(self, request, *a, **k)
            if runtime.writer is not None:
                _last_state.pop(request.request_id, None)
                runtime.emit(K.REQ_PREEMPT, _pool_of(self), request.request_id, 0, 0, ())
            return out

        return wrapper

    def free_request(orig):
        def wrapper(self, request, *a, **k):
            out = orig(self, request, *a, **k)
            if runtime.writer is not None:
                _last_state.pop(request.request_id, None)
                runtime.emit(K.REQ_FINISH, _pool_of(self), request.request_id, 0, 0, ())
            return out

        return wrapper

    for name, make in [("add_request", add_request), ("schedule", schedule), ("_preempt_request", preempt), ("_free_request", free_request)]:
        _patch(cls, name, make)


def install(module) -> None:
    name = module.__name__
    if name.endswith("block_pool"):
        _install_block_pool(module)
    elif name.endswith("kv_cache_manager"):
        _install_kv_cache_manager(module)
    elif name.endswith("scheduler"):
        _install_scheduler(module)
    _note()
