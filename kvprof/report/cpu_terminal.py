"""Terminal section for CPU samples (a CpuAnalysis as JSON-ready dict)."""

from __future__ import annotations

CATEGORIES = ("block management", "pytorch allocator", "gc", "kvprof", "other")


def render(console, sec: dict, result) -> None:
    from rich.table import Table
    from rich.text import Text

    console.print()
    console.print(
        Text("CPU (py-spy)", style="bold")
        + Text(
            f"  {sec['samples']:,} samples at {sec['rate']} Hz, {sec['cpu_s']:.2f} s of CPU; profile: {sec['profile']} (opens in speedscope)",
            style="dim",
        )
    )
    t = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    t.add_column("process", no_wrap=True)
    t.add_column("samples", justify="right")
    for c in CATEGORIES:
        t.add_column(c, justify="right", no_wrap=True)
    for p in sec["processes"]:
        t.add_row(
            f"{p['pid']} ({p['role']})", f"{p['samples']:,}", *[f"{100 * p['shares'][c]:.1f}%" for c in CATEGORIES]
        )
    if sec["processes"]:
        console.print(t)
    for p in sec["processes"]:
        if not p["top"]:
            continue
        line = f"process {p['pid']} ({p['role']})"
        if p["cpu_s_per_step"]:
            ps = p["cpu_s_per_step"]
            line += (
                f": {p['steps']:,} engine steps, {1e3 * sum(ps.values()):.2f} ms CPU per step, "
                f"{1e3 * ps['block management']:.2f} ms of it block management"
            )
        console.print(Text(line, style="bold"))
        order = sorted(CATEGORIES, key=lambda c: -p["shares"][c])
        picked = [s for c in order if p["shares"][c] > 0 for s in [x for x in p["top"] if x["category"] == c][:2]][:6]
        for s in picked:
            console.print(
                Text(f"  {100 * s['share']:5.1f}%  {s['category']:<17} ", style="default")
                + Text(s["stack"], style="dim"),
                overflow="ellipsis",
                no_wrap=True,
            )
    if sec["unrecorded_samples"]:
        console.print(
            Text(
                f"  {sec['unrecorded_samples']:,} samples of processes kvprof did not record (its launcher, non-Python children) left out",
                style="dim",
            )
        )
