"""Terminal section for the fleet (kvprof/analysis/fleet.py's section as a JSON-ready dict)."""

from __future__ import annotations

from kvprof.report import format as fmt


def _clock(n: dict) -> str:
    shift = n.get("clock_shift_s")
    if shift is None:
        return ""
    return "reference" if shift == 0 else f"{1e3 * shift:+,.1f} ms"


def render(console, sec: dict, result) -> None:
    from rich.table import Table
    from rich.text import Text

    t = sec["totals"]
    console.print()
    at_once = f", {t['peak_blocks_simultaneous']:,} at once" if t["peak_blocks_simultaneous"] is not None else ""
    console.print(
        Text("Fleet", style="bold")
        + Text(
            f"  {t['nodes']} node{'s' if t['nodes'] != 1 else ''}, {t['engines']} engine{'s' if t['engines'] != 1 else ''}; "
            f"peak blocks {t['peak_blocks_sum']:,} summed{at_once}; hit rate {fmt.value(t['hit_rate'], 'ratio')}; "
            f"{t['preemptions']:,} preemptions",
            style="dim",
        )
    )
    nt = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for col in ("node", "procs", "engines", "peak (sum)", "hit rate", "preempt", "clock"):
        nt.add_column(col, justify="left" if col in ("node", "clock") else "right", no_wrap=True)
    for n in sec["nodes"]:
        nt.add_row(
            n["node"],
            str(n["processes"]),
            str(n["engines"]),
            f"{n['peak_blocks_sum']:,}",
            fmt.value(n["hit_rate"], "ratio"),
            f"{n['preemptions']:,}",
            _clock(n),
        )
    console.print(nt)
    et = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for col in ("engine", "node", "peak", "of", "hit rate", "preempt"):
        et.add_column(col, justify="left" if col in ("engine", "node") else "right", no_wrap=True)
    for e in sec["engines"]:
        et.add_row(
            e["label"],
            e["node"],
            f"{e['peak_blocks']:,}",
            f"{e['capacity']:,}",
            fmt.value(e["hit_rate"], "ratio"),
            f"{e['preemptions']:,}",
        )
    console.print(et)
    if t.get("simultaneous_note"):
        console.print(f"  no simultaneous peak: {t['simultaneous_note']}", style="dim")
