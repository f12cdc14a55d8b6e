"""One pass over a bundle's block events, feeding every consumer that needs them.

The reader hands over the events of every process merged in time order, in bounded
chunks (``Bundle.block_chunks``).  Each chunk goes to one :class:`BlockAnalyzer` per
pool (and one for all pools together when there are several), to the drawing series
of the HTML report and the Perfetto export when asked for, and to the what-if schedule
builders of the pools ``kvprof whatif`` or the report replay.  The small streams met on
the way (markers, GC pauses, heap snapshots) stay with their process for the other
sections, so nothing reads the bundle twice.  Memory: the consumers' live state, never
the events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvprof.analysis.blocks import BlockAnalyzer, PoolAnalysis

if TYPE_CHECKING:
    from kvprof.analysis.whatif import ScheduleBuilder
    from kvprof.trace.reader import Bundle, PoolInfo


@dataclass
class BlockPass:
    """What one pass over the block events gave."""

    per_pool: list[PoolAnalysis]
    total: PoolAnalysis | None  # None without pools; the one pool's own result with one
    series: dict[str, Any] = field(default_factory=dict)  # drawing series (see timeseries)
    schedules: dict[int, Any] = field(default_factory=dict)  # pool index -> what-if schedule
    pool_steps: dict[int, int] = field(default_factory=dict)  # pool index -> engine steps recorded
    pool_calls: dict[int, int] = field(default_factory=dict)  # pool index -> events (calls) recorded
    pool_has_state: dict[int, bool] = field(
        default_factory=dict
    )  # pool index -> whether the probe reported request states
    whole_run: dict[int, Any] = field(
        default_factory=dict
    )  # pool index -> its analysis over the whole run, when a window cut the others

    def replay_pool(self, label: str | None = None, pools: list[PoolInfo] | None = None) -> int | None:
        """The pool `kvprof whatif` replays: ``label`` (a pool label or name), else the busiest
        of those with request states (else of all)."""
        if not self.pool_calls:
            return None
        if label is not None:
            named = [p for p in pools or () if label in (p.label, p.name)]
            if len(named) > 1:
                raise ValueError(f"several pools are named {label!r}: give one of {', '.join(p.label for p in named)}")
            if not named:
                raise ValueError(f"no pool {label!r} in this bundle (pools: {', '.join(p.label for p in pools or ())})")
            return named[0].index
        cand = [i for i, s in self.pool_has_state.items() if s] or list(self.pool_calls)
        best: int = max(cand, key=lambda i: (self.pool_calls[i], -i))
        return best


def block_pass(
    bundle: Bundle,
    bounds: tuple[int, int] | None = None,
    *,
    series: bool = False,
    schedule_pools: Any = (),  # global pool indices, or "all"
    progress: Callable[[int], object] | None = None,
) -> BlockPass:
    """Read every block event of ``bundle`` once.  ``bounds``: the analysis window (t0, t1);
    ``series``: also build the drawing series; ``schedule_pools``: global pool indices
    whose what-if schedule to extract ("all": every pool's); ``progress``: called with each chunk's events."""
    from kvprof.analysis import timeseries as ts

    pools = bundle.pools
    if progress is not None and hasattr(progress, "set_total"):
        progress.set_total(bundle.expected_events())
    per = [BlockAnalyzer([p], bounds) for p in pools]
    agg = BlockAnalyzer(pools, bounds, label="all pools") if len(pools) > 1 else None
    builders = {
        i: _schedule_builder(pools[i]) for i in (range(len(pools)) if schedule_pools == "all" else schedule_pools)
    }
    # the what-if fidelity check compares with the whole run, whatever the window
    whole = {i: BlockAnalyzer([pools[i]], None) for i in builders} if bounds is not None else {}
    maps = hit = counts = instants = None
    t0 = t1 = None
    for chunk in bundle.block_chunks():
        if progress is not None:
            progress(len(chunk))
        if t0 is None:
            t0 = int(chunk.t[0])
            if series:
                maps = [ts.BlockMapSeries(p, t0) for p in pools]
                counts = [ts.PoolCountsSeries(p) for p in pools]
                instants = [ts.InstantSeries(p) for p in pools]
                hit = ts.HitRateSeries(t0)
                for i, a in enumerate(per):
                    a.observers += [maps[i], counts[i], instants[i]]
                (agg or per[0]).observers.append(hit)
        t1 = int(chunk.t[-1])
        if len(pools) == 1:
            per[0].feed(chunk)
            if 0 in builders:
                builders[0].feed(chunk)
                if whole:
                    whole[0].feed(chunk)
            continue
        present = np.unique(chunk.pool)
        for p in present.tolist():
            part = chunk.take(chunk.pool == p)
            per[p].feed(part)
            if p in builders:
                builders[p].feed(part)
                if whole:
                    whole[p].feed(part)
        assert agg is not None  # several pools
        agg.feed(chunk)
    results = [a.finish() for a in per]
    total = None
    if results:
        total = results[0] if agg is None else agg.finish()
        total.label = "all pools"
    out = BlockPass(
        per_pool=results,
        total=total,
        pool_steps={i: a.counts["steps"] for i, a in enumerate(per)},
        pool_calls={i: a.calls for i, a in enumerate(per)},
        pool_has_state={i: a.have_state for i, a in enumerate(per)},
    )
    if series and t0 is not None:
        assert (
            maps is not None and counts is not None and instants is not None and hit is not None and t1 is not None
        )  # made with t0
        out.series = {
            "t0_ns": t0,
            "block_maps": [
                m for m in (maps[i].result(t1, per[i].reserved) for i in range(len(pools))) if m is not None
            ],
            "hit_rate": hit.result(t1),
            "pool_counts": [
                c for c in (counts[i].result(results[i].capacity) for i in range(len(pools))) if c is not None
            ],
            "instants": [x.result() for x in instants],
            "pool_spans": {i: (r.t_start, r.t_end) for i, r in enumerate(results) if r.t_end or r.t_start},
        }
    for i, b in builders.items():
        out.schedules[i] = b.finish()
    out.whole_run = {i: a.finish() for i, a in whole.items()}
    return out


def _schedule_builder(info: PoolInfo) -> ScheduleBuilder:
    from kvprof.analysis import whatif as W

    return W.ScheduleBuilder(info)
