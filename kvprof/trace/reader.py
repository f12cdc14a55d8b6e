"""Bundle reader: validates a bundle and reads its per-process streams in bounded pieces.

Every reporter and analyzer reads through this module.  Anything that cannot be read
raises :class:`kvprof.errors.BundleError` with a one-line message; damage the reader can
step over (a torn last chunk, a record that makes no sense) is skipped and said in
``Bundle.notes``.  Nothing here reads a whole stream into memory: block events come
out as :class:`kvprof.trace.chunks.BlockChunk` pieces merged over processes in time
order (``Bundle.block_chunks``); the small streams (markers, GC pauses, heap
snapshots) are kept per process as they go by.  Formats 1 and 2: docs/trace-format.md.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from kvprof.errors import BundleError
from kvprof.trace import codec, stage
from kvprof.trace import format as fmt
from kvprof.trace.chunks import BlockChunk

_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_JSON_BYTES = 64 << 20  # manifest.json, process.json
MAX_META_BYTES = 1 << 31  # meta.jsonl (interned strings: grows with requests)
META_READ = 8 << 20  # meta.jsonl is parsed this many bytes at a time
V1_PIECE = 1 << 18  # version-1 block events read at a time
MAX_POOL_BLOCKS = 1 << 26  # per-block state of bigger pools would not fit in memory
MAX_BLOCK_SIZE = 1 << 24
MAX_IDS_PER_EVENT = 1 << 26
MAX_PROCESSES = 100_000
T = TypeVar("T")
KNOWN_KINDS = np.zeros(256, dtype=bool)
KNOWN_KINDS[[v for k, v in vars(fmt.EventKind).items() if not k.startswith("_")]] = True


def clean_str(value: Any) -> str:
    """A string from a trace as text every writer can encode: lone surrogates (a
    non-UTF-8 argv or marker name) become U+FFFD."""
    s = value if isinstance(value, str) else str(value)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", s)


def _regular_file(path: str, what: str, limit: int) -> int:
    """Size of ``path`` if it is a regular file within ``limit`` bytes (a FIFO or a device in
    its place would hang the reader or never end)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BundleError(f"{what} missing: {path}") from None
    except OSError as exc:
        raise BundleError(f"{what} unreadable: {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{what} is not a regular file: {path}")
    if st.st_size > limit:
        raise BundleError(f"{what} is {st.st_size:,} bytes, more than a kvprof bundle ever holds ({limit:,}): {path}")
    return st.st_size


def load_json_file(path: str, what: str, limit: int = MAX_JSON_BYTES) -> Any:
    _regular_file(path, what, limit)
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read(limit + 1))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise BundleError(f"{what} unreadable: {path}: {exc}") from None
    except RecursionError:
        raise BundleError(f"{what} is nested too deeply to be one kvprof writes: {path}") from None
    except MemoryError:
        raise BundleError(f"{what} is too large to read: {path}") from None
    return data


def _load_json(path: str, what: str) -> dict[str, Any]:
    data = load_json_file(path, what)
    if not isinstance(data, dict):
        raise BundleError(f"{what} is not a JSON object: {path}")
    return data


def probe_map(value: Any) -> dict[str, Any]:
    """A process's probe notes as the analysis reads them: name -> dict (a note of another
    shape, from a damaged or foreign record, becomes {"status": its text})."""
    if not isinstance(value, dict):
        return {}
    return {clean_str(k): (v if isinstance(v, dict) else {"status": clean_str(v)}) for k, v in value.items()}


def _int(value: Any, lo: int, hi: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float):
        if not value.is_integer():
            return None
        value = int(value)
    return value if lo <= value <= hi else None


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
    extra: dict[str, Any] = field(default_factory=dict)
    node: str | None = None  # the node (host) of its process, in a bundle that spans several

    @property
    def label(self) -> str:
        return f"{self.name}@{self.node}:{self.pid}" if self.node else f"{self.name}@{self.pid}"


def pool_from_record(rec: dict[str, Any], index: int, pid: int, where: str) -> PoolInfo:
    """A pool declaration checked field by field (a bundle is untrusted input)."""
    li = _int(rec.get("pool"), 0, (1 << 16) - 1)
    nb = _int(rec.get("num_blocks"), 1, MAX_POOL_BLOCKS)
    bs = _int(rec.get("block_size"), 1, MAX_BLOCK_SIZE)
    if li is None:
        raise BundleError(f"bad pool record in {where}: 'pool' is not a pool index")
    if nb is None:
        raise BundleError(
            f"bad pool record in {where}: num_blocks {rec.get('num_blocks')!r} is not a pool size kvprof can analyse (1 to {MAX_POOL_BLOCKS:,})"
        )
    if bs is None:
        raise BundleError(
            f"bad pool record in {where}: block_size {rec.get('block_size')!r} is not a positive block size"
        )
    bpb = rec.get("bytes_per_block")
    bpb = _int(bpb, 1, 1 << 50) if bpb is not None else None
    skip = {"type", "pool", "name", "engine", "num_blocks", "block_size", "bytes_per_block", "clock"}
    return PoolInfo(
        index=index,
        pid=pid,
        local_index=li,
        name=clean_str(rec.get("name", f"pool{li}")),
        engine=clean_str(rec.get("engine", "custom")),
        num_blocks=nb,
        block_size=bs,
        bytes_per_block=bpb,
        clock=clean_str(rec.get("clock", "monotonic")),
        extra={k: v for k, v in rec.items() if k not in skip},
    )


@dataclass
class BlockStream:
    """Block-pool events of the whole bundle, merged in time order (call level), in memory.
    For tests and small inputs; the analysis reads ``Bundle.block_chunks`` instead.

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
    def from_events(
        cls, events: Iterable[Any], pools: list[dict[str, Any]], requests: list[str] | None = None
    ) -> BlockStream:
        """Build a stream from ``(t, kind, pool, req, arg, arg2, ids)`` tuples (tests, simulators).

        ``pools`` are dicts with at least num_blocks and block_size; ``req`` indexes ``requests``.
        """
        infos = [
            PoolInfo(
                index=i,
                pid=0,
                local_index=i,
                name=p.get("name", f"pool{i}"),
                engine=p.get("engine", "custom"),
                num_blocks=int(p["num_blocks"]),
                block_size=int(p["block_size"]),
                clock=p.get("clock", "monotonic"),
                extra={k: v for k, v in p.items() if k not in {"name", "engine", "num_blocks", "block_size", "clock"}},
            )
            for i, p in enumerate(pools)
        ]
        events = list(events)
        ids = [b for e in events for b in (e[6] or ())]

        def col(i: int, dt: Any) -> np.ndarray:
            return np.array([e[i] for e in events], dtype=dt)

        nreq = max([e[3] for e in events] + [-1]) + 1
        return cls(
            t=col(0, np.int64),
            kind=col(1, np.uint8),
            pool=col(2, np.int32),
            req=col(3, np.int64),
            arg=col(4, np.int64),
            arg2=col(5, np.int64),
            n=np.array([len(e[6] or ()) for e in events], dtype=np.uint32),
            ids=np.array(ids, dtype=np.int32),
            pools=infos,
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
        out: np.ndarray = self.t[self.name == self.names.index(name)]
        return out


class ProcessData:
    """The streams one process wrote."""

    def __init__(self, directory: str, bundle: Bundle | None = None):
        self.dir = directory
        self.bundle = bundle
        self.info = _load_json(os.path.join(directory, fmt.PROCESS_JSON), "process record")
        pid = _int(self.info.get("pid"), -1, (1 << 31) - 1)
        self.pid = -1 if pid is None else pid
        start = _int(self.info.get("start_ns"), 0, (1 << 63) - 1)
        self.start_ns = 0 if start is None else start
        self.info["probes"] = probe_map(self.info.get("probes"))
        if not isinstance(self.info.get("errors"), list):
            self.info["errors"] = [str(self.info["errors"])] if self.info.get("errors") is not None else []
        if "role" in self.info:
            self.info["role"] = clean_str(self.info["role"])
        self.strings: dict[int, str] = {}
        self.pools: list[dict[str, Any]] = []
        self.stacks: dict[
            int, list[tuple[str, int]]
        ] = {}  # tracemalloc stack id -> [[file, line], ...] innermost first
        self.notes: list[dict[str, Any]] = []
        self.damage: list[str] = []  # what the reader stepped over
        names = set(os.listdir(directory))
        self.version = (
            2
            if (
                stage.CHUNKS in names
                or any(n.startswith(stage.STAGE_PREFIX) for n in names)
                or self.info.get("format") == stage.PROCESS_FORMAT  # its files lost: read as the empty format 2 it was
            )
            else 1
        )
        self._small: dict[str, Any] | None = None  # markers, gc pauses, heap snapshots, once a pass has read them
        self.clock_shift = 0  # ns added to its monotonic times (set_clock_shift)
        self.node: tuple[str | None, str | None] = (None, None)  # (node key, node name) in a bundle of several nodes
        self._read_meta()

    # -- side records -------------------------------------------------------------------
    def _read_meta(self) -> None:
        path = os.path.join(self.dir, fmt.META_JSONL)
        if not os.path.exists(path):
            return
        _regular_file(path, "side records (meta.jsonl)", MAX_META_BYTES)
        with open(path, "rb") as fh:
            rest = b""
            while True:
                data = fh.read(META_READ)
                if not data:
                    break
                data = rest + data
                cut = data.rfind(b"\n") + 1
                rest = data[cut:]
                if cut:
                    self._parse_meta(data[:cut], path)
        # a partial last line is a crashed writer's: ignored

    def _parse_meta(self, data: bytes, path: str) -> None:
        try:
            # one parse per block of lines: far faster than a json.loads per line
            records = json.loads(b"[" + data.rstrip(b"\n").replace(b"\n", b",") + b"]")
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            records = self._parse_meta_lines(data, path)
        except RecursionError:
            raise BundleError(f"side record nested too deeply in {path}") from None
        for rec in records:
            kind = rec.get("type") if isinstance(rec, dict) else None
            if kind == "string":
                sid = _int(rec.get("id"), 0, (1 << 31) - 1)
                if sid is None or "s" not in rec:
                    raise BundleError(f"corrupt side record in {path}: string {rec!r:.80}")
                self.strings[sid] = clean_str(rec["s"])
            elif kind == "pool":
                self.pools.append(rec)
            elif kind == "stack":
                sid = _int(rec.get("id"), 0, (1 << 31) - 1)
                frames = rec.get("frames")
                try:
                    if sid is None or not isinstance(frames, list):
                        raise TypeError
                    self.stacks[sid] = [(clean_str(f), int(ln)) for f, ln in frames]
                except (KeyError, TypeError, ValueError):
                    raise BundleError(f"corrupt stack record in {path}") from None
            elif isinstance(rec, dict):
                self.notes.append(rec)

    def _parse_meta_lines(self, data: bytes, path: str) -> list[Any]:
        """Line by line, for a block the one-parse path refused: a damaged line is skipped
        and said (one line of garbage must not cost the whole process's strings)."""
        out = []
        bad = 0
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                bad += 1
            except RecursionError:
                raise BundleError(f"side record nested too deeply in {path}") from None
        if bad:
            self.damage.append(f"{bad} damaged side record line(s) skipped in {os.path.basename(self.dir)}/meta.jsonl")
        return out

    def string(self, sid: int) -> str:
        return self.strings.get(int(sid), f"#{sid}")

    def memray_file(self) -> str | None:
        """This process's memray capture (its own, or the one memray wrote after a fork)."""
        note = (self.info.get("probes") or {}).get("memray") or {}
        rel = note.get("file") if isinstance(note, dict) else None
        if not rel or not isinstance(rel, str):
            return None
        path = os.path.normpath(os.path.join(self.dir, rel))
        procs = os.path.dirname(os.path.normpath(self.dir))
        if not path.startswith(procs + os.sep):  # a hostile process.json pointing out of the bundle
            return None
        return path if os.path.isfile(path) else None

    # -- version 2: staging records ------------------------------------------------------
    def pieces(self, want: int = 0) -> Iterator[np.ndarray]:
        """Staging records (N, 48) in the order they were written: segment by segment, from
        the chunk log where a segment was compressed, else from its staging file (a process
        that died, or a rotation a signal interrupted, leaves some behind).  ``want``: a tag
        bitmask; chunks without any of those tags are skipped unread (0: all)."""
        sources: dict[int, list[Any]] = {}  # segment number -> [chunk (offset, header) or None, staging file or None]
        path = os.path.join(self.dir, stage.CHUNKS)
        if os.path.exists(path):
            for off, head in self._chunk_index(path, want):
                entry = sources.setdefault(head.seg_seq, [None, None])
                if entry[0] is None:  # a segment compressed twice (a retried write): the first one
                    entry[0] = (off, head)
        for name in os.listdir(self.dir):
            if name.startswith(stage.STAGE_PREFIX) and name.endswith(stage.STAGE_SUFFIX):
                try:
                    seq = int(name[len(stage.STAGE_PREFIX) : -len(stage.STAGE_SUFFIX)])
                except ValueError:
                    continue
                sources.setdefault(seq, [None, None])[1] = name
        fh = open(path, "rb") if os.path.exists(path) else None
        try:
            for seq in sorted(sources):
                chunk, name = sources[seq]
                covered = 0
                if chunk is not None:
                    off, head = chunk
                    covered = head.seg_count
                    if not want or head.tags & want:
                        assert fh is not None  # a chunk was indexed: the chunk log is there
                        fh.seek(off + stage.HEADER_SIZE)
                        try:
                            recs = codec.decode_chunk(head, fh.read(head.comp_len))
                        except stage.ChunkError as exc:
                            self.damage.append(
                                f"{os.path.basename(self.dir)}/{stage.CHUNKS}: the chunk at byte {off:,} is damaged ({exc}): "
                                f"its {head.nrec:,} records are not read"
                            )
                            covered = 0
                        else:
                            valid = codec.valid_records(recs)
                            if len(valid) < len(recs):
                                self.damage.append(
                                    f"{len(recs) - len(valid)} damaged records skipped in {os.path.basename(self.dir)}/{stage.CHUNKS}"
                                )
                            if len(valid):
                                yield valid
                if name is not None:
                    staged = self._stage_file(name)
                    if staged is not None and len(staged) > covered:
                        yield staged[covered:]
        finally:
            if fh is not None:
                fh.close()

    def _stage_file(self, name: str) -> np.ndarray | None:
        p = os.path.join(self.dir, name)
        try:
            size = _regular_file(p, "staging segment", 1 << 30)
        except BundleError as exc:
            self.damage.append(str(exc))
            return None
        if not size:
            return None
        with open(p, "rb") as fh:
            return codec.valid_records(fh.read())

    def _chunk_index(self, path: str, want: int) -> Iterator[tuple[int, stage.ChunkHeader]]:
        """(offset, header) of every staging-record chunk of the chunk log, read header by
        header; heap-site chunks are decoded on the way (when wanted).  A damaged header or
        a chunk cut short ends the log (said)."""
        size = _regular_file(path, "chunk log (events.kvc)", 1 << 62)
        pos = 0
        with open(path, "rb") as fh:
            while pos < size:
                fh.seek(pos)
                try:
                    head = stage.ChunkHeader(fh.read(stage.HEADER_SIZE))
                except stage.ChunkError as exc:
                    self._chunk_damage(exc, pos, size)
                    return
                if pos + stage.HEADER_SIZE + head.comp_len > size:
                    self._chunk_damage("cut short", pos, size)
                    return
                if head.payload == stage.PAYLOAD_HEAP_SITES:
                    if not want or want >> stage.TAG_HEAP_A & 1:
                        try:
                            self._sites.append(codec.decode_chunk(head, fh.read(head.comp_len)))
                        except stage.ChunkError as exc:
                            self._chunk_damage(exc, pos, size)
                            return
                elif head.seg_seq >= 0:
                    yield pos, head
                pos += stage.HEADER_SIZE + head.comp_len

    def _chunk_damage(self, why: object, pos: int, size: int) -> None:
        self.damage.append(
            f"{os.path.basename(self.dir)}/{stage.CHUNKS} damaged at byte {pos:,} ({why}): "
            f"the {size - pos:,} bytes after it are not read"
        )

    # -- clocks: a bundle of several hosts (kvprof/trace/hostinfo.py) -------------------------
    def set_clock_shift(self, ns: int) -> None:
        """Put this process's monotonic times on the bundle's timeline (ns added to each);
        events of pools on a simulated clock stay on it.  Before anything is read."""
        self.clock_shift = int(ns)
        if not ns:
            return
        self._life = (self.start_ns, _int(self.info.get("end_ns"), 0, (1 << 63) - 1))  # on its own clock
        self.start_ns += ns
        for key in ("start_ns", "end_ns"):
            if _int(self.info.get(key), 0, (1 << 63) - 1) is not None:
                self.info[key] += ns
        for rec in [*self.notes, *self.pools]:
            if _int(rec.get("t"), 0, (1 << 63) - 1) is not None and not (
                rec.get("type") == "pool" and rec.get("clock") == "simulated"
            ):
                rec["t"] += ns

    def _simulated_pools(self) -> list[int]:
        return [
            int(p["pool"])
            for p in self.pools
            if p.get("clock") == "simulated" and _int(p.get("pool"), 0, 1 << 16) is not None
        ]

    def _shift_rows(self, rows: np.ndarray) -> np.ndarray:
        rows = rows.copy()
        sim = self._simulated_pools()
        if sim:
            rows["t"][~np.isin(rows["pool"], sim)] += self.clock_shift
        else:
            rows["t"] += self.clock_shift
        return rows

    def _shift_small(self) -> None:
        if not self.clock_shift:
            return
        small = self._small
        assert small is not None  # read before it is shifted
        marks = small["marks"].copy()
        if (
            self._simulated_pools()
        ):  # markers of a simulated pool (Pool.mark) are on its clock: those outside the process's life stay
            lo, hi = self._life
            marks["t"][(marks["t"] >= lo) & (marks["t"] <= (hi if hi is not None else np.iinfo(np.int64).max))] += (
                self.clock_shift
            )
        else:
            marks["t"] += self.clock_shift
        gc, (snaps, sites) = small["gc"].copy(), small["heap"]
        gc["t"] += self.clock_shift
        snaps = snaps.copy()
        snaps["t"] += self.clock_shift
        self._small = {"marks": marks, "gc": gc, "heap": (snaps, sites)}

    # -- block events -------------------------------------------------------------------------
    def block_pieces(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows of BLOCK_EVENT_DTYPE, ids) in the order written, bounded pieces, on the
        bundle's timeline; the small streams seen on the way are kept (version 2
        interleaves them with block events)."""
        for rows, ids in self._block_pieces():
            yield (self._shift_rows(rows) if self.clock_shift else rows), ids

    def _block_pieces(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.version == 1:
            yield from self._v1_block_pieces()
            self._small_v1()
            return
        small: dict[str, list[np.ndarray]] = {"marks": [], "gc": [], "heap": []}
        self._sites: list[np.ndarray] = []
        for recs in self.pieces():
            parts = codec.split_records(recs)
            for tag, key in ((stage.TAG_MARK, "marks"), (stage.TAG_GC, "gc"), (stage.TAG_HEAP_A, "heap")):
                if tag in parts:
                    small[key].append(parts[tag][0])
            if stage.TAG_STRING in parts:  # request ids, interned in the stream
                for sid, text in parts[stage.TAG_STRING][0].items():
                    self.strings.setdefault(sid, clean_str(text))
            if stage.TAG_BLOCK in parts:
                rows, ids = parts[stage.TAG_BLOCK]
                assert ids is not None  # split_records gives block rows their ids
                yield self._checked(rows, ids)
        self._finish_small(small)

    def _checked(self, rows: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Events of kinds kvprof does not know are dropped (with their ids) and said."""
        bad = ~KNOWN_KINDS[rows["kind"]]
        if bad.any():
            self.damage.append(
                f"{int(bad.sum())} block events of unknown kinds skipped in {os.path.basename(self.dir)}"
            )
            keep = ~bad
            ids = ids[np.repeat(keep, rows["n"].astype(np.int64))]
            rows = rows[keep]
        return rows, ids

    def _v1_block_pieces(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        ev_path = os.path.join(self.dir, "blocks.bin")
        id_path = os.path.join(self.dir, "block_ids.bin")
        if not os.path.exists(ev_path):
            return
        ev_size = _regular_file(ev_path, "block events (blocks.bin)", 1 << 62)
        id_size = _regular_file(id_path, "block ids (block_ids.bin)", 1 << 62) if os.path.exists(id_path) else 0
        dt = fmt.BLOCK_EVENT_DTYPE
        count = ev_size // dt.itemsize
        id_count = id_size // 4
        id_pos = 0
        with open(ev_path, "rb") as fe, open(id_path, "rb") if id_size else open(os.devnull, "rb") as fi:
            for start in range(0, count, V1_PIECE):
                rows = np.frombuffer(fe.read(min(V1_PIECE, count - start) * dt.itemsize), dtype=dt)
                bad = ~KNOWN_KINDS[rows["kind"]]
                if bad.any():  # no writer writes such a record: the file is damaged from here
                    cut = int(np.flatnonzero(bad)[0])
                    self.damage.append(
                        f"{os.path.basename(self.dir)}/blocks.bin damaged at event {start + cut:,} "
                        f"(kind {int(rows['kind'][cut])}): the {count - start - cut:,} events from there are not read"
                    )
                    rows = rows[:cut]
                    count = start + cut
                n = rows["n"].astype(np.int64)
                if (n > MAX_IDS_PER_EVENT).any():
                    cut = int(np.flatnonzero(n > MAX_IDS_PER_EVENT)[0])
                    self.damage.append(
                        f"{os.path.basename(self.dir)}/blocks.bin damaged at event {start + cut:,} "
                        f"(claims {int(n[cut]):,} block ids): the {count - start - cut:,} events from there are not read"
                    )
                    rows, n = rows[:cut], n[:cut]
                    count = start + cut
                need = np.cumsum(n)
                have = id_count - id_pos
                if len(need) and need[-1] > have:  # ids and events cut at different points (a crash)
                    keep = int(np.searchsorted(need, have, side="right"))
                    rows, need = rows[:keep], need[:keep]
                    count = start + keep
                total = int(need[-1]) if len(need) else 0
                ids = (
                    np.frombuffer(fi.read(total * 4), dtype=fmt.BLOCK_ID_DTYPE)
                    if total
                    else np.zeros(0, dtype=fmt.BLOCK_ID_DTYPE)
                )
                id_pos += total
                if len(rows):
                    yield self._checked(rows, ids)
                if start + len(rows) >= count:
                    break

    def v1_sorted(self) -> bool:
        """Whether a version-1 process's block events are in time order (the lazy batches
        of kvprof's first vLLM adapter were not): the time column, read in pieces, up to
        the first record that cannot be one (where the reader stops too)."""
        path = os.path.join(self.dir, "blocks.bin")
        if self.version != 1 or not os.path.exists(path):
            return True
        dt = fmt.BLOCK_EVENT_DTYPE
        last = None
        with open(path, "rb") as fh:
            while True:
                data = fh.read(V1_PIECE * dt.itemsize)
                rows = np.frombuffer(data, dtype=dt, count=len(data) // dt.itemsize)
                bad = ~KNOWN_KINDS[rows["kind"]]
                if bad.any():
                    rows = rows[: int(np.flatnonzero(bad)[0])]
                t = rows["t"]
                if (len(t) > 1 and (np.diff(t) < 0).any()) or (last is not None and len(t) and t[0] < last):
                    return False
                if len(t):
                    last = t[-1]
                if bad.any() or len(rows) < V1_PIECE:
                    return True

    # -- small streams ---------------------------------------------------------------------------
    def _finish_small(self, small: dict[str, list[np.ndarray]]) -> None:
        def cat(parts: list[np.ndarray], dt: Any) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, dtype=dt)

        snaps = cat(small["heap"], fmt.HEAP_SNAP_DTYPE)
        sites = cat(self._sites, fmt.HEAP_SITE_DTYPE)
        self._sites = []
        if len(sites) and (not len(snaps) or sites["seq"].max() > snaps["seq"].max()):
            sites = sites[np.isin(sites["seq"], snaps["seq"])]  # rows of a snapshot lost in a crash
        self._small = {
            "marks": cat(small["marks"], fmt.MARK_DTYPE),
            "gc": cat(small["gc"], fmt.GC_DTYPE),
            "heap": (snaps, sites),
        }
        self._shift_small()

    def _small_v1(self) -> None:
        if self._small is not None:
            return

        def rd(name: str, dt: Any) -> np.ndarray:
            return _read_all(os.path.join(self.dir, name), dt)

        snaps = rd("heap_snaps.bin", fmt.HEAP_SNAP_DTYPE)
        sites = rd("heap_sites.bin", fmt.HEAP_SITE_DTYPE)
        if len(sites) and (not len(snaps) or sites["seq"].max() > snaps["seq"].max()):
            sites = sites[np.isin(sites["seq"], snaps["seq"])]
        self._small = {
            "marks": rd("marks.bin", fmt.MARK_DTYPE),
            "gc": rd("gc.bin", fmt.GC_DTYPE),
            "heap": (snaps, sites),
        }
        self._shift_small()

    def _load_small(self) -> dict[str, Any]:
        if self._small is None:
            if self.version == 1:
                self._small_v1()
            else:
                small: dict[str, list[np.ndarray]] = {"marks": [], "gc": [], "heap": []}
                self._sites = []
                want = 1 << stage.TAG_MARK | 1 << stage.TAG_GC | 1 << stage.TAG_HEAP_A
                for recs in self.pieces(want):
                    parts = codec.split_records(recs)
                    for tag, key in ((stage.TAG_MARK, "marks"), (stage.TAG_GC, "gc"), (stage.TAG_HEAP_A, "heap")):
                        if tag in parts:
                            small[key].append(parts[tag][0])
                self._finish_small(small)
        assert self._small is not None  # read just above
        return self._small

    def marks(self) -> np.ndarray:
        out: np.ndarray = self._load_small()["marks"]
        return out

    def gc_events(self) -> np.ndarray:
        out: np.ndarray = self._load_small()["gc"]
        return out

    def heap_snapshots(self) -> tuple[np.ndarray, np.ndarray]:
        """tracemalloc snapshots and their site rows; rows of a snapshot lost in a crash are dropped."""
        out: tuple[np.ndarray, np.ndarray] = self._load_small()["heap"]
        return out

    def expected_events(self) -> int:
        """Block events this process wrote, as far as it can be told without reading them (for
        a progress bar): its own count at exit, else the records its files hold."""
        counted = self.counted_blocks()
        if counted is not None:
            return counted
        if self.version == 1:
            path = os.path.join(self.dir, "blocks.bin")
            return os.path.getsize(path) // fmt.BLOCK_EVENT_DTYPE.itemsize if os.path.isfile(path) else 0
        total = 0
        for name in os.listdir(self.dir):
            p = os.path.join(self.dir, name)
            if name.startswith(stage.STAGE_PREFIX) and os.path.isfile(p):
                total += os.path.getsize(p) // stage.RECORD // 2  # segments are reserved ahead: about half full
            elif name == stage.CHUNKS and os.path.isfile(p):
                total += os.path.getsize(p) // 4  # about 4 bytes per event compressed
        return total

    def counted_blocks(self) -> int | None:
        """The block events this process counted at exit (its process.json), if it got there."""
        counts = self.info.get("counts")
        return _int(counts.get("blocks"), 0, 1 << 62) if isinstance(counts, dict) else None

    def counts(self) -> dict[str, int]:
        """Records per stream, counted from what is on disk."""
        out = {"blocks": 0, "block_ids": 0}
        for rows, ids in self.block_pieces():
            out["blocks"] += len(rows)
            out["block_ids"] += len(ids)
        small = self._load_small()
        out.update(
            marks=len(small["marks"]),
            gc=len(small["gc"]),
            heap_snaps=len(small["heap"][0]),
            heap_sites=len(small["heap"][1]),
        )
        return out


def _read_all(path: str, dtype: np.dtype[Any]) -> np.ndarray:
    """Whole records of ``dtype`` from a version-1 file; a trailing partial record is dropped."""
    if not os.path.exists(path):
        return np.zeros(0, dtype=dtype)
    size = _regular_file(path, os.path.basename(path), 1 << 34)
    count = size // dtype.itemsize
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.fromfile(path, dtype=dtype, count=count)


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

    # set by the analysis (kvprof/analysis/run.py analyze_bundle) for the sections it runs
    block_pass: Any  # kvprof.analysis.engine.BlockPass
    pool_steps: dict[int, int]

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
            raise BundleError(
                f"not a kvprof bundle (manifest format {clean_str(self.manifest.get('format'))!r:.60}): {path}"
            )
        version = self.manifest.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise BundleError(f"manifest has no format_version: {path}")
        if version > fmt.FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version} is newer than this kvprof reads ({fmt.FORMAT_VERSION}): upgrade kvprof"
            )
        if version < 1:
            raise BundleError(f"bad bundle format version {version}: {path}")
        self.format_version = version
        for key, kinds, what in _MANIFEST_FIELDS:
            value = self.manifest.get(key)
            if value is not None and not isinstance(value, kinds):
                raise BundleError(f"damaged manifest: '{key}' is not {what}: {path}")
        if any(not isinstance(p, dict) for p in self.manifest.get("processes") or []):
            raise BundleError(f"damaged manifest: 'processes' holds something that is not a process record: {path}")
        for p in self.manifest.get("processes") or []:
            p["probes"] = probe_map(p.get("probes"))
        procs_dir = os.path.join(path, fmt.PROCS_DIR)
        self.processes: list[ProcessData] = []
        if os.path.isdir(procs_dir):
            names = sorted(os.listdir(procs_dir))
            if len(names) > MAX_PROCESSES:
                raise BundleError(
                    f"{len(names):,} process directories: more than kvprof reads ({MAX_PROCESSES:,}): {path}"
                )
            for name in names:
                d = os.path.join(procs_dir, name)
                if os.path.isdir(d) and not os.path.islink(d) and os.path.exists(os.path.join(d, fmt.PROCESS_JSON)):
                    self.processes.append(ProcessData(d, self))
        self.clock = align_clocks(self.manifest, self.processes)
        self.processes.sort(key=lambda p: p.start_ns)
        self.notes: list[str] = []
        self._declare_pools()

    def _declare_pools(self) -> None:
        self.pools: list[PoolInfo] = []
        self._pool_lut: list[np.ndarray] = []  # per process: local pool index -> global (-1 undeclared)
        # request keys: numbered in the order requests first appear, bundle-wide (dense, so the
        # analysis can keep per-request state in arrays whatever ids a stream holds)
        self._req_keys: dict[int, int] = {}  # (process << 32 | string id) -> key
        self._key_of: list[tuple[int, int]] = []  # key -> (process, string id)
        for proc in self.processes:
            local: dict[int, int] = {}
            for rec in proc.pools:
                info = pool_from_record(rec, len(self.pools), proc.pid, proc.dir)
                info.node = proc.node[1]
                if info.local_index in local:
                    raise BundleError(f"bad pool record in {proc.dir}: pool {info.local_index} declared twice")
                local[info.local_index] = info.index
                self.pools.append(info)
            lut = np.full(max(local) + 1 if local else 1, -1, dtype=np.int32)
            for li, gi in local.items():
                lut[li] = gi
            self._pool_lut.append(lut)

    @property
    def request_keys(self) -> int:
        return len(self._key_of)

    def _request_keys(self, ids: np.ndarray) -> np.ndarray:
        """Dense keys of (process << 32 | string id) request ids (-1 stays -1), new ones
        numbered on in the order they come: called on the merged stream, so the numbering is
        the same every time."""
        out = np.full(len(ids), -1, dtype=np.int64)
        ok = ids >= 0
        if not ok.any():
            return out
        u, first, inv = np.unique(ids[ok], return_index=True, return_inverse=True)
        known = self._req_keys
        keys = np.empty(len(u), dtype=np.int64)
        for j in np.argsort(first, kind="stable").tolist():  # first come, first numbered
            c = int(u[j])
            k = known.get(c)
            if k is None:
                k = known[c] = len(self._key_of)
                self._key_of.append((c >> 32, c & 0xFFFFFFFF))
            keys[j] = k
        out[ok] = keys[inv]
        return out

    def request_name(self, key: int) -> str:
        """The request id a request key stands for ("pid:id" when several processes recorded)."""
        if key < 0 or key >= len(self._key_of):
            return ""
        i, sid = self._key_of[key]
        proc = self.processes[i]
        name = proc.string(sid)
        return f"{proc.pid}:{name}" if len(self.processes) > 1 else name

    # -- block events ---------------------------------------------------------------------------
    def _process_chunks(self, i: int) -> Iterator[BlockChunk]:
        """One process's block events as BlockChunks (global pools, request keys), in the
        order written; the next piece is read and decompressed by a helper thread while
        this one is analysed (zlib and numpy let go of the GIL)."""
        return _prefetched(self._process_chunks_now(i))

    def _process_chunks_now(self, i: int) -> Iterator[BlockChunk]:
        proc = self.processes[i]
        lut = self._pool_lut[i]
        if proc.version == 1 and not proc.v1_sorted():
            # kvprof 0.x wrote vLLM's events in batches out of time order: read the process whole
            pieces = list(proc.block_pieces())
            rows = np.concatenate([p[0] for p in pieces]) if pieces else np.zeros(0, dtype=fmt.BLOCK_EVENT_DTYPE)
            ids = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0, dtype=fmt.BLOCK_ID_DTYPE)
            order = np.argsort(rows["t"], kind="stable")
            n = rows["n"].astype(np.int64)
            starts = np.concatenate(([0], np.cumsum(n)))[:-1]
            ns = n[order]
            within = np.arange(int(ns.sum()), dtype=np.int64) - np.repeat(np.cumsum(ns) - ns, ns)
            ids = ids[np.repeat(starts[order], ns) + within]
            gen = iter([(rows[order], ids)])
        else:
            gen = proc.block_pieces()
        dropped = read = 0
        for rows, ids in gen:
            read += len(rows)
            n = rows["n"].astype(np.int64)
            pl = rows["pool"].astype(np.int64)
            gpool = np.where(pl < len(lut), lut[np.minimum(pl, len(lut) - 1)], -1)
            req = rows["req"].astype(np.int64)
            req = np.where(req >= 0, (i << 32) | req, -1)  # made dense keys by block_chunks, in merge order
            chunk = BlockChunk(
                rows["t"].astype(np.int64),
                rows["kind"].astype(np.uint8),
                gpool.astype(np.int32),
                req,
                rows["arg"].astype(np.int64),
                rows["arg2"].astype(np.int64),
                n,
                np.asarray(ids, dtype=np.int32),
            )
            if (gpool < 0).any():  # events of a pool whose declaration was lost in a crash: dropped
                keep = gpool >= 0
                dropped += int((~keep).sum())
                chunk = chunk.take(keep)
            if len(chunk):
                yield chunk
        if dropped:
            proc.damage.append(f"{dropped:,} block events of undeclared pools skipped in {os.path.basename(proc.dir)}")
        counted = proc.counted_blocks()
        if proc.version >= 2 and counted is not None and read < counted:
            # the process counted at exit the block events it had written: fewer on disk is a
            # chunk log or staging file missing, emptied or cut (tests/test_fuzz_bundles.py)
            proc.damage.append(
                f"{counted - read:,} of the {counted:,} block events {os.path.basename(proc.dir)} wrote are not in its"
                " files (a file missing, emptied or cut short)"
            )

    def block_chunks(self) -> Iterator[BlockChunk]:
        """Every process's block events merged in time order (ties: process order, then the
        order written), as BlockChunks; no run of equal times is split between two chunks.
        A process's own events are put in time order with one piece of look-ahead (threads
        that race between reading the clock and writing the record)."""
        every = [_Sorted(self._process_chunks(i)) for i in range(len(self.processes))]
        sources = [s for s in every if not s.done or len(s.pending)]
        while sources:
            horizon = min(s.horizon for s in sources)
            parts = [s.release(horizon) for s in sources]
            parts = [p for p in parts if len(p)]
            if parts:
                if len(parts) == 1:
                    out = parts[0]
                else:
                    merged = BlockChunk.concat(parts)
                    out = _reorder(merged, np.argsort(merged.t, kind="stable"))
                out.req = self._request_keys(out.req)
                yield out
            for s in sources:
                if s.horizon == horizon and not s.done:
                    s.advance()
            sources = [s for s in sources if not s.done or len(s.pending)]
        late = sum(s.late for s in every)
        if late:
            self.notes.append(
                f"{late:,} block events were written more than a piece out of time order: analysed where they came, at the earliest time not yet analysed"
            )

    def block_stream(self) -> BlockStream:
        """All block events in memory (tests and small inputs)."""
        chunk = BlockChunk.concat(list(self.block_chunks()) or [BlockChunk.empty()])
        keys = np.unique(chunk.req[chunk.req >= 0])
        lut = {int(k): i for i, k in enumerate(keys.tolist())}
        req = (
            np.array([lut.get(int(r), -1) for r in chunk.req.tolist()], dtype=np.int64) if len(chunk.req) else chunk.req
        )
        return BlockStream(
            chunk.t,
            chunk.kind,
            chunk.pool,
            req,
            chunk.arg,
            chunk.arg2,
            chunk.n.astype(np.uint32),
            chunk.ids,
            self.pools,
            [self.request_name(int(k)) for k in keys.tolist()],
        )

    def expected_events(self) -> int:
        return sum(p.expected_events() for p in self.processes)

    def damage(self) -> list[str]:
        return self.notes + [d for p in self.processes for d in p.damage]

    def marks(self) -> Marks:
        names: list[str] = []
        index: dict[str, int] = {}
        cols: list[tuple[np.ndarray, ...]] = []
        for proc in self.processes:
            m = proc.marks()
            if not len(m):
                continue
            lut: dict[int, int] = {}
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


_DONE = object()


def _prefetched(gen: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Run a generator one or two items ahead in a daemon thread; its exceptions are raised
    here, in order.  Closing this generator stops the thread at its next item."""
    import queue
    import threading

    q: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in gen:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((_DONE, None))
        except BaseException as exc:  # handed to the consumer
            q.put((_DONE, exc))

    th = threading.Thread(target=work, name="kvprof-read", daemon=True)
    th.start()
    try:
        while True:
            item, exc = q.get()
            if item is _DONE:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()


def _reorder(c: BlockChunk, order: np.ndarray) -> BlockChunk:
    off = c.offsets
    ns = c.n[order]
    within = np.arange(int(ns.sum()), dtype=np.int64) - np.repeat(np.cumsum(ns) - ns, ns)
    ids = c.ids[np.repeat(off[:-1][order], ns) + within]
    return BlockChunk(c.t[order], c.kind[order], c.pool[order], c.req[order], c.arg[order], c.arg2[order], ns, ids)


class _Sorted:
    """One process's chunks put in time order with one piece of look-ahead: events are
    released once a later piece shows no earlier time can still come (up to the horizon,
    the smallest time of the piece read last)."""

    def __init__(self, chunks: Iterable[BlockChunk]):
        self.it = iter(chunks)
        self.pending = BlockChunk.empty()
        self.done = False
        self.late = 0
        self.floor: int | None = None  # every event released so far is earlier than this
        self.horizon: int = 0  # set by advance(), below
        self.advance()

    def advance(self) -> None:
        nxt = next(self.it, None)
        if nxt is None:
            self.done = True
            self.horizon = np.iinfo(np.int64).max
            return
        if self.floor is not None and len(nxt) and nxt.t.min() < self.floor:
            # more than a piece out of order (a thread stalled between reading the clock and
            # writing, a damaged file, a clock that went back): these events keep their order
            # but take the earliest time not yet released, so that time never goes back for
            # the consumers and no run of equal times is split (the bundle's notes say how many)
            late = nxt.t < self.floor
            self.late += int(late.sum())
            nxt.t = np.where(late, self.floor, nxt.t)
        merged = BlockChunk.concat([self.pending, nxt])
        if len(merged) > 1 and (np.diff(merged.t) < 0).any():
            merged = _reorder(merged, np.argsort(merged.t, kind="stable"))
        self.pending = merged
        self.horizon = int(nxt.t.min()) if len(nxt) else (self.horizon or np.iinfo(np.int64).min)
        if not len(nxt):
            self.advance()

    def release(self, horizon: int) -> BlockChunk:
        """Pending events with time < horizon (all of them once the source is exhausted).
        Every source is released up to the same horizon, so no later event is earlier."""
        if self.done and horizon == np.iinfo(np.int64).max:
            out, self.pending = self.pending, BlockChunk.empty()
            return out
        self.floor = horizon if self.floor is None else max(self.floor, horizon)
        cut = int(np.searchsorted(self.pending.t, horizon, side="left"))
        if cut == 0:
            return BlockChunk.empty()
        out, self.pending = self.pending.split(cut)
        return out


def align_clocks(manifest: dict[str, Any], processes: list[ProcessData]) -> dict[str, Any]:
    """Processes recorded on several hosts on one timeline (kvprof/trace/hostinfo.py
    clock_shifts), and each process's node when they span several; returns the summary
    (reference clock, per host its offset, shift and spread)."""
    from kvprof.trace import hostinfo

    infos = [p.info for p in processes]
    shifts, summary = hostinfo.clock_shifts(manifest, infos)
    for proc, ns in zip(processes, shifts):
        proc.set_clock_shift(ns)
    nodes = hostinfo.node_keys(infos)
    if len({k for k, _ in nodes if k is not None}) > 1:
        for proc, node in zip(processes, nodes):
            proc.node = node
    return summary


def open_bundle(path: str) -> Bundle:
    return Bundle(path)
