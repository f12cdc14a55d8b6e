"""SGLang adapter of the ``blocks`` probe (tested on SGLang 0.5.23's scheduler-side code).

SGLang keeps KV memory in a token-to-KV pool allocator and a radix prefix cache:

* ``PagedTokenToKVPoolAllocator`` (``page_size`` tokens per page) or
  ``TokenToKVPoolAllocator`` (one token per slot) hand out pages from
  ``free_pages``; page (or slot) 0 is padding, never handed out.  A kvprof block
  is one page, the block size is ``page_size``; the pool has ``num_pages + 1``
  blocks with block 0 reserved.
* ``RadixCache`` owns the pages of the KV it keeps (tree node values are token
  indices).  A node with ``lock_ref == 0`` is *evictable* (kvprof: free-cached),
  with ``lock_ref > 0`` *protected* (kvprof: in use).  A request's own pages that
  the tree does not hold yet are in use by that request.

So a page's kvprof reference count is the lock references of the node holding
it, or 1 while a request's row holds it outside the tree:

=========================================  =========================================
SGLang                                     kvprof events
=========================================  =========================================
allocator ``alloc``/``alloc_extend``/        ``alloc`` of the pages taken from the head
``alloc_decode``                            of ``free_pages``, split per request in
                                            batch order when a batch is being prepared
``RadixCache.insert`` of a new node         ``cache`` of its pages, and the request's
                                            reference handed to the tree (-1)
``inc_lock_ref`` / ``dec_lock_ref``         +1 / -1 on every page of every node on the
                                            path to the root (``hit`` / ``free``)
pages back to the allocator                 ``free`` (a request's row pages), or
(``_release_page_ids`` / ``free``)          ``evict`` when ``RadixCache.evict`` frees them
``RadixCache.reset``                        ``evict`` of every page the tree held
=========================================  =========================================

Reference changes inside one hooked call are netted before they are written: a
checkpoint unlocks the request's old node, inserts its new pages and locks the new
node, which leaves the shared prefix's counts where they were, and
``PrefillAdder.add_one_req`` pins the matched prefix while it decides and then locks
it for the admitted request; only the net change is an event (a ``hit`` for the
admitted request's matched pages).  ``alloc`` and ``evict`` are written in the
order they happen, after any pending change of the same pages.

Scheduler hooks (``Req``, ``PrefillAdder``, ``ScheduleBatch``, ``ReqToTokenPool``)
add arrivals, steps (one per prepared batch), per-request token counts, one prefix
lookup per admission (the ``prefix_len`` the scheduler admitted the request with:
``req_query`` on first admission, ``req_query_preempted`` when a retracted request
comes back, as PrefillAdder's own ``reprocessed_log_hit_tokens`` counts them),
retractions (``preempt``) and finishes.  Every hook is found by feature detection;
the manifest lists those attached and those missing.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from kvprof import runtime
from kvprof.probes.patching import Hooks
from kvprof.trace.format import EventKind as K

MODULES = [
    "sglang.srt.mem_cache.allocator",  # 0.5.2x: a package re-exporting the classes below
    "sglang.srt.mem_cache.allocator.token",
    "sglang.srt.mem_cache.allocator.paged",
    "sglang.srt.mem_cache.radix_cache",
    "sglang.srt.mem_cache.memory_pool",
    "sglang.srt.managers.schedule_batch",
    "sglang.srt.managers.schedule_policy",
]

_hooks = Hooks("sglang")
_lock = threading.RLock()
_pools: dict[int, int] = {}  # id(allocator) -> kvprof pool index
_page: dict[int, int] = {}  # pool index -> page size
_immortal: list = []
_depth = [0]  # nesting of hooked calls; reference changes are netted until it is 0 again
_pending: dict = {}  # (pool, page) -> net reference change not yet written
_pending_cache: dict = {}  # (pool, page) -> None: pages cached, not yet written (ordered)
_ctx: dict[str, Any] = {"req": None, "batch": None, "evicting": 0, "pool": None, "step": 0}
_last_state: dict = {}  # request id -> (filled, held) last written


def _failed(exc) -> None:
    """A probe that fails says why once and steps aside; it never raises into SGLang."""
    w = runtime.writer
    if w is not None and not _ctx.get("failed"):
        _ctx["failed"] = True
        w.error(f"sglang adapter: {exc!r} (later events of this process may be incomplete)")


def _safely(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - never into the target
        _failed(exc)


def _version() -> str:
    try:
        import sglang

        return str(getattr(sglang, "__version__", "unknown"))
    except Exception:  # noqa: BLE001 - importing sglang's package init may fail in odd installs
        return "unknown"


def _note() -> None:
    _hooks.note(version=_version())


# -- pools -------------------------------------------------------------------------------
def _declare(alloc) -> int | None:
    idx = _pools.get(id(alloc))
    if idx is not None or runtime.writer is None:
        return idx
    with _lock:
        idx = _pools.get(id(alloc))
        if idx is not None:
            return idx
        ps = int(getattr(alloc, "page_size", 1) or 1)
        pages = int(getattr(alloc, "num_pages", 0) or 0) if ps > 1 else int(getattr(alloc, "size", 0) or 0)
        if pages <= 0:
            pages = int(getattr(alloc, "size", 0) or 0) // ps
        idx = runtime.declare_pool(
            {
                "name": "sglang",
                "engine": "sglang",
                "engine_version": _version(),
                "allocator": type(alloc).__name__,
                "num_blocks": pages + 1,  # page 0 is SGLang's padding page, never handed out
                "block_size": ps,
                "prefix_caching": True,
            }
        )
        _pools[id(alloc)] = idx
        _page[idx] = ps
        try:
            weakref.finalize(alloc, _pools.pop, id(alloc), None).atexit = False
        except TypeError:
            _immortal.append(alloc)
        runtime.emit(K.RESERVE, idx, None, 0, 0, (0,))
        _ctx["pool"] = idx
    return idx


def _pool_of_tree(tree):
    alloc = getattr(tree, "token_to_kv_pool_allocator", None)
    return None if alloc is None else _pools.get(id(alloc))


def _pages(indices, ps: int) -> list:
    """Page ids of a page-aligned run of token indices (one per page), as ints."""
    if indices is None:
        return []
    try:
        if ps > 1:
            indices = indices[::ps] // ps
        return [int(i) for i in indices.tolist()]
    except AttributeError:  # a plain list
        return [int(i) // ps for i in list(indices)[::ps]]


def _path_pages(tree, node, ps: int) -> list:
    root = getattr(tree, "root_node", None)
    out: list = []
    while node is not None and node is not root:
        out.extend(_pages(getattr(node, "value", None), ps))
        node = node.parent
    return out


# -- netting ---------------------------------------------------------------------------------
def _emit(kind, pool, req, ids) -> None:
    if ids:
        runtime.emit(kind, pool, req, 0, 0, ids)


def _change(pool, pages, d: int) -> None:
    """A reference change of ``d`` on each page: written now, or netted until the outer call ends."""
    if not pages:
        return
    if not _depth[0]:
        _emit(K.HIT if d > 0 else K.FREE, pool, _ctx["req"], pages)
        return
    for p in pages:
        key = (pool, p)
        _pending[key] = _pending.get(key, 0) + d


def _cached(pool, pages) -> None:
    if not _depth[0]:
        _emit(K.CACHE, pool, None, pages)
        return
    for p in pages:
        _pending_cache[(pool, p)] = None


def _write_pending(keys=None) -> None:
    """Write the netted changes (all of them, or those of ``keys``): cache first, then hits, then frees."""
    if keys is None:
        cache, changes = list(_pending_cache), list(_pending.items())
        _pending_cache.clear()
        _pending.clear()
    else:
        cache = [k for k in keys if k in _pending_cache]
        for k in cache:
            del _pending_cache[k]
        changes = [(k, _pending.pop(k)) for k in keys if k in _pending]
    by_pool: dict = {}
    for pool, p in cache:
        by_pool.setdefault(pool, []).append(p)
    for pool, pages in by_pool.items():
        _emit(K.CACHE, pool, None, pages)
    rounds: dict = {}  # (pool, sign, round) -> pages: a change of +2 is two hits
    for (pool, p), d in changes:
        for r in range(abs(d)):
            rounds.setdefault((pool, d > 0, r), []).append(p)
    req = _ctx["req"]
    for (pool, up, _r), pages in sorted(rounds.items(), key=lambda kv: (not kv[0][1], kv[0][2])):
        _emit(K.HIT if up else K.FREE, pool, req, pages)


def _now_or_after_pending(kind, pool, req, pages) -> None:
    """Write an alloc or evict in order, after any netted change of the same pages."""
    if not pages:
        return
    if _pending or _pending_cache:
        keys = [(pool, p) for p in pages]
        if any(k in _pending or k in _pending_cache for k in keys):
            _write_pending(keys)
    _emit(kind, pool, req, pages)


class _Outer:
    """A hooked call: changes inside it are netted and written when the outermost one returns."""

    __slots__ = ("req", "prev")

    def __init__(self, req=None):
        self.req = req

    def __enter__(self):
        _depth[0] += 1
        self.prev = _ctx["req"]
        if self.req is not None:
            _ctx["req"] = self.req
        return self

    def __exit__(self, *exc):
        _depth[0] -= 1
        try:
            if not _depth[0] and (_pending or _pending_cache):
                _write_pending()
        except Exception as exc:  # noqa: BLE001 - never into the target
            _pending.clear()
            _pending_cache.clear()
            _failed(exc)
        finally:
            _ctx["req"] = self.prev
        return False


# -- allocators -------------------------------------------------------------------------------
def _free_view(alloc):
    extra = getattr(alloc, "staged_pages", None)
    if extra is None:
        rp = getattr(alloc, "release_pages", None)
        extra = [rp] if rp is not None and len(rp) else []
    return alloc.free_pages, list(extra)


def _taken(alloc, before) -> list:
    """Pages an allocation took: the head of ``free_pages`` (after a merge of staged frees, when
    the allocator merged them to serve it)."""
    fp, extra = before
    fp2, extra2 = _free_view(alloc)
    k = (len(fp) + sum(len(x) for x in extra)) - (len(fp2) + sum(len(x) for x in extra2))
    if k <= 0:
        return []
    if extra and not extra2:  # merge_and_sort_free ran first
        import torch

        fp = torch.sort(torch.cat([fp, *extra]))[0]
    return [int(i) for i in fp[:k].tolist()]


def _split(pool, pages, sizes) -> None:
    """Write the allocation, one event per request of the batch being prepared when the page
    counts add up (SGLang hands pages out in batch order), else one event."""
    batch = _ctx["batch"]
    if batch is not None and sizes is not None and len(sizes) == len(batch) and sum(sizes) == len(pages):
        at = 0
        for rid, n in zip(batch, sizes):
            if n:
                _now_or_after_pending(K.ALLOC, pool, rid, pages[at : at + n])
                at += n
        return
    _now_or_after_pending(K.ALLOC, pool, _ctx["req"], pages)


def _install_allocators(mod) -> None:
    for name in ("TokenToKVPoolAllocator", "PagedTokenToKVPoolAllocator"):
        cls = getattr(mod, name, None)
        if cls is not None:  # a class re-exported by the package is patched once (Hooks.patch)
            _install_allocator(cls)


def _install_allocator(cls) -> None:
    def init(orig):
        def wrapper(self, *a, **k):
            orig(self, *a, **k)
            if runtime.writer is not None:
                _declare(self)

        return wrapper

    def alloc(orig):
        def wrapper(self, need_size, *a, **k):
            pool = _pools.get(id(self))
            if runtime.writer is None or pool is None:
                return orig(self, need_size, *a, **k)
            before = _free_view(self)
            out = orig(self, need_size, *a, **k)
            if out is not None:  # token slots: the batch's tokens in order; pages: one event
                _safely(lambda: _split(pool, _taken(self, before), _ctx.get("sizes") if _page[pool] == 1 else None))
            return out

        return wrapper

    def alloc_extend(orig):
        def wrapper(self, prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, *a, **k):
            pool = _pools.get(id(self))
            if runtime.writer is None or pool is None:
                return orig(self, prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, *a, **k)
            before = _free_view(self)
            out = orig(self, prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, *a, **k)
            if out is not None:

                def write():
                    ps = _page[pool]
                    sizes = [
                        -(-int(s) // ps) - -(-int(p) // ps)
                        for p, s in zip(prefix_lens_cpu.tolist(), seq_lens_cpu.tolist())
                    ]
                    _split(pool, _taken(self, before), sizes)

                _safely(write)
            return out

        return wrapper

    def alloc_decode(orig):
        def wrapper(self, seq_lens, seq_lens_cpu, *a, **k):
            pool = _pools.get(id(self))
            if runtime.writer is None or pool is None:
                return orig(self, seq_lens, seq_lens_cpu, *a, **k)
            before = _free_view(self)
            out = orig(self, seq_lens, seq_lens_cpu, *a, **k)
            if out is not None:

                def write():
                    ps = _page[pool]
                    sizes = [1 if (int(s) - 1) % ps == 0 else 0 for s in seq_lens_cpu.tolist()]
                    _split(pool, _taken(self, before), sizes)

                _safely(write)
            return out

        return wrapper

    def released(self, pages) -> None:
        pool = _pools.get(id(self))
        if pool is None or not pages:
            return
        if _ctx["evicting"]:  # the radix cache dropping a node: its pages leave the cache
            _now_or_after_pending(K.EVICT, pool, None, pages)
        else:  # a request's own pages (its row beyond the tree, or duplicates of cached KV)
            _change(pool, pages, -1)

    def release_page_ids(orig):
        def wrapper(self, *page_ids, **k):
            out = orig(self, *page_ids, **k)
            if runtime.writer is not None:
                _safely(lambda: released(self, [int(i) for t in page_ids for i in t.tolist()]))
            return out

        return wrapper

    def free(orig):  # allocators that return slots in free() itself (the token-level one)
        def wrapper(self, free_index, *a, **k):
            grouped = getattr(self, "free_group", None) is not None
            out = orig(self, free_index, *a, **k)
            if runtime.writer is not None and not grouped and free_index is not None:
                _safely(lambda: free_index.numel() and released(self, [int(i) for i in free_index.tolist()]))
            return out

        return wrapper

    _hooks.patch(cls, "__init__", init)
    _hooks.patch(cls, "alloc", alloc)
    if "alloc_extend" in cls.__dict__:
        _hooks.patch(cls, "alloc_extend", alloc_extend)
    if "alloc_decode" in cls.__dict__:
        _hooks.patch(cls, "alloc_decode", alloc_decode)
    if hasattr(cls, "_release_page_ids"):  # paged: every page goes back to the free list through it
        _hooks.patch(cls, "_release_page_ids", release_page_ids)
    else:
        _hooks.patch(cls, "free", free)


# -- radix cache ------------------------------------------------------------------------------
def _install_radix_cache(mod) -> None:
    cls = getattr(mod, "RadixCache", None)
    if cls is None:
        _hooks.missing.append("RadixCache")
        return

    def insert(orig):
        def wrapper(self, params, *a, **k):
            pool = _pool_of_tree(self) if runtime.writer is not None else None
            if pool is None:
                return orig(self, params, *a, **k)
            before = getattr(self, "evictable_size_", None)
            out = orig(self, params, *a, **k)
            if (
                before is not None and self.evictable_size_ > before
            ):  # a new node: the request's pages now belong to the tree

                def write():
                    node = getattr(out, "last_device_node", None)
                    pages = _pages(getattr(node, "value", None), _page[pool])
                    _cached(pool, pages)
                    _change(pool, pages, -1)

                _safely(write)
            return out

        return wrapper

    def lock_ref(d):
        def make(orig):
            def wrapper(self, node, *a, **k):
                pool = _pool_of_tree(self) if runtime.writer is not None else None
                if pool is None or getattr(self, "disable", False):
                    return orig(self, node, *a, **k)
                try:
                    pages = _path_pages(self, node, _page[pool])
                except Exception as exc:  # noqa: BLE001
                    _failed(exc)
                    return orig(self, node, *a, **k)
                out = orig(self, node, *a, **k)
                _safely(_change, pool, pages, d)
                return out

            return wrapper

        return make

    def evict(orig):
        def wrapper(self, *a, **k):
            if runtime.writer is None:
                return orig(self, *a, **k)
            _ctx["evicting"] += 1
            try:
                with _Outer():
                    return orig(self, *a, **k)
            finally:
                _ctx["evicting"] -= 1

        return wrapper

    def checkpoint(orig):
        def wrapper(self, req, *a, **k):
            if runtime.writer is None:
                return orig(self, req, *a, **k)
            with _Outer(getattr(req, "rid", None)):
                return orig(self, req, *a, **k)

        return wrapper

    def reset(orig):
        def wrapper(self, *a, **k):
            pool = _pool_of_tree(self) if runtime.writer is not None else None
            pages = []
            if pool is not None and getattr(self, "root_node", None) is not None:
                stack = list(self.root_node.children.values())
                while stack:
                    node = stack.pop()
                    pages.extend(_pages(node.value, _page[pool]))
                    stack.extend(node.children.values())
            out = orig(self, *a, **k)
            if pages:
                _now_or_after_pending(K.EVICT, pool, None, pages)
            return out

        return wrapper

    for name, make in [
        ("insert", insert),
        ("inc_lock_ref", lock_ref(+1)),
        ("dec_lock_ref", lock_ref(-1)),
        ("evict", evict),
        ("checkpoint", checkpoint),
        ("reset", reset),
    ]:
        _hooks.patch(cls, name, make)


# -- scheduler side ---------------------------------------------------------------------------
def _query(req, hit: int) -> None:
    pool = _ctx["pool"]
    if pool is None:
        return
    fill = getattr(req, "full_untruncated_fill_ids", None)
    query = len(fill) if fill is not None else len(req.origin_input_ids) + len(req.output_ids)
    retracted = bool(getattr(req, "retracted_stain", False) or getattr(req, "retraction_count", 0))
    runtime.emit(K.REQ_QUERY_PREEMPTED if retracted else K.REQ_QUERY, pool, req.rid, int(query), int(hit), ())


def _install_policy(mod) -> None:
    cls = getattr(mod, "PrefillAdder", None)
    if cls is None:
        _hooks.missing.append("PrefillAdder")
        return

    def add_one_req(orig):
        def wrapper(self, req, *a, **k):
            if runtime.writer is None:
                return orig(self, req, *a, **k)
            n0 = len(self.can_run_list)
            with _Outer(req.rid):
                out = orig(self, req, *a, **k)
                if len(self.can_run_list) > n0 and self.can_run_list[-1] is req:  # admitted
                    _safely(_query, req, req.prefix_len)
            return out

        return wrapper

    def add_chunked_req(orig):  # a continuing chunk: no new lookup
        def wrapper(self, req, *a, **k):
            if runtime.writer is None:
                return orig(self, req, *a, **k)
            with _Outer(req.rid):
                return orig(self, req, *a, **k)

        return wrapper

    _hooks.patch(cls, "add_one_req", add_one_req)
    _hooks.patch(cls, "add_chunked_req", add_chunked_req)


def _batch_pool(batch):
    alloc = getattr(batch, "token_to_kv_pool_allocator", None)
    return None if alloc is None else _pools.get(id(alloc))


def _install_schedule_batch(mod) -> None:
    req_cls = getattr(mod, "Req", None)
    batch_cls = getattr(mod, "ScheduleBatch", None)
    if req_cls is None:
        _hooks.missing.append("Req")
    else:

        def req_init(orig):
            def wrapper(self, *a, **k):
                orig(self, *a, **k)
                pool = _ctx["pool"]
                if runtime.writer is not None and pool is not None:
                    sp = getattr(self, "sampling_params", None)
                    runtime.emit(
                        K.REQ_ARRIVE,
                        pool,
                        self.rid,
                        len(self.origin_input_ids),
                        int(getattr(sp, "max_new_tokens", -1) or -1),
                        (),
                    )

            return wrapper

        def reset_for_retract(orig):
            def wrapper(self, *a, **k):
                out = orig(self, *a, **k)
                pool = _ctx["pool"]
                if runtime.writer is not None and pool is not None:
                    _last_state.pop(self.rid, None)
                    runtime.emit(K.REQ_PREEMPT, pool, self.rid, 0, 0, ())
                return out

            return wrapper

        _hooks.patch(req_cls, "__init__", req_init)
        _hooks.patch(req_cls, "reset_for_retract", reset_for_retract)
    if batch_cls is None:
        _hooks.missing.append("ScheduleBatch")
        return

    def prepare(decode: bool):
        def make(orig):
            def wrapper(self, *a, **k):
                pool = _batch_pool(self) if runtime.writer is not None else None
                if pool is None:
                    return orig(self, *a, **k)
                _ctx["pool"] = pool
                runtime.emit(K.STEP, pool, None, _ctx["step"], 0, ())
                _ctx["step"] += 1
                reqs = list(self.reqs)
                prev = _ctx["batch"], _ctx.get("sizes")
                try:
                    _ctx["batch"] = [r.rid for r in reqs]
                    # the tokens each request extends by, in batch order (decode: one each)
                    _ctx["sizes"] = [1] * len(reqs) if decode else [int(getattr(r, "extend_len", 0) or 0) for r in reqs]
                except Exception as exc:  # noqa: BLE001
                    _ctx["batch"] = _ctx["sizes"] = None
                    _failed(exc)
                try:
                    with _Outer():
                        out = orig(self, *a, **k)
                finally:
                    _ctx["batch"], _ctx["sizes"] = prev
                _safely(_states, pool, reqs)
                return out

            return wrapper

        return make

    def _states(pool, reqs):
        ps = _page[pool]
        for r in reqs:
            filled = int(getattr(r.kv, "kv_allocated_len", 0) or 0) if hasattr(r, "kv") else int(r.seqlen)
            state = (filled, -(-filled // ps))
            if _last_state.get(r.rid) != state:
                _last_state[r.rid] = state
                runtime.emit(K.REQ_STATE, pool, r.rid, state[0], state[1], ())

    _hooks.patch(batch_cls, "prepare_for_extend", prepare(False))
    _hooks.patch(batch_cls, "prepare_for_decode", prepare(True))


def _install_memory_pool(mod) -> None:
    cls = getattr(mod, "ReqToTokenPool", None)
    if cls is None:
        _hooks.missing.append("ReqToTokenPool")
        return

    def free(orig):
        def wrapper(self, req, *a, **k):
            out = orig(self, req, *a, **k)
            pool = _ctx["pool"]
            finished = getattr(req, "finished", None)
            if runtime.writer is not None and pool is not None and callable(finished) and finished():
                _last_state.pop(req.rid, None)
                runtime.emit(K.REQ_FINISH, pool, req.rid, 0, 0, ())
            return out

        return wrapper

    _hooks.patch(cls, "free", free)


def install(module) -> None:
    name = module.__name__
    if ".allocator" in name:
        _install_allocators(module)
    elif name.endswith("radix_cache"):
        _install_radix_cache(module)
    elif name.endswith("memory_pool"):
        _install_memory_pool(module)
    elif name.endswith("schedule_batch"):
        _install_schedule_batch(module)
    elif name.endswith("schedule_policy"):
        _install_policy(module)
    _note()
