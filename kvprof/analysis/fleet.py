"""The fleet section: a bundle whose pools live on several nodes (hosts, Ray nodes) or in
several processes (engine replicas): per engine, per node, and the fleet's totals.

An *engine* is one block pool (a vLLM engine core's KV cache, a replica's, a
``kvprof.blocks.Pool``); a *node* is the Ray node of its process, else its host
(kvprof/trace/hostinfo.py ``node_keys``).  Everything comes from the one pass over the
block events (``bundle.block_pass``), which the reader feeds on one timeline (clocks
aligned per host), so:

* per engine: its own analysis (peak in-use blocks, hit rate, preemptions);
* per node: the sums over its engines (peak blocks summed: each engine's own peak, which
  need not have come at the same moment), hit tokens over query tokens;
* fleet: the sum of every engine's peak, and the **simultaneous** peak, the most blocks in
  use at one moment across all engines (the all-pools analysis of the pass, on the
  aligned timeline; not given when pools run on clocks of their own, simulated ones).

Invariants: simultaneous <= summed peak; a node's summed peak <= the fleet's; the fleet's
hit rate lies between its engines' lowest and highest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvprof.analysis.results import Finding, SectionResult, Window, metric_entry
from kvprof.trace import hostinfo

if TYPE_CHECKING:
    from kvprof.trace.reader import Bundle, ProcessData

IMBALANCE_FINDING = 1.5  # an engine's peak this many times the engines' mean is said
CLOCK_SPREAD_FINDING_S = 0.01  # a host whose offsets to wall time moved this much during the run


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _pool_processes(bundle: Bundle) -> list[ProcessData]:
    """The process of each pool, by global pool index (the reader numbers pools process by process)."""
    out: list[ProcessData] = []
    for proc in bundle.processes:
        out.extend([proc] * len(proc.pools))
    return out


def _node_of(proc: ProcessData, bundle: Bundle) -> tuple[str, str | None]:
    key, name = proc.node
    if key is not None:
        return key, name
    host = hostinfo.hostname(proc.info) or hostinfo.hostname(bundle.manifest) or "local"
    return f"host:{host}", str(host).split(".")[0]


def section(bundle: Bundle, bounds: Window | None) -> SectionResult | None:
    bp = getattr(bundle, "block_pass", None)
    owners = _pool_processes(bundle)
    nodes_of_procs = {_node_of(p, bundle) for p in bundle.processes}
    if bp is None or not bp.per_pool or len(owners) != len(bp.per_pool):
        return None
    # a pool that saw no event is no engine: a forked child re-declares its parent's pools,
    # and one that only ran exec (subprocess with a preexec_fn: Ray's daemons) never uses them
    used = [i for i in range(len(owners)) if bp.pool_calls.get(i)]
    if len({id(owners[i]) for i in used}) < 2 and len(nodes_of_procs) < 2:
        return None  # one process's pools on one node: the blocks section says it all
    window = getattr(bounds, "label", None)
    engines = []
    for i in used:
        info, a, proc = bundle.pools[i], bp.per_pool[i], owners[i]
        key, name = _node_of(proc, bundle)
        engines.append(
            {
                "label": info.label,
                "engine": info.engine,
                "node": name,
                "node_key": key,
                "pid": info.pid,
                "num_blocks": info.num_blocks,
                "capacity": a.capacity,
                "clock": info.clock,
                "peak_blocks": a.peak_blocks,
                "high_watermark": a.high_watermark,
                "query_tokens": a.query_tokens,
                "hit_tokens": a.hit_tokens,
                "hit_rate": a.hit_rate,
                "preemptions": a.preemptions,
                "requests": a.requests,
                "block_events": a.block_events,
            }
        )
    domains = (getattr(bundle, "clock", None) or {}).get("domains") or {}
    nodes: dict[str, Any] = {}
    for proc in bundle.processes:
        key, name = _node_of(proc, bundle)
        n = nodes.setdefault(
            key,
            {
                "node": name,
                "hostname": hostinfo.hostname(proc.info),
                "ray_node_id": None,
                "processes": 0,
                "pids": [],
                "engines": 0,
                "capacity": 0,
                "peak_blocks_sum": 0,
                "query_tokens": 0,
                "hit_tokens": 0,
                "preemptions": 0,
                "clock_shift_s": None,
                "clock_spread_s": None,
            },
        )
        n["processes"] += 1
        n["pids"].append(proc.pid)
        ray_node = hostinfo.ray_node(proc.info)
        if ray_node == key:
            n["ray_node_id"] = ray_node
        dom = domains.get(hostinfo.clock_domain(proc.info))
        if dom is not None:
            n["clock_shift_s"], n["clock_spread_s"] = dom["shift_ns"] / 1e9, dom["spread_ns"] / 1e9
    for e in engines:
        n = nodes[e["node_key"]]
        n["engines"] += 1
        n["capacity"] += e["capacity"]
        n["peak_blocks_sum"] += e["peak_blocks"]
        n["query_tokens"] += e["query_tokens"]
        n["hit_tokens"] += e["hit_tokens"]
        n["preemptions"] += e["preemptions"]
    for n in nodes.values():
        n["hit_rate"] = _ratio(n["hit_tokens"], n["query_tokens"])
    peaks = [e["peak_blocks"] for e in engines]
    own_clocks = any(e["clock"] != "monotonic" for e in engines)
    simultaneous = None if own_clocks else (bp.total.peak_blocks if bp.total is not None else None)
    query, hit = sum(e["query_tokens"] for e in engines), sum(e["hit_tokens"] for e in engines)
    rates = [e["hit_rate"] for e in engines if e["query_tokens"]]
    mean_peak = sum(peaks) / len(peaks) if peaks else 0
    totals = {
        "nodes": len(nodes),
        "engines": len(engines),
        "capacity": sum(e["capacity"] for e in engines),
        "peak_blocks_sum": sum(peaks),
        "peak_blocks_simultaneous": simultaneous,
        "simultaneous_note": "the pools keep clocks of their own (simulated)" if own_clocks else None,
        "peak_blocks_max_node": max(n["peak_blocks_sum"] for n in nodes.values()) if nodes else 0,
        "peak_imbalance": (max(peaks) / mean_peak) if mean_peak else None,
        "query_tokens": query,
        "hit_tokens": hit,
        "hit_rate": _ratio(hit, query),
        "min_engine_hit_rate": min(rates) if rates else None,
        "preemptions": sum(e["preemptions"] for e in engines),
    }
    clock = {
        "reference": (getattr(bundle, "clock", None) or {}).get("reference"),
        "aligned": any(d["shift_ns"] for d in domains.values()),
    }
    section: dict[str, Any] = {
        "totals": totals,
        "nodes": sorted(nodes.values(), key=lambda n: n["node"]),
        "engines": engines,
        "clock": clock,
    }
    for e in engines:
        e.pop("node_key")
    metrics: dict[str, Any] = {}

    def put(name: str, value: Any) -> None:
        metrics[name] = metric_entry(name, value, "fleet", window)

    put("fleet.nodes", totals["nodes"])
    put("fleet.engines", totals["engines"])
    put("fleet.peak_blocks.sum", totals["peak_blocks_sum"])
    put("fleet.peak_blocks.simultaneous", totals["peak_blocks_simultaneous"])
    put("fleet.peak_blocks.max_node", totals["peak_blocks_max_node"])
    put("fleet.peak_blocks.imbalance", totals["peak_imbalance"])
    put("fleet.prefix_cache.hit_rate", totals["hit_rate"])
    put("fleet.prefix_cache.min_engine_hit_rate", totals["min_engine_hit_rate"])
    put("fleet.preemptions", totals["preemptions"])
    return SectionResult(
        name="fleet", metrics=metrics, section=section, findings=_findings(totals, engines, section["nodes"])
    )


def _findings(totals: dict[str, Any], engines: list[Any], nodes: list[Any]) -> list[Any]:
    out = []
    imb = totals["peak_imbalance"]
    if imb is not None and imb >= IMBALANCE_FINDING and len(engines) > 1:
        top = max(engines, key=lambda e: e["peak_blocks"])
        out.append(
            Finding(
                "info",
                "Engines are unevenly loaded",
                f"{top['label']} on {top['node']} peaked at {top['peak_blocks']:,} blocks, {imb:.1f}x the mean of the "
                f"{len(engines)} engines ({totals['peak_blocks_sum'] / len(engines):,.0f}); a router that balances on KV "
                "use would need fewer blocks per replica.",
                {"engine": top["label"], "peak_blocks": top["peak_blocks"], "imbalance": imb},
                "fleet",
            )
        )
    for n in nodes:
        if n["clock_spread_s"] is not None and n["clock_spread_s"] > CLOCK_SPREAD_FINDING_S:
            out.append(
                Finding(
                    "warning",
                    "A host's clock moved against wall time during the recording",
                    f"On {n['node']} the offset of the monotonic clock to wall time varied by {1e3 * n['clock_spread_s']:.1f} ms "
                    "(the wall clock was stepped): its events are aligned with the others to about that.",
                    {"node": n["node"], "spread_s": n["clock_spread_s"]},
                    "fleet",
                )
            )
    return out
