"""Terminal report (rich).  Renders an AnalysisResult; computes nothing."""

from __future__ import annotations

import os
import shlex

from kvprof.report import format as fmt

HEADLINE = [
    "blocks.usage.high_watermark",
    "blocks.usage.time_weighted",
    "blocks.internal_fragmentation.time_weighted",
    "blocks.internal_fragmentation.at_peak",
    "blocks.external_fragmentation.at_peak",
    "blocks.prefix_cache.hit_rate",
    "blocks.prefix_cache.hit_tokens",
    "blocks.evictions",
    "blocks.evicted_before_reuse_ratio",
    "blocks.preemptions",
    "blocks.allocation_failures",
    "blocks.fragmentation_that_hurts",
    "blocks.leaked_blocks",
    "blocks.churn.allocations_per_step",
    "blocks.lifetime.p50_seconds",
    "blocks.events",
]
# Renderers of other sections, as section name -> "module:function"; each is
# called as function(console, section_dict, result) after the block-pool part.
SECTION_RENDERERS: dict[str, str] = {
    "fleet": "kvprof.report.fleet_terminal:render",
    "torch": "kvprof.report.torch_terminal:render",
    "heap": "kvprof.report.heap_terminal:render",
    "gc": "kvprof.report.gc_terminal:render",
    "cpu": "kvprof.report.cpu_terminal:render",
    "nvml": "kvprof.report.nvml_terminal:render",
}
MAP_CHARS = {0: ("·", "grey50"), 1: ("▒", "cyan"), 2: ("█", "green"), 3: ("x", "magenta")}
SEVERITY = {"error": ("✗", "bold red"), "warning": ("!", "yellow"), "info": ("i", "blue")}


def render(result, width: int | None = None, console=None) -> None:
    from rich.table import Table
    from rich.text import Text

    if console is None:
        console = fmt.console(width=width or min(100, fmt.term_width()))
    src = result.source
    if src.get("snapshot"):
        console.print(
            Text("kvprof analysis", style="bold") + Text(f"  {os.path.basename(src['snapshot'])}", style="dim")
        )
        console.print(Text("a PyTorch CUDA memory snapshot (read without torch)", style="dim"))
    elif src.get("memray_capture"):
        console.print(
            Text("kvprof analysis", style="bold") + Text(f"  {os.path.basename(src['memray_capture'])}", style="dim")
        )
        console.print(Text("a memray capture file", style="dim"))
    else:
        cmd = (
            shlex.join(map(str, src.get("command") or []))
            if isinstance(src.get("command"), list)
            else str(src.get("command") or src.get("bundle"))
        )
        console.print(
            Text("kvprof analysis", style="bold") + Text(f"  {os.path.basename(src.get('bundle', ''))}", style="dim")
        )
        console.print(Text(f"command: {cmd}", overflow="ellipsis", no_wrap=True), style="dim")
    target = src.get("target") or {}
    if target:
        how = f"signal {target.get('signal_name')}" if target.get("signal") else f"exit code {target.get('exit_code')}"
        console.print(
            f"target ended with {how}; {src.get('processes', 0)} process(es); window: {src.get('window')}", style="dim"
        )

    blocks = result.sections.get("blocks")
    if blocks:
        agg = blocks["aggregate"]
        pools = blocks["pools"]
        console.print()
        desc = ", ".join(
            f"{p['label']} ({p['num_blocks']:,} blocks × {p['block_size']} slots, {p['engine']})" for p in agg["pools"]
        )
        console.print(Text("Block pools: ", style="bold") + Text(desc))
        if any(p.get("clock") == "simulated" for p in agg["pools"]):
            console.print("  times are on the pool's simulated clock", style="dim")
        table = Table(show_header=True, header_style="bold", box=None, pad_edge=False, expand=False)
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_column("window", style="dim")
        for name in HEADLINE:
            entry = result.metrics.get(name)
            if entry is None:
                continue
            table.add_row(name.removeprefix("blocks."), fmt.value(entry["value"], entry["unit"]), entry["window"])
        console.print(table)
        if len(pools) > 1:
            pt = Table(show_header=True, header_style="bold", box=None, title="per pool", title_justify="left")
            for col in ("pool", "peak", "int. frag", "hit rate", "preempt", "leaked"):
                pt.add_column(col, justify="right" if col != "pool" else "left")
            for p in pools:
                pt.add_row(
                    p["label"],
                    fmt.value(p["high_watermark"], "ratio"),
                    fmt.value(p["internal_time_weighted"], "ratio"),
                    fmt.value(p["hit_rate"], "ratio"),
                    str(p["preemptions"]),
                    str(p["leaked_blocks"]),
                )
            console.print(pt)
        _block_map(console, agg, min(64, console.width - 8))
        _whatif(console, agg)

    import importlib

    for name, spec in SECTION_RENDERERS.items():
        if name in result.sections:
            mod, _, fn = spec.partition(":")
            getattr(importlib.import_module(mod), fn)(console, result.sections[name], result)

    findings = result.findings
    if findings:
        console.print()
        console.print(Text("Findings", style="bold"))
        for f in findings:
            mark, style = SEVERITY.get(f.severity, ("-", ""))
            title = indented(f.title, console.width, first=f" {mark} ", style="bold")
            title.stylize(style, 0, 3)
            console.print(title)
            console.print(indented(f.detail, console.width))


def indented(text: str, width: int, indent: str = "   ", first: str | None = None, style: str = ""):
    """``text`` wrapped at ``width`` with every line after the first starting at ``indent``
    (rich's own wrapping would start them at column 0), as one Text printed unwrapped."""
    import textwrap

    from rich.text import Text

    lines = textwrap.wrap(
        text,
        width=max(width, len(indent) + 20),
        initial_indent=indent if first is None else first,
        subsequent_indent=indent,
        break_on_hyphens=False,
    ) or [indent if first is None else first]
    out = Text("\n".join(lines), style=style, no_wrap=True, overflow="ignore")
    return out


def _block_map(console, agg: dict, cols: int) -> None:
    from rich.text import Text

    rle = agg.get("block_map_at_peak") or []
    total = sum(n for _, n in rle)
    if not total:
        return
    rows = 4 if total > cols * 2 else max(1, -(-total // cols))
    cells = cols * rows
    per = max(1, -(-total // cells))
    # expand lazily: majority state per cell
    counts = []
    cur = [0, 0, 0, 0]
    filled = 0
    for state, n in rle:
        while n:
            take = min(n, per - filled)
            cur[state] += take
            filled += take
            n -= take
            if filled == per:
                counts.append(cur)
                cur, filled = [0, 0, 0, 0], 0
    if filled:
        counts.append(cur)
    console.print()
    console.print(
        Text("Block map at the high watermark", style="bold")
        + Text(f"  (1 cell = {per} block{'s' if per > 1 else ''})", style="dim")
    )
    for r in range(0, len(counts), cols):
        line = Text("  ")
        for c in counts[r : r + cols]:
            state = max(range(4), key=lambda s: (c[s], s == 2))
            ch, style = MAP_CHARS[state]
            line.append(ch, style=style)
        console.print(line)
    legend = Text("  ")
    for state, label in ((2, "in-use"), (1, "free-cached"), (0, "free-empty"), (3, "reserved")):
        ch, style = MAP_CHARS[state]
        legend.append(ch, style=style)
        legend.append(f" {label}  ", style="dim")
    console.print(legend)


def _whatif(console, agg: dict) -> None:
    from rich.table import Table

    rows = agg.get("rounding") or []
    if not rows:
        return
    t = Table(
        title="Block-size rounding (recorded request lengths)", title_justify="left", box=None, header_style="bold"
    )
    for col in ("block size", "slots", "waste", "table entries", "last-block waste"):
        t.add_column(col, justify="right")
    for r in rows:
        mark = " *" if r["recorded"] else ""
        t.add_row(
            f"{r['block_size']}{mark}",
            f"{r['allocated_slots']:,}",
            f"{100 * r['waste_ratio']:.1f}%",
            f"{r['block_table_entries']:,}",
            f"{r['mean_last_block_waste']:.1f}",
        )
    console.print()
    console.print(t)
    c = agg.get("contiguous") or {}
    if c.get("utilization") is not None:
        note = f"* recorded. A contiguous reservation of {c['max_len']:,} tokens per request would have used {100 * c['utilization']:.1f}% of its slots."
        console.print(indented(note, console.width, indent="    ", first="  ", style="dim"))
