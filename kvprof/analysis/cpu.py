"""CPU samples (``--probe pyspy``): where each recorded process spent its CPU.

py-spy's speedscope profile (kept as is in ``pyspy/``) holds one sampled
profile per process and thread, stacks root first.  Each sample gets the
category of its innermost frame that has one:

* ``block management``: vLLM's ``v1/core`` (block pool, KV cache manager,
  scheduler), nano-vllm's ``block_manager`` and ``scheduler``, and pools kept
  through ``kvprof.blocks`` (the demo included);
* ``pytorch allocator``: ``torch/cuda/memory.py`` and, with native frames, the
  CUDA caching allocator;
* ``gc``: the collector's own C functions (native frames only; ``--probe gc``
  measures pauses directly);
* ``kvprof``: kvprof's own recording code in the target (its overhead);
* ``other``: the rest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvprof.owncode import IDLE_LOOPS, OWN_CODE

if TYPE_CHECKING:
    from kvprof.analysis.results import SectionResult, Window
    from kvprof.trace.reader import Bundle

CATEGORIES = ("block management", "pytorch allocator", "gc", "kvprof", "other")
_RULES = [  # (category, path fragment or None, function-name regex or None)
    *(("kvprof", part, None) for part in OWN_CODE),
    ("block management", "/vllm/v1/core/", None),
    ("block management", "/nanovllm/engine/block_manager.py", None),
    ("block management", "/nanovllm/engine/scheduler.py", None),
    ("block management", "/kvprof/blocks.py", None),
    ("block management", "/kvprof/demo.py", None),
    ("pytorch allocator", "/torch/cuda/memory.py", None),
    ("pytorch allocator", None, re.compile(r"CUDACachingAllocator|c10::cuda::.*[Aa]lloc")),
    (
        "gc",
        None,
        re.compile(
            r"^(gc_collect\w*|collect_with_callback|collect_main|subtract_refs|move_unreachable|visit_decref|visit_reachable|_PyGC_\w+|_PyObject_GC_Link)$"
        ),
    ),
]
_PROC = re.compile(r"Process (\d+)")


def category_of(name: str, path: str) -> str | None:
    if name == "<module>":  # import time is not the module's work
        return None
    p = path.replace("\\", "/")
    for cat, frag, rx in _RULES:
        if frag is not None and frag in p:
            return cat
        if rx is not None and rx.search(name or ""):
            return cat
    return None


@dataclass
class Stack:
    category: str
    stack: str
    samples: int
    share: float


@dataclass
class CpuProcess:
    pid: int
    role: str
    samples: int
    cpu_s: float
    shares: dict[str, float]  # category -> share of this process's samples
    seconds: dict[str, float]  # category -> CPU seconds (sample weights)
    steps: int | None
    cpu_s_per_step: dict[str, float] | None  # category -> seconds per engine step
    top: list[Stack] = field(default_factory=list)


@dataclass
class CpuAnalysis:
    profile: str
    rate: int | None
    samples: int
    cpu_s: float
    shares: dict[str, Any]
    processes: list[CpuProcess]
    unrecorded_samples: int  # samples of processes kvprof did not record (the launcher shim, non-Python children)


_WAITS = {"Event.wait", "Condition.wait", "wait"}


def _waiting_kvprof_thread(frames: list[Any], stack: list[Any]) -> bool:
    """A kvprof helper thread asleep in its loop (kvprof.owncode.IDLE_LOOPS): below the
    loop's frame only threading's waits and native frames (the lock wait py-spy --native
    shows)."""
    for i in reversed(stack):
        f = frames[i] if 0 <= i < len(frames) else {}
        path = str(f.get("file", "")).replace("\\", "/")
        if not path.endswith(".py"):
            continue  # native
        name = str(f.get("name", ""))
        if path.endswith("/threading.py") and name in _WAITS:
            continue
        return any(name == fn and path.endswith(suffix) for fn, suffix in IDLE_LOOPS)
    return False


def _label(frames: list[Any], stack: list[int], at: int) -> str:
    parts = []
    for i in stack[at::-1][:3]:
        f = frames[i]
        if f.get("name", "").startswith("process "):
            break
        parts.append(f"{f.get('name', '?')} ({os.path.basename(str(f.get('file', '?')))}:{f.get('line', '?')})")
    return " < ".join(parts) or "(no frames: native or idle)"


def analyze_cpu(bundle: Bundle) -> CpuAnalysis | None:
    note = (bundle.manifest.get("probe_status") or {}).get("pyspy")
    if not note or not note.get("profile"):
        return None
    path = os.path.join(bundle.path, note["profile"])
    try:
        with open(path, "rb") as fh:
            data = json.load(fh)
        frames = data["shared"]["frames"]
        profiles = data["profiles"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the run died before py-spy wrote its profile: nothing to say
    cats = [category_of(str(f.get("name", "")), str(f.get("file", ""))) for f in frames]
    recorded = {p.pid: p for p in bundle.processes}
    pool_steps = getattr(bundle, "pool_steps", None) or {}  # engine steps per pool, from the analysis pass
    marks = bundle.marks()
    per_pid: dict[int, dict[str, Any]] = {}
    unrecorded = 0
    for prof in profiles:
        m = _PROC.search(str(prof.get("name", "")))
        pid = int(m.group(1)) if m else -1
        samples, weights = prof.get("samples") or [], prof.get("weights") or []
        if pid not in recorded:
            unrecorded += len(samples)
            continue
        acc = per_pid.setdefault(
            pid,
            {
                "n": 0,
                "s": 0.0,
                "cat": dict.fromkeys(CATEGORIES, 0),
                "sec": dict.fromkeys(CATEGORIES, 0.0),
                "stacks": {},
            },
        )
        for k, stack in enumerate(samples):
            w = float(weights[k]) if k < len(weights) else 0.0
            if _waiting_kvprof_thread(frames, stack):
                continue  # kvprof's writer or snapshot thread asleep (native mode misses that it is idle)
            cat, at = "other", len(stack) - 1
            for j in range(len(stack) - 1, -1, -1):
                c = cats[stack[j]] if 0 <= stack[j] < len(cats) else None
                if c is not None:
                    cat, at = c, j
                    break
            acc["n"] += 1
            acc["s"] += w
            acc["cat"][cat] += 1
            acc["sec"][cat] += w
            key = (cat, _label(frames, stack, at) if stack else "(empty)")
            acc["stacks"][key] = acc["stacks"].get(key, 0) + 1
    procs = []
    for pid, acc in sorted(per_pid.items()):
        n = acc["n"] or 1
        steps = None
        local = [pi.index for pi in bundle.pools if pi.pid == pid]
        if local:
            steps = sum(pool_steps.get(i, 0) for i in local) or None
        if steps is None and "step" in marks.names:
            steps = int(((marks.pid == pid) & (marks.name == marks.names.index("step"))).sum()) or None
        per_step = {c: acc["s"] * acc["cat"][c] / n / steps for c in CATEGORIES} if steps else None
        top = sorted(acc["stacks"].items(), key=lambda kv: -kv[1])
        shown = [
            Stack(c, st, k, k / n) for cat in CATEGORIES for (c, st), k in [kv for kv in top if kv[0][0] == cat][:8]
        ]
        procs.append(
            CpuProcess(
                pid,
                str(recorded[pid].info.get("role")),
                acc["n"],
                acc["s"],
                {c: acc["cat"][c] / n for c in CATEGORIES},
                dict(acc["sec"]),
                steps,
                per_step,
                shown,
            )
        )
    total = sum(p.samples for p in procs)
    shares = {c: (sum(p.shares[c] * p.samples for p in procs) / total if total else None) for c in CATEGORIES}
    return CpuAnalysis(
        profile=note["profile"],
        rate=note.get("rate"),
        samples=total,
        cpu_s=sum(p.cpu_s for p in procs),
        shares=shares,
        processes=procs,
        unrecorded_samples=unrecorded,
    )


def section(bundle: Bundle, bounds: Window | None = None) -> SectionResult | None:
    """SECTION_ANALYZERS entry (py-spy samples carry no timestamps: always the whole run)."""
    from kvprof.analysis import Finding, SectionResult, metric_entry

    a = analyze_cpu(bundle)
    if a is None:
        return None

    def put(name: str, value: Any) -> tuple[str, dict[str, Any]]:
        return name, metric_entry(name, value, "pyspy", "whole run")

    metrics = dict(
        [
            put("cpu.samples", a.samples),
            put("cpu.seconds", a.cpu_s),
            put("cpu.block_management_share", a.shares["block management"]),
            put("cpu.torch_allocator_share", a.shares["pytorch allocator"]),
            put("cpu.kvprof_share", a.shares["kvprof"]),
        ]
    )
    findings = []
    if not a.samples:
        findings.append(
            Finding(
                "info",
                "py-spy took no samples of the recorded processes",
                f"{a.unrecorded_samples:,} samples of other processes"
                if a.unrecorded_samples
                else "the program ended (or slept) before py-spy's first sample; sample a longer run, or raise --pyspy-rate",
                {"unrecorded_samples": a.unrecorded_samples},
                "pyspy",
            )
        )
    for p in a.processes:
        bm = p.shares["block management"]
        if p.samples >= 20 and bm >= 0.1:
            top = next((s for s in p.top if s.category == "block management"), None)
            findings.append(
                Finding(
                    "warning" if bm >= 0.25 else "info",
                    f"KV block management took {100 * bm:.0f}% of process {p.pid}'s CPU samples",
                    f"{p.samples:,} samples; hottest: {top.stack if top else '?'}"
                    + (
                        f"; {1e3 * p.cpu_s_per_step['block management']:.2f} ms per engine step"
                        if p.cpu_s_per_step
                        else ""
                    ),
                    {"pid": p.pid, "share": bm},
                    "pyspy",
                )
            )
    if bounds is not None:
        findings.append(
            Finding(
                "info",
                "CPU samples cover the whole run",
                "py-spy's profile has no timestamps, so --window does not cut it.",
                {},
                "pyspy",
            )
        )
    return SectionResult(name="cpu", metrics=metrics, section=dataclasses.asdict(a), findings=findings)
