"""PyTorch CUDA caching allocator: a snapshot → typed results (docs/metrics.md, PyTorch).

Pure functions of a normalized snapshot (kvprof.trace.torch_snapshot); no torch,
no numpy (a snapshot has thousands of blocks, not millions, and `analyze` on a
bare snapshot must start fast).

Accounting, per the contract: reserved = Σ segment total_size; allocated = Σ
size of ``active_allocated`` blocks; requested = Σ their requested_size;
``active_pending_free`` blocks (freed, not yet reusable) apart.  Rounding waste
= allocated - requested; cached slack = reserved - allocated - pending.  Their
sum with pending is PyTorch's ``_memory_viz stats`` total_free, and rounding /
total_free its "% internal".
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALLOC, PENDING = "active_allocated", "active_pending_free"
STACK_DEPTH = 4  # frames that name a call site in the by-stack tables


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
    median_lifetime_us: float | None = None


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
    timeline: dict  # {"t_us": [...], "requested": [...], "reserved": [...]} rebuilt from the trace
    allocator_settings: dict
    advice: list[dict] = field(default_factory=list)


def _frag(total: int, largest: int) -> float | None:
    return (1 - largest / total) if total > 0 else None


def _stack(frames: list) -> str:
    parts = []
    for f in frames[:STACK_DEPTH]:
        fn = str(f.get("filename", "?")).replace("\\", "/").rsplit("/", 1)[-1]
        parts.append(f"{f.get('name', '?')} ({fn}:{f.get('line', '?')})")
    return " < ".join(parts) if parts else "(no frames recorded)"


def analyze_snapshot(snap: dict) -> TorchAnalysis:
    segs = snap["segments"]
    reserved = allocated = requested = pending = 0
    pools: dict[tuple, list[int]] = {}  # (device, stream, pool) -> inactive block sizes
    seg_space = []
    for s in segs:
        reserved += s["total_size"]
        inactive = []
        for b in s["blocks"]:
            if b["state"] == ALLOC:
                allocated += b["size"]
                requested += b["requested_size"]
            elif b["state"] == PENDING:
                pending += b["size"]
            else:
                inactive.append(b["size"])
        key = (s["device"], s["stream"], s["segment_type"], s["segment_pool_id"])
        pools.setdefault(key, []).extend(inactive)
        tot = sum(inactive)
        seg_space.append(FreeSpace(
            scope=f"segment 0x{s['address']:x} ({s['segment_type']}, {s['total_size']:,} B, device {s['device']}, stream {s['stream']})",
            inactive_bytes=tot, largest_inactive=max(inactive, default=0), inactive_blocks=len(inactive), external_fragmentation=_frag(tot, max(inactive, default=0)),
        ))
    pool_space = []
    for (dev, stream, kind, pid), sizes in sorted(pools.items(), key=lambda kv: -sum(kv[1])):
        tot = sum(sizes)
        pool_space.append(FreeSpace(scope=f"device {dev} stream {stream} {kind} pool {pid}", inactive_bytes=tot,
                                    largest_inactive=max(sizes, default=0), inactive_blocks=len(sizes), external_fragmentation=_frag(tot, max(sizes, default=0))))
    all_inactive = [x for sizes in pools.values() for x in sizes]
    total_inactive = sum(all_inactive)
    largest = max(all_inactive, default=0)
    rounding = allocated - requested
    cached = reserved - allocated - pending
    total_free = reserved - requested
    worst = sorted((f for f in seg_space if f.inactive_blocks > 1), key=lambda f: -(f.inactive_bytes - f.largest_inactive))[:10]

    # -- the trace ----------------------------------------------------------------------
    entries = [(d, e) for d, dev in enumerate(snap["device_traces"]) for e in dev]
    times = [e["time_us"] for _, e in entries if e["time_us"] is not None]
    span = (max(times) - min(times)) if len(times) >= 2 else None
    live: dict[tuple, tuple] = {}  # (device, addr) -> (size, stack, time, index)
    alloc_count = alloc_bytes = short = short_bytes = 0
    churn: dict[str, list] = {}
    last_alloc_index = -1
    ooms = []
    activity = ("alloc", "free_requested", "free_completed", "segment_alloc", "segment_free", "segment_map", "segment_unmap")
    last_activity: dict = {}  # device -> index of its last allocator activity in the trace
    for i, (d, e) in enumerate(entries):
        if e["action"] in activity:
            last_activity[d] = i
    for i, (d, e) in enumerate(entries):
        act = e["action"]
        if act == "alloc":
            alloc_count += 1
            alloc_bytes += e["size"]
            live[(d, e["addr"])] = (e["size"], _stack(e["frames"]), e["time_us"], i)
            last_alloc_index = i
        elif act in ("free_requested", "free") or (act == "free_completed" and (d, e["addr"]) in live):
            got = live.pop((d, e["addr"]), None)
            if got is not None:
                size, stack, t0, idx = got
                row = churn.setdefault(stack, [0, 0, []])
                row[0] += 1
                row[1] += size
                if t0 is not None and e["time_us"] is not None:
                    row[2].append(e["time_us"] - t0)
                if idx == last_alloc_index:  # nothing else was allocated in between
                    short += 1
                    short_bytes += size
        elif act == "oom":
            later = last_activity.get(d, -1) > i  # this device's state changed after the OOM
            sizes = _serving_pool(pools, d, e["stream"], e["size"])
            tot, big = sum(sizes), max(sizes, default=0)
            ooms.append(Oom(time_us=e["time_us"], device=d, stream=e["stream"], requested=e["size"],
                            device_free=e["device_free"] if e["device_free"] >= 0 else None, inactive_bytes=tot, largest_inactive=big,
                            state_at="snapshot" if later else "oom", fragmentation_oom=tot >= e["size"] > big))
    leaks: dict[str, list] = {}
    for size, stack, _t, _i in live.values():
        row = leaks.setdefault(stack, [0, 0])
        row[0] += 1
        row[1] += size

    def median(xs):
        xs = sorted(xs)
        n = len(xs)
        return None if not n else (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2)

    leak_rows = sorted((StackRow(k, c, b) for k, (c, b) in leaks.items()), key=lambda r: -r.bytes)[:15]
    churn_rows = sorted((StackRow(k, c, b, median(ls)) for k, (c, b, ls) in churn.items()), key=lambda r: -r.bytes)[:15]

    a = TorchAnalysis(
        devices=sorted({s["device"] for s in segs}), segments=len(segs), reserved=reserved, allocated=allocated, requested=requested,
        pending_free=pending, rounding_waste=rounding, cached_free=cached, total_free=total_free,
        internal_free_ratio=(rounding / total_free) if total_free > 0 else None,
        external_fragmentation=_frag(total_inactive, largest), largest_inactive=largest,
        pools=pool_space, worst_segments=worst, ooms=ooms, trace_entries=len(entries), trace_span_us=span,
        alloc_count=alloc_count, alloc_bytes=alloc_bytes, allocs_per_second=(alloc_count / (span / 1e6)) if span else None,
        leaked_bytes=sum(r[1] for r in leaks.values()) if entries else None, leaks_by_stack=leak_rows, churn_by_stack=churn_rows,
        short_lived=short, short_lived_bytes=short_bytes, timeline=_timeline(entries, requested, reserved),
        allocator_settings=dict(snap.get("allocator_settings") or {}),
    )
    a.advice = _advice(a)
    return a


SMALL_REQUEST = 1 << 20  # PyTorch's kSmallSize: requests up to 1 MiB come from the small pool


def _serving_pool(pools: dict, device: int, stream: int, size: int) -> list:
    """Inactive block sizes of the pool an allocation of ``size`` is served from: the default
    pool (private pools serve only their own graphs and MemPools) of its device and stream,
    small for requests up to 1 MiB, large beyond.  Snapshots too old to name segment types
    count every default-pool block of the stream."""
    kind = "small" if size <= SMALL_REQUEST else "large"
    mine = [(k, xs) for k, xs in pools.items() if k[0] == device and k[1] == stream and tuple(k[3]) in ((0, 0), (0,), ())]
    typed = [xs for k, xs in mine if k[2] == kind]
    if typed or any(k[2] in ("small", "large") for k, _ in mine):
        return [x for xs in typed for x in xs]
    return [x for _, xs in mine for x in xs]


def _timeline(entries, requested_end: int, reserved_end: int, max_points: int = 2000) -> dict:
    """Requested (live) and reserved bytes over the trace window, rebuilt backwards from the
    snapshot's own totals (the trace is a ring buffer that ends at the snapshot).  The
    trace's alloc and free sizes are the sizes the program asked for, not the rounded
    block sizes, so the rebuild starts from the requested total; the devices' entries are
    merged in time order (each device has its own list)."""
    steps = []
    requested: set = set()  # blocks whose free was requested: they left `allocated` then
    for d, e in entries:
        act, size = e["action"], e["size"]
        da = 0
        if act == "alloc":
            da = size
        elif act in ("free_requested", "free"):
            requested.add((d, e["addr"]))
            da = -size
        elif act == "free_completed":
            da = 0 if (d, e["addr"]) in requested else -size
            requested.discard((d, e["addr"]))
        if e["time_us"] is None:
            continue
        dr = size if act in ("segment_alloc", "segment_map") else -size if act in ("segment_free", "segment_unmap") else 0
        if da or dr:
            steps.append((e["time_us"], da, dr))
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
    t.reverse(), al.reverse(), re.reverse()
    if len(t) > max_points:  # evenly spaced points, plus the peaks and the last point (the state at the end)
        stride = len(t) / max_points
        keep = sorted({int(i * stride) for i in range(max_points)} | {max(range(len(al)), key=al.__getitem__),
                                                                      max(range(len(re)), key=re.__getitem__), len(t) - 1})
        t, al, re = [t[i] for i in keep], [al[i] for i in keep], [re[i] for i in keep]
    return {"t_us": t, "requested": al, "reserved": re}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _advice(a: TorchAnalysis) -> list[dict]:
    out = []
    settings = a.allocator_settings
    frag_ooms = [o for o in a.ooms if o.fragmentation_oom]
    if frag_ooms and not settings.get("expandable_segments", False):
        o = frag_ooms[0]
        out.append({
            "setting": "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
            "why": f"{len(frag_ooms)} out-of-memory error(s) were fragmentation: {_mib(o.requested)} requested with {_mib(o.inactive_bytes)} "
                   f"free in the allocator's cache but no free block larger than {_mib(o.largest_inactive)}; expandable segments grow in place instead of needing one free run",
        })
    if a.external_fragmentation is not None and a.external_fragmentation > 0.5 and a.cached_free > 0.2 * max(a.reserved, 1):
        if not settings.get("expandable_segments", False) and not frag_ooms:
            out.append({
                "setting": "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (or max_split_size_mb)",
                "why": f"{_mib(a.cached_free)} of {_mib(a.reserved)} reserved sits free in the cache but the largest free block is "
                       f"{_mib(a.largest_inactive)} ({100 * a.external_fragmentation:.0f}% external fragmentation): large requests may not fit",
            })
    if a.cached_free > 0.5 * max(a.reserved, 1) and a.cached_free > 1 << 30:
        out.append({
            "setting": "torch.cuda.empty_cache() between phases, or garbage_collection_threshold",
            "why": f"{_mib(a.cached_free)} ({100 * a.cached_free / a.reserved:.0f}% of reserved) is cached but unused: other processes on the GPU cannot use it",
        })
    if a.total_free > 0 and a.rounding_waste > 0.25 * a.total_free and a.rounding_waste > 64 << 20:
        out.append({
            "setting": "PYTORCH_CUDA_ALLOC_CONF=roundup_power2_divisions:[...]",
            "why": f"rounding waste is {_mib(a.rounding_waste)} ({100 * a.rounding_waste / a.allocated:.1f}% of allocated): finer size classes round less",
        })
    return out
