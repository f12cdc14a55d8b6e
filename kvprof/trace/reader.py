"""Bundle reader: validates a bundle and merges its per-process streams.

Every reporter and analyzer reads through this module.  Anything that cannot
be read raises :class:`kvprof.errors.BundleError` with a one-line message.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from kvprof.errors import BundleError
from kvprof.trace import format as fmt


def _load_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise BundleError(f"{what} missing: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{what} unreadable: {path}: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{what} is not a JSON object: {path}")
    return data


def _read_records(path: str, dtype: np.dtype) -> np.ndarray:
    """Whole records of ``dtype`` from ``path``; a trailing partial record is dropped."""
    if not os.path.exists(path):
        return np.zeros(0, dtype=dtype)
    size = os.path.getsize(path)
    count = size // dtype.itemsize
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.fromfile(path, dtype=dtype, count=count)


@dataclass
class PoolInfo:
    """A block pool as declared by a probe or by kvprof.blocks.Pool."""

    index: int  # global index in the merged stream
    pid: int
    local_index: int
    name: str
    engine: str
    num_blocks: int
    block_size: int
    bytes_per_block: int | None = None
    clock: str = "monotonic"
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.pid}"


@dataclass
class BlockStream:
    """Block-pool events of the whole bundle, merged in time order (call level).

    ``ids`` holds the block ids of all events back to back; event i owns
    ``ids[offsets[i]:offsets[i+1]]``.  ``req`` indexes ``requests`` (-1: none).
    """

    t: np.ndarray
    kind: np.ndarray
    pool: np.ndarray
    req: np.ndarray
    arg: np.ndarray
    arg2: np.ndarray
    n: np.ndarray
    ids: np.ndarray
    pools: list[PoolInfo]
    requests: list[str]

    @classmethod
    def from_events(cls, events, pools: list[dict], requests: list[str] | None = None) -> "BlockStream":
        """Build a stream from ``(t, kind, pool, req, arg, arg2, ids)`` tuples (tests, simulators).

        ``pools`` are dicts with at least num_blocks and block_size; ``req`` indexes ``requests``.
        """
        infos = [
            PoolInfo(index=i, pid=0, local_index=i, name=p.get("name", f"pool{i}"), engine=p.get("engine", "custom"),
                     num_blocks=int(p["num_blocks"]), block_size=int(p["block_size"]), clock=p.get("clock", "monotonic"),
                     extra={k: v for k, v in p.items() if k not in {"name", "engine", "num_blocks", "block_size", "clock"}})
            for i, p in enumerate(pools)
        ]
        events = list(events)
        ids = [b for e in events for b in (e[6] or ())]
        col = lambda i, dt: np.array([e[i] for e in events], dtype=dt)  # noqa: E731
        nreq = max([e[3] for e in events] + [-1]) + 1
        return cls(
            t=col(0, np.int64), kind=col(1, np.uint8), pool=col(2, np.int32), req=col(3, np.int64),
            arg=col(4, np.int64), arg2=col(5, np.int64),
            n=np.array([len(e[6] or ()) for e in events], dtype=np.uint32),
            ids=np.array(ids, dtype=np.int32), pools=infos,
            requests=requests if requests is not None else [f"r{i}" for i in range(nreq)],
        )

    @property
    def offsets(self) -> np.ndarray:
        off = np.zeros(len(self.n) + 1, dtype=np.int64)
        np.cumsum(self.n, out=off[1:])
        return off

    def __len__(self) -> int:
        return len(self.t)


@dataclass
class Marks:
    t: np.ndarray
    name: np.ndarray  # index into names
    value: np.ndarray
    pid: np.ndarray
    names: list[str]

    def times_of(self, name: str) -> np.ndarray:
        if name not in self.names:
            return np.zeros(0, dtype=np.int64)
        return self.t[self.name == self.names.index(name)]


class ProcessData:
    """The streams one process wrote."""

    def __init__(self, directory: str):
        self.dir = directory
        self.info = _load_json(os.path.join(directory, fmt.PROCESS_JSON), "process record")
        self.pid = int(self.info.get("pid", -1))
        self.strings: dict[int, str] = {}
        self.pools: list[dict] = []
        self.stacks: dict[int, list] = {}  # tracemalloc stack id -> [[file, line], ...] innermost first
        self.notes: list[dict] = []
        self._read_meta()

    def _read_meta(self) -> None:
        path = os.path.join(self.dir, fmt.META_JSONL)
        if not os.path.exists(path):
            return
        with open(path, "rb") as fh:
            data = fh.read()
        cut = data.rfind(b"\n") + 1  # a partial last line is a crashed writer's: ignore it
        try:
            # one parse for the whole file: far faster than a json.loads per line
            records = json.loads(b"[" + data[:cut].rstrip(b"\n").replace(b"\n", b",") + b"]") if cut else []
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BundleError(f"corrupt side record in {path}") from None
        for rec in records:
            kind = rec.get("type") if isinstance(rec, dict) else None
            if kind == "string":
                try:
                    self.strings[int(rec["id"])] = str(rec["s"])
                except (KeyError, TypeError, ValueError):
                    raise BundleError(f"corrupt side record in {path}") from None
            elif kind == "pool":
                self.pools.append(rec)
            elif kind == "stack":
                try:
                    self.stacks[int(rec["id"])] = [(str(f), int(ln)) for f, ln in rec["frames"]]
                except (KeyError, TypeError, ValueError):
                    raise BundleError(f"corrupt stack record in {path}") from None
            else:
                self.notes.append(rec)

    def block_events(self) -> tuple[np.ndarray, np.ndarray]:
        ev = _read_records(os.path.join(self.dir, "blocks.bin"), fmt.BLOCK_EVENT_DTYPE)
        ids = _read_records(os.path.join(self.dir, "block_ids.bin"), fmt.BLOCK_ID_DTYPE)
        if len(ev):
            need = np.cumsum(ev["n"], dtype=np.int64)
            if need[-1] > len(ids):  # ids and events cut at different points
                ev = ev[: int(np.searchsorted(need, len(ids), side="right"))]
                need = need[: len(ev)]
            ids = ids[: int(need[-1]) if len(need) else 0]
        else:
            ids = ids[:0]
        return ev, ids

    def marks(self) -> np.ndarray:
        return _read_records(os.path.join(self.dir, "marks.bin"), fmt.MARK_DTYPE)

    def gc_events(self) -> np.ndarray:
        return _read_records(os.path.join(self.dir, "gc.bin"), fmt.GC_DTYPE)

    def heap_snapshots(self) -> tuple[np.ndarray, np.ndarray]:
        """tracemalloc snapshots and their site rows; rows of a snapshot lost in a crash are dropped."""
        snaps = _read_records(os.path.join(self.dir, "heap_snaps.bin"), fmt.HEAP_SNAP_DTYPE)
        sites = _read_records(os.path.join(self.dir, "heap_sites.bin"), fmt.HEAP_SITE_DTYPE)
        if len(sites) and (not len(snaps) or sites["seq"].max() > snaps["seq"].max()):
            sites = sites[np.isin(sites["seq"], snaps["seq"])]
        return snaps, sites

    def memray_file(self) -> str | None:
        """This process's memray capture (its own, or the one memray wrote after a fork)."""
        note = (self.info.get("probes") or {}).get("memray") or {}
        rel = note.get("file")
        if not rel:
            return None
        path = os.path.normpath(os.path.join(self.dir, str(rel)))
        procs = os.path.dirname(os.path.normpath(self.dir))
        if not path.startswith(procs + os.sep):  # a hostile process.json pointing out of the bundle
            return None
        return path if os.path.isfile(path) else None

    def string(self, sid: int) -> str:
        return self.strings.get(int(sid), f"#{sid}")


# manifest fields the analysis reads, with the types `kvprof record` writes
_MANIFEST_FIELDS = (
    ("processes", list, "a list"),
    ("target", dict, "an object"),
    ("command", (list, str), "a command line"),
    ("probe_status", dict, "an object"),
    ("probe_options", dict, "an object"),
    ("probe_cost", dict, "an object"),
    ("probes", (dict, list), "an object"),
)


class Bundle:
    """An opened bundle.  ``Bundle(path)`` validates it or raises BundleError."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.exists(path):
            raise BundleError(f"no such bundle: {path}")
        if not os.path.isdir(path):
            raise BundleError(f"not a kvprof bundle (not a directory): {path}")
        mpath = os.path.join(path, fmt.MANIFEST)
        if not os.path.exists(mpath):
            raise BundleError(f"not a kvprof bundle (no {fmt.MANIFEST}): {path}")
        self.manifest = _load_json(mpath, "manifest")
        if self.manifest.get("format") != fmt.FORMAT_NAME:
            raise BundleError(f"not a kvprof bundle (manifest format {self.manifest.get('format')!r}): {path}")
        version = self.manifest.get("format_version")
        if not isinstance(version, int):
            raise BundleError(f"manifest has no format_version: {path}")
        if version > fmt.FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version} is newer than this kvprof reads ({fmt.FORMAT_VERSION}): upgrade kvprof"
            )
        if version < 1:
            raise BundleError(f"bad bundle format version {version}: {path}")
        for key, kinds, what in _MANIFEST_FIELDS:
            value = self.manifest.get(key)
            if value is not None and not isinstance(value, kinds):
                raise BundleError(f"damaged manifest: '{key}' is not {what}: {path}")
        if any(not isinstance(p, dict) for p in self.manifest.get("processes") or []):
            raise BundleError(f"damaged manifest: 'processes' holds something that is not a process record: {path}")
        procs_dir = os.path.join(path, fmt.PROCS_DIR)
        self.processes: list[ProcessData] = []
        if os.path.isdir(procs_dir):
            for name in sorted(os.listdir(procs_dir)):
                d = os.path.join(procs_dir, name)
                if os.path.isdir(d) and os.path.exists(os.path.join(d, fmt.PROCESS_JSON)):
                    self.processes.append(ProcessData(d))
        self.processes.sort(key=lambda p: p.info.get("start_ns", 0))

    # -- merged streams --------------------------------------------------------------
    def block_stream(self) -> BlockStream:
        parts = []
        pools: list[PoolInfo] = []
        requests: list[str] = []
        for proc in self.processes:
            ev, ids = proc.block_events()
            local_pools = {}
            for rec in proc.pools:
                li = int(rec["pool"])
                try:
                    info = PoolInfo(
                        index=len(pools),
                        pid=proc.pid,
                        local_index=li,
                        name=str(rec.get("name", f"pool{li}")),
                        engine=str(rec.get("engine", "custom")),
                        num_blocks=int(rec["num_blocks"]),
                        block_size=int(rec["block_size"]),
                        bytes_per_block=rec.get("bytes_per_block"),
                        clock=str(rec.get("clock", "monotonic")),
                        extra={k: v for k, v in rec.items() if k not in {"type", "pool", "name", "engine", "num_blocks", "block_size", "bytes_per_block", "clock"}},
                    )
                except (KeyError, TypeError, ValueError):
                    raise BundleError(f"bad pool record in {proc.dir}: {rec!r}") from None
                local_pools[li] = info.index
                pools.append(info)
            if not len(ev):
                continue
            if not local_pools:
                raise BundleError(f"block events without a pool declaration in {proc.dir}")
            lut = np.full(max(local_pools) + 1, -1, dtype=np.int32)
            for li, gi in local_pools.items():
                lut[li] = gi
            pool_local = ev["pool"].astype(np.int64)
            if pool_local.max() >= len(lut) or (lut[pool_local] < 0).any():
                keep = np.zeros(len(ev), dtype=bool)
                ok = pool_local < len(lut)
                keep[ok] = lut[pool_local[ok]] >= 0
                # events of a pool whose declaration was lost in a crash: drop them and their ids
                starts = np.concatenate(([0], np.cumsum(ev["n"], dtype=np.int64)))
                idmask = np.repeat(keep, ev["n"].astype(np.int64))
                ev, ids, pool_local = ev[keep], ids[: starts[-1]][idmask], pool_local[keep]
            req_local = ev["req"].astype(np.int64)
            used = np.unique(req_local[req_local >= 0])
            req_lut = np.full(int(used.max()) + 1 if len(used) else 1, -1, dtype=np.int64)
            for sid in used:
                req_lut[sid] = len(requests)
                requests.append(f"{proc.pid}:{proc.string(sid)}" if len(self.processes) > 1 else proc.string(sid))
            req = np.where(req_local >= 0, req_lut[np.maximum(req_local, 0)], -1)
            parts.append((ev["t"], ev["kind"], lut[pool_local], req, ev["arg"], ev["arg2"], ev["n"], ids))
        if not parts:
            e = np.zeros(0, dtype=np.int64)
            return BlockStream(e, e.astype(np.uint8), e.astype(np.int32), e, e, e, e.astype(np.uint32), e.astype(np.int32), pools, requests)
        if len(parts) == 1 and (len(parts[0][0]) < 2 or bool((np.diff(parts[0][0]) >= 0).all())):
            t, kind, pool, req, arg, arg2, n, ids = parts[0]
            return BlockStream(t, kind, pool.astype(np.int32), req, arg, arg2, n, ids, pools, requests)
        # several processes, or threads whose timestamps interleave: merge by time (stable)
        cols = [np.concatenate([p[i] for p in parts]) for i in range(8)]
        t, kind, pool, req, arg, arg2, n, ids = cols
        order = np.argsort(t, kind="stable")
        starts = np.concatenate(([0], np.cumsum(n, dtype=np.int64)))[:-1]
        n_sorted = n[order].astype(np.int64)
        total = int(n_sorted.sum())
        # gather ids of each event in the new order
        first = np.repeat(starts[order], n_sorted)
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(n_sorted) - n_sorted, n_sorted)
        ids = ids[first + within]
        return BlockStream(t[order], kind[order], pool[order].astype(np.int32), req[order], arg[order], arg2[order], n[order], ids, pools, requests)

    def marks(self) -> Marks:
        names: list[str] = []
        index: dict[str, int] = {}
        cols = []
        for proc in self.processes:
            m = proc.marks()
            if not len(m):
                continue
            lut = {}
            for sid in np.unique(m["name"]):
                s = proc.string(sid)
                if s not in index:
                    index[s] = len(names)
                    names.append(s)
                lut[int(sid)] = index[s]
            gname = np.array([lut[int(x)] for x in m["name"]], dtype=np.int32)
            cols.append((m["t"], gname, m["value"], np.full(len(m), proc.pid, dtype=np.int64)))
        if not cols:
            e = np.zeros(0, dtype=np.int64)
            return Marks(e, e.astype(np.int32), e, e, names)
        t, name, value, pid = (np.concatenate([c[i] for c in cols]) for i in range(4))
        order = np.argsort(t, kind="stable")
        return Marks(t[order], name[order], value[order], pid[order], names)


def open_bundle(path: str) -> Bundle:
    return Bundle(path)
