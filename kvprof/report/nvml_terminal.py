"""Terminal section for the nvml probe (sections.nvml).  Computes nothing."""

from __future__ import annotations

from kvprof.report import format as fmt


def render(console, sec: dict, result) -> None:
    from rich.table import Table
    from rich.text import Text

    console.print()
    status = sec.get("status") or {}
    if not sec.get("gpus"):
        console.print(
            Text("GPU memory (NVML)", style="bold") + Text(f"  {status.get('reason') or 'no samples'}", style="dim")
        )
        return
    console.print(
        Text("GPU memory (NVML)", style="bold")
        + Text(
            f"  {sum(g['samples'] for g in sec['gpus']):,} samples, every {status.get('interval_s', '?')} s",
            style="dim",
        )
    )
    t = Table(show_edge=False, pad_edge=False)
    for h in ("GPU", "total", "peak used", "mean used"):
        t.add_column(h, justify="right")
    for g in sec["gpus"]:
        t.add_row(str(g["gpu"]), fmt.bytes_(g["total"]), fmt.bytes_(g["used_peak"]), fmt.bytes_(g["used_mean"]))
    console.print(t)
    rows = sec.get("processes") or []
    if rows:
        t = Table(show_edge=False, pad_edge=False)
        for h in ("GPU", "pid", "process", "peak used", "outside torch's pool"):
            t.add_column(h, justify="right")
        for p in rows:
            t.add_row(
                str(p["gpu"]),
                str(p["pid"]),
                p.get("role") or "not recorded",
                fmt.bytes_(p["used_peak"]) if p["used_peak"] >= 0 else "n/a",
                fmt.bytes_(p["outside_torch_peak"]) if "outside_torch_peak" in p else "-",
            )
        console.print(t)
