"""Terminal section for the Python and native heap (a HeapAnalysis as JSON-ready dict)."""

from __future__ import annotations

import os


def _b(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"


def _site(stack: list, width: int = 70) -> str:
    if not stack:
        return "<no Python frames>"
    f = stack[0]
    text = f"{_short(f['file'])}:{f['line']} in {f['function']}"
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _short(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    if not rel.startswith(".."):
        return rel
    marker = "site-packages" + os.sep
    return path.split(marker, 1)[1] if marker in path else path


def render(console, sec: dict, result) -> None:
    from rich.table import Table
    from rich.text import Text

    console.print()
    head = f"  peak {_b(sec['peak_bytes'])} (process {sec['peak_pid']})"
    if sec["leaked_bytes_at_exit"] is not None:
        head += f", {_b(sec['leaked_bytes_at_exit'])} left at exit"
    if sec["total_allocations"] is not None:
        head += f", {sec['total_allocations']:,} allocations"
    console.print(Text("Heap", style="bold") + Text(head, style="dim"), markup=False)
    sus = sec["leak_suspects"]
    if any(p["tracemalloc"] for p in sec["processes"]):
        if sus:
            console.print(
                Text(
                    f"Leak suspects (live bytes growing in ≥{sec['k']} consecutive steady-state intervals, ≥{sec['k'] + 1} snapshots)",
                    style="bold",
                )
            )
            t = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
            for col in ("process", "site", "growth", "live", "r²"):
                t.add_column(col, justify="left" if col in ("process", "site") else "right", no_wrap=col != "site")
            for s in sus[:10]:
                g = (
                    f"{_b(s['growth_bytes_per_step'])}/{s['window']['marker']}"
                    if s["growth_bytes_per_step"] is not None
                    else f"{_b(s['growth_bytes_per_second'])}/s"
                )
                t.add_row(
                    f"{s['pid']} ({s['role']})", Text(_site(s["stack"])), g, _b(s["live_bytes"]), f"{s['r2']:.2f}"
                )
            console.print(t)
            top = sus[0]
            console.print(Text("Top suspect's stack:", style="dim"))
            for f in top["stack"][:8]:
                console.print(Text(f"    {_short(f['file'])}:{f['line']} in {f['function']}", style="dim"))
        else:
            console.print(
                Text(
                    "No leak suspects: no site's live bytes grew steadily across the steady-state snapshots.",
                    style="dim",
                )
            )
    for p in sec["processes"]:
        tm, mr = p["tracemalloc"], p["memray"]
        line = f"process {p['pid']} ({p['role']}):"
        if tm:
            line += (
                f" tracemalloc {tm['snapshots']} snapshots"
                + (f" ({tm['steady_snapshots']} steady at marker {tm['marker']!r})" if tm["marker"] else "")
                + f", peak {_b(tm['peak_bytes'])}, {_b(tm['live_bytes_end'])} live at the end"
            )
            if tm.get("note"):
                line += f"; {tm['note']}"
        if mr:
            line += (
                f"{';' if tm else ''} memray: {mr['total_allocations']:,} allocations ({_b(mr['total_allocated_bytes'])}), "
                f"peak {_b(mr['peak_bytes'])}, leaked {_b(mr['leaked_bytes'])}, {mr['temporary_allocations']:,} temporary"
            )
        console.print(Text(line, style="dim"))
        if mr and mr["churn"]:
            t = Table(show_header=True, header_style="bold", box=None, pad_edge=False, title=None)
            for col in ("churn: site", "allocs/s", "allocated", "frees/s", "temporary"):
                t.add_column(col, justify="left" if col == "churn: site" else "right", no_wrap=col != "churn: site")
            for c in mr["churn"][:5]:
                t.add_row(
                    Text(_site(c["stack"])),
                    "-" if c["allocations_per_second"] is None else f"{c['allocations_per_second']:,.0f}",
                    _b(c["allocated_bytes"]),
                    "-" if c["frees_per_second"] is None else f"{c['frees_per_second']:,.0f}",
                    "-" if c["temporary"] is None else f"{c['temporary']:,}",
                )
            console.print(t)
            if mr.get("churn_note"):
                console.print(Text(f"  ({mr['churn_note']})", style="dim"))
        if mr and mr["leaked_stacks"]:
            console.print(Text("  left allocated at exit:", style="dim"))
            for s in mr["leaked_stacks"][:3]:
                console.print(Text(f"    {_b(s['bytes']):>10}  {s['count']:>7,}×  {_site(s['stack'])}", style="dim"))
        at_peak = (mr["peak_stacks"] if mr else None) or (tm["live_at_peak_snapshot"] if tm else None)
        if at_peak:
            console.print(
                Text(
                    "  alive at the peak:" if mr else f"  alive at the largest snapshot ({tm['peak_at_s']:.2f} s):",
                    style="dim",
                )
            )
            for s in at_peak[:3]:
                console.print(Text(f"    {_b(s['bytes']):>10}  {s['count']:>7,}×  {_site(s['stack'])}", style="dim"))
