"""Terminal rendering of `kvprof whatif` (sections.whatif).  Computes nothing."""

from __future__ import annotations

from kvprof.report import format as fmt

COLUMNS = [  # (metric, header, unit)
    ("blocks.peak_blocks", "peak", "count"),
    ("blocks.usage.time_weighted", "usage", "ratio"),
    ("blocks.internal_fragmentation.time_weighted", "int.frag", "ratio"),
    ("blocks.internal_fragmentation.at_peak", "@peak", "ratio"),
    ("blocks.external_fragmentation.at_peak", "ext.frag", "ratio"),
    ("blocks.prefix_cache.hit_rate", "hit rate", "ratio"),
    ("blocks.allocation_failures", "fails", "count"),
    ("blocks.fragmentation_that_hurts", "frag.fails", "count"),
    ("blocks.preemptions", "preempt", "count"),
    ("whatif.recomputed_tokens", "recomputed", "count"),
    ("whatif.unserved_requests", "unserved", "count"),
    ("whatif.max_running_requests", "running", "count"),
    ("whatif.defrag_blocks_moved", "moved", "count"),
]


def _v(v, unit):
    if v is None:
        return "-"
    return fmt.value(v, unit)


def render(section: dict, width: int | None = None, console=None) -> None:
    from rich.table import Table
    from rich.text import Text

    if console is None:
        console = fmt.console(width=width or max(fmt.term_width(180), 180))
    rec = section["recorded"]
    console.print(
        Text("kvprof whatif", style="bold") + Text(f"  pool {section['pool']} ({section['engine']})", style="dim")
    )
    console.print(
        Text(
            f"recorded: block size {rec['block_size']}, {rec['num_blocks']} blocks ({rec['reserved']} reserved), "
            f"{rec['policy']}, prefix caching {'on' if rec['prefix_caching'] else 'off'}, {rec['requests']} requests",
            style="dim",
        )
    )
    bad = [k for k, v in section["fidelity"].items() if not v["equal"]]
    if bad:
        console.print(
            Text(
                "! the replay of the recorded configuration differs from analyze on: " + ", ".join(bad), style="yellow"
            )
        )
        for k in bad:
            f = section["fidelity"][k]
            console.print(Text(f"    {k}: analyze {f['analyze']}, replay {f['replay']}", style="yellow"))
    else:
        f = section["fidelity"]
        console.print(
            Text(
                f"check: the replay of the recorded configuration equals analyze (peak {f['blocks.peak_blocks']['replay']} blocks, "
                f"internal fragmentation {_v(f['blocks.internal_fragmentation.time_weighted']['replay'], 'ratio')}, "
                f"hit tokens {f['blocks.prefix_cache.hit_tokens']['replay']:,}, preemptions {f['blocks.preemptions']['replay']})",
                style="green",
            )
        )
    if section["unsupported_events"]:
        console.print(
            Text(
                "not replayed: " + ", ".join(f"{k} ({v})" for k, v in section["unsupported_events"].items()),
                style="yellow",
            )
        )

    console.print()
    t = Table(
        title="Blocks needed (no capacity limit, recorded schedule)",
        title_justify="left",
        show_edge=False,
        pad_edge=False,
    )
    for h in ("block size", "peak blocks", "peak KV", "int.frag", "@peak", "hit rate"):
        t.add_column(h, justify="right")
    for r in section["blocks_needed"]:
        m = r["metrics"]
        t.add_row(
            str(r["block_size"]) + (" *" if r["block_size"] == rec["block_size"] else ""),
            f"{m['blocks.peak_blocks']:,}",
            _v(m["whatif.peak_bytes"], "bytes"),
            _v(m["blocks.internal_fragmentation.time_weighted"], "ratio"),
            _v(m["blocks.internal_fragmentation.at_peak"], "ratio"),
            _v(m["blocks.prefix_cache.hit_rate"], "ratio"),
        )
    console.print(t)

    if section["rows"]:
        console.print()
        t = Table(
            title=f"Under a fixed capacity: {section['capacity']}",
            title_justify="left",
            show_edge=False,
            pad_edge=False,
        )
        t.add_column("B", justify="right")
        t.add_column("blocks", justify="right")
        t.add_column("policy", no_wrap=True)
        t.add_column("recovery", no_wrap=True)
        for _, h, _u in COLUMNS:
            t.add_column(h, justify="right")
        for r in section["rows"]:
            m = r["metrics"]
            t.add_row(
                str(r["block_size"]),
                f"{r['num_blocks']:,}",
                r["policy"] + ("*" if r["recorded"] else ""),
                r["recovery"],
                *[_v(m.get(k), u) for k, _h, u in COLUMNS],
            )
        console.print(t)
        console.print(
            Text(
                "* the recorded configuration.  recovery: preempt = recompute preemption of the newest request (vLLM); "
                "seeds = drop cached blocks, then compact, then preempt (run allocators only).",
                style="dim",
            )
        )

    adv = section["advice"]
    console.print()
    line = f"block size: the replay's optimum is {adv.get('empirical_block_size')} ({adv.get('empirical_basis')})"
    if adv.get("closed_form_block_size"):
        line += (
            f"; the closed form sqrt(2·L·m_meta/m_token) gives {adv['closed_form_block_size']:.1f} "
            f"(L = {adv['mean_length']:.0f} tokens, m_meta = {adv['metadata_bytes_per_block']} B per block, m_token = {adv['bytes_per_token']:.0f} B)"
        )
    elif adv.get("mean_length"):
        line += (
            f"; the closed form needs the bytes per token (L = {adv['mean_length']:.0f} tokens): give --bytes-per-token"
        )
    console.print(Text(line))
