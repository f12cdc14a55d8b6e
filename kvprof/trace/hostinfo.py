"""Where a process runs and how its clock relates to wall time: what lets bundles (or
processes) recorded on several hosts be put on one timeline.

Every stream's times are ``time.monotonic_ns()``, a clock private to the machine (on
Linux it counts from boot: two hosts' values have nothing in common).  Each process
records, at its start and at its end, ``wall_minus_mono_ns = time.time_ns() -
time.monotonic_ns()``; the reader adds, to the times of a host's processes, the
difference between that host's offset and the reference host's (kvprof/trace/reader.py
``clock_shifts``).  Two processes share a monotonic clock exactly when they share a
``boot_id`` (Linux's /proc/sys/kernel/random/boot_id), which is the clock's identity
here; hosts without one fall back to the hostname.

Imported by the recorded process (kvprof/trace/writer.py): stdlib only, and cheap.
"""

from __future__ import annotations

import os
import time
from typing import Any

_BOOT_ID = "/proc/sys/kernel/random/boot_id"
_cache: dict[str, str | None] = {}


def wall_minus_mono_ns() -> int:
    """``time.time_ns() - time.monotonic_ns()``, read as tightly as this process can: the
    wall clock is read between two monotonic reads, three times, and the tightest pair
    kept (a thread switch between the reads would otherwise add its length to the offset)."""
    best: tuple[int, int] | None = None
    for _ in range(3):
        m0 = time.monotonic_ns()
        w = time.time_ns()
        m1 = time.monotonic_ns()
        if best is None or m1 - m0 < best[0]:
            best = (m1 - m0, w - (m0 + m1) // 2)
    assert best is not None  # the loop ran
    return best[1]


def boot_id() -> str | None:
    if "boot_id" not in _cache:
        try:
            with open(_BOOT_ID) as fh:
                _cache["boot_id"] = fh.read().strip() or None
        except OSError:
            _cache["boot_id"] = None
    return _cache["boot_id"]


def host() -> dict[str, Any]:
    """The host of this process: hostname and the identity of its monotonic clock."""
    return {"hostname": os.uname().nodename, "boot_id": boot_id()}


def ray_worker(argv: Any) -> dict[str, str] | None:
    """A Ray worker's node and worker ids, from the command line the raylet gave it
    (``default_worker.py --node-id=... --worker-id=...``); None for other processes."""
    if not argv or not str(argv[0]).endswith(os.path.join("workers", "default_worker.py")):
        return None
    out = {"role": "worker"}
    for arg in argv[1:]:
        key, sep, value = str(arg).partition("=")
        if sep and key in ("--node-id", "--worker-id", "--node-ip-address"):
            out[key[2:].replace("-", "_")] = value
    job = os.environ.get("RAY_JOB_ID")
    if job:
        out["job_id"] = job
    return out


def process_fields(argv: Any) -> dict[str, Any]:
    """process.json's host fields for a process starting to record (its clock offset at
    the end is added when it closes)."""
    out: dict[str, Any] = {
        "host": host(),
        "clock": {"wall_minus_mono_ns": {"start": wall_minus_mono_ns(), "end": None}},
    }
    ray = ray_worker(argv)
    if ray is not None:
        out["ray"] = ray
    return out


def hostname(info: Any) -> str | None:
    """The hostname a process record or manifest names (None when it names none, or not as text)."""
    h = info.get("host") if isinstance(info, dict) else None
    v = h.get("hostname") if isinstance(h, dict) else None
    return v if isinstance(v, str) and v else None


def ray_node(info: Any) -> str | None:
    """The Ray node id a process record names."""
    r = info.get("ray") if isinstance(info, dict) else None
    v = r.get("node_id") if isinstance(r, dict) else None
    return v if isinstance(v, str) and v else None


def clock_domain(info: Any) -> str | None:
    """The identity of the monotonic clock a process (or a manifest) recorded with: its
    boot id, else its hostname; None when it says neither (kvprof before 0.2)."""
    h = info.get("host") if isinstance(info, dict) else None
    if not isinstance(h, dict):
        return None
    for key in ("boot_id", "hostname"):
        v = h.get(key)
        if isinstance(v, str) and v:
            return v
    return None


def offsets(info: Any) -> list[int]:
    """The clock offsets (wall minus monotonic, ns) a process or manifest recorded."""
    clock = info.get("clock") if isinstance(info, dict) else None
    w = clock.get("wall_minus_mono_ns") if isinstance(clock, dict) else None
    if not isinstance(w, dict):
        return []
    # a bundle is untrusted input: an offset no clock gives (beyond +-2**62 ns, 146 years) is left out
    return [
        int(v)
        for v in (w.get("start"), w.get("end"))
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) < 1 << 62
    ]


def median_offsets(sources: Any) -> dict[str, dict[str, int]]:
    """Per clock domain, the median of the offsets its processes and manifests recorded,
    and their spread (max - min: a wall clock stepped during the run, or reads far apart)."""
    samples: dict[str, list[int]] = {}
    for info in sources:
        d = clock_domain(info)
        if d is not None:
            samples.setdefault(d, []).extend(offsets(info))
    out: dict[str, dict[str, int]] = {}
    for d, values in samples.items():
        if values:
            values.sort()
            out[d] = {
                "offset_ns": values[len(values) // 2],
                "spread_ns": values[-1] - values[0],
                "samples": len(values),
            }
    return out


def clock_shifts(manifest: dict[str, Any], infos: list[Any]) -> tuple[list[int], dict[str, Any]]:
    """Per process (``infos``: their process.json), the ns to add to its monotonic times to
    put them on the bundle's timeline: the monotonic clock of the reference host (the
    manifest's ``clock.reference``, else its own host's), so a bundle of one host is read
    as recorded.  A process of another host moves by the difference of the two hosts'
    offsets to wall time; one whose host or offsets are unknown stays where it is.
    Returns the shifts and a summary (reference, and per domain its offset, shift, spread)."""
    clock: Any = manifest.get("clock") if isinstance(manifest.get("clock"), dict) else {}
    hosts: Any = clock.get("hosts") if isinstance(clock.get("hosts"), list) else []
    hosts = [h for h in hosts if isinstance(h, dict)]  # a combined bundle's parts
    table = median_offsets([manifest, *hosts, *infos])
    ref = clock.get("reference") if isinstance(clock.get("reference"), str) else clock_domain(manifest)
    if ref not in table:
        ref = next((clock_domain(i) for i in infos if clock_domain(i) in table), None)
    shifts = []
    for info in infos:
        d = clock_domain(info)
        shifts.append(
            table[d]["offset_ns"] - table[ref]["offset_ns"] if d in table and ref in table and d != ref else 0
        )
    summary = {
        "reference": ref,
        "domains": {
            d: {**v, "shift_ns": v["offset_ns"] - table[ref]["offset_ns"] if ref in table else 0}
            for d, v in table.items()
        },
    }
    return shifts, summary


def node_keys(infos: list[Any]) -> list[tuple[str | None, str | None]]:
    """Per process, (node key, node name): its Ray node when it was a Ray process, else its
    host; a host with a single Ray node counts as that node.  Names are hostnames, with the
    start of the Ray node id when several nodes share one (Ray's local test clusters)."""
    ray_nodes_of: dict[str | None, set[str | None]] = {}
    for info in infos:
        if ray_node(info):
            ray_nodes_of.setdefault(clock_domain(info), set()).add(ray_node(info))
    keys = []
    for info in infos:
        node = ray_node(info)
        if node is None and len(ray_nodes_of.get(clock_domain(info), ())) == 1:
            node = next(iter(ray_nodes_of[clock_domain(info)]))
        keys.append(node or clock_domain(info))
    hosts: dict[str | None, str | None] = {}  # key -> hostname
    for key, info in zip(keys, infos):
        if key is not None and hostname(info):
            hosts.setdefault(key, hostname(info))
    ray_keys = set().union(*ray_nodes_of.values()) if ray_nodes_of else set()
    shared = {h for h in hosts.values() if list(hosts.values()).count(h) > 1}
    names: dict[str | None, str] = {}
    for key in dict.fromkeys(k for k in keys if k is not None):
        h = (hosts.get(key) or str(key)[:12]).split(".")[0]
        names[key] = f"{h}/{key[:6]}" if key in ray_keys and hosts.get(key) in shared else h
    return [(k, names.get(k)) for k in keys]
