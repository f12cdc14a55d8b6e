"""`kvprof combine`: parts recorded on two "hosts" (two recordings on this machine, one of
them given another host identity and a clock offset on purpose) become one bundle on one
timeline, which analyze, report, compare and export read like any other."""

import importlib.util
import json
import os
import shutil
import sys

import numpy as np
import pytest

from kvprof.trace.reader import Bundle
from tests.conftest import run_kvprof

pytestmark = pytest.mark.slow  # records and combines several runs (make test-quick leaves it out)

ENGINE = """
import sys, time, gc
import kvprof, kvprof.blocks

name, steps, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
pool = kvprof.blocks.Pool(num_blocks=32, block_size=16, name=name)
held = []
for i in range(steps):
    kvprof.mark(f"{name}-step", i)
    pool.step(i)
    if i < steps // 2:  # first half: one more block held each step
        pool.alloc([i], f"r{i}")
        held.append(i)
    elif held:  # second half: given back
        b = held.pop()
        pool.free([b], f"r{b}")
    pool.prefix_query(f"q{i}", 32, 16 if i % 2 else 0)
    gc.collect(0)
    time.sleep(pause)
if len(sys.argv) > 4:  # a pool on a simulated clock: its times are its own, never moved
    sim = kvprof.blocks.Pool(num_blocks=8, block_size=16, name="sim", clock=iter([1000, 2000, 3000]).__next__)
    sim.alloc([1, 2], "s")
    sim.free([1, 2], "s")
"""

D_MARGIN = 25_000_000  # B lands 25 ms after A's step 10 (A steps every 50 ms)


def _record(tmp_path, name, *args):
    script = tmp_path / "engine.py"
    script.write_text(ENGINE)
    out = tmp_path / f"{name}.kvprof"
    r = run_kvprof("record", "-q", "-p", "blocks,gc", "-o", str(out), "--", sys.executable, str(script), name, *args)
    assert r.returncode == 0, r.stderr
    return out


def _offsets(bundle_dir) -> list[int]:
    """Every clock offset a part recorded (manifest and processes), as the reader pools them."""
    out = []
    for info in [json.load(open(bundle_dir / "manifest.json"))] + [
        json.load(open(d / "process.json")) for d in (bundle_dir / "procs").iterdir()
    ]:
        w = info["clock"]["wall_minus_mono_ns"]
        out += [v for v in (w["start"], w["end"]) if v is not None]
    return sorted(out)


def _move_to_another_host(bundle_dir, offset: int) -> None:
    """What a part recorded on host-b looks like: its own host identity and clock offset."""
    paths = [bundle_dir / "manifest.json"] + [d / "process.json" for d in (bundle_dir / "procs").iterdir()]
    for path in paths:
        info = json.load(open(path))
        info["host"].update(hostname="host-b", boot_id="boot-b")
        info["clock"]["wall_minus_mono_ns"] = {"start": offset, "end": offset}
        for p in info.get("processes") or []:
            p["host"].update(hostname="host-b", boot_id="boot-b")
            p["clock"]["wall_minus_mono_ns"] = {"start": offset, "end": offset}
        json.dump(info, open(path, "w"))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parts")
    a = _record(tmp, "a", "20", "0.05")
    b = _record(tmp, "b", "6", "0", "sim")
    ba, bb = Bundle(str(a)), Bundle(str(b))
    ma, mb = ba.marks(), bb.marks()
    a10 = int(ma.times_of("a-step")[10])
    b0 = int(mb.times_of("b-step")[0])
    off_a = _offsets(a)[len(_offsets(a)) // 2]  # the reader's upper median
    # B's offset chosen so that its first step lands 25 ms after A's step 10 on A's clock
    off_b = a10 + D_MARGIN - b0 + off_a
    raw_b = {"t": bb.block_stream().t.copy(), "marks": mb.t.copy(), "gc": bb.processes[0].gc_events()["t"].copy()}
    _move_to_another_host(b, off_b)
    return {"a": a, "b": b, "shift": off_b - off_a, "raw_b": raw_b, "tmp": tmp}


def test_combined_parts_are_one_timeline_in_order(parts, tmp_path):
    out = tmp_path / "all.kvprof"
    r = run_kvprof("combine", str(out), str(parts["a"]), str(parts["b"]))
    assert r.returncode == 0, r.stderr
    assert "combined 2 parts" in r.stderr and "2 hosts" in r.stderr and "host-b" in r.stderr
    b = Bundle(str(out))
    names = sorted(os.listdir(out / "procs"))
    assert (
        len(names) == 2
        and any(n.startswith("host-b-") for n in names)
        and any(n.startswith(os.uname().nodename.split(".")[0][:3]) for n in names)
    )
    assert b.manifest["status"] == "complete" and len(b.manifest["combined"]["parts"]) == 2
    assert b.manifest["command"][-3:] == ["a", "20", "0.05"], "the first recorded part is the reference"
    proc_b = next(p for p in b.processes if p.info["host"]["hostname"] == "host-b")
    # host A's offset is the median of what its manifest and processes recorded, which the
    # combined manifest samples again: within the spread of A's own samples (a few ns)
    a_offsets = _offsets(parts["a"])
    assert abs(proc_b.clock_shift - parts["shift"]) <= a_offsets[-1] - a_offsets[0]
    shift = proc_b.clock_shift  # every time of B moved by exactly this
    # markers: every step of B between A's steps 10 and 11, on A's clock
    m = b.marks()
    order = [m.names[i] for i in m.name]
    first_b, last_b = order.index("b-step"), len(order) - 1 - order[::-1].index("b-step")
    a_steps = [i for i, n in enumerate(order) if n == "a-step"]
    assert a_steps[10] < first_b and last_b < a_steps[11]
    assert np.array_equal(np.sort(m.t[m.pid == proc_b.pid]), np.sort(parts["raw_b"]["marks"] + shift))
    # block events: merged in time order; B's moved by the shift, except its simulated pool's
    s = b.block_stream()
    assert (np.diff(s.t) >= 0).all()
    sim = [p.index for p in s.pools if p.name == "sim"]
    mine = np.isin(s.pool, [p.index for p in s.pools if p.pid == proc_b.pid and p.name == "b"])
    raw = parts["raw_b"]["t"]
    assert np.array_equal(np.sort(s.t[mine]), np.sort(raw[raw > 10_000]) + shift)
    assert sorted(s.t[np.isin(s.pool, sim)].tolist()) == [1000, 2000]
    assert np.array_equal(proc_b.gc_events()["t"], parts["raw_b"]["gc"] + shift)


def test_fleet_totals_of_the_combined_bundle(parts, tmp_path):
    out = tmp_path / "all.kvprof"
    assert run_kvprof("combine", "-q", str(out), str(parts["a"]), str(parts["b"])).returncode == 0
    js = tmp_path / "a.json"
    r = run_kvprof("analyze", str(out), "--json", str(js))
    assert r.returncode == 0, r.stderr
    assert "Fleet" in r.stdout and "host-b" in r.stdout
    res = json.load(open(js))
    fleet, mt = res["sections"]["fleet"], {k: v["value"] for k, v in res["metrics"].items()}
    engines = {e["label"].split("@")[0]: e for e in fleet["engines"]}
    assert engines["a"]["peak_blocks"] == 10 and engines["b"]["peak_blocks"] == 3 and engines["b"]["node"] == "host-b"
    assert mt["fleet.nodes"] == 2 and mt["fleet.engines"] == 3
    assert mt["fleet.peak_blocks.sum"] == 10 + 3 + 2
    assert mt["fleet.peak_blocks.simultaneous"] is None, "a simulated pool has no common timeline"
    assert mt["fleet.prefix_cache.hit_rate"] == pytest.approx((10 * 16 + 3 * 16) / ((20 + 6) * 32))
    # compare, report and export take it like any bundle; compare gates the fleet's metrics
    assert run_kvprof("compare", str(out), str(out)).returncode == 0
    budget = tmp_path / "budget.toml"
    budget.write_text('[budgets]\n"fleet.prefix_cache.min_engine_hit_rate" = { min = 0.9 }\n')
    r = run_kvprof("analyze", str(out), "--budget", str(budget))
    assert r.returncode == 1 and "fleet.prefix_cache.min_engine_hit_rate" in r.stdout + r.stderr
    r = run_kvprof("export", str(out), "--format", "perfetto", "-o", str(tmp_path / "t.json"))
    assert r.returncode == 0, r.stderr
    r = run_kvprof("report", str(out), "-o", str(tmp_path / "r.html"), "--no-whatif", timeout=300)
    assert r.returncode == 0, r.stderr


def test_simultaneous_peak_needs_the_aligned_timeline(tmp_path):
    """A holds its 10 blocks between its steps 9 and 10; B, moved there, holds its 3 at that
    moment: 13 at once on the aligned timeline; moved an hour earlier, never together: 10
    (the sum of the peaks is 13 both times)."""
    a = _record(tmp_path, "a", "20", "0.05")
    b = _record(tmp_path, "b", "6", "0")
    a9, b0 = int(Bundle(str(a)).marks().times_of("a-step")[9]), int(Bundle(str(b)).marks().times_of("b-step")[0])
    off_a = _offsets(a)[len(_offsets(a)) // 2]
    for delta, together in ((D_MARGIN, 13), (-3600 * 10**9, 10)):
        _move_to_another_host(b, a9 + delta - b0 + off_a)
        out = tmp_path / f"c{delta}.kvprof"
        assert run_kvprof("combine", "-q", str(out), str(a), str(b)).returncode == 0
        js = tmp_path / f"c{delta}.json"
        assert run_kvprof("analyze", str(out), "--json", str(js)).returncode == 0
        mt = {k: v["value"] for k, v in json.load(open(js))["metrics"].items()}
        assert mt["fleet.peak_blocks.sum"] == 13 and mt["fleet.peak_blocks.simultaneous"] == together


def test_combine_refuses_bad_input_with_one_line(parts, tmp_path):
    a, b = str(parts["a"]), str(parts["b"])
    out = tmp_path / "o.kvprof"
    cases = [
        ((str(out), a, str(tmp_path)), "not a kvprof bundle"),
        ((str(out), a, a), "given twice"),
        ((str(out), a, a + "/"), "given twice"),
        ((str(out),), ("Missing argument", "nothing to combine")),
        ((os.path.join(a, "inside.kvprof"), a, b), "apart from the parts"),
    ]
    copy = tmp_path / "copy.kvprof"
    import shutil

    shutil.copytree(a, copy)
    cases.append(((str(out), a, str(copy)), "the same recording given twice"))
    for args, words in cases:
        r = run_kvprof("combine", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert any(w in r.stderr for w in ((words,) if isinstance(words, str) else words)), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()
    assert run_kvprof("combine", "-q", str(out), a, b).returncode == 0
    r = run_kvprof("combine", str(out), a, b)
    assert r.returncode == 2 and "output exists" in r.stderr
    assert run_kvprof("combine", "-q", "--force", str(out), a, b).returncode == 0
    # a combined bundle combines again
    again = tmp_path / "again.kvprof"
    r = run_kvprof("combine", str(again), str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(again / "procs")) == sorted(os.listdir(out / "procs"))


def test_the_readmes_fleet_query_over_many_combined_runs(parts, tmp_path):
    """README "Many runs at fleet scale": the DuckDB query over several combined runs'
    Parquet exports gives, run by run and engine by engine, analyze's fleet figures."""
    duckdb = pytest.importorskip("duckdb")
    pytest.importorskip("pyarrow")
    import re

    from tests.conftest import ROOT

    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("### Many runs at fleet scale", 1)[1]
    sql = re.search(r"```sql\n(.*?)```", section, re.S).group(1)
    runs = tmp_path / "runs"
    expected = {}
    for run in ("monday", "tuesday"):
        combined = tmp_path / f"{run}.kvprof"
        assert run_kvprof("combine", "-q", str(combined), str(parts["a"]), str(parts["b"])).returncode == 0
        r = run_kvprof("export", str(combined), "--format", "parquet", "-o", str(runs / run))
        assert r.returncode == 0, r.stderr
        js = tmp_path / f"{run}.json"
        assert run_kvprof("analyze", str(combined), "--json", str(js)).returncode == 0
        for e in json.load(open(js))["sections"]["fleet"]["engines"]:
            expected[(run, e["label"])] = (
                None if e["hit_rate"] is None else pytest.approx(e["hit_rate"]),
                e["preemptions"],
            )
    con = duckdb.connect()
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the query reads runs/*/...
    try:
        statements = [s.strip() for s in sql.split(";") if s.strip()]
        for s in statements[:-1]:
            con.execute(s)
        rows = con.execute(statements[-1]).fetchall()
    finally:
        os.chdir(cwd)
    assert {(run, engine): (rate, pre) for run, engine, rate, pre in rows} == expected
    assert any("host-b" in engine for _, engine in expected)


@pytest.mark.skipif(
    importlib.util.find_spec("pyspark") is None or not shutil.which("java"), reason="needs pyspark and Java"
)
def test_the_readmes_fleet_query_on_spark(parts, tmp_path):
    """The same README query, unchanged, through the README's PySpark lines (skipped without
    pyspark and Java; run by hand: PYTHONPATH=<a venv with pyspark>/lib/python3.X/site-packages)."""
    duckdb = pytest.importorskip("duckdb")
    import re

    from tests.conftest import ROOT

    section = open(os.path.join(ROOT, "README.md")).read().split("### Many runs at fleet scale", 1)[1]
    sql = re.search(r"```sql\n(.*?)```", section, re.S).group(1)
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    for run in ("monday", "tuesday"):
        combined = tmp_path / f"{run}.kvprof"
        assert run_kvprof("combine", "-q", str(combined), str(parts["a"]), str(parts["b"])).returncode == 0
        assert (
            run_kvprof("export", str(combined), "--format", "parquet", "-o", str(tmp_path / "runs" / run)).returncode
            == 0
        )
    statements = [s.strip() for s in sql.split(";") if s.strip()]
    query = statements[-1]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        con = duckdb.connect()
        for s in statements[:-1]:
            con.execute(s)
        want = sorted(con.execute(query).fetchall(), key=lambda r: r[:2])
        shown: list = []
        scope = {"QUERY": query, "shown": shown}
        exec(code.replace("spark.sql(QUERY).show()", "shown.extend(spark.sql(QUERY).collect())"), scope)
        got = sorted((tuple(r) for r in shown), key=lambda r: r[:2])
        scope["spark"].stop()
    finally:
        os.chdir(cwd)
    assert len(got) == len(want) >= 4 and any("host-b" in r[1] for r in got)
    for g, w in zip(got, want):
        assert (
            g[:2] == w[:2]
            and g[3] == w[3]
            and (g[2] == w[2] or (None not in (g[2], w[2]) and abs(g[2] - w[2]) < 1e-12))
        )
