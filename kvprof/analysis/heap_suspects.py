"""Leak suspects from tracemalloc's snapshots (``--probe tracemalloc``), and the rule and
the types that kvprof.analysis.memray_reader applies to memray's replayed captures too.

Leak suspect (docs/metrics.md, "Python and native heap"): a site (a stack, innermost frame
first) whose live bytes grow in at least ``k`` consecutive intervals between steady-state
marker snapshots, ranked by the least-squares growth per step.  tracemalloc's snapshots
are taken at the markers.

Steady state: the snapshots of the process's most frequent marker, after its
``steady_state`` marker when it has one, otherwise after the first
``WARMUP_FRACTION`` of them.  Growth per step is per marker call: snapshots
thinned with ``--tracemalloc-every`` are placed at the ordinal of their marker.

Pure functions of the bundle's arrays; no memray, no tracemalloc.
"""

from __future__ import annotations

import ast
import functools
import linecache
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from kvprof.trace.reader import Marks, ProcessData

K_CONSECUTIVE = 5  # consecutive growing marker intervals that make a suspect
WARMUP_FRACTION = 0.2
MIN_GROWTH_BYTES = 4096  # total growth over the steady window below which a site is noise
MIN_R2 = 0.6
STEADY_MARKERS = ("steady_state", "steady", "warmup_done")
TOP = 10


@dataclass
class Frame:
    file: str
    line: int
    function: str


@dataclass
class LeakSuspect:
    pid: int
    role: str
    source: str  # "tracemalloc" or "memray"
    site: str  # "file:line in function" of the innermost frame
    stack: list[Frame]
    live_bytes: int  # at the last steady-state snapshot
    live_blocks: int
    growth_bytes_per_step: float | None  # None when the window had no markers (per second then)
    growth_bytes_per_second: float
    consecutive_growth: int  # longest run of growing intervals
    r2: float
    window: dict[str, Any]  # {"marker", "from", "to", "snapshots", "start_s", "end_s"}
    evidence: str


@dataclass
class StackBytes:
    stack: list[Frame]
    site: str
    bytes: int
    count: int


@dataclass
class TracemallocProcess:
    snapshots: int
    depth: int | None
    marker: str | None  # the marker series used for steady state
    steady_snapshots: int
    live_bytes_end: int
    peak_bytes: int  # tracemalloc's traced peak (its own bookkeeping excluded, kvprof's included)
    peak_at_s: float | None
    live_at_peak_snapshot: list[StackBytes]  # sites at the snapshot with the most live bytes
    series: list[list[float]]  # [t_s, live_bytes] downsampled for drawing
    snapshot_seconds: float
    overhead_bytes: int  # tracemalloc's own memory at the end
    note: str | None = None


# -- frames ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=512)
def _functions_of(filename: str) -> tuple[tuple[int, int, str], ...]:
    """(start, end, qualified name) of every def/class in a source file, outermost first."""
    lines = linecache.getlines(filename)
    if not lines:
        return ()
    try:
        tree = ast.parse("".join(lines))
    except (SyntaxError, ValueError):
        return ()
    out: list[tuple[int, int, str]] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                out.append((child.lineno, getattr(child, "end_lineno", child.lineno) or child.lineno, name))
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    return tuple(out)


def function_at(filename: str, line: int) -> str:
    """The innermost function (or class body) holding a line; '<module>', or '?' without the source."""
    spans = _functions_of(filename)
    if not spans and not linecache.getlines(filename):
        return "?"
    best = "<module>"
    width = None
    for start, end, name in spans:
        if start <= line <= end and (width is None or end - start <= width):
            best, width = name, end - start
    return best


def _frames(raw: Iterable[tuple[str, int]]) -> list[Frame]:
    return [Frame(f, int(ln), function_at(f, int(ln))) for f, ln in raw]


def site_of(frames: list[Frame]) -> str:
    """A stack's name in the reports: its innermost frame, "file:line in function"."""
    if not frames:
        return "<no Python frames>"
    f = frames[0]
    return f"{f.file}:{f.line} in {f.function}"


# -- tracemalloc ----------------------------------------------------------------------------
def _dense(snaps: np.ndarray, sites: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Live bytes and blocks per (site, snapshot), forward-filled from the delta rows."""
    order = np.argsort(snaps["seq"], kind="stable")
    snaps = snaps[order]
    stacks = np.unique(sites["stack"]) if len(sites) else np.zeros(0, np.int32)
    col = {int(s): i for i, s in enumerate(snaps["seq"])}
    row = {int(s): i for i, s in enumerate(stacks)}
    size = np.zeros((len(stacks), len(snaps)), dtype=np.int64)
    count = np.zeros_like(size)
    if len(sites):
        r = np.fromiter((row[int(s)] for s in sites["stack"]), np.int64, len(sites))
        c = np.fromiter((col.get(int(s), -1) for s in sites["seq"]), np.int64, len(sites))
        ok = c >= 0
        # a delta sets the value from its snapshot on, until the next delta of that site
        setv = np.full_like(size, -1)
        setc = np.full_like(size, -1)
        setv[r[ok], c[ok]] = sites["size"][ok]
        setc[r[ok], c[ok]] = sites["count"][ok]
        for j in range(len(snaps)):
            if j:
                size[:, j] = size[:, j - 1]
                count[:, j] = count[:, j - 1]
            m = setv[:, j] >= 0
            size[m, j] = setv[m, j]
            count[m, j] = setc[m, j]
    return snaps, stacks, size, count


def longest_growth_run(d: np.ndarray) -> np.ndarray:
    """Per row: the longest run of consecutive positive differences."""
    best = np.zeros(d.shape[0], dtype=np.int64)
    cur = np.zeros(d.shape[0], dtype=np.int64)
    for j in range(d.shape[1]):
        cur = np.where(d[:, j] > 0, cur + 1, 0)
        best = np.maximum(best, cur)
    return best


def least_squares(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope and r² of each row of y against x."""
    xm = x - x.mean()
    sxx = float((xm * xm).sum())
    if sxx == 0:
        return np.zeros(y.shape[0]), np.zeros(y.shape[0])
    ym = y - y.mean(axis=1, keepdims=True)
    slope = (ym * xm).sum(axis=1) / sxx
    ss_tot = (ym * ym).sum(axis=1)
    resid = ym - slope[:, None] * xm
    ss_res = (resid * resid).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss_tot > 0, 1 - ss_res / ss_tot, 0.0)
    return slope, r2


def analyze_tracemalloc(
    proc: ProcessData, marks: Marks, bounds: tuple[int, int] | None, k: int
) -> tuple[TracemallocProcess | None, list[LeakSuspect]]:
    """One process's tracemalloc snapshots within ``bounds``: (TracemallocProcess, its leak
    suspects), or (None, []) when it wrote none."""
    snaps, sites = proc.heap_snapshots()
    if not len(snaps):
        return None, []
    snaps, stacks, size, count = _dense(snaps, sites)
    start = int(proc.info.get("start_ns") or snaps["t"][0])
    sel = np.ones(len(snaps), dtype=bool)
    if bounds is not None:
        sel = (snaps["t"] >= bounds[0]) & (snaps["t"] <= bounds[1])
    note = (proc.info.get("probes") or {}).get("tracemalloc") or {}
    ts = (snaps["t"] - start) / 1e9
    live = snaps["live"]
    in_win = np.flatnonzero(sel)
    peak_i = int(in_win[np.argmax(live[in_win])]) if len(in_win) else None
    at_peak = []
    if peak_i is not None:
        top = np.argsort(size[:, peak_i])[::-1][:TOP]
        for r in top:
            if size[r, peak_i] <= 0:
                break
            frames = _frames(proc.stacks.get(int(stacks[r]), []))
            at_peak.append(StackBytes(frames, site_of(frames), int(size[r, peak_i]), int(count[r, peak_i])))
    # steady-state marker series
    mine = marks.pid == proc.pid
    is_mark = (snaps["reason"] == 1) & sel & (snaps["mark"] >= 0)
    marker = None
    series = np.zeros(0, dtype=np.int64)
    if is_mark.any():
        names = [proc.string(int(m)) for m in snaps["mark"][is_mark]]
        counts: dict[str, int] = {}
        for n in names:
            counts[n] = counts.get(n, 0) + 1
        marker = max(counts, key=lambda n: (counts[n], n not in STEADY_MARKERS))
        series = np.flatnonzero(is_mark)[[n == marker for n in names]]
    per_step = len(series) >= 2
    if not per_step:  # no markers: timer and exit snapshots, growth per second
        series = np.flatnonzero(sel & (snaps["reason"] != 0))
    # the marker's ordinal (its count among this process's calls of it) places thinned snapshots
    if per_step and marker in marks.names:
        mt = marks.t[mine & (marks.name == marks.names.index(marker))]
        x_all = np.searchsorted(mt, snaps["t"], side="right").astype(float)
    else:
        x_all = ts.astype(float)
    # warm-up: after a steady-state marker if there is one, else skip the first part
    steady_t = None
    for name in STEADY_MARKERS:
        if name in marks.names:
            tt = marks.t[mine & (marks.name == marks.names.index(name))]
            if len(tt):
                steady_t = int(tt[0])
                break
    if steady_t is not None and (snaps["t"][series] >= steady_t).sum() >= 2:
        series = series[snaps["t"][series] >= steady_t]
    elif len(series) > 2:
        series = series[int(np.ceil(WARMUP_FRACTION * len(series))) :]
    suspects: list[LeakSuspect] = []
    role = str(proc.info.get("role"))
    if len(series) >= k + 1:
        y = size[:, series].astype(float)
        x = x_all[series]
        d = np.diff(y, axis=1)
        run = longest_growth_run(d)
        slope, r2 = least_squares(x, y)
        growth = y[:, -1] - y[:, 0]
        cand = np.flatnonzero((run >= k) & (slope > 0) & (growth >= MIN_GROWTH_BYTES) & (r2 >= MIN_R2))
        span_s = float(ts[series[-1]] - ts[series[0]]) or None
        for r in cand[np.argsort(slope[cand])[::-1]]:
            frames = _frames(proc.stacks.get(int(stacks[r]), []))
            per_s = float(growth[r] / span_s) if span_s else 0.0
            unit = "step" if per_step else "second"
            first = marker if per_step else "timer"
            suspects.append(
                LeakSuspect(
                    pid=proc.pid,
                    role=role,
                    source="tracemalloc",
                    site=site_of(frames),
                    stack=frames,
                    live_bytes=int(size[r, series[-1]]),
                    live_blocks=int(count[r, series[-1]]),
                    growth_bytes_per_step=float(slope[r]) if per_step else None,
                    growth_bytes_per_second=per_s,
                    consecutive_growth=int(run[r]),
                    r2=float(r2[r]),
                    window={
                        "marker": marker if per_step else None,
                        "from": float(x[0]),
                        "to": float(x[-1]),
                        "snapshots": int(len(series)),
                        "start_s": float(ts[series[0]]),
                        "end_s": float(ts[series[-1]]),
                    },
                    evidence=(
                        f"live bytes grew in {int(run[r])} consecutive {first} intervals (k={k}), "
                        f"{int(y[r, 0]):,} → {int(y[r, -1]):,} B over {len(series)} snapshots, "
                        f"{slope[r]:,.0f} B per {unit} (least squares, r²={r2[r]:.2f})"
                    ),
                )
            )
    if len(ts) > 400:
        pick = np.unique(np.linspace(0, len(ts) - 1, 400).astype(int))
        pick = np.union1d(pick, [int(np.argmax(live))])
    else:
        pick = np.arange(len(ts))
    tm = TracemallocProcess(
        snapshots=int(sel.sum()),
        depth=note.get("depth"),
        marker=marker if per_step else None,
        steady_snapshots=int(len(series)),
        live_bytes_end=int(live[in_win[-1]]) if len(in_win) else 0,
        # the traced peak less kvprof's own live memory at that snapshot (traced - live)
        peak_bytes=int(
            np.maximum(snaps["peak"][sel] - (snaps["traced"][sel] - snaps["live"][sel]), snaps["live"][sel]).max()
        )
        if sel.any()
        else 0,
        peak_at_s=float(ts[peak_i]) if peak_i is not None else None,
        live_at_peak_snapshot=at_peak,
        series=[[float(ts[i]), int(live[i])] for i in pick],
        snapshot_seconds=float(snaps["cost"].sum() / 1e9),
        overhead_bytes=int(snaps["overhead"][-1]),
        note=None
        if len(series) >= k + 1
        else f"{len(series)} steady-state snapshots; leak suspects need at least {k + 1}",
    )
    return tm, suspects
