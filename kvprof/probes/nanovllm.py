"""nano-vllm adapter of the ``blocks`` probe.

nano-vllm keeps block state in ``nanovllm.engine.block_manager.BlockManager``:
``blocks`` (``Block`` with ``ref_count``, ``hash``, ``token_ids``), the
``hash_to_block_id`` map that makes a block findable by the prefix cache,
``free_block_ids`` and ``used_block_ids``.  Two APIs are in use:

* December 2025: ``can_allocate(seq) -> bool``, ``allocate(seq)`` (hashes full
  blocks as it goes), ``may_append(seq)`` (allocates at ``len % B == 1``, hashes
  the last block at ``len % B == 0``);
* 2026: ``can_allocate(seq) -> cached blocks or -1``, ``allocate(seq,
  num_cached_blocks)``, ``may_append(seq)`` (allocation only), ``hash_blocks(seq)``
  (caches the blocks a step filled: chunked prefill).

Hooks are per call: a call's block ids come from ``seq.block_table`` around it
(``deallocate`` clears the table, so it is captured first).  Prefix-cache
findability is observed on the ``hash_to_block_id`` map itself: the manager's map
is replaced by a ``dict`` subclass that reports each mapping set (``cache``) and
each mapping deleted or taken over by another block (``evict``), so forks that
drop hashes at free time are recorded as they behave.  Those events are held
until the enclosing manager call has emitted its allocations and frees, so the
stream orders them as the state changed.

Requests are sequences (``seq_id``).  One ``req_query`` per admission of a
never-preempted sequence, and one ``req_query_preempted`` per re-admission of a
preempted one (vLLM counts those apart, as ``preempted_queries``); failures are
``can_allocate``/``can_append`` answering no.  Scheduler hooks add arrivals,
steps, preemptions and per-step token counts (filled = tokens whose KV the
scheduled step writes; held = blocks in the table, so slots allocated ahead of a
chunked prefill are lookahead).
"""

from __future__ import annotations

import functools
import inspect

from kvprof import runtime
from kvprof.probes.patching import Hooks
from kvprof.trace.format import EventKind as K

MODULES = ["nanovllm.engine.block_manager", "nanovllm.engine.scheduler"]

_hooks = Hooks("nano-vllm")
_api = {"name": "unknown"}
_depth = [0]  # nesting of hooked BlockManager calls (allocate calls _allocate_block, ...)
_pending: list = []  # cache/evict events held until the outer call has emitted its own
_preempted: set = set()  # seq ids preempted at least once: their re-admissions are counted apart
_last_state: dict = {}  # seq id -> (filled, held) last reported


@functools.lru_cache(maxsize=1)
def _version() -> str:
    """The distribution that provides the loaded `nanovllm` package, if any (looked up once)."""
    import os
    import sys

    mod = sys.modules.get("nanovllm")
    paths = list(getattr(mod, "__path__", ()) or ())
    try:
        from importlib import metadata

        for dist in ("nano-vllm", "nano-vllm-fork", "nanovllm"):
            try:
                d = metadata.distribution(dist)
            except metadata.PackageNotFoundError:
                continue
            where = os.path.realpath(str(d.locate_file("nanovllm")))
            if not paths or any(os.path.realpath(p) == where for p in paths):
                return f"{dist} {d.version}"
    except Exception:  # pragma: no cover - metadata is stdlib
        pass
    return "unknown (not an installed distribution)"


def _note() -> None:
    _hooks.note(version=_version(), api=_api["name"])


def _pool(mgr) -> int | None:
    idx = getattr(mgr, "_kvprof_pool", None)
    if idx is None and runtime.writer is not None and hasattr(mgr, "blocks"):
        idx = runtime.declare_pool(
            {
                "name": "nano-vllm",
                "engine": "nano-vllm",
                "engine_version": _version(),
                "api": _api["name"],
                "num_blocks": len(mgr.blocks),
                "block_size": int(mgr.block_size),
                "prefix_caching": True,
            }
        )
        try:
            mgr._kvprof_pool = idx
        except AttributeError:  # pragma: no cover - slotted manager: declare each time would be wrong
            return None
    return idx


def _emit(kind: int, mgr, seq=None, arg: int = 0, arg2: int = 0, ids=()) -> None:
    idx = _pool(mgr)
    if idx is not None:
        runtime.emit(kind, idx, None if seq is None else seq.seq_id, arg, arg2, ids)


class _HashMap(dict):
    """The manager's hash -> block id map, reporting findability changes."""

    __slots__ = ("mgr",)

    def __setitem__(self, h, block_id):
        old = dict.get(self, h)
        dict.__setitem__(self, h, block_id)
        if old == block_id:
            return
        mgr = self.mgr
        if old is not None and 0 <= old < len(mgr.blocks) and mgr.blocks[old].hash == h:
            _defer(K.EVICT, mgr, old)  # another block now answers for this content
        _defer(K.CACHE, mgr, block_id)

    def __delitem__(self, h):
        block_id = dict.get(self, h)
        dict.__delitem__(self, h)
        mgr = self.mgr
        if block_id is not None and 0 <= block_id < len(mgr.blocks) and mgr.blocks[block_id].hash == h:
            _defer(K.EVICT, mgr, block_id)

    def pop(self, h, *default):
        if h in self:
            value = dict.get(self, h)
            self.__delitem__(h)
            return value
        return dict.pop(self, h, *default)


def _defer(kind, mgr, block_id) -> None:
    if runtime.writer is None:
        return
    if _depth[0]:
        _pending.append((kind, mgr, int(block_id)))
    else:
        _emit(kind, mgr, None, 0, 0, (int(block_id),))


def _flush_pending() -> None:
    items = _pending[:]
    _pending.clear()
    for kind, mgr, block_id in items:
        _emit(kind, mgr, None, 0, 0, (block_id,))


def _call(orig, self, seq, args, kwargs, state, after):
    """Run a manager method with cache/evict events held until ``after(self, seq, state)``
    has emitted the call's own events (module-level functions: no closure per call)."""
    _depth[0] += 1
    try:
        out = orig(self, seq, *args, **kwargs)
    finally:
        _depth[0] -= 1
    try:
        if after is not None:
            after(self, seq, state)
    finally:
        if not _depth[0] and _pending:
            _flush_pending()
    return out


def _after_allocate(self, seq, cached_before) -> None:
    ids = list(seq.block_table)
    bs = int(self.block_size)
    hits = max(0, (int(seq.num_cached_tokens) - int(cached_before)) // bs)
    _emit(K.REQ_QUERY_PREEMPTED if seq.seq_id in _preempted else K.REQ_QUERY, self, seq, int(len(seq)), hits * bs)
    if hits:
        _emit(K.HIT, self, seq, 0, 0, ids[:hits])
    if ids[hits:]:
        _emit(K.ALLOC, self, seq, 0, 0, ids[hits:])


def _after_append(self, seq, n0) -> None:
    if len(seq.block_table) > n0:
        _emit(K.ALLOC, self, seq, 0, 0, list(seq.block_table[n0:]))


def _after_deallocate(self, seq, ids) -> None:
    if ids:
        _emit(K.FREE, self, seq, 0, 0, ids[::-1])  # freed tail first


# -- BlockManager ------------------------------------------------------------------------
def _install_block_manager(mod) -> None:
    cls = getattr(mod, "BlockManager", None)
    if cls is None:
        _hooks.missing.append("BlockManager")
        return
    try:
        params = list(inspect.signature(cls.allocate).parameters)
    except (TypeError, ValueError, AttributeError):
        params = []
    _api["name"] = "2026" if "num_cached_blocks" in params or hasattr(cls, "hash_blocks") else "2025-12"

    def init(orig):
        def wrapper(self, *a, **k):
            orig(self, *a, **k)
            table = getattr(self, "hash_to_block_id", None)
            if type(table) is dict:
                tracked = _HashMap(table)
                tracked.mgr = self
                self.hash_to_block_id = tracked
            if runtime.writer is not None:
                _pool(self)

        return wrapper

    def allocate(orig):
        def wrapper(self, seq, *a, **k):
            if runtime.writer is None:
                return orig(self, seq, *a, **k)
            return _call(orig, self, seq, a, k, seq.num_cached_tokens, _after_allocate)

        return wrapper

    def may_append(orig):
        def wrapper(self, seq, *a, **k):
            if runtime.writer is None:
                return orig(self, seq, *a, **k)
            return _call(orig, self, seq, a, k, len(seq.block_table), _after_append)

        return wrapper

    def hash_blocks(orig):
        def wrapper(self, seq, *a, **k):
            if runtime.writer is None:
                return orig(self, seq, *a, **k)
            return _call(orig, self, seq, a, k, None, None)

        return wrapper

    def deallocate(orig):
        def wrapper(self, seq, *a, **k):
            if runtime.writer is None:
                return orig(self, seq, *a, **k)
            out = _call(orig, self, seq, a, k, list(seq.block_table), _after_deallocate)
            if getattr(seq, "is_finished", False):
                _last_state.pop(seq.seq_id, None)
                _preempted.discard(seq.seq_id)
                _emit(K.REQ_FINISH, self, seq)
            return out

        return wrapper

    def can_allocate(orig):
        def wrapper(self, seq, *a, **k):
            out = orig(self, seq, *a, **k)
            if runtime.writer is not None and (out is False or (type(out) is int and out < 0)):
                # 2025-12 needs every block free; 2026 does not say how many it lacked
                need = int(seq.num_blocks) if out is False else -1
                _emit(K.ALLOC_FAIL, self, seq, need, len(self.free_block_ids))
            return out

        return wrapper

    def can_append(orig):
        def wrapper(self, seq, *a, **k):
            out = orig(self, seq, *a, **k)
            if runtime.writer is not None and not out:
                _emit(K.ALLOC_FAIL, self, seq, 1, len(self.free_block_ids))
            return out

        return wrapper

    for name, make in [
        ("__init__", init),
        ("allocate", allocate),
        ("may_append", may_append),
        ("deallocate", deallocate),
        ("can_allocate", can_allocate),
        ("can_append", can_append),
    ]:
        _hooks.patch(cls, name, make)
    if hasattr(cls, "hash_blocks"):
        _hooks.patch(cls, "hash_blocks", hash_blocks)


# -- Scheduler ---------------------------------------------------------------------------
def _install_scheduler(mod) -> None:
    cls = getattr(mod, "Scheduler", None)
    if cls is None:
        _hooks.missing.append("Scheduler")
        return

    def add(orig):
        def wrapper(self, seq, *a, **k):
            out = orig(self, seq, *a, **k)
            mgr = getattr(self, "block_manager", None)
            if runtime.writer is not None and mgr is not None:
                _emit(
                    K.REQ_ARRIVE,
                    mgr,
                    seq,
                    int(getattr(seq, "num_prompt_tokens", len(seq))),
                    int(getattr(seq, "max_tokens", -1)),
                )
            return out

        return wrapper

    def schedule(orig):
        step = [0]

        def wrapper(self, *a, **k):
            mgr = getattr(self, "block_manager", None)
            if runtime.writer is None or mgr is None:
                return orig(self, *a, **k)
            _emit(K.STEP, mgr, None, step[0])
            step[0] += 1
            out = orig(self, *a, **k)
            seqs = out[0] if isinstance(out, tuple) and out else out
            for seq in seqs or ():
                held = len(seq.block_table)
                if hasattr(seq, "num_scheduled_tokens"):  # 2026: computed so far + this step's chunk
                    filled = int(seq.num_cached_tokens) + int(seq.num_scheduled_tokens)
                else:  # 2025-12: the step computes every token of the sequence
                    filled = len(seq)
                state = (filled, held)
                if _last_state.get(seq.seq_id) != state:
                    _last_state[seq.seq_id] = state
                    _emit(K.REQ_STATE, mgr, seq, filled, held)
            return out

        return wrapper

    def preempt(orig):
        def wrapper(self, seq, *a, **k):
            out = orig(self, seq, *a, **k)
            mgr = getattr(self, "block_manager", None)
            if runtime.writer is not None and mgr is not None:
                _preempted.add(seq.seq_id)
                _last_state.pop(seq.seq_id, None)
                _emit(K.REQ_PREEMPT, mgr, seq)
            return out

        return wrapper

    for name, make in [("add", add), ("schedule", schedule), ("preempt", preempt)]:
        _hooks.patch(cls, name, make)


def install(module) -> None:
    name = module.__name__
    if name.endswith("block_manager"):
        _install_block_manager(module)
    elif name.endswith("scheduler"):
        _install_scheduler(module)
    _note()
