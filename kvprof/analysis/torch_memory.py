"""PyTorch CUDA caching allocator: a snapshot → typed results (docs/metrics.md, PyTorch).

Pure functions of a normalized snapshot (kvprof.trace.torch_snapshot); no torch.
The snapshot arrives as columns.  Segments and blocks (thousands, not millions) are
summed per segment with C loops over the block columns.  The trace is replayed entry
by entry in Python when it is short (numpy costs 0.1 s to import, and `analyze` on a
small snapshot must stay ten times faster than PyTorch's own reader); from
``NUMPY_ENTRIES`` entries on, the same replay is done with numpy: allocations are
paired with their frees by sorting the entries by (device, address), the timeline is
a suffix sum.  Both give the same figures (tests/test_torch_snapshot_equivalence.py).

Accounting, per the contract: reserved = Σ segment total_size; allocated = Σ
size of ``active_allocated`` blocks; requested = Σ their requested_size;
``active_pending_free`` blocks (freed, not yet reusable) apart.  Rounding waste
= allocated - requested; cached slack = reserved - allocated - pending.  Their
sum with pending is PyTorch's ``_memory_viz stats`` total_free, and rounding /
total_free its "% internal".
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from collections.abc import Iterable
from itertools import compress, islice
from typing import TYPE_CHECKING, Any

from kvprof.trace import torch_snapshot as T
from kvprof.trace.torch_snapshot import STACK_DEPTH  # noqa: F401 - frames that name a call site in the by-stack tables

if TYPE_CHECKING:
    import numpy as np

    from kvprof.analysis.results import SectionResult

ALLOC, PENDING = "active_allocated", "active_pending_free"
NUMPY_ENTRIES = 100_000  # trace entries from which the replay runs in numpy
NUMPY_IF_IMPORTED = (
    5_000  # or from which it does when numpy is imported already (the loader imports it for large files)
)
ACTIVITY = (
    T.ALLOC,
    T.FREE_REQUESTED,
    T.FREE_COMPLETED,
    T.SEGMENT_ALLOC,
    T.SEGMENT_FREE,
    T.SEGMENT_MAP,
    T.SEGMENT_UNMAP,
)
FREES = (T.FREE_REQUESTED, T.FREE, T.FREE_COMPLETED)


@dataclass
class FreeSpace:
    """Inactive (free, cached) memory of one scope: a pool of a stream, or a segment."""

    scope: str
    inactive_bytes: int
    largest_inactive: int
    inactive_blocks: int
    external_fragmentation: float | None  # 1 - largest / total inactive


@dataclass
class Oom:
    time_us: float | None
    device: int
    stream: int
    requested: int
    device_free: int | None  # what the device said it had free (cudaMemGetInfo), when recorded
    inactive_bytes: int  # in the stream's pools, at snapshot time
    largest_inactive: int
    state_at: str  # "oom" when no allocator activity followed it, else "snapshot" (an approximation)
    fragmentation_oom: bool  # total inactive >= request > largest inactive block


@dataclass
class StackRow:
    stack: str
    count: int
    bytes: int
    median_lifetime_us: Any = None  # float | None; while ranking, the lifetimes (a list, or a function that gives it)


@dataclass
class TorchAnalysis:
    devices: list[int]
    segments: int
    reserved: int
    allocated: int
    requested: int
    pending_free: int
    rounding_waste: int
    cached_free: int
    total_free: int  # as _memory_viz stats prints it: reserved - requested
    internal_free_ratio: float | None  # rounding_waste / total_free
    external_fragmentation: float | None
    largest_inactive: int
    pools: list[FreeSpace]
    worst_segments: list[FreeSpace]
    ooms: list[Oom]
    trace_entries: int
    trace_span_us: float | None
    alloc_count: int
    alloc_bytes: int
    allocs_per_second: float | None
    leaked_bytes: int | None  # allocated in the trace window and never freed (None: no trace)
    leaks_by_stack: list[StackRow]
    churn_by_stack: list[StackRow]
    short_lived: int  # allocations freed before the next allocation was made
    short_lived_bytes: int
    timeline: dict[str, Any]  # {"t_us": [...], "requested": [...], "reserved": [...]} rebuilt from the trace
    allocator_settings: dict[str, Any]
    advice: list[dict[str, Any]] = field(default_factory=list)


def _frag(total: int, largest: int) -> float | None:
    return (1 - largest / total) if total > 0 else None


def _median(xs: Iterable[float]) -> float | None:
    xs = sorted(xs)
    n = len(xs)
    return None if not n else (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2)


@dataclass
class _Trace:
    """What the replay of the trace yields, before the stack tables are ranked."""

    span: float | None
    alloc_count: int
    alloc_bytes: int
    leaks: dict[int, Any]  # stack index -> [count, bytes], in the order the allocations stayed live
    churn: dict[
        int, Any
    ]  # stack index -> [count, bytes, lifetimes (a list, or a function that gives it)], in the order of the frees
    short: int
    short_bytes: int
    ooms: list[Any]  # (index, device, later activity on its device)
    timeline: dict[str, Any]


def analyze_snapshot(snap: dict[str, Any], use_numpy: bool | None = None) -> TorchAnalysis:
    """The analysis of a normalized snapshot; `use_numpy` forces one replay of the trace
    (None: numpy for long traces, or when it is imported already)."""
    c: T.Columns = snap["columns"]
    segs = snap["segments"]
    alloc_state = c.blk_states.index(ALLOC) if ALLOC in c.blk_states else -1
    pending_state = c.blk_states.index(PENDING) if PENDING in c.blk_states else -1
    st, size, req, state = c.seg_starts, c.blk_size, c.blk_requested, c.blk_state
    codes = range(len(c.blk_states))
    is_alloc = list(map([k == alloc_state for k in codes].__getitem__, state))
    allocated = sum(compress(size, is_alloc))
    requested = sum(compress(req, is_alloc))
    pending = sum(compress(size, map([k == pending_state for k in codes].__getitem__, state)))
    free_mask = list(map([k not in (alloc_state, pending_state) for k in codes].__getitem__, state))  # inactive blocks
    reserved = sum(c.seg_total)
    pools: dict[tuple[Any, ...], list[int]] = {}  # (device, stream, kind, pool) -> inactive block sizes
    seg_free = []  # (inactive bytes, largest, count, segment index) of segments with more than one inactive block
    it_size, it_free = iter(size), iter(free_mask)
    for i, (dev, stream, kind, pool) in enumerate(zip(c.seg_device, c.seg_stream, c.seg_type, c.seg_pool)):
        n = st[i + 1] - st[i]
        inactive = list(compress(islice(it_size, n), islice(it_free, n)))
        key: tuple[Any, ...] = (dev, stream, c.seg_types[kind], c.seg_pools[pool])
        got = pools.get(key)
        if got is None:
            pools[key] = inactive
        else:
            got.extend(inactive)
        if len(inactive) > 1:
            seg_free.append((sum(inactive), max(inactive), len(inactive), i))
    pool_space = []
    for (dev, stream, kind, pid), sizes in sorted(pools.items(), key=lambda kv: -sum(kv[1])):
        tot = sum(sizes)
        pool_space.append(
            FreeSpace(
                scope=f"device {dev} stream {stream} {kind} pool {pid}",
                inactive_bytes=tot,
                largest_inactive=max(sizes, default=0),
                inactive_blocks=len(sizes),
                external_fragmentation=_frag(tot, max(sizes, default=0)),
            )
        )
    total_inactive = sum(map(sum, pools.values()))
    largest = max((max(x) for x in pools.values() if x), default=0)
    rounding = allocated - requested
    cached = reserved - allocated - pending
    total_free = reserved - requested
    worst = []
    for tot, big, count, i in sorted(seg_free, key=lambda f: -(f[0] - f[1]))[:10]:
        s = segs[i]
        worst.append(
            FreeSpace(
                scope=f"segment 0x{s['address']:x} ({s['segment_type']}, {s['total_size']:,} B, device {s['device']}, stream {s['stream']})",
                inactive_bytes=tot,
                largest_inactive=big,
                inactive_blocks=count,
                external_fragmentation=_frag(tot, big),
            )
        )

    # -- the trace ----------------------------------------------------------------------
    if use_numpy is None:
        use_numpy = c.entries >= NUMPY_ENTRIES or (c.entries >= NUMPY_IF_IMPORTED and "numpy" in sys.modules)
    replay = _replay_numpy if use_numpy else _replay_python
    tr = replay(c, requested, reserved)
    ooms = []
    serving: dict[tuple[Any, ...], tuple[int, int]] = {}
    for k, (i, d, later) in enumerate(tr.ooms):  # in trace order, as the OOM columns
        stream, want = c.oom_stream[k], c.size[i]
        key = (d, stream, want <= SMALL_REQUEST)
        if key not in serving:
            sizes = _serving_pool(pools, d, stream, want)
            serving[key] = (sum(sizes), max(sizes, default=0))
        tot, big = serving[key]
        free = c.oom_device_free[k]
        ooms.append(
            Oom(
                time_us=c.time_of(i),
                device=d,
                stream=stream,
                requested=want,
                device_free=free if free >= 0 else None,
                inactive_bytes=tot,
                largest_inactive=big,
                state_at="snapshot" if later else "oom",
                fragmentation_oom=tot >= want > big,
            )
        )
    names = c.stacks
    leak_rows = sorted((StackRow(names[k], n, b) for k, (n, b) in tr.leaks.items()), key=lambda r: -r.bytes)[:15]
    churn_rows = sorted((StackRow(names[k], n, b, ls) for k, (n, b, ls) in tr.churn.items()), key=lambda r: -r.bytes)[
        :15
    ]
    for r in churn_rows:  # lifetimes: a list, or a function that gives it (numpy: only for the rows shown)
        r.median_lifetime_us = _median(
            r.median_lifetime_us() if callable(r.median_lifetime_us) else r.median_lifetime_us
        )

    a = TorchAnalysis(
        devices=sorted(set(c.seg_device)),
        segments=len(segs),
        reserved=reserved,
        allocated=allocated,
        requested=requested,
        pending_free=pending,
        rounding_waste=rounding,
        cached_free=cached,
        total_free=total_free,
        internal_free_ratio=(rounding / total_free) if total_free > 0 else None,
        external_fragmentation=_frag(total_inactive, largest),
        largest_inactive=largest,
        pools=pool_space,
        worst_segments=worst,
        ooms=ooms,
        trace_entries=c.entries,
        trace_span_us=tr.span,
        alloc_count=tr.alloc_count,
        alloc_bytes=tr.alloc_bytes,
        allocs_per_second=(tr.alloc_count / (tr.span / 1e6)) if tr.span else None,
        leaked_bytes=sum(r[1] for r in tr.leaks.values()) if c.entries else None,
        leaks_by_stack=leak_rows,
        churn_by_stack=churn_rows,
        short_lived=tr.short,
        short_lived_bytes=tr.short_bytes,
        timeline=tr.timeline,
        allocator_settings=dict(snap.get("allocator_settings") or {}),
    )
    a.advice = _advice(a)
    return a


SMALL_REQUEST = 1 << 20  # PyTorch's kSmallSize: requests up to 1 MiB come from the small pool


def _serving_pool(pools: dict[tuple[Any, ...], list[int]], device: int, stream: int, size: int) -> list[Any]:
    """Inactive block sizes of the pool an allocation of ``size`` is served from: the default
    pool (private pools serve only their own graphs and MemPools) of its device and stream,
    small for requests up to 1 MiB, large beyond.  Snapshots too old to name segment types
    count every default-pool block of the stream."""
    kind = "small" if size <= SMALL_REQUEST else "large"
    mine = [
        (k, xs) for k, xs in pools.items() if k[0] == device and k[1] == stream and tuple(k[3]) in ((0, 0), (0,), ())
    ]
    typed = [xs for k, xs in mine if k[2] == kind]
    if typed or any(k[2] in ("small", "large") for k, _ in mine):
        return [x for xs in typed for x in xs]
    return [x for _, xs in mine for x in xs]


# -- the replay, entry by entry -------------------------------------------------------------------
def _replay_python(c: T.Columns, requested_end: int, reserved_end: int) -> _Trace:
    """The trace replayed in Python, one entry at a time (short traces)."""
    n = c.entries
    devs = [d for d, k in enumerate(c.dev_lens) for _ in range(k)]
    times = [c.time_of(i) for i in range(n)]
    known = [t for t in times if t is not None]
    span = (max(known) - min(known)) if len(known) >= 2 else None
    stacks = iter(c.alloc_stack)
    live: dict[tuple[Any, ...], tuple[Any, ...]] = {}  # (device, addr) -> (size, stack, time, index)
    alloc_count = alloc_bytes = short = short_bytes = 0
    churn: dict[int, Any] = {}
    last_alloc_index = -1
    ooms = []
    last_activity: dict[int, int] = {}  # device -> index of its last allocator activity in the trace
    for i, (d, act) in enumerate(zip(devs, c.action)):
        if act in ACTIVITY:
            last_activity[d] = i
    for i, (d, act, addr, size) in enumerate(zip(devs, c.action, c.addr, c.size)):
        if act == T.ALLOC:
            alloc_count += 1
            alloc_bytes += size
            live[(d, addr)] = (size, next(stacks), times[i], i)
            last_alloc_index = i
        elif act in FREES:
            got = live.pop((d, addr), None)
            if got is not None:
                size, stack, t0, idx = got
                row = churn.setdefault(stack, [0, 0, []])
                row[0] += 1
                row[1] += size
                if t0 is not None and times[i] is not None:
                    row[2].append(times[i] - t0)
                if idx == last_alloc_index:  # nothing else was allocated in between
                    short += 1
                    short_bytes += size
        elif act == T.OOM:
            ooms.append((i, d, last_activity.get(d, -1) > i))  # this device's state changed after the OOM
    leaks: dict[int, Any] = {}
    for size, stack, _t, _i in live.values():
        row = leaks.setdefault(stack, [0, 0])
        row[0] += 1
        row[1] += size
    return _Trace(
        span,
        alloc_count,
        alloc_bytes,
        leaks,
        churn,
        short,
        short_bytes,
        ooms,
        _timeline_python(c, devs, times, requested_end, reserved_end),
    )


def _timeline_python(
    c: T.Columns, devs: list[Any], times: list[Any], requested_end: int, reserved_end: int, max_points: int = 2000
) -> dict[str, Any]:
    """Requested (live) and reserved bytes over the trace window, rebuilt backwards from the
    snapshot's own totals (the trace is a ring buffer that ends at the snapshot).  The
    trace's alloc and free sizes are the sizes the program asked for, not the rounded
    block sizes, so the rebuild starts from the requested total; the devices' entries are
    merged in time order (each device has its own list)."""
    steps = []
    requested: set[Any] = set()  # blocks whose free was requested: they left `allocated` then
    for d, act, addr, size, t in zip(devs, c.action, c.addr, c.size, times):
        da = 0
        if act == T.ALLOC:
            da = size
        elif act in (T.FREE_REQUESTED, T.FREE):
            requested.add((d, addr))
            da = -size
        elif act == T.FREE_COMPLETED:
            da = 0 if (d, addr) in requested else -size
            requested.discard((d, addr))
        if t is None:
            continue
        dr = (
            size
            if act in (T.SEGMENT_ALLOC, T.SEGMENT_MAP)
            else -size
            if act in (T.SEGMENT_FREE, T.SEGMENT_UNMAP)
            else 0
        )
        if da or dr:
            steps.append((t, da, dr))
    if not steps:
        return {"t_us": [], "requested": [], "reserved": []}
    steps.sort(key=lambda x: x[0])  # stable: one device's order kept at equal times
    t, al, re = [], [], []
    a, r = requested_end, reserved_end
    for tu, da, dr in reversed(steps):
        t.append(tu)
        al.append(a)
        re.append(r)
        a -= da
        r -= dr
    t.reverse()
    al.reverse()
    re.reverse()
    if len(t) > max_points:  # evenly spaced points, plus the peaks and the last point (the state at the end)
        stride = len(t) / max_points
        keep = sorted(
            {int(i * stride) for i in range(max_points)}
            | {max(range(len(al)), key=al.__getitem__), max(range(len(re)), key=re.__getitem__), len(t) - 1}
        )
        t, al, re = [t[i] for i in keep], [al[i] for i in keep], [re[i] for i in keep]
    return {"t_us": t, "requested": al, "reserved": re}


# -- the same replay in numpy ---------------------------------------------------------------------
def _replay_numpy(c: T.Columns, requested_end: int, reserved_end: int, max_points: int = 2000) -> _Trace:
    """The trace replayed with numpy (long traces); the same figures as _replay_python.

    Per (device, address), in trace order, an allocation is live until the next entry of
    that key: a free of any kind ends it (a pair: churn, and short-lived when no other
    allocation came in between), another allocation replaces it (it is counted nowhere),
    none leaves it live at the end (a leak, listed where the first of the allocations
    that replaced each other at that address was made).  A free_completed leaves the
    requested bytes alone when the previous free of its key was a free_requested."""
    import numpy as np

    def mask(codes: Iterable[int]) -> np.ndarray:
        table = np.zeros(256, dtype=bool)
        table[list(codes)] = True
        return table[act.view(np.uint8)]

    n = c.entries
    act = np.frombuffer(c.action, dtype=np.int8)
    addr = np.frombuffer(c.addr, dtype=np.int64)
    size = np.frombuffer(c.size, dtype=np.int64)
    ndev = len(c.dev_lens)
    dev = np.repeat(np.arange(ndev, dtype=np.int64), c.dev_lens)
    if c.time_is_float:
        time = np.frombuffer(c.time, dtype=np.float64)
        has_time = ~np.isnan(time)
    else:
        time = np.frombuffer(c.time, dtype=np.int64)
        has_time = time != T.NO_TIME
    known = time[has_time]
    span = (known.max() - known.min()).item() if len(known) >= 2 else None
    is_alloc = act == T.ALLOC
    is_free = mask(FREES)
    is_req = mask((T.FREE_REQUESTED, T.FREE))
    stack = np.full(n, -1, dtype=np.int64)
    stack[is_alloc] = np.frombuffer(c.alloc_stack, dtype=np.int32)
    alloc_count = int(is_alloc.sum())
    alloc_bytes = int(size[is_alloc].sum())

    # allocations and frees sorted by (device, address), trace order kept within a key
    ev = np.flatnonzero(is_alloc | is_free)
    ev = ev[np.argsort(addr[ev], kind="stable")] if ndev == 1 else ev[np.lexsort((addr[ev], dev[ev]))]
    same_next = np.zeros(len(ev), dtype=bool)
    if len(ev) > 1:
        same_next[:-1] = addr[ev[1:]] == addr[ev[:-1]]
        if ndev > 1:
            same_next[:-1] &= dev[ev[1:]] == dev[ev[:-1]]
    ev_alloc = is_alloc[ev]
    next_free = np.zeros(len(ev), dtype=bool)
    next_free[:-1] = same_next[:-1] & ~ev_alloc[1:]
    paired = ev_alloc & next_free
    a_idx, f_idx = ev[paired], ev[np.flatnonzero(paired) + 1]
    leaked = ev_alloc & ~same_next
    # where a leaked allocation sits in the live map: the first of the run of allocations before it
    starts = ev_alloc & ~np.concatenate(([False], same_next[:-1] & ev_alloc[:-1]))
    first_of_run = np.maximum.accumulate(np.where(starts, np.arange(len(ev)), -1)) if len(ev) else ev
    l_pos = np.flatnonzero(leaked)
    l_idx, l_first = ev[l_pos], ev[first_of_run[l_pos]]
    order = np.argsort(l_first, kind="stable")
    leaks = _group(stack[l_idx[order]], size[l_idx[order]], len(c.stacks))

    # churn, in the order of the frees
    order = np.argsort(f_idx, kind="stable")
    a_idx, f_idx = a_idx[order], f_idx[order]
    churn_stack = stack[a_idx]
    churn = _group(churn_stack, size[a_idx], len(c.stacks))
    both = has_time[a_idx] & has_time[f_idx]
    lifetimes = time[f_idx] - time[a_idx]
    for k, row in churn.items():
        row.append(lambda k=k: lifetimes[(churn_stack == k) & both].tolist())
    prev_alloc = np.maximum.accumulate(np.where(is_alloc, np.arange(n), -1))
    is_short = prev_alloc[f_idx] == a_idx
    short, short_bytes = int(is_short.sum()), int(size[a_idx][is_short].sum())

    # OOMs, with whether their device moved after them
    activity = mask(ACTIVITY)
    last_activity = {}
    for d in range(ndev):
        at = np.flatnonzero(activity & (dev == d)) if ndev > 1 else np.flatnonzero(activity)
        if len(at):
            last_activity[d] = int(at[-1])
    ooms = [(i, int(dev[i]), last_activity.get(int(dev[i]), -1) > i) for i in np.flatnonzero(act == T.OOM).tolist()]

    # timeline
    da = np.zeros(n, dtype=np.int64)
    da[is_alloc] = size[is_alloc]
    da[is_req] = -size[is_req]
    fr = ev[is_free[ev]]  # the frees, still by key and in trace order
    if len(fr):
        prev_req = np.zeros(len(fr), dtype=bool)
        prev_req[1:] = (addr[fr[1:]] == addr[fr[:-1]]) & (dev[fr[1:]] == dev[fr[:-1]]) & is_req[fr[:-1]]
        done = fr[(act[fr] == T.FREE_COMPLETED) & ~prev_req]
        da[done] = -size[done]
    dr = np.zeros(n, dtype=np.int64)
    grow, shrink = mask((T.SEGMENT_ALLOC, T.SEGMENT_MAP)), mask((T.SEGMENT_FREE, T.SEGMENT_UNMAP))
    dr[grow], dr[shrink] = size[grow], -size[shrink]
    step = np.flatnonzero(has_time & ((da != 0) | (dr != 0)))
    step = step[np.argsort(time[step], kind="stable")]
    if not len(step):
        timeline: dict[str, Any] = {"t_us": [], "requested": [], "reserved": []}
    else:
        sda, sdr = da[step], dr[step]
        al = requested_end - (
            np.cumsum(sda[::-1])[::-1] - sda
        )  # the state after each step: the end minus what came later
        re = reserved_end - (np.cumsum(sdr[::-1])[::-1] - sdr)
        t = time[step]
        if len(t) > max_points:
            stride = len(t) / max_points
            keep = np.unique(
                np.concatenate(
                    [
                        (np.arange(max_points) * stride).astype(np.int64),
                        [int(np.argmax(al)), int(np.argmax(re)), len(t) - 1],
                    ]
                )
            )
            t, al, re = t[keep], al[keep], re[keep]
        timeline = {"t_us": t.tolist(), "requested": al.tolist(), "reserved": re.tolist()}
    return _Trace(span, alloc_count, alloc_bytes, leaks, churn, short, short_bytes, ooms, timeline)


def _group(keys: np.ndarray, sizes: np.ndarray, nkeys: int) -> dict[int, Any]:
    """key -> [count, bytes] in the order each key first appears (keys: ints below nkeys)."""
    import numpy as np

    if not len(keys):
        return {}
    counts = np.bincount(keys, minlength=nkeys)
    total = np.zeros(nkeys, dtype=np.int64)
    np.add.at(total, keys, sizes)  # exact, unlike bincount's float weights
    first = np.full(nkeys, len(keys), dtype=np.int64)
    np.minimum.at(first, keys, np.arange(len(keys)))
    present = np.flatnonzero(counts)
    present = present[np.argsort(first[present], kind="stable")]
    return {k: [int(counts[k]), int(total[k])] for k in present.tolist()}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _advice(a: TorchAnalysis) -> list[dict[str, Any]]:
    out = []
    settings = a.allocator_settings
    frag_ooms = [o for o in a.ooms if o.fragmentation_oom]
    if frag_ooms and not settings.get("expandable_segments", False):
        o = frag_ooms[0]
        out.append(
            {
                "setting": "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
                "why": f"{len(frag_ooms)} out-of-memory error(s) were fragmentation: {_mib(o.requested)} requested with {_mib(o.inactive_bytes)} "
                f"free in the allocator's cache but no free block larger than {_mib(o.largest_inactive)}; expandable segments grow in place instead of needing one free run",
            }
        )
    if (
        a.external_fragmentation is not None
        and a.external_fragmentation > 0.5
        and a.cached_free > 0.2 * max(a.reserved, 1)
    ):
        if not settings.get("expandable_segments", False) and not frag_ooms:
            out.append(
                {
                    "setting": "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (or max_split_size_mb)",
                    "why": f"{_mib(a.cached_free)} of {_mib(a.reserved)} reserved sits free in the cache but the largest free block is "
                    f"{_mib(a.largest_inactive)} ({100 * a.external_fragmentation:.0f}% external fragmentation): large requests may not fit",
                }
            )
    if a.cached_free > 0.5 * max(a.reserved, 1) and a.cached_free > 1 << 30:
        out.append(
            {
                "setting": "torch.cuda.empty_cache() between phases, or garbage_collection_threshold",
                "why": f"{_mib(a.cached_free)} ({100 * a.cached_free / a.reserved:.0f}% of reserved) is cached but unused: other processes on the GPU cannot use it",
            }
        )
    if a.total_free > 0 and a.rounding_waste > 0.25 * a.total_free and a.rounding_waste > 64 << 20:
        out.append(
            {
                "setting": "PYTORCH_CUDA_ALLOC_CONF=roundup_power2_divisions:[...]",
                "why": f"rounding waste is {_mib(a.rounding_waste)} ({100 * a.rounding_waste / a.allocated:.1f}% of allocated): finer size classes round less",
            }
        )
    return out


def snapshot_section(a: TorchAnalysis, source: str) -> SectionResult:
    """Metrics map, JSON section and findings of one TorchAnalysis (a SectionResult)."""
    import dataclasses

    from kvprof.analysis.results import Finding, SectionResult, metric_entry

    def put(name: str, value: Any) -> tuple[str, dict[str, Any]]:
        return name, metric_entry(name, value, "torch")

    metrics = dict(
        [
            put("torch.segments", a.segments),
            put("torch.reserved_bytes", a.reserved),
            put("torch.allocated_bytes", a.allocated),
            put("torch.requested_bytes", a.requested),
            put("torch.pending_free_bytes", a.pending_free),
            put("torch.rounding_waste_bytes", a.rounding_waste),
            put("torch.cached_free_bytes", a.cached_free),
            put("torch.total_free_bytes", a.total_free),
            put("torch.internal_free_ratio", a.internal_free_ratio),
            put("torch.external_fragmentation", a.external_fragmentation),
            put("torch.largest_free_block_bytes", a.largest_inactive),
            put("torch.ooms", len(a.ooms)),
            put("torch.fragmentation_ooms", sum(1 for o in a.ooms if o.fragmentation_oom)),
            put("torch.leaked_bytes", a.leaked_bytes),
            put("torch.allocations", a.alloc_count),
            put("torch.allocated_bytes_total", a.alloc_bytes),
            put("torch.allocations_per_second", a.allocs_per_second),
            put("torch.short_lived_allocations", a.short_lived),
        ]
    )
    findings = []

    def mib(n: float) -> str:
        return f"{n / 2**20:,.1f} MiB"

    for o in a.ooms:
        kind = "fragmentation OOM" if o.fragmentation_oom else "OOM"
        findings.append(
            Finding(
                "error",
                f"{kind}: {mib(o.requested)} could not be allocated on device {o.device}",
                (
                    f"The cache held {mib(o.inactive_bytes)} free but its largest free block was {mib(o.largest_inactive)}: the memory was there, in pieces."
                    if o.fragmentation_oom
                    else f"The cache held {mib(o.inactive_bytes)} free (largest block {mib(o.largest_inactive)}): the request did not fit, fragmentation aside."
                )
                + (" (allocator state at the snapshot, which came after the OOM)" if o.state_at == "snapshot" else ""),
                {
                    "requested": o.requested,
                    "inactive_bytes": o.inactive_bytes,
                    "largest_inactive": o.largest_inactive,
                    "device_free": o.device_free,
                },
                "torch",
            )
        )
    if a.leaked_bytes:
        top = a.leaks_by_stack[0]
        findings.append(
            Finding(
                "warning",
                f"{mib(a.leaked_bytes)} allocated during the trace is still allocated at its end",
                f"Largest site: {top.stack}, {top.count} allocation(s), {mib(top.bytes)}. Allocations made before the trace window began are not counted.",
                {"leaked_bytes": a.leaked_bytes, "top_stack": top.stack},
                "torch",
            )
        )
    for adv in a.advice:
        findings.append(Finding("info", f"try {adv['setting']}", adv["why"], {}, "torch"))
    section = dataclasses.asdict(a)
    section["source"] = source
    return SectionResult(name="torch", metrics=metrics, section=section, findings=findings)
