"""Terminal section for garbage-collector pauses (a GcAnalysis as JSON-ready dict)."""

from __future__ import annotations


def render(console, sec: dict, result) -> None:
    from rich.table import Table
    from rich.text import Text

    console.print()
    share = sec["time_share"]
    console.print(
        Text("Garbage collector", style="bold")
        + Text(
            f"  {sec['collections']:,} collections, {sec['pause_s']:.3f} s paused, longest {1e3 * sec['max_pause_s']:.2f} ms"
            + (f", up to {100 * share:.2f}% of a process's time" if share is not None else ""),
            style="dim",
        )
    )
    t = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for col in ("process", "gen", "collections", "paused", "longest", "p99", "collected"):
        t.add_column(col, justify="left" if col == "process" else "right", no_wrap=True)
    for p in sec["processes"]:
        for g in p["by_generation"]:
            if not g["collections"]:
                continue
            p99 = g["p99_pause_s"]
            t.add_row(
                f"{p['pid']} ({p['role']})",
                str(g["generation"]),
                f"{g['collections']:,}",
                f"{g['pause_s']:.3f} s",
                f"{1e3 * g['max_pause_s']:.2f} ms",
                "" if p99 is None else f"{1e3 * p99:.2f} ms",
                f"{g['collected']:,}",
            )
    console.print(t)
    if sec["longest"]:
        console.print(Text("Longest pauses", style="bold"))
        for q in sec["longest"][:5]:
            where = f" after marker {q['after_marker']}" if q["after_marker"] else ""
            console.print(
                Text(
                    f"  {1e3 * q['duration_s']:8.2f} ms  gen {q['generation']}  process {q['pid']} at {q['start_s']:.3f} s{where}",
                    style="dim",
                )
            )
