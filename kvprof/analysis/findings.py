"""Findings: what the numbers mean, in plain words, each with the evidence behind it.

Thresholds live here and nowhere else.  Findings carry numbers, not formatting
beyond the sentence itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kvprof.analysis import Finding

if TYPE_CHECKING:
    from kvprof.trace.reader import Bundle

FULL_POOL = 0.95
HIGH_INTERNAL = 0.20
POLLUTION = 0.5
# Re-admitted (preempted) requests finding less than this share of their tokens in the prefix
# cache, while the cache evicted blocks: their own computed blocks were dropped before they came back.
READMISSION_HITS = 0.5


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def run_findings(bundle: Bundle) -> list[Finding]:
    out = []
    man = bundle.manifest
    target = man.get("target") or {}
    if man.get("status") == "recording":
        out.append(
            Finding(
                "warning",
                "The recording did not finish",
                "The recorder itself stopped before writing its final manifest; streams are read as far as they go.",
                {"status": "recording"},
                "run",
            )
        )
    if man.get("status") == "incomplete":
        inc: Any = man.get("incomplete") if isinstance(man.get("incomplete"), dict) else {}
        reasons = [str(r) for r in inc.get("reasons") or []] if isinstance(inc.get("reasons"), list) else []
        out.append(
            Finding(
                "warning",
                "The bundle is incomplete",
                "; ".join(reasons[:5]) or "The recorder could not write everything (a full disk).",
                {"reasons": reasons[:20]},
                "run",
            )
        )
    if target.get("signal"):
        out.append(
            Finding(
                "warning",
                f"The target was killed by {target.get('signal_name')}",
                "Every event it had recorded is in the bundle (the kernel keeps what a killed process wrote into its staging files).",
                {"exit_code": target.get("exit_code")},
                "run",
            )
        )
    elif target.get("exit_code"):
        out.append(
            Finding(
                "warning",
                f"The target exited with code {target['exit_code']}",
                "The run may have crashed; the analysis covers what was recorded.",
                {"exit_code": target["exit_code"]},
                "run",
            )
        )
    probes: dict[str, list[dict[str, Any]]] = {}
    for p in man.get("processes", []) or []:
        for name, st in (p.get("probes") or {}).items():
            probes.setdefault(name, []).append(st)
    blocks = probes.get("blocks", [])
    if blocks and not any(s.get("engines") for s in blocks) and not any(bundle_has_pools(bundle)):
        out.append(
            Finding(
                "warning",
                "No block pool was seen",
                "The blocks probe was on, but no vLLM or nano-vllm pool was created and no kvprof.blocks.Pool was declared in any recorded process.",
                {"processes": len(blocks)},
                "run",
            )
        )
    for p in man.get("processes", []) or []:
        for err in p.get("errors", []) or []:
            out.append(
                Finding("warning", f"Probe problem in pid {p.get('pid')}", str(err), {"pid": p.get("pid")}, "run")
            )
        for st in (p.get("probes") or {}).values():
            for engine, info in (st.get("engines") or {}).items():
                missing = info.get("missing") if isinstance(info, dict) else None
                if missing:
                    out.append(
                        Finding(
                            "info",
                            f"{engine}: some hook points were not found",
                            f"Not attached in pid {p.get('pid')}: {', '.join(map(str, missing))}. Events from those code paths are not recorded.",
                            {"missing": missing},
                            "run",
                        )
                    )
    return out


def bundle_has_pools(bundle: Bundle) -> Iterator[bool]:
    for proc in bundle.processes:
        yield bool(proc.pools)


def block_findings(a: Any, per_pool: Any) -> list[Finding]:
    out: list[Finding] = []
    cap = a.capacity
    if a.high_watermark is not None and a.high_watermark >= FULL_POOL:
        out.append(
            Finding(
                "warning",
                f"The pool ran full: peak usage {_pct(a.high_watermark)}",
                f"{a.peak_blocks} of {cap} usable blocks were in use at the peak; requests beyond that wait or are preempted.",
                {"peak_blocks": a.peak_blocks, "capacity": cap},
            )
        )
    if a.preemptions:
        out.append(
            Finding(
                "warning",
                _n(a.preemptions, "preemption"),
                f"Requests lost their blocks and had their work redone; {a.allocation_failures} allocations were refused. More KV memory, fewer concurrent sequences or a smaller block size lower this.",
                {"preemptions": a.preemptions, "allocation_failures": a.allocation_failures},
            )
        )
    if a.fragmentation_that_hurts:
        out.append(
            Finding(
                "error",
                f"{_n(a.fragmentation_that_hurts, 'allocation failure')} with enough free blocks",
                "The engine refused allocations although free-empty + free-cached blocks covered them: the allocator needs contiguity, or its free count is wrong.",
                {"count": a.fragmentation_that_hurts},
            )
        )
    if a.engine_free_mismatches:
        out.append(
            Finding(
                "warning",
                "The engine's free-block count disagrees with the replayed pool",
                f"At {a.engine_free_mismatches} allocation failures the free blocks the engine saw differ from kvprof's replay: some block state change is not being recorded.",
                {"count": a.engine_free_mismatches},
            )
        )
    if a.internal_time_weighted is not None:
        best = (
            min(a.rounding, key=lambda r: r["waste_ratio"] + 0.0005 * r["block_table_entries"] / max(1, a.requests))
            if a.rounding
            else None
        )
        detail = f"{_pct(a.internal_time_weighted)} of allocated slot-time held no token (block size {a.block_size})"
        if a.internal_lookahead_time_weighted:
            detail += f"; {_pct(a.internal_lookahead_time_weighted)} of it from blocks allocated ahead of their tokens"
        detail += (
            f". Per request the last block wasted {a.per_request_waste.mean:.1f} slots on average (even spread would give {a.per_request_waste_reference:.1f})."
            if a.per_request_waste.mean is not None and a.per_request_waste_reference is not None
            else "."
        )
        sev = "warning" if a.internal_time_weighted >= HIGH_INTERNAL else "info"
        out.append(
            Finding(
                sev,
                f"Internal fragmentation {_pct(a.internal_time_weighted)}",
                detail,
                {
                    "time_weighted": a.internal_time_weighted,
                    "at_peak": a.internal_at_peak,
                    "block_size": a.block_size,
                    "whatif_best": best["block_size"] if best else None,
                },
            )
        )
    elif a.requests == 0:
        out.append(
            Finding(
                "info",
                "No request token counts",
                "Internal fragmentation needs request_state events (filled tokens, blocks held); none were recorded.",
                {},
            )
        )
    if a.external_at_peak is not None and a.external_at_peak > 0:
        out.append(
            Finding(
                "info",
                f"External fragmentation {_pct(a.external_at_peak)} in id space at the peak",
                f"Free blocks formed {a.free_runs_at_peak} runs, the largest {a.largest_free_run_at_peak} blocks. A paged allocator needs no contiguity, so this alone costs nothing; it matters only for allocators or kernels that want runs.",
                {"free_runs": a.free_runs_at_peak, "largest_run": a.largest_free_run_at_peak},
            )
        )
    if a.query_tokens:
        out.append(
            Finding(
                "info",
                f"Prefix cache hit rate {_pct(a.hit_rate)}",
                f"{a.hit_tokens:,} of {a.query_tokens:,} queried tokens were found in the cache; {a.evictions:,} cached blocks were evicted.",
                {"query_tokens": a.query_tokens, "hit_tokens": a.hit_tokens},
            )
        )
    if a.evictions and a.evicted_before_reuse_ratio is not None and a.evicted_before_reuse_ratio >= POLLUTION:
        out.append(
            Finding(
                "warning",
                f"Cache pollution: {_pct(a.evicted_before_reuse_ratio)} of evicted blocks were never reused",
                f"{a.evicted_before_reuse} of {a.evictions} evicted cached blocks had no hit between being cached and being evicted.",
                {"evicted": a.evictions, "never_reused": a.evicted_before_reuse},
            )
        )
    if (
        a.preempted_query_tokens
        and a.evictions
        and a.preempted_hit_rate is not None
        and a.preempted_hit_rate < READMISSION_HITS
    ):
        recomputed = a.preempted_query_tokens - a.preempted_hit_tokens
        first = f"; first admissions found {_pct(a.hit_rate)}" if a.hit_rate is not None else ""
        out.append(
            Finding(
                "warning",
                f"Preempted requests recomputed {_pct(recomputed / a.preempted_query_tokens)} of their tokens on re-admission",
                f"Coming back after {_n(a.preemptions, 'preemption')}, requests found {a.preempted_hit_tokens:,} of {a.preempted_query_tokens:,} queried tokens "
                f"in the prefix cache ({_pct(a.preempted_hit_rate)}{first}); meanwhile {_n(a.evictions, 'cached block')} were evicted, "
                f"{a.evicted_before_reuse:,} of them before any reuse. The cache dropped what the preempted requests had computed before "
                f"they came back, so {recomputed:,} tokens were computed again. Fewer preemptions (more KV memory, fewer concurrent "
                "sequences) or re-admitting preempted requests sooner keeps their blocks findable.",
                {
                    "preempted_query_tokens": a.preempted_query_tokens,
                    "preempted_hit_tokens": a.preempted_hit_tokens,
                    "preempted_hit_rate": a.preempted_hit_rate,
                    "recomputed_tokens": recomputed,
                    "evictions": a.evictions,
                    "evicted_before_reuse": a.evicted_before_reuse,
                    "preemptions": a.preemptions,
                },
            )
        )
    if a.leaked_blocks:
        ids = ", ".join(f"{p}#{b}" for p, b in a.leaked_block_ids[:8])
        out.append(
            Finding(
                "error",
                f"{_n(a.leaked_blocks, 'block')} leaked",
                f"Still in use at the end though every request that referenced them finished (first ones: {ids}).",
                {"leaked_blocks": a.leaked_blocks, "blocks": a.leaked_block_ids[:50]},
            )
        )
    if a.in_use_at_idle and not a.leaked_blocks:
        out.append(
            Finding(
                "warning",
                f"{_n(a.in_use_at_idle, 'block')} in use while no request was live",
                "At a moment with no live request, blocks were still referenced: a leak that was cleaned up later, or deferred frees.",
                {"in_use_at_idle": a.in_use_at_idle},
            )
        )
    if a.refcount_errors:
        out.append(
            Finding(
                "error",
                f"{_n(a.refcount_errors, 'ref-count imbalance')}",
                "Blocks were freed while not in use, or allocated while in use: a double free, or events the probe missed.",
                {"count": a.refcount_errors},
            )
        )
    if a.out_of_range_ids:
        out.append(
            Finding(
                "warning",
                f"{_n(a.out_of_range_ids, 'block id')} outside their pool",
                "Events named block ids beyond the declared pool size; they were ignored.",
                {"count": a.out_of_range_ids},
            )
        )
    if a.damaged_queries:
        out.append(
            Finding(
                "warning",
                f"{_n(a.damaged_queries, 'prefix-cache lookup')} left out",
                "They reported more hit tokens than they queried, or negative counts: damaged records, not counted in the hit rate.",
                {"count": a.damaged_queries},
            )
        )
    return out
