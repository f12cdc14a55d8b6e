"""Terminal section for the PyTorch CUDA allocator (a TorchAnalysis as JSON-ready dict)."""

from __future__ import annotations

from kvprof.report import format as fmt


def render(console, sec: dict, result) -> None:
    from rich.table import Table
    from rich.text import Text

    b = fmt.bytes_
    console.print()
    if "reserved" not in sec:  # the torch probe ran but recorded nothing: say why
        console.print(Text("PyTorch CUDA allocator", style="bold") + Text("  no snapshot recorded", style="dim"))
        for note in sec.get("notes") or []:
            console.print(Text(f"  {note}", style="dim"))
        return
    if sec.get("process"):
        p = sec["process"]
        console.print(
            Text(
                f"from pid {p['pid']} ({p.get('role')}), {p.get('reason')} snapshot {sec.get('source')}; "
                f"{len(sec.get('snapshots') or [])} snapshot(s) in the bundle",
                style="dim",
            )
        )
    devices = ", ".join(str(d) for d in sec["devices"]) or "none"
    console.print(
        Text("PyTorch CUDA allocator", style="bold")
        + Text(f"  {sec['segments']:,} segments on device(s) {devices}", style="dim")
    )
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold", no_wrap=True)
    t.add_column(justify="right", no_wrap=True)
    t.add_column(style="dim")
    reserved = sec["reserved"] or 1
    pct = lambda n: f"{100 * n / reserved:.1f}% of reserved"  # noqa: E731
    t.add_row("reserved", b(sec["reserved"]), "segments taken from the device")
    t.add_row("allocated", b(sec["allocated"]), pct(sec["allocated"]))
    t.add_row("  requested", b(sec["requested"]), "what the program asked for")
    t.add_row("  rounding waste", b(sec["rounding_waste"]), "allocated - requested")
    t.add_row("cached free", b(sec["cached_free"]), pct(sec["cached_free"]))
    if sec["pending_free"]:
        t.add_row("pending free", b(sec["pending_free"]), "freed, waiting on stream work")
    internal = sec["internal_free_ratio"]
    t.add_row(
        "total free", b(sec["total_free"]), f"{100 * internal:.1f}% of it rounding" if internal is not None else ""
    )
    frag = sec["external_fragmentation"]
    t.add_row(
        "largest free block",
        b(sec["largest_inactive"]),
        f"external fragmentation {100 * frag:.1f}%" if frag is not None else "",
    )
    console.print(t)
    pools = [p for p in sec["pools"] if p["inactive_bytes"]][:4]
    if pools:
        console.print(Text("Free space by stream and pool", style="bold"))
        pt = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        for col, just in (
            ("pool", "left"),
            ("free", "right"),
            ("largest", "right"),
            ("blocks", "right"),
            ("ext. frag", "right"),
        ):
            pt.add_column(col, justify=just, no_wrap=True, overflow="ellipsis")  # type: ignore[arg-type]  # "left", "right"
        for p in pools:
            f = p["external_fragmentation"]
            pt.add_row(
                p["scope"],
                b(p["inactive_bytes"]),
                b(p["largest_inactive"]),
                f"{p['inactive_blocks']:,}",
                "" if f is None else f"{100 * f:.1f}%",
            )
        console.print(pt)
    if sec["trace_entries"]:
        span = sec["trace_span_us"]
        rate = f", {sec['allocs_per_second']:,.0f}/s" if sec["allocs_per_second"] else ""
        console.print(
            Text("Trace", style="bold")
            + Text(
                f"  {sec['trace_entries']:,} entries over {span / 1e6:.2f} s: {sec['alloc_count']:,} allocations, {b(sec['alloc_bytes'])}{rate}; "
                f"{sec['short_lived']:,} freed before the next allocation"
                if span
                else f"  {sec['trace_entries']:,} entries",
                style="dim",
            )
        )
        for title, rows in (
            ("Still allocated at the end of the trace, by stack", sec["leaks_by_stack"]),
            ("Churn by stack (allocated and freed)", sec["churn_by_stack"]),
        ):
            if rows:
                console.print(Text(title, style="bold"))
                for r in rows[:5]:
                    life = (
                        f", median life {r['median_lifetime_us'] / 1e3:.2f} ms"
                        if r.get("median_lifetime_us") is not None
                        else ""
                    )
                    console.print(
                        Text(f"  {b(r['bytes']):>10}  {r['count']:>6,}×  ", style="default")
                        + Text(r["stack"] + life, style="dim"),
                        overflow="ellipsis",
                        no_wrap=True,
                    )
