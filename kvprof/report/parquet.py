"""`kvprof export BUNDLE --format parquet -o DIR`: one Parquet table per stream, plus the
analysis's metrics and findings, for DuckDB, Polars, Spark or pandas.

The tables and their columns are declared once, in TABLES; docs/parquet.md's table
reference is generated from them (`make parquet-docs`).  Block
events are read through the reader's chunk API (Bundle.block_chunks, every process merged
in time order) and written as they come, a row group per ~128k events, so the memory used
does not grow with the recording.  The small streams (markers, GC, heap and torch samples)
are read per process.  Needs pyarrow (``pip install 'kvprof[parquet]'``).
"""

from __future__ import annotations

import json
import os

TABLES: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "block_events": (
        "One row per block-stream event (a block state change, a request event or an engine step), every "
        "process merged in time order: the order `kvprof analyze` replays them in.",
        [
            (
                "event",
                "int64",
                "Position in that order, from 0. Order by it (not by t_ns) to replay: equal times keep the order written.",
            ),
            (
                "t_ns",
                "int64",
                "When, in ns on the pool's clock (monotonic, or the simulated clock of a `kvprof.blocks.Pool(clock=...)`).",
            ),
            ("pool", "int32", "The pool: `pools.pool`."),
            (
                "kind",
                "string",
                "alloc, free, hit, cache, evict, reserve (block state); req_arrive, req_query, req_query_preempted, "
                "req_state, req_finish, req_preempt, alloc_fail (requests); step (engine).",
            ),
            (
                "request",
                "string",
                "The request id (`PID:ID` when several processes recorded); null when the event has none.",
            ),
            (
                "arg",
                "int64",
                "By kind: req_arrive prompt tokens; req_query / req_query_preempted queried tokens; req_state filled "
                "tokens; alloc_fail blocks needed (-1 unknown); step the step number; 0 otherwise.",
            ),
            (
                "arg2",
                "int64",
                "By kind: req_arrive max new tokens (-1 unknown); req_query / req_query_preempted hit tokens; "
                "req_state blocks held; alloc_fail free blocks seen (-1 unknown); 0 otherwise.",
            ),
            (
                "block_ids",
                "list<int32>",
                "The blocks concerned, in the order recorded (empty for request and step events). "
                "`UNNEST(block_ids)` gives one row per block.",
            ),
        ],
    ),
    "request_states": (
        "The req_state events as typed columns: a request's block table after a step.",
        [
            ("event", "int64", "`block_events.event` of the same event."),
            ("t_ns", "int64", "When (the pool's clock, ns)."),
            ("pool", "int32", "`pools.pool`."),
            ("request", "string", "The request id."),
            ("filled_tokens", "int64", "Tokens whose KV is (being) written."),
            ("blocks_held", "int64", "Blocks in the request's block table."),
        ],
    ),
    "pools": (
        "The block pools, one row each.",
        [
            ("pool", "int32", "Pool index in this bundle (what `block_events.pool` refers to)."),
            ("label", "string", "NAME@PID, as the reports call it."),
            ("name", "string", "The pool's name."),
            ("engine", "string", "vllm, nano-vllm, custom (kvprof.blocks), ..."),
            ("pid", "int32", "The process that owns it."),
            ("num_blocks", "int64", "Blocks in the pool, reserved ones included."),
            ("block_size", "int64", "Token slots per block."),
            ("bytes_per_block", "int64", "KV bytes per block, when the pool said; null otherwise."),
            ("clock", "string", "monotonic, or simulated (a simulator's own clock)."),
        ],
    ),
    "processes": (
        "The recorded processes, from the manifest.",
        [
            ("pid", "int32", "Process id."),
            ("ppid", "int32", "Parent's process id."),
            ("role", "string", "main (the command kvprof started) or child."),
            ("argv", "list<string>", "Its argv when recording began (`-m MODULE ...` for python -m)."),
            ("start_time", "float64", "Seconds since the epoch."),
            ("exited_cleanly", "bool", "Closed its recording, or was stopped by its parent's orderly shutdown."),
            ("ended", "string", "closed, stopped_with_parent, running or unknown (README, Record)."),
        ],
    ),
    "markers": (
        "kvprof.mark() calls, every process, in time order.",
        [
            ("t_ns", "int64", "When (monotonic clock, ns; a pool's own markers are on its clock)."),
            ("pid", "int32", "The process."),
            ("name", "string", "The marker's name."),
            ("value", "int64", "Its value (kvprof.mark(name, value)), 0 when none was given."),
        ],
    ),
    "gc": (
        "Garbage collections (--probe gc), one row each.",
        [
            ("pid", "int32", "The process."),
            ("t_ns", "int64", "Start (monotonic clock, ns)."),
            ("duration_ns", "int64", "From gc.callbacks start to stop."),
            ("generation", "int16", "The oldest generation collected."),
            ("collected", "int64", "Unreachable objects found."),
            ("uncollectable", "int64", "Objects that could not be freed (gc.garbage)."),
        ],
    ),
    "heap_samples": (
        "tracemalloc snapshots (--probe tracemalloc): the Python heap at start, markers, timer ticks and exit.",
        [
            ("pid", "int32", "The process."),
            ("t_ns", "int64", "When (monotonic clock, ns)."),
            ("seq", "int64", "Snapshot number in its process, from 0."),
            ("reason", "string", "start, mark, timer or exit."),
            ("marker", "string", "The marker that triggered it; null otherwise."),
            ("marker_value", "int64", "That marker's value."),
            ("live_bytes", "int64", "Traced bytes alive, kvprof's own allocations left out."),
            ("live_blocks", "int64", "Traced memory blocks alive, same filter."),
            ("traced_bytes", "int64", "tracemalloc.get_traced_memory() current, unfiltered."),
            ("peak_bytes", "int64", "Traced peak since the previous snapshot, unfiltered."),
            ("tracemalloc_bytes", "int64", "tracemalloc's own memory."),
            ("sites_changed", "int64", "Rows of heap_sites this snapshot wrote."),
            ("cost_ns", "int64", "Time the snapshot took in the process."),
        ],
    ),
    "heap_sites": (
        "Per snapshot, the call sites whose live bytes changed since the process's previous snapshot "
        "(size 0 when a site emptied): a site's size at snapshot S is its last row with seq <= S.",
        [
            ("pid", "int32", "The process."),
            ("seq", "int64", "`heap_samples.seq` of the snapshot."),
            ("stack", "int32", "`heap_stacks.stack` (per process)."),
            ("size_bytes", "int64", "Live bytes allocated there."),
            ("count", "int64", "Live memory blocks allocated there."),
        ],
    ),
    "heap_stacks": (
        "The call stacks of heap_sites.",
        [
            ("pid", "int32", "The process."),
            ("stack", "int32", "Stack id, per process."),
            ("frames", "list<string>", "FILE:LINE, innermost first."),
        ],
    ),
    "torch_samples": (
        "torch.cuda.memory_stats() samples (--probe torch), at markers and at exit, one row per device.",
        [
            ("pid", "int32", "The process."),
            ("t_ns", "int64", "When (monotonic clock, ns)."),
            ("marker", "string", "The marker it was taken at; null at exit."),
            ("device", "int32", "CUDA device index."),
            ("allocated_bytes", "int64", "allocated_bytes.all.current."),
            ("reserved_bytes", "int64", "reserved_bytes.all.current."),
            ("active_bytes", "int64", "active_bytes.all.current."),
            ("inactive_split_bytes", "int64", "inactive_split_bytes.all.current."),
            ("allocated_peak_bytes", "int64", "allocated_bytes.all.peak."),
            ("reserved_peak_bytes", "int64", "reserved_bytes.all.peak."),
            ("num_ooms", "int64", "Out-of-memory errors so far."),
            ("num_alloc_retries", "int64", "Allocations retried after freeing cached blocks."),
        ],
    ),
    "metrics": (
        "The analysis's metrics (`kvprof analyze --json`'s metrics map), one row each.",
        [
            ("name", "string", "Metric name (docs/metrics-reference.md)."),
            ("value", "float64", "Its value; null when not measured."),
            ("unit", "string", "ratio, blocks, tokens, bytes, seconds, count, ..."),
            ("better", "string", "lower, higher, or null (neither)."),
            ("window", "string", "Where it is measured: whole run, at peak, end of run, ..."),
            ("noisy", "bool", "A timing that varies run to run (compare gives it more tolerance)."),
        ],
    ),
    "findings": (
        "The analysis's findings, worst first.",
        [
            ("severity", "string", "error, warning or info."),
            ("title", "string", "One line."),
            ("detail", "string", "The explanation, with the numbers."),
            ("source", "string", "The analyzer that found it (blocks, heap, gc, ...)."),
            ("evidence", "string", "The figures behind it, as JSON."),
        ],
    ),
}
ROW_GROUP_ROWS = 128 * 1024
TORCH_FIELDS = (
    "allocated",
    "reserved",
    "active",
    "inactive_split",
    "allocated_peak",
    "reserved_peak",
    "num_ooms",
    "num_alloc_retries",
)


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        from kvprof.errors import UsageError

        raise UsageError("the Parquet export needs pyarrow: pip install 'kvprof[parquet]'") from None
    return pa, pq


def _type(pa, name: str):
    if name.startswith("list<"):
        return pa.list_(_type(pa, name[5:-1]))
    return {
        "int16": pa.int16(),
        "int32": pa.int32(),
        "int64": pa.int64(),
        "float64": pa.float64(),
        "bool": pa.bool_(),
        "string": pa.string(),
    }[name]


def schema(table: str):
    pa, _ = _pa()
    doc, cols = TABLES[table]
    fields = [pa.field(c, _type(pa, t), metadata={"description": d}) for c, t, d in cols]
    return pa.schema(fields, metadata={"description": doc, "producer": "kvprof"})


class _Table:
    """One output file, written a row group at a time (to NAME.parquet.tmp, renamed when done)."""

    def __init__(self, out_dir: str, name: str):
        pa, pq = _pa()
        self.pa, self.name = pa, name
        self.path = os.path.join(out_dir, f"{name}.parquet")
        self.tmp = self.path + ".tmp"
        self.schema = schema(name)
        self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        self.parts: list[dict] = []
        self.pending = 0
        self.rows = 0

    def add(self, columns: dict) -> None:
        """Columns as lists, numpy arrays or pyarrow arrays, by name."""
        n = len(next(iter(columns.values()))) if columns else 0
        if not n:
            return
        self.parts.append(columns)
        self.pending += n
        if self.pending >= ROW_GROUP_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        pa = self.pa
        arrays = []
        for f in self.schema:
            chunks = [p[f.name] for p in self.parts]
            arrays.append(
                pa.concat_arrays([c if isinstance(c, pa.Array) else pa.array(c, type=f.type) for c in chunks])
            )
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema), row_group_size=ROW_GROUP_ROWS)
        self.rows += self.pending
        self.parts, self.pending = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001
            pass
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


def export(path: str, out_dir: str, progress=None) -> dict:
    """Write every table of the bundle at ``path`` into ``out_dir`` (created; files of the same
    names replaced, others left alone).  Returns {table: rows}."""
    from kvprof.analysis.sources import require_bundle
    from kvprof.errors import UsageError

    pa, _ = _pa()
    require_bundle(path, f"the Parquet export reads a kvprof bundle (a directory): {path}")
    if out_dir == "-":
        raise UsageError("--format parquet writes a directory of files: give -o DIR")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"-o {out_dir}: not a directory")
    from kvprof.analysis import analyze_bundle
    from kvprof.trace.reader import Bundle

    bundle = Bundle(path)
    result = analyze_bundle(bundle, progress=progress)  # the metrics and findings; a pass of its own
    bundle = Bundle(path)  # read afresh for the tables
    os.makedirs(out_dir, exist_ok=True)
    tables = {name: _Table(out_dir, name) for name in TABLES}
    try:
        _blocks(pa, bundle, tables)
        _pools(bundle, tables["pools"])
        _processes(bundle, tables["processes"])
        _markers(bundle, tables["markers"])
        for proc in bundle.processes:
            _gc(proc, tables["gc"])
            _heap(proc, tables)
            _torch(proc, tables["torch_samples"])
        _analysis(result, tables)
        for t in tables.values():
            t.close()
    except BaseException:
        for t in tables.values():
            t.abort()
        raise
    return {name: t.rows for name, t in tables.items()}


def _blocks(pa, bundle, tables) -> None:
    import numpy as np

    from kvprof.trace.format import KIND_NAMES, EventKind as K

    kinds = np.array([KIND_NAMES.get(k, f"kind_{k}") for k in range(256)], dtype=object)
    names: dict[int, str] = {}  # request key -> id, for the keys seen so far
    event = 0
    for chunk in bundle.block_chunks():
        n = len(chunk)
        idx = np.arange(event, event + n, dtype=np.int64)
        event += n
        keys, inverse = np.unique(chunk.req, return_inverse=True)
        for k in keys.tolist():
            if k >= 0 and k not in names:
                names[k] = bundle.request_name(k)
        labels = pa.array([names.get(k) if k >= 0 else None for k in keys.tolist()], type=pa.string())
        request = labels.take(pa.array(inverse.astype(np.int32)))
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(chunk.n, out=offsets[1:])
        ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(chunk.ids.astype(np.int32)))
        tables["block_events"].add(
            {
                "event": idx,
                "t_ns": chunk.t,
                "pool": chunk.pool.astype(np.int32),
                "kind": pa.array(kinds[chunk.kind].tolist(), type=pa.string()),
                "request": request,
                "arg": chunk.arg,
                "arg2": chunk.arg2,
                "block_ids": ids,
            }
        )
        st = chunk.kind == K.REQ_STATE
        if st.any():
            tables["request_states"].add(
                {
                    "event": idx[st],
                    "t_ns": chunk.t[st],
                    "pool": chunk.pool[st].astype(np.int32),
                    "request": request.filter(pa.array(st)),
                    "filled_tokens": chunk.arg[st],
                    "blocks_held": chunk.arg2[st],
                }
            )
        if len(names) > 1_000_000:  # a long run's request ids: keep the lookup bounded (Bundle.request_name is cheap)
            names.clear()


def _pools(bundle, t: _Table) -> None:
    pools = bundle.pools
    t.add(
        {
            "pool": [p.index for p in pools],
            "label": [p.label for p in pools],
            "name": [p.name for p in pools],
            "engine": [p.engine for p in pools],
            "pid": [p.pid for p in pools],
            "num_blocks": [p.num_blocks for p in pools],
            "block_size": [p.block_size for p in pools],
            "bytes_per_block": [p.bytes_per_block for p in pools],
            "clock": [p.clock for p in pools],
        }
    )


def _int_or_none(v, lo=-(1 << 31), hi=(1 << 31) - 1):
    return v if isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi else None


def _processes(bundle, t: _Table) -> None:
    listed = [p for p in bundle.manifest.get("processes") or [] if isinstance(p, dict)]
    if not listed:  # a recording that did not finish: what the process records say
        listed = [dict(p.info, exited_cleanly=p.info.get("end_ns") is not None) for p in bundle.processes]
    t.add(
        {
            "pid": [_int_or_none(p.get("pid")) for p in listed],
            "ppid": [_int_or_none(p.get("ppid")) for p in listed],
            "role": [str(p.get("role")) if p.get("role") is not None else None for p in listed],
            "argv": [[str(a) for a in p["argv"]] if isinstance(p.get("argv"), list) else None for p in listed],
            "start_time": [
                float(p["start_time"])
                if isinstance(p.get("start_time"), (int, float)) and not isinstance(p.get("start_time"), bool)
                else None
                for p in listed
            ],
            "exited_cleanly": [bool(p.get("exited_cleanly")) for p in listed],
            "ended": [str(p.get("ended") or ("closed" if p.get("exited_cleanly") else "unknown")) for p in listed],
        }
    )


def _markers(bundle, t: _Table) -> None:
    m = bundle.marks()
    names = m.names
    t.add(
        {"t_ns": m.t, "pid": m.pid.astype("int32"), "name": [names[int(i)] for i in m.name.tolist()], "value": m.value}
    )


def _gc(proc, t: _Table) -> None:
    g = proc.gc_events()
    if len(g):
        t.add(
            {
                "pid": [proc.pid] * len(g),
                "t_ns": g["t"],
                "duration_ns": g["duration"],
                "generation": g["generation"].astype("int16"),
                "collected": g["collected"],
                "uncollectable": g["uncollectable"],
            }
        )


def _heap(proc, tables) -> None:
    from kvprof.trace.format import HEAP_REASONS

    snaps, sites = proc.heap_snapshots()
    if len(snaps):
        tables["heap_samples"].add(
            {
                "pid": [proc.pid] * len(snaps),
                "t_ns": snaps["t"],
                "seq": snaps["seq"].astype("int64"),
                "reason": [HEAP_REASONS.get(int(r), str(int(r))) for r in snaps["reason"].tolist()],
                "marker": [proc.string(m) if m >= 0 else None for m in snaps["mark"].tolist()],
                "marker_value": snaps["mark_value"],
                "live_bytes": snaps["live"],
                "live_blocks": snaps["blocks"],
                "traced_bytes": snaps["traced"],
                "peak_bytes": snaps["peak"],
                "tracemalloc_bytes": snaps["overhead"],
                "sites_changed": snaps["rows"].astype("int64"),
                "cost_ns": snaps["cost"],
            }
        )
    if len(sites):
        tables["heap_sites"].add(
            {
                "pid": [proc.pid] * len(sites),
                "seq": sites["seq"].astype("int64"),
                "stack": sites["stack"],
                "size_bytes": sites["size"],
                "count": sites["count"],
            }
        )
    if proc.stacks:
        ids = sorted(proc.stacks)
        tables["heap_stacks"].add(
            {
                "pid": [proc.pid] * len(ids),
                "stack": ids,
                "frames": [[f"{f}:{ln}" for f, ln in proc.stacks[i]] for i in ids],
            }
        )


def _torch(proc, t: _Table) -> None:
    cols: dict[str, list] = {c: [] for c, _, _ in TABLES["torch_samples"][1]}
    for rec in proc.notes:
        ts, devices = rec.get("t"), rec.get("devices")
        if (
            rec.get("type") != "torch_stats"
            or not isinstance(ts, int)
            or isinstance(ts, bool)
            or not isinstance(devices, dict)
        ):
            continue
        mark = rec.get("mark")
        for dev, st in sorted(devices.items()):
            if not isinstance(st, dict) or _int_or_none(_as_int(dev)) is None:
                continue
            cols["pid"].append(proc.pid)
            cols["t_ns"].append(ts)
            cols["marker"].append(proc.string(mark) if isinstance(mark, int) and mark >= 0 else None)
            cols["device"].append(_as_int(dev))
            for f in TORCH_FIELDS:
                v = st.get(f)
                cols[f + ("_bytes" if not f.startswith("num_") else "")].append(
                    _int_or_none(v, -(1 << 63), (1 << 63) - 1)
                )
    t.add(cols)


def _as_int(text):
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _analysis(result, tables) -> None:
    import math

    def number(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        v = float(v)
        return v if math.isfinite(v) else None

    items = sorted(result.metrics.items())
    tables["metrics"].add(
        {
            "name": [n for n, _ in items],
            "value": [number(e.get("value")) for _, e in items],
            "unit": [e.get("unit") for _, e in items],
            "better": [e.get("better") for _, e in items],
            "window": [e.get("window") for _, e in items],
            "noisy": [bool(e.get("noisy")) for _, e in items],
        }
    )
    fs = result.findings
    tables["findings"].add(
        {
            "severity": [f.severity for f in fs],
            "title": [f.title for f in fs],
            "detail": [f.detail for f in fs],
            "source": [f.source for f in fs],
            "evidence": [json.dumps(f.evidence, default=str, sort_keys=True) for f in fs],
        }
    )


def docs() -> str:
    """docs/parquet.md's table reference, from TABLES."""
    out = ["## Tables", ""]
    for name, (doc, cols) in TABLES.items():
        out += [f"### `{name}.parquet`", "", doc, "", "| column | type | meaning |", "|---|---|---|"]
        out += [f"| `{c}` | {t} | {d} |" for c, t, d in cols]
        out.append("")
    return "\n".join(out)


def update_docs(path: str) -> None:
    """Replace docs/parquet.md from its "## Tables" heading on with docs() (the prose above stays)."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    head = text[: text.index("## Tables")] if "## Tables" in text else text.rstrip("\n") + "\n\n"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(head + docs())


if __name__ == "__main__":  # python -m kvprof.report.parquet [--update docs/parquet.md]
    import sys

    if sys.argv[1:2] == ["--update"]:
        update_docs(sys.argv[2])
    else:
        print(docs(), end="")
