"""`kvprof combine OUT PART...`: bundles, or parts of one, recorded on several hosts,
merged into one bundle (coverage.py's ``combine`` is the model).

What it does, and why that is enough:

* Every process directory of every part is copied into ``OUT/procs/``, renamed
  ``HOST-PID-START`` so that processes of different hosts (which may have the same pid,
  and whose monotonic clocks start anywhere) never collide.  The files are copied as they
  are: a process's times stay on its own host's monotonic clock, and its process.json
  keeps that host's identity and its clock offsets to wall time.
* The reader puts every process on one timeline when it opens a bundle
  (kvprof/trace/hostinfo.py ``clock_shifts``): the reference clock is that of the first
  part ``kvprof record`` finished (else the first part given), and a process of another
  host moves by the difference between its host's offset to wall time and the
  reference's.  Pools on a simulated clock are not moved.  So the combined bundle is read,
  analysed, reported, compared and exported like any other, and combining a combined
  bundle again works the same way.
* The manifest says what was combined: every part (path, status, host, processes), the
  reference clock and every host's offsets; the run's command and target are the
  reference part's.  Top-level files of the other parts (py-spy profiles, NVML samples:
  one host's each) are kept under ``parts/`` and not analysed.

Refused with one line: a part that is not a bundle, a part given twice (the same path, or
the same processes in two parts), an OUT that exists (without --force) or lies in a part.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time

from kvprof._version import __version__
from kvprof.errors import BundleError, UsageError
from kvprof.trace import format as fmt
from kvprof.trace import hostinfo
from kvprof.trace.atomic import write_json_atomic

_SKIP_TOP = {fmt.MANIFEST, fmt.PROCS_DIR, "manifest.reserve"}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._-") or "host"


def _open_parts(out: str, parts: list[str]) -> list:
    from kvprof.trace.reader import Bundle

    if not parts:
        raise UsageError("nothing to combine: give one or more bundles or parts")
    seen: dict = {}
    opened = []
    for given in parts:
        real = os.path.realpath(given)
        if real in seen:
            raise UsageError(f"{given} is given twice (as {seen[real]})")
        seen[real] = given
        try:
            opened.append(Bundle(given))
        except BundleError as exc:
            raise BundleError(f"cannot combine {given}: {exc}") from None
        if real == out or out.startswith(real + os.sep) or real.startswith(out + os.sep):
            raise UsageError(f"the output must lie apart from the parts: {out} and {given}")
    owner: dict = {}  # (clock domain, pid, start on its own clock) -> part
    for b in opened:
        for proc in b.processes:
            key = (hostinfo.clock_domain(proc.info), proc.pid, proc.start_ns - proc.clock_shift)
            if key in owner and owner[key] is not b:
                host = hostinfo.hostname(proc.info) or "an unknown host"
                raise UsageError(
                    f"{owner[key].path} and {b.path} hold the same process (pid {proc.pid} on {host}): "
                    "the same recording given twice?"
                )
            owner[key] = b
    return opened


def _copy_tree(src: str, dst: str, skipped: list) -> None:
    """Directories and regular files only: a link or a device in a part is not followed
    (a part is untrusted input), and said."""
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        st = os.lstat(s)
        if stat.S_ISDIR(st.st_mode):
            _copy_tree(s, d, skipped)
        elif stat.S_ISREG(st.st_mode):
            shutil.copy2(s, d)
        else:
            skipped.append(s)


def combine(out: str, parts: list[str], force: bool = False) -> dict:
    """Merge ``parts`` into a new bundle at ``out``; returns a summary for the closing line."""
    from kvprof.record import _scan_processes
    from kvprof.trace.reader import Bundle

    out = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(out))), os.path.basename(os.path.abspath(out)))
    opened = _open_parts(out, parts)
    if os.path.lexists(out):
        if not force:
            raise UsageError(f"output exists: {out} (use --force to replace it)")
        if not (os.path.isdir(out) and not os.path.islink(out) and os.path.exists(os.path.join(out, fmt.MANIFEST))):
            raise UsageError(f"output exists and is not a kvprof bundle, not replacing it: {out}")
    # the reference: the first bundle `kvprof record` finished (its command, target, host clock)
    ref_i = next((i for i, b in enumerate(opened) if isinstance(b.manifest.get("target"), dict)), 0)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.combine-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        summary = _write(tmp, opened, ref_i, _scan_processes)
        Bundle(tmp)  # what was written reads back
        if os.path.lexists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["out"] = out
    return summary


def _write(tmp: str, opened: list, ref_i: int, scan) -> dict:
    procs_out = os.path.join(tmp, fmt.PROCS_DIR)
    os.makedirs(procs_out)
    skipped: list = []
    part_of: dict = {}  # new dir name -> part index
    for i, b in enumerate(opened):
        for proc in b.processes:
            host = _safe(hostinfo.hostname(proc.info) or hostinfo.hostname(b.manifest) or f"part{i}")
            base = os.path.basename(proc.dir)
            name = base if base.startswith(host + "-") else f"{host}-{base}"
            n = 2
            while name in part_of:
                name = f"{host}-{base}-{n}"
                n += 1
            _copy_tree(proc.dir, os.path.join(procs_out, name), skipped)
            part_of[name] = i
        extras = [e for e in sorted(os.listdir(b.path)) if e not in _SKIP_TOP and not e.startswith(".")]
        for e in extras:  # the reference's py-spy profile and NVML samples stay where the analysis reads them
            src = os.path.join(b.path, e)
            dst = (
                os.path.join(tmp, e)
                if i == ref_i
                else os.path.join(tmp, "parts", f"{i}-{_safe(hostinfo.hostname(b.manifest) or 'host')}", e)
            )
            if os.path.isdir(src) and not os.path.islink(src):
                _copy_tree(src, dst, skipped)
            elif os.path.isfile(src) and not os.path.islink(src):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copy2(src, dst)
            else:
                skipped.append(src)
    ref = opened[ref_i].manifest
    processes = scan(tmp)
    for p in processes:
        p["part"] = part_of.get(p["dir"].rsplit("/", 1)[-1])
    # every part's own clock record counts for its host's offset (hostinfo.clock_shifts)
    hosts = [
        {"part": i, "host": b.manifest.get("host"), "clock": b.manifest.get("clock")}
        for i, b in enumerate(opened)
        if isinstance(b.manifest.get("host"), dict) and isinstance(b.manifest.get("clock"), dict)
    ]
    clock = {
        "reference": hostinfo.clock_domain(ref)
        or next((hostinfo.clock_domain(p) for p in processes if hostinfo.clock_domain(p)), None),
        "wall_minus_mono_ns": (ref.get("clock") or {}).get("wall_minus_mono_ns"),
        "hosts": hosts,
    }
    reasons = []
    for b in opened:
        st = b.manifest.get("status")
        if st not in ("complete", "part"):
            reasons.append(
                f"part {b.path} is {st!r}"
                + (
                    ": " + "; ".join(map(str, (b.manifest.get("incomplete") or {}).get("reasons") or []))
                    if st == "incomplete"
                    else ""
                )
            )
    if skipped:
        reasons.append(
            f"{len(skipped)} entries of the parts that are not regular files or directories were not copied: {skipped[0]}"
        )
    probes: dict = {}
    for b in opened:
        mp = b.manifest.get("probes")
        probes.update(mp if isinstance(mp, dict) else {str(p): "" for p in mp or []})
    starts = [b.manifest.get("start_time") for b in opened if isinstance(b.manifest.get("start_time"), (int, float))]
    ends = [b.manifest.get("end_time") for b in opened if isinstance(b.manifest.get("end_time"), (int, float))]
    man = {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "kvprof_version": __version__,
        "status": "incomplete" if reasons else "complete",
        **({"incomplete": {"reasons": reasons}} if reasons else {}),
        **{
            k: ref[k]
            for k in ("command", "cwd", "python", "host", "target", "probe_options", "probe_status", "ray")
            if k in ref
        },
        "clock": clock,
        "start_time": min(starts) if starts else None,
        "end_time": max(ends) if ends else None,
        "probes": probes,
        "processes": processes,
        "combined": {
            "at": time.time(),
            "reference_part": ref_i,
            "parts": [
                {
                    "path": b.path,
                    "status": b.manifest.get("status"),
                    "host": hostinfo.hostname(b.manifest),
                    "processes": len(b.processes),
                    "start_time": b.manifest.get("start_time"),
                    "end_time": b.manifest.get("end_time"),
                    "command": b.manifest.get("command"),
                }
                for b in opened
            ],
        },
    }
    write_json_atomic(os.path.join(tmp, fmt.MANIFEST), man)
    shifts, table = hostinfo.clock_shifts(man, processes)
    names: dict[str, str] = {}
    for p in processes:
        d = hostinfo.clock_domain(p)
        if d is not None:
            names.setdefault(d, hostinfo.hostname(p) or d)
    for h in hosts:
        d = hostinfo.clock_domain(h)
        if d is not None:
            names.setdefault(d, hostinfo.hostname(h) or d)
    unaligned = sorted(
        {hostinfo.hostname(p) or "unknown" for p in processes if hostinfo.clock_domain(p) not in table["domains"]}
    )
    return {
        "parts": len(opened),
        "processes": len(processes),
        "hosts": [
            {
                "host": names.get(d, d),
                "shift_s": v["shift_ns"] / 1e9,
                "spread_s": v["spread_ns"] / 1e9,
                "reference": d == table["reference"],
            }
            for d, v in table["domains"].items()
        ],
        "unaligned": unaligned,
        "status": man["status"],
        "reasons": reasons,
    }


def summary_lines(s: dict) -> list[str]:
    rel = os.path.relpath(s["out"])
    shown = rel if not rel.startswith("..") else s["out"]
    hosts = s["hosts"]
    out = [
        f"kvprof: combined {s['parts']} part{'s' if s['parts'] != 1 else ''} into {shown} "
        f"({s['processes']} process{'es' if s['processes'] != 1 else ''}, {len(hosts)} host{'s' if len(hosts) != 1 else ''})"
    ]
    if len(hosts) > 1:
        ref = next((h["host"] for h in hosts if h["reference"]), "?")
        moved = ", ".join(f"{h['host']} {h['shift_s'] * 1e3:+.3f} ms" for h in hosts if not h["reference"])
        out.append(f"kvprof: clocks on {ref}'s timeline: {moved}")
    if s["unaligned"]:
        out.append(
            f"kvprof: warning: processes of {', '.join(s['unaligned'])} carry no clock offsets (recorded by an older kvprof): their times are taken as they are"
        )
    if s["reasons"]:
        out.append(f"kvprof: warning: the combined bundle is incomplete: {s['reasons'][0]}")
    return out
