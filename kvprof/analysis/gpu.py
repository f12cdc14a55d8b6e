"""GPU memory of a bundle: the torch probe's snapshots and memory_stats samples, and the
nvml probe's samples.  Pure functions of the bundle's files; no torch, no NVML.

* torch: the last snapshot of each process that wrote one (OOM snapshots are read for
  their diagnosis too) through the same analysis as a bare snapshot; the process with the
  most reserved memory gives the section and the ``torch.*`` metrics; every snapshot is
  listed with its reason (exit, oom, mark).
* nvml: per GPU the used-memory timeline (downsampled for drawing), its peak and the
  device's total; per process its peak; and, for recorded processes whose torch probe
  sampled memory_stats, the memory outside PyTorch's pool: NVML's figure for the process
  minus torch's reserved bytes at the nearest sample (CUDA context, cuBLAS/NCCL
  workspaces, other allocators).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from kvprof.trace import format as fmt

if TYPE_CHECKING:
    from kvprof.analysis.results import SectionResult, Window
    from kvprof.trace.reader import Bundle


def snapshots(bundle: Bundle) -> list[dict[str, Any]]:
    """Every torch snapshot the bundle holds, oldest first: pid, role, reason, mark, t, path."""
    out: list[dict[str, Any]] = []
    for proc in bundle.processes:
        for rec in proc.notes:
            if rec.get("type") != "torch_snapshot":
                continue
            rel = str(rec.get("file") or "")
            path = os.path.normpath(os.path.join(proc.dir, rel))
            if not path.startswith(os.path.normpath(proc.dir) + os.sep) or not os.path.isfile(path):
                continue  # missing, or a hostile record pointing out of the bundle
            out.append(
                {
                    "pid": proc.pid,
                    "role": proc.info.get("role"),
                    "reason": rec.get("reason"),
                    "mark": rec.get("mark"),
                    "t": int(rec.get("t") or 0),
                    "path": path,
                    "file": os.path.relpath(path, bundle.path),
                }
            )
    return sorted(out, key=lambda s: s["t"])


def torch_stats(bundle: Bundle) -> dict[int, list[tuple[int, dict[str, Any]]]]:
    """pid -> list of (t ns, {device: stats}) from the torch probe's memory_stats samples."""
    out: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for proc in bundle.processes:
        rows = [(int(r.get("t") or 0), r.get("devices") or {}) for r in proc.notes if r.get("type") == "torch_stats"]
        if rows:
            out[proc.pid] = sorted(rows, key=lambda x: x[0])
    return out


def torch_snapshots_section(bundle: Bundle, bounds: Window | None = None) -> SectionResult | None:
    """SECTION_ANALYZERS entry: the torch probe's snapshots in a bundle as the torch section
    (the last one of each process, the process with the most reserved memory in front);
    torch_memory.snapshot_section makes it from that one snapshot's analysis."""
    from kvprof.analysis.torch_memory import analyze_snapshot, snapshot_section
    from kvprof.trace import torch_snapshot

    snaps = snapshots(bundle)
    notes = [
        f"torch probe in pid {p.pid}: {(p.info.get('probes') or {}).get('torch', {}).get('reason')}"
        for p in bundle.processes
        if ((p.info.get("probes") or {}).get("torch") or {}).get("status") == "no CUDA"
    ]
    if not snaps:
        if not notes:
            return None
        from kvprof.analysis import SectionResult

        return SectionResult(name="torch", metrics={}, section={"snapshots": [], "notes": notes[:20]}, findings=[])
    last: dict[str, Any] = {}
    for s in snaps:
        last[s["pid"]] = s
    results = []
    for s in last.values():
        try:
            results.append((s, analyze_snapshot(torch_snapshot.load(s["path"]))))
        except Exception as exc:  # noqa: BLE001 - a damaged snapshot: one line, the others still count
            notes.append(f"{s['file']}: unreadable ({exc})")
    if not results:
        from kvprof.analysis import SectionResult

        return SectionResult(
            name="torch",
            metrics={},
            section={"snapshots": [dict(x, path=None) for x in snaps], "notes": notes},
            findings=[],
        )
    s, a = max(results, key=lambda r: r[1].reserved)
    part = snapshot_section(a, source=s["file"])
    part.section["process"] = {"pid": s["pid"], "role": s["role"], "reason": s["reason"]}
    part.section["snapshots"] = [{k: v for k, v in x.items() if k != "path"} for x in snaps]
    part.section["per_process"] = [
        {
            "pid": x["pid"],
            "role": x["role"],
            "file": x["file"],
            "reserved": r.reserved,
            "allocated": r.allocated,
            "external_fragmentation": r.external_fragmentation,
            "ooms": len(r.ooms),
        }
        for x, r in results
    ]
    part.section["notes"] = notes
    for f in part.findings:
        f.detail += f" (pid {s['pid']}, {s['file']})"
    # OOMs the allocator's observer reported as they happened (the snapshot taken then is listed)
    seen: list[dict[str, Any]] = []
    for proc in bundle.processes:
        for rec in proc.notes:
            if rec.get("type") == "torch_oom":
                seen.append(
                    {
                        "pid": proc.pid,
                        "role": proc.info.get("role"),
                        "device": rec.get("device"),
                        "requested": rec.get("requested"),
                        "device_allocated": rec.get("device_allocated"),
                        "device_free": rec.get("device_free"),
                    }
                )
    part.section["observed_ooms"] = seen
    if seen:
        from kvprof.analysis import Finding

        o = seen[0]
        part.findings.insert(
            0,
            Finding(
                "error",
                f"CUDA out of memory in pid {o['pid']} ({o['role']}): {o['requested'] / 2**20:,.1f} MiB requested",
                f"The allocator's OOM observer fired {len(seen)} time(s); the device had {o['device_free'] / 2**20:,.1f} MiB free. "
                "The snapshot taken at that moment is in the bundle (reason 'oom'): `kvprof analyze` it for the fragmentation diagnosis.",
                {"observed_ooms": len(seen), **o},
                "torch",
            ),
        )
    return part


def _read(path: str, dtype: np.dtype[Any]) -> np.ndarray:
    if not os.path.exists(path):
        return np.zeros(0, dtype=dtype)
    data = np.fromfile(path, dtype=np.uint8)
    n = len(data) // dtype.itemsize
    return data[: n * dtype.itemsize].view(dtype)


def nvml_section(bundle: Bundle, bounds: Window | None = None) -> SectionResult | None:
    from kvprof.analysis import Finding, SectionResult, metric_entry

    status = (bundle.manifest.get("probe_status") or {}).get("nvml")
    gpus = _read(os.path.join(bundle.path, fmt.NVML_GPUS), fmt.NVML_GPU_DTYPE)
    procs = _read(os.path.join(bundle.path, fmt.NVML_PROCS), fmt.NVML_PROC_DTYPE)
    if status is None and not len(gpus):
        return None
    if not len(gpus):
        return SectionResult(name="nvml", metrics={}, section={"status": status, "gpus": []}, findings=[])
    t0 = int(gpus["t"].min())
    recorded = {p.pid: p.info.get("role") for p in bundle.processes}
    out_gpus = []
    for g in np.unique(gpus["gpu"]).tolist():
        rows = gpus[gpus["gpu"] == g]
        step = max(1, len(rows) // 2000)
        out_gpus.append(
            {
                "gpu": g,
                "samples": len(rows),
                "total": int(rows["total"].max()),
                "used_peak": int(rows["used"].max()),
                "used_mean": float(rows["used"].mean()),
                "t_s": ((rows["t"][::step] - t0) / 1e9).tolist(),
                "used": rows["used"][::step].tolist(),
            }
        )
    out_procs = []
    stats = torch_stats(bundle)
    outside_max: int | None = None
    for g, pid in sorted({(int(a), int(b)) for a, b in zip(procs["gpu"], procs["pid"])}):
        rows = procs[(procs["gpu"] == g) & (procs["pid"] == pid)]
        row: dict[str, Any] = {
            "gpu": g,
            "pid": pid,
            "recorded": pid in recorded,
            "role": recorded.get(pid),
            "used_peak": int(rows["used"].max()),
        }
        if pid in stats:
            ts = np.array([x[0] for x in stats[pid]])
            res = np.array([int((x[1].get(str(g)) or {}).get("reserved", 0)) for x in stats[pid]])
            j = np.clip(np.searchsorted(ts, rows["t"]), 0, len(ts) - 1)
            ok = rows["used"] >= 0
            if ok.any():
                outside = rows["used"][ok] - res[j[ok]]
                row["outside_torch_peak"] = int(outside.max())
                row["torch_reserved_at_peak_use"] = int(res[j[ok]][np.argmax(rows["used"][ok])])
                outside_max = max(outside_max or 0, row["outside_torch_peak"])
        out_procs.append(row)
    peak = max(g["used_peak"] for g in out_gpus)
    total = max(g["total"] for g in out_gpus)
    metrics = {
        "nvml.used_peak_bytes": metric_entry("nvml.used_peak_bytes", peak, "nvml"),
        "nvml.used_peak_ratio": metric_entry("nvml.used_peak_ratio", peak / total if total else None, "nvml"),
    }
    if outside_max is not None:
        metrics["nvml.outside_torch_bytes"] = metric_entry("nvml.outside_torch_bytes", outside_max, "nvml")
    findings = []
    if total and peak / total > 0.95:
        findings.append(
            Finding(
                "warning",
                f"a GPU reached {100 * peak / total:.0f}% of its memory",
                f"NVML saw {peak / 2**30:.2f} GiB used of {total / 2**30:.2f} GiB.",
                {"used_peak": peak, "total": total},
                "nvml",
            )
        )
    return SectionResult(
        name="nvml",
        metrics=metrics,
        section={"status": status, "gpus": out_gpus, "processes": out_procs},
        findings=findings,
    )
