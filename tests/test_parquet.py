"""kvprof export --format parquet: every stream a typed, documented table that DuckDB reads,
and SQL over it gives analyze's figures (peak blocks through a window function, hit tokens)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, analyzed_metrics, run_kvprof

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
duckdb = pytest.importorskip("duckdb")

from kvprof.report import parquet  # noqa: E402

FIXTURES = os.path.join(ROOT, "fixtures")


def _export(bundle, out) -> None:
    r = run_kvprof("export", str(bundle), "--format", "parquet", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"kvprof: wrote {len(parquet.TABLES)} tables to {out}")


def _doc_queries() -> list[str]:
    return re.findall(
        r"```sql\n(.*?)```", open(os.path.join(ROOT, "docs", "parquet.md"), encoding="utf-8").read(), re.S
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["demo.kvprof", "demo-leak.kvprof", "crash-sigkill.kvprof"])
def test_sql_over_the_tables_gives_analyze_s_peak_blocks_and_hit_tokens(tmp_path, name):
    bundle = os.path.join(FIXTURES, name)
    out = tmp_path / "pq"
    _export(bundle, out)
    want = analyzed_metrics(bundle)
    peak_sql, hits_sql = (
        q.replace("run-parquet/", f"{out}/") for q in _doc_queries()[:2]
    )  # the queries docs/parquet.md shows
    ((peak,),) = duckdb.sql(peak_sql).fetchall()
    ((hits,),) = duckdb.sql(hits_sql).fetchall()
    assert peak == want["blocks.peak_blocks"] and (hits or 0) == want["blocks.prefix_cache.hit_tokens"], (peak, hits)
    # and the metrics table holds analyze's map
    got = dict(duckdb.sql(f"SELECT name, value FROM '{out}/metrics.parquet'").fetchall())
    assert got.keys() == want.keys()
    assert all(got[k] == (float(v) if v is not None else None) for k, v in want.items())


def test_every_table_is_written_with_its_declared_columns_and_types(tmp_path):
    out = tmp_path / "pq"
    _export(os.path.join(FIXTURES, "demo.kvprof"), out)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{t}.parquet" for t in parquet.TABLES)
    for table, (_doc, cols) in parquet.TABLES.items():
        s = pq.read_schema(out / f"{table}.parquet")
        assert s.names == [c for c, _, _ in cols], table
        assert all(s.field(c).type == parquet._type(pa, t) for c, t, _ in cols), table
        assert all(s.field(c).metadata[b"description"].decode() == d for c, _, d in cols), table
    con = duckdb.connect()
    n_events = con.execute(f"SELECT COUNT(*), SUM(len(block_ids)) FROM '{out}/block_events.parquet'").fetchone()
    assert n_events == (12794, 7175)
    assert (
        con.execute(f"SELECT COUNT(*) FROM '{out}/request_states.parquet'").fetchone()[0]
        == con.execute(f"SELECT COUNT(*) FROM '{out}/block_events.parquet' WHERE kind = 'req_state'").fetchone()[0]
        > 0
    )
    assert (
        con.execute(
            f"SELECT COUNT(*) FROM '{out}/block_events.parquet' WHERE request IS NULL AND kind LIKE 'req_%'"
        ).fetchone()[0]
        == 0
    )
    assert con.execute(
        f"SELECT MIN(event), MAX(event), COUNT(DISTINCT event) FROM '{out}/block_events.parquet'"
    ).fetchone() == (0, 12793, 12794)
    assert con.execute(f"SELECT label, num_blocks, block_size, clock FROM '{out}/pools.parquet'").fetchall()[0][1:] == (
        256,
        16,
        "simulated",
    )
    assert (
        con.execute(
            f"SELECT COUNT(*) FROM '{out}/findings.parquet' WHERE severity IN ('error', 'warning', 'info')"
        ).fetchone()[0]
        > 0
    )
    assert "demo" in con.execute(f"SELECT argv FROM '{out}/processes.parquet'").fetchone()[0]


@pytest.mark.slow
def test_heap_gc_and_markers_of_a_recording(tmp_path):
    bundle = tmp_path / "h.kvprof"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(bundle),
        "--probe",
        "blocks,gc,tracemalloc",
        "--tracemalloc-interval",
        "0",
        "--",
        sys.executable,
        "-m",
        "kvprof.commands",
        "demo",
        "--requests",
        "60",
        "--seed",
        "2",
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "pq"
    _export(bundle, out)
    from kvprof.trace.reader import Bundle

    b = Bundle(str(bundle))
    snaps = sum(len(p.heap_snapshots()[0]) for p in b.processes)
    gcs = sum(len(p.gc_events()) for p in b.processes)
    con = duckdb.connect()
    assert con.execute(f"SELECT COUNT(*) FROM '{out}/heap_samples.parquet'").fetchone()[0] == snaps > 0
    assert con.execute(f"SELECT COUNT(*) FROM '{out}/gc.parquet'").fetchone()[0] == gcs
    assert set(r[0] for r in con.execute(f"SELECT DISTINCT reason FROM '{out}/heap_samples.parquet'").fetchall()) >= {
        "start",
        "mark",
        "exit",
    }
    assert sorted(r[0] for r in con.execute(f"SELECT DISTINCT name FROM '{out}/markers.parquet'").fetchall()) == sorted(
        b.marks().names
    )
    # a site's frames, through its stack
    row = con.execute(f"""SELECT s.size_bytes, k.frames FROM '{out}/heap_sites.parquet' s
                      JOIN '{out}/heap_stacks.parquet' k USING (pid, stack) ORDER BY s.size_bytes DESC LIMIT 1""").fetchone()
    assert row[0] > 0 and re.match(r".+:\d+$", row[1][0])
    # analyze's heap peak is in the metrics table
    assert con.execute(f"SELECT value FROM '{out}/metrics.parquet' WHERE name = 'heap.peak_bytes'").fetchone()[0] > 0


def test_torch_samples(tmp_path):
    """The torch probe's memory_stats samples (meta.jsonl records), one row per device."""
    bundle = tmp_path / "t.kvprof"
    shutil.copytree(os.path.join(FIXTURES, "demo.kvprof"), bundle)
    (proc,) = (bundle / "procs").iterdir()
    stats = {
        "allocated": 1 << 20,
        "reserved": 2 << 20,
        "active": 1 << 20,
        "inactive_split": 0,
        "allocated_peak": 3 << 20,
        "reserved_peak": 4 << 20,
        "num_ooms": 0,
        "num_alloc_retries": 1,
    }
    with open(proc / "meta.jsonl", "a") as fh:
        fh.write(
            json.dumps(
                {"type": "torch_stats", "t": 10, "mark": -1, "devices": {"0": stats, "1": dict(stats, allocated=5)}}
            )
            + "\n"
        )
    out = tmp_path / "pq"
    _export(bundle, out)
    rows = duckdb.sql(
        f"SELECT device, allocated_bytes, reserved_peak_bytes, marker FROM '{out}/torch_samples.parquet' ORDER BY device"
    ).fetchall()
    assert rows == [(0, 1 << 20, 4 << 20, None), (1, 5, 4 << 20, None)]


def test_block_events_are_written_a_row_group_at_a_time(tmp_path, monkeypatch):
    """Bounded memory: rows leave for the file every ROW_GROUP_ROWS events, never all at once."""
    from kvprof.report.progress import PassProgress

    monkeypatch.setattr(parquet, "ROW_GROUP_ROWS", 1000)
    seen = []
    real_flush = parquet._Table.flush

    def flush(self):
        if self.name == "block_events":
            seen.append(self.pending)
        real_flush(self)

    monkeypatch.setattr(parquet._Table, "flush", flush)
    out = tmp_path / "pq"
    rows = parquet.export(os.path.join(FIXTURES, "demo.kvprof"), str(out), progress=PassProgress("x"))
    meta = pq.ParquetFile(out / "block_events.parquet").metadata
    assert rows["block_events"] == meta.num_rows == 12794 and meta.num_row_groups >= 12
    assert (
        max(seen) < 1000 + 90_000
    )  # one chunk past the threshold at most (a chunk: a staging segment, <= 87,000 events)


@pytest.mark.slow
def test_export_needs_pyarrow_and_a_directory(tmp_path):
    code = "import sys; sys.modules['pyarrow'] = None; from kvprof.commands import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "export",
            os.path.join(FIXTURES, "demo.kvprof"),
            "--format",
            "parquet",
            "-o",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "pip install 'kvprof[parquet]'" in r.stderr
    r = run_kvprof("export", os.path.join(FIXTURES, "demo.kvprof"), "--format", "parquet", "-o", "-")
    assert r.returncode == 2 and "-o DIR" in r.stderr
    (tmp_path / "file").write_text("")
    r = run_kvprof("export", os.path.join(FIXTURES, "demo.kvprof"), "--format", "parquet", "-o", str(tmp_path / "file"))
    assert r.returncode == 2 and "not a directory" in r.stderr
    r = run_kvprof("export", os.path.join(FIXTURES, "demo.kvprof"), "--format", "csv", "-o", str(tmp_path / "y"))
    assert r.returncode == 2 and "perfetto or parquet" in r.stderr


def test_docs_list_every_table_and_column():
    text = open(os.path.join(ROOT, "docs", "parquet.md"), encoding="utf-8").read()
    assert text.endswith(parquet.docs()), "regenerate: make parquet-docs"


def test_the_readme_query_runs(tmp_path):
    out = tmp_path / "pq"
    _export(os.path.join(FIXTURES, "demo.kvprof"), out)
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Export to Parquet") :]
    (sql,) = re.findall(r"```sql\n(.*?)```", section[: section.index("\n## ", 5)], re.S)[:1]
    rows = duckdb.sql(sql.replace("run-parquet/", f"{out}/")).fetchall()
    assert rows == [(255, 9760)]
