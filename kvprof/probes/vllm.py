"""vLLM v1 adapter of the `blocks` probe (tested on vLLM 0.32).

Patched class attributes, each by feature detection (a missing method is
reported in process.json, never fatal):

* ``BlockPool``: get_new_blocks (alloc), free_blocks and unpin_blocks (free),
  touch (prefix-cache hit), cache_full_blocks / cache_partial_block (cache),
  evict_blocks, reset_prefix_cache, move_block_hashes (evict / cache).
* ``KVCacheManager``: __init__ (declares the pool with its block size),
  allocate_slots (attributes allocations and hits to the request; ``None``
  is an allocation failure), free (attributes frees), record_prefix_cache_stats
  (each lookup, as vLLM counts it: ``req_query`` for ``prefix_cache_queries/hits``,
  ``req_query_preempted`` for a preempted request's ``preempted_queries/hits``).
* ``Scheduler``: add_request (arrival), schedule (a step; afterwards the token
  count and block-table length of each running request), _preempt_request,
  _free_request (finish).

Blocks are ``slots=True`` dataclasses, so nothing is stored on them; pools are
kept in a side table keyed by ``id(pool)``.  Every wrapper does one call's
worth of work (a list of block ids), never per-block hooks.
"""

from __future__ import annotations

import threading
import weakref
from time import monotonic_ns


from kvprof import runtime
from kvprof.probes.patching import Hooks
from kvprof.trace.format import EventKind as K

MODULES = ["vllm.v1.core.block_pool", "vllm.v1.core.kv_cache_manager", "vllm.v1.core.sched.scheduler"]

_pools: dict[int, int] = {}  # id(BlockPool) -> kvprof pool index, live pools only
_declare_lock = threading.RLock()
_immortal: list = []  # pools that cannot be weak-referenced, kept alive so ids stay unique
_current_req = None  # request id while KVCacheManager works for one request
_hooks = Hooks("vllm")
_last_state: dict = {}  # request id -> (filled, held) last reported


def _vllm_version() -> str:
    try:
        import vllm

        return str(getattr(vllm, "__version__", "unknown"))
    except Exception:  # pragma: no cover - vllm import always works once its modules load
        return "unknown"


def _note() -> None:
    _hooks.note(version=_vllm_version())


def _pool_index(pool, block_size: int | None = None, t_declare: int | None = None, **extra) -> int:
    idx = _pools.get(id(pool))
    if idx is not None:
        return idx
    with _declare_lock:  # the target's thread and the flush thread may both get here
        idx = _pools.get(id(pool))
        if idx is not None:
            return idx
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
        try:  # forget the pool when it dies, so its id() can be reused safely
            weakref.finalize(pool, _pools.pop, id(pool), None).atexit = False  # exit-time flushes still need it
        except TypeError:  # not weak-referenceable: keep it alive instead
            _immortal.append(pool)
        null = getattr(pool, "null_block", None)
        if null is not None:
            _nulls[idx] = int(null.block_id)
            w = runtime.writer
            if w is not None:
                w.block(
                    runtime.now() if t_declare is None else t_declare,
                    int(K.RESERVE),
                    idx,
                    -1,
                    0,
                    0,
                    (int(null.block_id),),
                )
    return idx


_nulls: dict[int, int] = {}  # kvprof pool index -> id of the pool's null block
_ALLOC, _HIT, _FREE = int(K.ALLOC), int(K.HIT), int(K.FREE)


def _record(w, kind: int, pool, blocks) -> None:
    """Write one BlockPool call's event: the ids of its blocks, read now (the record is on
    disk when the call returns).  The null block (never a state change) is left out, and
    so are blocks that ``free_blocks`` forwards to another live pool, which records them
    itself."""
    idx = _pools.get(id(pool))
    if idx is None:
        idx = _pool_index(pool)
    ids = [b.block_id for b in blocks]
    null = _nulls.get(idx)
    if null is not None and null in ids:
        ids = [i for i in ids if i != null]
    if kind == _FREE and len(_pools) > 1:
        ids = [b.block_id for b in blocks if getattr(b, "pool", None) in (None, pool) and b.block_id != null]
    if ids:
        req = _current_req
        rid = -1 if req is None else (w._strings.get(req) if type(req) is str else None)
        if rid is None:
            rid = w.intern_request(req)
        w.block(monotonic_ns(), kind, idx, rid, 0, 0, ids)


def _queue(kind: int, pool, blocks: list) -> None:
    """Record one block event (the generic wrappers' path)."""
    w = runtime.writer
    if w is not None and blocks:
        _record(w, kind, pool, blocks)


def _arity(fn, names: tuple) -> bool:
    """True when `fn` takes exactly (self, *names), so a wrapper without *args fits."""
    try:
        import inspect

        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    return tuple(p.name for p in params) == ("self", *names) and all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)


# -- BlockPool ---------------------------------------------------------------------------
def _install_block_pool(mod) -> None:
    cls = getattr(mod, "BlockPool", None)
    if cls is None:
        _hooks.missing.append("BlockPool")
        return

    # Where the signature is the one expected, a wrapper without *args/**kwargs is used:
    # these run millions of times.
    def get_new_blocks(orig):
        def wrapper(self, num_blocks, *a, **k):
            blocks = orig(self, num_blocks, *a, **k)
            _queue(_ALLOC, self, list(blocks))
            return blocks

        if not _arity(orig, ("num_blocks",)):
            return wrapper

        def fast(self, num_blocks):
            blocks = orig(self, num_blocks)
            w = runtime.writer
            if w is not None and blocks:
                _record(w, _ALLOC, self, blocks)
            return blocks

        return fast

    def touch(orig):
        def wrapper(self, blocks, *a, **k):
            if runtime.writer is None or not blocks:
                return orig(self, blocks, *a, **k)
            blocks = list(blocks)
            out = orig(self, blocks, *a, **k)
            if isinstance(blocks[0], (list, tuple)):  # older releases: one list per KV-cache group
                blocks = [b for grp in blocks for b in grp]
            _queue(_HIT, self, blocks)
            return out

        if not _arity(orig, ("blocks",)):
            return wrapper

        def fast(self, blocks):
            w = runtime.writer
            if w is None or not blocks or type(blocks[0]) is list:
                return wrapper(self, blocks)
            blocks = list(blocks)
            out = orig(self, blocks)
            _record(w, _HIT, self, blocks)
            return out

        return fast

    def free_blocks(orig):
        def wrapper(self, ordered_blocks, *a, **k):
            if runtime.writer is None:
                return orig(self, ordered_blocks, *a, **k)
            blocks = list(ordered_blocks)  # often an iterator: materialise once
            out = orig(self, blocks, *a, **k)
            _queue(_FREE, self, blocks)
            return out

        if not _arity(orig, ("ordered_blocks",)):
            return wrapper

        def fast(self, ordered_blocks):
            w = runtime.writer
            if w is None:
                return orig(self, ordered_blocks)
            blocks = list(ordered_blocks)
            out = orig(self, blocks)
            if blocks:
                _record(w, _FREE, self, blocks)
            return out

        return fast

    def unpin_blocks(orig):
        def wrapper(self, blocks, *a, **k):
            if runtime.writer is None:
                return orig(self, blocks, *a, **k)
            blocks = list(blocks)
            out = orig(self, blocks, *a, **k)
            _queue(_FREE, self, blocks)
            return out

        return wrapper

    def cache_full_blocks(orig):
        def wrapper(self, request, blocks, num_cached_blocks, num_full_blocks, *a, **k):
            out = orig(self, request, blocks, num_cached_blocks, num_full_blocks, *a, **k)
            if runtime.writer is not None and num_full_blocks > num_cached_blocks:
                ids = [
                    b.block_id
                    for b in blocks[num_cached_blocks:num_full_blocks]
                    if not b.is_null and b.block_hash is not None
                ]
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
        _hooks.patch(cls, name, make)


# -- KVCacheManager ----------------------------------------------------------------------
def _kv_layout(config) -> dict:
    """Bytes one block holds across all layers, from vLLM's KVCacheConfig (page size of each
    group's spec times its layers), and the per-token layout when the spec says it; {} when
    the config is not the shape this version of kvprof knows."""
    try:
        groups = list(config.kv_cache_groups)
        total = sum(int(g.kv_cache_spec.page_size_bytes) * len(g.layer_names) for g in groups)
        out: dict[str, object] = {"bytes_per_block": total} if total > 0 else {}
        spec = groups[0].kv_cache_spec
        heads, size = getattr(spec, "num_kv_heads", None), getattr(spec, "head_size", None)
        if heads and size:
            out["kv_layout"] = {
                "layers": sum(len(g.layer_names) for g in groups),
                "kv_heads": int(heads),
                "head_size": int(size),
                "dtype": str(getattr(spec, "dtype", "")),
            }
        return out
    except Exception:  # noqa: BLE001 - another vLLM's config: the pool is declared without bytes
        return {}


def _install_kv_cache_manager(mod) -> None:
    cls = getattr(mod, "KVCacheManager", None)
    if cls is None:
        _hooks.missing.append("KVCacheManager")
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
                extra.update(_kv_layout(k.get("kv_cache_config", a[0] if a else None)))
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
                # as vLLM's PrefixCacheStats.record: lookups of requests never preempted are
                # queries/hits, those of preempted requests coming back preempted_queries/hits
                if enabled is None or enabled(request):
                    kind = K.REQ_QUERY_PREEMPTED if getattr(request, "num_preemptions", 0) > 0 else K.REQ_QUERY
                    runtime.emit(
                        kind,
                        _pool_index(self.block_pool),
                        request.request_id,
                        int(request.num_tokens),
                        int(num_hits),
                        (),
                    )
            return out

        return wrapper

    for name, make in [
        ("__init__", init),
        ("allocate_slots", allocate_slots),
        ("free", free),
        ("record_prefix_cache_stats", record_prefix_cache_stats),
    ]:
        _hooks.patch(cls, name, make)


# -- Scheduler ---------------------------------------------------------------------------
def _install_scheduler(mod) -> None:
    cls = getattr(mod, "Scheduler", None)
    if cls is None:
        _hooks.missing.append("Scheduler")
        return

    def _pool_of(sched):
        pool = getattr(getattr(sched, "kv_cache_manager", None), "block_pool", None)
        return _pool_index(pool) if pool is not None else 0

    def add_request(orig):
        def wrapper(self, request, *a, **k):
            out = orig(self, request, *a, **k)
            if runtime.writer is not None:
                max_tokens = getattr(getattr(request, "sampling_params", None), "max_tokens", None)
                runtime.emit(
                    K.REQ_ARRIVE,
                    _pool_of(self),
                    request.request_id,
                    int(getattr(request, "num_prompt_tokens", 0)),
                    -1 if max_tokens is None else int(max_tokens),
                    (),
                )
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

    for name, make in [
        ("add_request", add_request),
        ("schedule", schedule),
        ("_preempt_request", preempt),
        ("_free_request", free_request),
    ]:
        _hooks.patch(cls, name, make)


def install(module) -> None:
    name = module.__name__
    if name.endswith("block_pool"):
        _install_block_pool(module)
    elif name.endswith("kv_cache_manager"):
        _install_kv_cache_manager(module)
    elif name.endswith("scheduler"):
        _install_scheduler(module)
    _note()
