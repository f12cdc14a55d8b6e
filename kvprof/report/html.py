"""Self-contained HTML report: the analysis and its series drawn with Bokeh.

Renders an AnalysisResult and the series of kvprof.analysis.timeseries.collect; computes
nothing.  Bokeh's JavaScript (bokeh.min.js only, ~1.3 MB) is inlined, so the file opens
from a CI artifact with no network.  Every string that comes from a trace (function
names, file paths, the command line, marker names) is escaped: here with html.escape,
inside the charts by Bokeh's own serialisation.
"""

from __future__ import annotations

import html
import math
import os
import shlex
import time

from kvprof import metrics as registry
from kvprof.report import format as fmt

STATE_COLORS = ["#d9d9d9", "#6baed6", "#31a354", "#9e4fa5"]  # free-empty, free-cached, in-use, reserved
STATE_NAMES = ["free-empty", "free-cached", "in-use", "reserved"]
TORCH_STATE_COLORS = {"active_allocated": "#31a354", "active_pending_free": "#fd8d3c", "inactive": "#d9d9d9"}
# the colour each chart draws its data in (a browser test looks for it on the canvas)
CHART_COLORS = {
    "usage": "#31a354",
    "blockmap": "#31a354",
    "frag": "#e6550d",
    "whatif": "#e6550d",
    "heap": "#fd8d3c",
    "heap-live": "#3182bd",
    "torch": "#31a354",
    "nvml": "#31a354",
    "gc": "#9ecae1",
    "cpu": "#31a354",
}
HEADLINE = [
    "blocks.usage.high_watermark",
    "blocks.usage.time_weighted",
    "blocks.peak_blocks",
    "blocks.internal_fragmentation.time_weighted",
    "blocks.internal_fragmentation.at_peak",
    "blocks.external_fragmentation.at_peak",
    "blocks.prefix_cache.hit_rate",
    "blocks.preemptions",
    "blocks.allocation_failures",
    "blocks.leaked_blocks",
    "blocks.evictions",
    "heap.peak_bytes",
    "heap.leak_suspects",
    "heap.leak_suspect_bytes_per_step",
    "heap.leaked_bytes_at_exit",
    "heap.temporary_allocations",
    "gc.pause_seconds_total",
    "gc.time_share",
    "cpu.block_management_share",
    "torch.reserved_bytes",
    "torch.allocated_bytes",
    "torch.external_fragmentation",
    "torch.ooms",
    "torch.leaked_bytes",
]
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f2937;color:#f9fafb;padding:14px 24px}header h1{margin:0;font-size:20px}
header .meta{color:#cbd5e1;font-size:12px;word-break:break-all}main{padding:8px 24px 40px;max-width:1280px}
section{background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:12px 16px;margin:14px 0}
h2{font-size:16px;margin:4px 0 10px}table{border-collapse:collapse;font-size:13px}
td,th{padding:3px 10px;border-bottom:1px solid #f0f0f0;text-align:left;vertical-align:top}td.num{text-align:right;font-variant-numeric:tabular-nums}
.sev-error{color:#b91c1c}.sev-warning{color:#b45309}.sev-info{color:#1d4ed8}.caption{color:#555;font-size:12px;margin:4px 0 8px}
.kv-chart{margin:6px 0 14px}.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px;vertical-align:middle}
code{font-size:12px;background:#f3f4f6;padding:0 3px;border-radius:3px}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _bokeh():
    from bokeh import models, plotting

    return plotting, models


def _plain(text: str) -> str:
    """Bokeh reads $$...$$, \\[...\\] and \\(...\\) in titles as TeX: a pool or marker named so
    must show as typed.  A zero-width space breaks each delimiter."""
    for delim in ("$$", "\\[", "\\]", "\\(", "\\)"):
        text = text.replace(delim, delim[0] + "\u200b" + delim[1:])
    return text


def _fig(title: str, x_label: str, y_label: str, height: int = 260, **kw):
    plotting, _ = _bokeh()
    title = _plain(title)
    p = plotting.figure(
        title=title,
        height=height,
        sizing_mode="stretch_width",
        x_axis_label=x_label,
        y_axis_label=y_label,
        tools="pan,box_zoom,wheel_zoom,reset,save,hover",
        toolbar_location="right",
        **kw,
    )
    p.title.text_font_size = "13px"
    return p


def _nan_to_none(v):
    return [None if (x is None or (isinstance(x, float) and math.isnan(x))) else x for x in v]


# -- charts ------------------------------------------------------------------------------------------------
def _shade_window(p, agg: dict) -> None:
    """The time charts show the whole run; an analysis window (--window) is shaded on them."""
    w = (agg.get("timeline") or {}).get("window_s")
    if w:
        _, models = _bokeh()
        p.add_layout(models.BoxAnnotation(left=w[0], right=w[1], fill_color="#fde68a", fill_alpha=0.35, line_alpha=0))


def _usage_chart(agg: dict, series: dict):
    _, models = _bokeh()
    tl = agg.get("timeline") or {}
    if not tl.get("t_s"):
        return None
    p = _fig("KV blocks in use over time", "seconds", "blocks")
    src = models.ColumnDataSource({"t": tl["t_s"], "in_use": tl["in_use_max"], "cached": tl["cached"]})
    p.step(
        "t", "in_use", source=src, mode="after", color="#31a354", line_width=2, legend_label="in use (max per bucket)"
    )
    p.step("t", "cached", source=src, mode="after", color="#6baed6", line_width=1.5, legend_label="free-cached")
    cap = tl.get("capacity") or agg.get("capacity")
    if cap:
        p.add_layout(models.Span(location=cap, dimension="width", line_color="#555", line_dash="dashed", line_width=1))
    if agg.get("peak_blocks"):
        p.add_layout(
            models.Span(
                location=agg["peak_blocks"], dimension="width", line_color="#b91c1c", line_dash="dotted", line_width=1
            )
        )
    pre = tl.get("preemptions_t_s") or []
    if pre:
        count = (
            f"{len(pre)}; {agg.get('preemptions')} in the window"
            if tl.get("window_s")
            else str(agg.get("preemptions", len(pre)))
        )
        p.scatter(
            pre,
            [cap or agg.get("peak_blocks") or 0] * len(pre),
            marker="inverted_triangle",
            size=7,
            color="#b91c1c",
            legend_label=f"preemptions ({count})",
        )
    _shade_window(p, agg)
    span = tl["t_s"][-1] if tl["t_s"] else 0
    # markers on another clock than the pool's (a pool with a simulated clock) fall outside: left out
    marks = [m for m in series.get("markers") or [] if -0.05 * span <= m[0] <= 1.05 * span]
    if marks:
        msrc = models.ColumnDataSource(
            {
                "t": [m[0] for m in marks],
                "y": [0] * len(marks),
                "name": [m[1] for m in marks],
                "pid": [m[2] for m in marks],
            }
        )
        p.scatter("t", "y", source=msrc, marker="triangle", size=8, color="#7c3aed", legend_label="markers")
    p.select_one(models.HoverTool).tooltips = [("t", "@t{0.000} s"), ("value", "$y{0}"), ("marker", "@name")]
    p.legend.location = "top_left"
    p.legend.click_policy = "hide"
    return p


def _block_map_chart(m: dict, agg: dict):
    import numpy as np

    _, models = _bokeh()
    grid = np.asarray(m["grid"], dtype=np.uint8)
    p = _fig(
        f"Block map: {m['pool']}",
        "seconds",
        "block id",
        height=340,
        x_range=(0, max(m["span_s"], 1e-9)),
        y_range=(0, m["num_blocks"]),
    )
    mapper = models.LinearColorMapper(palette=STATE_COLORS, low=-0.5, high=3.5)
    p.image(image=[grid], x=0, y=0, dw=max(m["span_s"], 1e-9), dh=m["num_blocks"], color_mapper=mapper)
    w = (agg.get("timeline") or {}).get("window_s")
    if w:  # over the image, an outline rather than a fill
        p.add_layout(
            models.BoxAnnotation(
                left=w[0], right=w[1], fill_alpha=0, line_color="#b45309", line_width=2, line_dash="dashed"
            )
        )
    p.select_one(models.HoverTool).tooltips = [("t", "$x{0.000} s"), ("block", "$y{0}"), ("state", "@image{0}")]
    return p


def _frag_hit_chart(agg: dict, series: dict):
    tl = agg.get("timeline") or {}
    hr = series.get("hit_rate")
    if not tl.get("internal_fragmentation") and not hr:
        return None
    p = _fig("Internal fragmentation and prefix-cache hit rate over time", "seconds", "ratio", y_range=(0, 1))
    if tl.get("internal_fragmentation"):
        p.line(
            tl["t_s"],
            tl["internal_fragmentation"],
            color="#e6550d",
            line_width=2,
            legend_label="internal fragmentation (unfilled / in-use slots)",
        )
    if hr:
        p.line(
            hr["t_s"],
            _nan_to_none(hr["cumulative"]),
            color="#3182bd",
            line_width=2,
            legend_label="hit rate, cumulative",
        )
        p.scatter(hr["t_s"], _nan_to_none(hr["bucket"]), color="#9ecae1", size=3, legend_label="hit rate per bucket")
    _shade_window(p, agg)
    p.legend.location = "top_right"
    p.legend.click_policy = "hide"
    return p


def _whatif_chart(agg: dict, series: dict):
    from bokeh.layouts import row

    rows = agg.get("rounding") or []
    w = series.get("whatif")
    if not rows and not w:
        return None
    figs = []
    if rows:
        p = _fig(
            "Waste of the recorded lengths against block size",
            "block size (tokens)",
            "wasted / allocated slots",
            x_axis_type="log",
        )
        xs = [r["block_size"] for r in rows]
        p.line(xs, [r["waste_ratio"] for r in rows], color="#e6550d", line_width=2)
        p.scatter(xs, [r["waste_ratio"] for r in rows], color="#e6550d", size=6)
        figs.append(p)
    if w and w.get("blocks_needed"):
        p = _fig(
            "KV slots needed at peak (replay, no capacity limit)",
            "block size (tokens)",
            "token slots",
            x_axis_type="log",
        )
        xs = [r["block_size"] for r in w["blocks_needed"]]
        ys = [r["metrics"]["blocks.peak_blocks"] * r["block_size"] for r in w["blocks_needed"]]
        p.line(xs, ys, color="#31a354", line_width=2, legend_label="peak blocks × block size")
        p.scatter(xs, ys, color="#31a354", size=6)
        cap = w["recorded"]["num_blocks"] * w["recorded"]["block_size"]
        p.line([min(xs), max(xs)], [cap, cap], color="#555", line_dash="dashed", legend_label="recorded pool")
        p.legend.location = "top_left"
        figs.append(p)
    return row(*figs, sizing_mode="stretch_width") if len(figs) > 1 else figs[0]


def _icicle(title: str, items: list, weight_key: str, unit: str):
    """An icicle of stacks (outermost frame at the top), width by weight."""
    _, models = _bokeh()
    items = [i for i in items if (i.get(weight_key) or 0) > 0 and i.get("stack")]
    if not items:
        return None
    root: dict = {"children": {}, "w": 0.0}
    for it in items:
        w = float(it[weight_key])
        node = root
        node["w"] += w
        for fr in reversed(it["stack"]):  # stacks are innermost first
            key = f"{fr.get('function', '?')} ({os.path.basename(str(fr.get('file', '?')))}:{fr.get('line', '?')})"
            node = node["children"].setdefault(key, {"children": {}, "w": 0.0, "frame": fr})
            node["w"] += w
    data: dict[str, list] = {
        "left": [],
        "right": [],
        "top": [],
        "bottom": [],
        "name": [],
        "file": [],
        "weight": [],
        "color": [],
    }
    palette = ["#fdae6b", "#fd8d3c", "#f16913", "#d94801", "#fdd0a2", "#fee6ce"]
    depth_max = 0

    def walk(node, x0, depth):
        nonlocal depth_max
        x = x0
        for i, (_key, child) in enumerate(sorted(node["children"].items(), key=lambda kv: -kv[1]["w"])):
            fr = child["frame"]
            data["left"].append(x)
            data["right"].append(x + child["w"])
            data["top"].append(-depth)
            data["bottom"].append(-depth - 0.95)
            data["name"].append(str(fr.get("function", "?")))
            data["file"].append(f"{fr.get('file', '?')}:{fr.get('line', '?')}")
            data["weight"].append(child["w"])
            data["color"].append(palette[(depth + i) % len(palette)])
            depth_max = max(depth_max, depth + 1)
            walk(child, x, depth + 1)
            x += child["w"]

    walk(root, 0.0, 0)
    p = _fig(
        title,
        unit,
        "stack depth (outermost at the top)",
        height=min(120 + 22 * depth_max, 520),
        x_range=(0, root["w"]),
        y_range=(-depth_max - 0.1, 0.1),
    )
    src = models.ColumnDataSource(data)
    p.quad(left="left", right="right", top="top", bottom="bottom", fill_color="color", line_color="white", source=src)
    # names on the boxes wide enough to hold some of them (hover shows every box in full)
    total = root["w"] or 1.0
    lab: dict[str, list] = {"x": [], "y": [], "text": []}
    for left, right, top, name in zip(data["left"], data["right"], data["top"], data["name"]):
        chars = int((right - left) / total * 110)
        if chars >= 4:
            lab["x"].append(left + total * 0.003)
            lab["y"].append(top - 0.5)
            lab["text"].append(name if len(name) <= chars else name[: chars - 1] + "…")
    if lab["text"]:
        p.text(
            "x",
            "y",
            "text",
            source=models.ColumnDataSource(lab),
            text_font_size="10px",
            text_baseline="middle",
            text_color="#222",
        )
    p.select_one(models.HoverTool).renderers = [p.renderers[0]]
    p.select_one(models.HoverTool).tooltips = [("function", "@name"), ("where", "@file"), (unit, "@weight{0,0.0}")]
    p.yaxis.visible = False
    return p


def _heap_charts(heap: dict):
    out = []
    if heap.get("leak_suspects"):
        c = _icicle(
            "Leak suspects: growth per step by stack (tracemalloc)",
            heap["leak_suspects"],
            "growth_bytes_per_step",
            "bytes per step",
        )
        if c is not None:
            out.append(
                ("heap-leaks", c, "Each box is a frame; its width is the growth per step of the suspects below it.")
            )
    for proc in heap.get("processes") or []:
        mem = proc.get("memray") or {}
        if mem.get("churn"):
            c = _icicle(
                f"Allocations by stack, pid {proc['pid']} ({proc.get('role')}, memray)",
                mem["churn"],
                "allocations",
                "allocations",
            )
            if c is not None:
                out.append((f"heap-churn-{proc['pid']}", c, "Churn: allocations made by each stack over the run."))
        if mem.get("leaked_stacks"):
            c = _icicle(f"Left at exit by stack, pid {proc['pid']} (memray)", mem["leaked_stacks"], "bytes", "bytes")
            if c is not None:
                out.append(
                    (f"heap-exit-{proc['pid']}", c, "Memory allocated and not freed when memray's tracker stopped.")
                )
    series: list = [
        (p["pid"], p.get("role"), (p.get("tracemalloc") or {}).get("series")) for p in heap.get("processes") or []
    ]
    series = [s for s in series if s[2]]
    if series:
        p = _fig(
            "Python heap live bytes over time (tracemalloc snapshots)",
            "seconds since the process started tracing",
            "bytes",
        )
        colors = ["#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363", "#e7ba52"]
        for i, (pid, role, pts) in enumerate(series[:12]):
            p.line(
                [x[0] for x in pts],
                [x[1] for x in pts],
                color=colors[i % len(colors)],
                line_width=2,
                legend_label=f"pid {pid} ({role})",
            )
        p.legend.location = "top_left"
        out.append(
            (
                "heap-live",
                p,
                "Live bytes kvprof's tracemalloc probe saw at each snapshot (its own allocations excluded).",
            )
        )
    return out


def _torch_charts(torch: dict, series: dict):
    _, models = _bokeh()
    out = []
    tl = torch.get("timeline") or {}
    if tl.get("t_us"):
        p = _fig("PyTorch caching allocator: requested and reserved over the trace", "seconds", "bytes")
        t0 = tl["t_us"][0]
        xs = [(t - t0) / 1e6 for t in tl["t_us"]]
        p.step(xs, tl["reserved"], mode="after", color="#636363", line_width=2, legend_label="reserved")
        p.step(
            xs, tl["requested"], mode="after", color="#31a354", line_width=2, legend_label="requested (live tensors)"
        )
        p.legend.location = "top_left"
        out.append(
            ("torch-timeline", p, "Rebuilt backwards from the snapshot's totals through its trace (device_traces).")
        )
    segs = series.get("segments") or []
    if segs:
        data: dict[str, list] = {
            "left": [],
            "right": [],
            "top": [],
            "bottom": [],
            "state": [],
            "size": [],
            "color": [],
            "segment": [],
        }
        for i, s in enumerate(segs):
            for off, size, state in s["blocks"]:
                data["left"].append(off / 2**20)
                data["right"].append((off + size) / 2**20)
                data["top"].append(-i)
                data["bottom"].append(-i - 0.85)
                data["state"].append(state)
                data["size"].append(fmt.bytes_(size))
                data["color"].append(TORCH_STATE_COLORS.get(state, "#bdbdbd"))
                data["segment"].append(f"{s['address']:#x} ({fmt.bytes_(s['size'])}, stream {s['stream']})")
        p = _fig(
            f"Segment map: the {len(segs)} largest segments, blocks by state",
            "offset in segment (MiB)",
            "segment",
            height=min(140 + 16 * len(segs), 700),
        )
        p.quad(
            left="left",
            right="right",
            top="top",
            bottom="bottom",
            fill_color="color",
            line_color="white",
            line_width=0.5,
            source=models.ColumnDataSource(data),
        )
        p.select_one(models.HoverTool).tooltips = [("segment", "@segment"), ("block", "@size, @state")]
        p.yaxis.visible = False
        out.append(
            (
                "torch-segments",
                p,
                "Green: allocated; orange: freed, pending stream work; grey: inactive (free in the cache). "
                "Free grey between green blocks is external fragmentation.",
            )
        )
    return out


def _nvml_chart(nvml: dict):
    gpus = [g for g in nvml.get("gpus") or [] if g.get("t_s")]
    if not gpus:
        return None
    p = _fig("GPU memory used (NVML, all processes)", "seconds", "bytes")
    colors = ["#31a354", "#3182bd", "#e6550d", "#756bb1", "#636363", "#e7ba52", "#9ecae1", "#fd8d3c"]
    for i, g in enumerate(gpus):
        p.line(g["t_s"], g["used"], color=colors[i % len(colors)], line_width=2, legend_label=f"GPU {g['gpu']}")
        p.line([g["t_s"][0], g["t_s"][-1]], [g["total"], g["total"]], color=colors[i % len(colors)], line_dash="dashed")
    p.legend.location = "top_left"
    return p


def _gc_chart(series: dict):
    pauses = series.get("gc_pauses") or []
    if not pauses:
        return None
    p = _fig("Garbage-collector pauses", "seconds", "pause (ms)")
    colors = ["#9ecae1", "#fd8d3c", "#b91c1c"]
    for g in range(3):
        sel = [x for x in pauses if x["generation"] == g]
        if sel:
            p.scatter(
                [x["t_s"] for x in sel],
                [x["pause_s"] * 1e3 for x in sel],
                color=colors[g],
                size=5,
                legend_label=f"generation {g}",
            )
    p.legend.location = "top_left"
    return p


def _cpu_chart(cpu: dict):
    _, models = _bokeh()
    procs = [p for p in cpu.get("processes") or [] if p.get("samples")]
    if not procs:
        return None
    cats = sorted({c for p in procs for c in (p.get("shares") or {})})
    labels = [f"{p['pid']} {p.get('role', '')}".strip() for p in procs]
    data = {"process": labels}
    for c in cats:
        data[c] = [(p.get("shares") or {}).get(c, 0.0) for p in procs]
    palette = ["#31a354", "#3182bd", "#e6550d", "#756bb1", "#bdbdbd", "#e7ba52", "#636363"]
    p = _fig(
        "CPU samples by category, per process",
        "share of samples",
        "process",
        y_range=labels,
        height=120 + 30 * len(labels),
    )
    p.hbar_stack(
        cats,
        y="process",
        height=0.7,
        source=models.ColumnDataSource(data),
        color=palette[: len(cats)],
        legend_label=cats,
    )
    p.legend.location = "bottom_right"
    return p


# -- page -----------------------------------------------------------------------------------------------------
def _metric_rows(result, names) -> str:
    rows = []
    for name in names:
        m = result.metrics.get(name)
        if m is None:
            continue
        reg = registry.get(name)
        rows.append(
            f"<tr><td><code>{_e(name)}</code></td><td class=num>{_e(fmt.value(m['value'], m['unit']))}</td>"
            f"<td>{_e(m.get('window', ''))}</td><td>{_e(reg.definition if reg else '')}</td></tr>"
        )
    return (
        "<table><tr><th>metric</th><th>value</th><th>window</th><th>what it is</th></tr>" + "".join(rows) + "</table>"
    )


def _headline(result) -> str:
    head = [n for n in HEADLINE if (result.metrics.get(n) or {}).get("value") is not None]
    return (
        _metric_rows(result, head)
        + f"<details><summary>all {len(result.metrics)} metrics</summary>"
        + _metric_rows(result, list(result.metrics))
        + "</details>"
    )


def _findings(result) -> str:
    if not result.findings:
        return "<p>No findings.</p>"
    items = []
    for f in result.findings:
        sev = f.severity if f.severity in ("error", "warning", "info") else "info"
        items.append(f"<li class='sev-{sev}'><b>{_e(f.title)}</b><br><span>{_e(f.detail)}</span></li>")
    return "<ul>" + "".join(items) + "</ul>"


def render(result, series: dict) -> str:
    """The report as one HTML string."""
    from bokeh.embed import components
    from bokeh.resources import Resources

    src = result.source
    title = os.path.basename(str(src.get("bundle") or src.get("snapshot") or src.get("memray_capture") or "report"))
    cmd = src.get("command")
    cmd = shlex.join(map(str, cmd)) if isinstance(cmd, list) else (cmd or "")
    target = src.get("target") or {}
    status = ""
    if target:
        status = (
            f"signal {target.get('signal_name')}" if target.get("signal") else f"exit code {target.get('exit_code')}"
        )

    charts: list = []  # (section id, chart id, figure, caption)
    agg = ((result.sections.get("blocks") or {}).get("aggregate")) or {}
    if agg:
        c = _usage_chart(agg, series)
        if c is not None:
            charts.append(
                (
                    "blocks",
                    "usage",
                    c,
                    "In-use blocks (the most in each time bucket), free-cached blocks, the pool's capacity (dashed) and "
                    "the high watermark (dotted); triangles: preemptions (top) and markers (bottom).",
                )
            )
        for m in series.get("block_maps") or []:
            note = (
                f"each row is {m['blocks_per_row']} consecutive block ids, shown in its busiest state"
                if m["blocks_per_row"] > 1
                else "one row per block id"
            )
            charts.append(
                (
                    "blocks",
                    f"blockmap-{len(charts)}",
                    _block_map_chart(m, agg),
                    f"Block id × time ({note}). Grey: free-empty; blue: free-cached "
                    "(prefix-cache residency); green: in use; purple: reserved. Scattered grey among green is external fragmentation in id space.",
                )
            )
        c = _frag_hit_chart(agg, series)
        if c is not None:
            charts.append(
                (
                    "blocks",
                    "frag-hit",
                    c,
                    "Share of allocated slots holding no token, and the prefix-cache hit rate in tokens.",
                )
            )
    heap = result.sections.get("heap")
    if heap:
        for cid, c, cap in _heap_charts(heap):
            charts.append(("heap", cid, c, cap))
    torch = result.sections.get("torch")
    if torch:
        for cid, c, cap in _torch_charts(torch, series):
            charts.append(("torch", cid, c, cap))
    if result.sections.get("nvml"):
        c = _nvml_chart(result.sections["nvml"])
        if c is not None:
            charts.append(
                (
                    "nvml",
                    "nvml",
                    c,
                    "Device memory used as NVML reports it (dashed: the device's total), sampled by the recorder.",
                )
            )
    c = _gc_chart(series)
    if c is not None:
        charts.append(("gc", "gc", c, "Every collection's pause by generation (gc probe)."))
    if agg:  # last: its replay ran in the background while the others were drawn
        from kvprof.analysis.run import resolve_series

        resolve_series(series)
        c = _whatif_chart(agg, series)
        if c is not None:
            charts.append(
                (
                    "whatif",
                    "whatif",
                    c,
                    "Left: wasted slots of the recorded final lengths at each block size. Right: `kvprof whatif`'s "
                    "replay of the recorded schedule with no capacity limit: KV token slots needed at peak, against the recorded pool.",
                )
            )
    if result.sections.get("cpu"):
        c = _cpu_chart(result.sections["cpu"])
        if c is not None:
            charts.append(("cpu", "cpu", c, "py-spy samples per process by category."))

    script, divs = components({cid: fig for _, cid, fig, _ in charts}) if charts else ("", {})
    js = Resources(mode="inline", components=["bokeh"]).render_js() if charts else ""
    headings = {
        "blocks": "KV block pool",
        "whatif": "Block-size what-if",
        "heap": "Python and native heap",
        "torch": "PyTorch CUDA memory",
        "nvml": "GPU memory (NVML)",
        "gc": "Garbage collector",
        "cpu": "CPU",
    }
    body = []
    for sec in ("blocks", "whatif", "heap", "torch", "nvml", "gc", "cpu"):
        mine = [(cid, cap) for s, cid, _, cap in charts if s == sec]
        if not mine:
            continue
        parts = [f"<section id='{sec}'><h2>{headings[sec]}</h2>"]
        if sec == "blocks" and (agg.get("timeline") or {}).get("window_s"):
            parts.append(
                f"<p class=caption>These charts and the what-if replay cover the whole run; the analysis window ({_e(src.get('window'))}) "
                "is shaded yellow (outlined on the block map). The figures in the table above are the window's.</p>"
            )
        if sec == "blocks":
            parts.append(
                "<div class=legend>"
                + "".join(f"<span style='background:{c}'></span>{n}" for c, n in zip(STATE_COLORS, STATE_NAMES))
                + "</div>"
            )
        if sec == "whatif" and series.get("whatif"):
            fid = series["whatif"]["fidelity"]
            ok = all(v["equal"] for v in fid.values())
            parts.append(
                f"<p class=caption>Replay of the recorded configuration {'equals' if ok else 'differs from'} the analysis "
                f"(peak {_e(fid['blocks.peak_blocks']['replay'])} blocks, hit tokens {_e(fid['blocks.prefix_cache.hit_tokens']['replay'])}).</p>"
            )
        for cid, cap in mine:
            parts.append(
                f"<div class='kv-chart' data-chart='{_e(cid)}' data-color='{_e(CHART_COLORS.get(cid, CHART_COLORS.get(cid.split('-')[0], '')))}'>{divs[cid]}</div>"
                f"<p class=caption>{_e(cap)}</p>"
            )
        parts.append("</section>")
        body.append("".join(parts))
    if series.get("whatif_note"):
        body.append(f"<section id='whatif-note'><p class=caption>what-if: {_e(series['whatif_note'])}</p></section>")
    markers = result.sections.get("markers") or {}
    if markers:
        rows = "".join(
            f"<tr><td>{_e(k)}</td><td class=num>{_e(v.get('count'))}</td><td>{_e(', '.join(map(str, v.get('processes', []))))}</td></tr>"
            for k, v in list(markers.items())[:200]
        )
        body.append(
            f"<section id='markers'><h2>Markers</h2><table><tr><th>name</th><th>count</th><th>processes</th></tr>{rows}</table></section>"
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>kvprof report: {_e(title)}</title><style>{CSS}</style>
{js}
</head><body>
<header><h1>kvprof report: {_e(title)}</h1>
<div class=meta>{_e(cmd)}</div>
<div class=meta>{_e(status)}{" · " if status else ""}window: {_e(src.get("window", ""))} · {_e(src.get("processes", ""))} process(es) · generated {_e(time.strftime("%Y-%m-%d %H:%M:%S"))}</div></header>
<main>
<section id='headline'><h2>Headline</h2>{_headline(result)}</section>
<section id='findings'><h2>Findings</h2>{_findings(result)}</section>
{"".join(body)}
</main>
{script}
</body></html>
"""


def write(result, series: dict, path: str) -> None:
    from kvprof.trace.atomic import write_output

    write_output(path, render(result, series))
