"""Every bad bundle: one line and exit 2, or an analysis that says what it skipped; never a
traceback, in bounded time and memory.

A seeded hypothesis fuzzer damages a real bundle's files (the JSON records field by
field, the chunk log and staging segments byte by byte) and runs analyze, export,
whatif and compare in-process; the classes a red-team pass found each have a test of
their own, some run as real processes under a memory cap.  ``KVPROF_FUZZ_EXAMPLES``
sets the number of fuzzed bundles (``make fuzz`` runs thousands).
"""

import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvprof.trace import stage
from tests.conftest import run_kvprof

pytestmark = pytest.mark.slow  # dozens of damaged bundles, each through every command (make test-quick leaves it out)

EXAMPLES = int(os.environ.get("KVPROF_FUZZ_EXAMPLES", "40"))
SECONDS = 180  # one fuzzed bundle through the four commands: a hang, not a slow or loaded machine (125 s seen at load 5 on 2 cores)


@pytest.fixture(scope="module")
def seed_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("seed") / "seed.kvprof"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(out),
        "--probe",
        "blocks,gc",
        "--",
        sys.executable,
        "-m",
        "kvprof.commands",
        "demo",
        "--requests",
        "400",
        "--num-blocks",
        "128",
    )
    assert r.returncode == 0, r.stderr
    # the what-if kernels compile on their first use (about 30 s, once per install): not timed below
    rc, err = run_in_process("whatif", str(out), "--block-size", "32", "--num-blocks", "64", "--json", os.devnull)
    assert rc == 0, err
    return out


def _proc_dir(bundle):
    return os.path.join(bundle, "procs", os.listdir(os.path.join(bundle, "procs"))[0])


def run_in_process(*args) -> tuple[int, str]:
    """The real command line, in this process: (exit code, stderr)."""
    from kvprof.commands import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(list(args))
    return rc, err.getvalue()


def assert_handled(bundle, other):
    """analyze, export, whatif and compare: exit 0, or a one-line error and exit 2."""
    t0 = time.monotonic()
    for args in (
        ["analyze", bundle, "--no-report", "--json", os.devnull],
        ["export", bundle, "-o", os.devnull],
        ["whatif", bundle, "--block-size", "32", "--num-blocks", "64", "--json", os.devnull],
        ["compare", other, bundle],
    ):
        rc, err = run_in_process(*args)
        assert rc in (0, 1, 2), (args, rc, err)  # 1: compare found a regression
        if rc == 2:
            assert err.startswith("kvprof: error: ") and err.count("\n") == 1, (args, err)
        assert "Traceback" not in err, err
    assert time.monotonic() - t0 < SECONDS


# -- field by field --------------------------------------------------------------------------
HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**31 - 1, 2**63, -(2**31), 10**12, 0, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["\udcff", "x" * 10000]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.recursive(st.integers(), lambda c: st.lists(c, max_size=2), max_leaves=5),
)


def _mutate_json(obj, path, value):
    """obj with the value at ``path`` (keys/indices, possibly missing) replaced."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(obj, dict) and obj:
        k = list(obj)[key % len(obj)]
        obj = dict(obj)
        obj[k] = _mutate_json(obj[k], rest, value)
    elif isinstance(obj, list) and obj:
        i = key % len(obj)
        obj = list(obj)
        obj[i] = _mutate_json(obj[i], rest, value)
    return obj


def _dump(obj) -> str:
    return json.dumps(obj, allow_nan=True)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_bundles_are_handled(seed_bundle, tmp_path_factory, data):
    b = str(tmp_path_factory.mktemp("f") / "f.kvprof")
    shutil.copytree(seed_bundle, b)
    proc = _proc_dir(b)
    target = data.draw(st.sampled_from(["manifest", "process", "meta", "chunks", "chunks", "stage"]))
    if target in ("manifest", "process"):
        path = os.path.join(b, "manifest.json") if target == "manifest" else os.path.join(proc, "process.json")
        obj = json.load(open(path))
        for _ in range(data.draw(st.integers(1, 3))):
            obj = _mutate_json(obj, data.draw(st.lists(st.integers(0, 40), min_size=1, max_size=3)), data.draw(HOSTILE))
        open(path, "w").write(_dump(obj))
    elif target == "meta":
        path = os.path.join(proc, "meta.jsonl")
        lines = open(path).read().splitlines()
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, len(lines) - 1))
            rec = json.loads(lines[i])
            lines[i] = _dump(
                _mutate_json(rec, data.draw(st.lists(st.integers(0, 10), min_size=1, max_size=2)), data.draw(HOSTILE))
            )
        open(path, "w").write("\n".join(lines) + "\n")
    else:
        path = os.path.join(proc, stage.CHUNKS)
        raw = bytearray(open(path, "rb").read())
        if target == "stage":  # a staging segment a dead process left, damaged
            raw = bytearray(stage.pack_block(10**13, 1, 0, -1, 0, 0, list(range(30))) * 20)
            path = os.path.join(proc, stage.stage_name(data.draw(st.integers(0, 10**6))))
        for _ in range(data.draw(st.integers(1, 4))):
            how = data.draw(st.sampled_from(["flip", "cut", "zero", "dup", "junk"]))
            at = data.draw(st.integers(0, max(0, len(raw) - 1)))
            if how == "flip" and raw:
                raw[at] ^= data.draw(st.integers(1, 255))
            elif how == "cut":
                del raw[at:]
            elif how == "zero":
                raw[at : at + 64] = bytes(len(raw[at : at + 64]))
            elif how == "dup":
                raw[at:at] = raw[at : at + data.draw(st.integers(1, 4096))]
            else:
                raw[at:at] = data.draw(st.binary(min_size=1, max_size=200))
        open(path, "wb").write(bytes(raw))
    assert_handled(b, str(seed_bundle))


# -- the classes found by hand ---------------------------------------------------------------
def _bundle(seed, tmp_path, name="b.kvprof"):
    b = str(tmp_path / name)
    shutil.copytree(seed, b)
    return b, _proc_dir(b)


def _edit_json(path, fn):
    obj = json.load(open(path))
    fn(obj)
    open(path, "w").write(_dump(obj))


def _meta(proc):
    return [json.loads(line) for line in open(os.path.join(proc, "meta.jsonl"))]


def _write_meta(proc, records):
    open(os.path.join(proc, "meta.jsonl"), "w").write("".join(_dump(r) + "\n" for r in records))


def _pool_edit(key, value):
    def edit(proc):
        recs = _meta(proc)
        for r in recs:
            if r.get("type") == "pool":
                if value is KeyError:
                    r.pop(key)
                else:
                    r[key] = value
        _write_meta(proc, recs)

    return edit


DEEP = "[" * 100000 + "]" * 100000


@pytest.mark.parametrize(
    "name, edit, expect",
    [
        ("deep manifest", lambda b, p: open(os.path.join(b, "manifest.json"), "w").write(DEEP), "nested too deeply"),
        (
            "deep process.json",
            lambda b, p: open(os.path.join(p, "process.json"), "w").write('{"pid": ' + DEEP + "}"),
            "nested too deeply",
        ),
        (
            "deep meta line",
            lambda b, p: open(os.path.join(p, "meta.jsonl"), "a").write('{"type": "x", "v": ' + DEEP + "}\n"),
            "nested too deeply",
        ),
        ("pool without its index", lambda b, p: _pool_edit("pool", KeyError)(p), "bad pool record"),
        ("num_blocks -1", lambda b, p: _pool_edit("num_blocks", -1)(p), "not a pool size"),
        ("num_blocks 2**63", lambda b, p: _pool_edit("num_blocks", 2**63)(p), "not a pool size"),
        ("num_blocks 1e308", lambda b, p: _pool_edit("num_blocks", 1e308)(p), "not a pool size"),
        ("num_blocks 10**12", lambda b, p: _pool_edit("num_blocks", 10**12)(p), "not a pool size"),
        ("block_size 0", lambda b, p: _pool_edit("block_size", 0)(p), "not a positive block size"),
    ],
)
def test_damaged_records_are_one_line(seed_bundle, tmp_path, name, edit, expect):
    b, proc = _bundle(seed_bundle, tmp_path)
    edit(b, proc)
    for cmd in (
        ["analyze", b],
        ["report", b, "-o", str(tmp_path / "r.html")],
        ["export", b, "-o", os.devnull],
        ["whatif", b],
        ["compare", b, b],
    ):
        rc, err = run_in_process(*cmd)
        assert rc == 2 and expect in err and err.count("\n") == 1, (cmd, rc, err)


@pytest.mark.parametrize(
    "edit",
    [
        lambda p: _edit_json(
            os.path.join(p, "process.json"),
            lambda o: o.update(pid="xyz", probes=[1], errors=5, start_ns=None, role=["x"]),
        ),
        lambda p: _edit_json(
            os.path.join(p, "process.json"), lambda o: o.update(pid=10**30, start_ns=-5, end_ns="late")
        ),
        lambda p: _pool_edit("bytes_per_block", "x")(p),
        lambda p: _pool_edit("name", {"a": 1})(p),
        lambda p: open(os.path.join(p, "meta.jsonl"), "a").write("7\n[1, 2]\nnull\n"),
        lambda p: _write_meta(
            p, [dict(r, s="\udcff" + str(r.get("s"))) if r.get("type") == "string" else r for r in _meta(p)]
        ),
    ],
)
def test_fields_of_the_wrong_type_do_not_break_any_command(seed_bundle, tmp_path, edit):
    b, proc = _bundle(seed_bundle, tmp_path)
    edit(proc)
    assert_handled(b, str(seed_bundle))
    rc, err = run_in_process("report", b, "-o", str(tmp_path / "r.html"))
    assert rc == 0, err


def test_block_ids_and_request_ids_at_the_ends_of_their_range(tmp_path):
    """A block id of -2**31 and a request id of 2**31-1 in the stream: dropped or unknown,
    never an index into a 16 GiB array."""
    script = tmp_path / "ends.py"
    script.write_text(
        "import kvprof.blocks, kvprof.runtime as rt\n"
        "pool = kvprof.blocks.Pool(num_blocks=8, block_size=16, name='p')\n"
        "pool.request_arrived('r', 10)\n"
        "pool.alloc([-2**31, 1], request='r')\n"
        "pool.request_state('r', 10, 1)\n"
        "rt.writer.block(rt.now(), 12, 0, 2**31 - 1, 5, 1, ())\n"
        "pool.free([1], request='r')\n"
    )
    out = tmp_path / "e.kvprof"
    assert run_kvprof("record", "-q", "-o", str(out), "--", sys.executable, str(script)).returncode == 0
    assert_handled(str(out), str(out))


def _limited(args, mem=3 << 30, timeout=60):
    """A real kvprof process under an address-space cap."""

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))

    return subprocess.run(
        [sys.executable, "-m", "kvprof.commands", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=cap,
    )


def test_sizes_are_not_trusted_from_the_file(seed_bundle, tmp_path):
    # a sparse 20 GB chunk log: read chunk by chunk, damaged at the first bad header
    b, proc = _bundle(seed_bundle, tmp_path, "sparse.kvprof")
    with open(os.path.join(proc, stage.CHUNKS), "r+b") as fh:
        fh.truncate(20 << 30)
    r = _limited(["analyze", b, "--json", "-"])
    assert r.returncode == 0, r.stderr
    assert any("damaged" in f["detail"] for f in json.loads(r.stdout)["findings"])
    # a version-1 stream as long: read in pieces
    v1 = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "format-v1", "demo.kvprof"
    )
    b1, p1 = _bundle(v1, tmp_path, "sparse1.kvprof")
    with open(os.path.join(p1, "blocks.bin"), "r+b") as fh:
        fh.truncate(20 << 30)
    r = _limited(["analyze", b1, "--no-report"], timeout=240)
    assert r.returncode in (0, 2) and "Traceback" not in r.stderr and "MemoryError" not in r.stderr, r.stderr
    # /dev/zero and FIFOs in place of the JSON files: refused at once
    for name in ("manifest.json", "process.json", "meta.jsonl"):
        b, proc = _bundle(seed_bundle, tmp_path, f"z-{name}")
        where = b if name == "manifest.json" else proc
        os.remove(os.path.join(where, name))
        os.symlink("/dev/zero", os.path.join(where, name))
        r = _limited(["analyze", b], timeout=30)
        assert r.returncode == 2 and "not a regular file" in r.stderr, r.stderr
        os.remove(os.path.join(where, name))
        os.mkfifo(os.path.join(where, name))
        r = _limited(["analyze", b], timeout=30)
        assert r.returncode == 2 and "not a regular file" in r.stderr, r.stderr


def test_thousands_of_process_directories(seed_bundle, tmp_path):
    b, proc = _bundle(seed_bundle, tmp_path, "many.kvprof")
    procs = os.path.dirname(proc)
    for i in range(2000):
        d = os.path.join(procs, f"{100000 + i}-{i}")
        os.mkdir(d)
        open(os.path.join(d, "process.json"), "w").write(
            json.dumps({"pid": 100000 + i, "start_ns": i, "role": "child"})
        )
    t0 = time.monotonic()
    r = _limited(["analyze", b, "--no-report", "--json", os.devnull], timeout=120)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 30


def test_impossible_values_are_left_out_not_reported(tmp_path):
    """GC pauses that overflow a sum or exceed the process's life, lookups that hit more than
    they asked: damaged records, left out and said; the figures stay sane."""
    script = tmp_path / "nonsense.py"
    script.write_text(
        "import kvprof.blocks, kvprof.runtime as rt\n"
        "pool = kvprof.blocks.Pool(num_blocks=8, block_size=16, name='p')\n"
        "pool.request_arrived('r', 10)\n"
        "pool.prefix_query('r', 16, 16)\n"
        "pool.prefix_query('r', 1, 2559236)\n"
        "pool.prefix_query('r', -5, 0)\n"
        "for i in range(3):\n"
        "    rt.writer.gc_pause(rt.now(), 2**62, 0, 1, 0)\n"
        "rt.writer.gc_pause(rt.now(), 1000, 2, 1, 0)\n"
    )
    out = tmp_path / "n.kvprof"
    assert (
        run_kvprof("record", "-q", "-o", str(out), "--probe", "blocks,gc", "--", sys.executable, str(script)).returncode
        == 0
    )
    r = run_kvprof("analyze", str(out), "--json", "-")
    assert r.returncode == 0, r.stderr
    a = json.loads(r.stdout)
    m = {k: v["value"] for k, v in a["metrics"].items()}
    assert m["blocks.prefix_cache.hit_rate"] == 1.0 and m["blocks.prefix_cache.query_tokens"] == 16
    assert 0 <= m["gc.pause_seconds_total"] < 1 and m["gc.time_share"] <= 1.0
    titles = " ".join(f["title"] + " " + f["detail"] for f in a["findings"])
    assert "prefix-cache lookups left out" in titles and "garbage-collector records with impossible values" in titles


def test_all_ff_streams_are_damage_not_data(seed_bundle, tmp_path):
    b, proc = _bundle(seed_bundle, tmp_path, "ff.kvprof")
    path = os.path.join(proc, stage.CHUNKS)
    size = os.path.getsize(path)
    open(path, "wb").write(b"\xff" * size)
    r = run_kvprof("analyze", b, "--json", "-")
    assert r.returncode == 0, r.stderr
    a = json.loads(r.stdout)
    assert a["metrics"]["blocks.events"]["value"] == 0
    assert any("damaged" in f["detail"] for f in a["findings"])


def test_a_marker_that_is_no_unicode_reaches_every_output(tmp_path):
    script = tmp_path / "m.py"
    script.write_text(
        "import kvprof, kvprof.blocks\npool = kvprof.blocks.Pool(num_blocks=4, block_size=4)\n"
        "kvprof.mark('\\udcff')\npool.alloc([1], request='\\udcfe')\npool.free([1], request='\\udcfe')\n"
    )
    out = tmp_path / "m.kvprof"
    assert run_kvprof("record", "-q", "-o", str(out), "--", sys.executable, str(script)).returncode == 0
    for args in (
        ["analyze", str(out)],
        ["report", str(out), "-o", str(tmp_path / "r.html")],
        ["export", str(out), "-o", str(tmp_path / "t.json")],
    ):
        r = run_kvprof(*args)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr)
    events = json.loads(open(tmp_path / "t.json").read())["traceEvents"]
    assert [e["name"] for e in events if e.get("ph") == "i" and e.get("s") == "t"] == ["\ufffd"]  # the marker, readable


@pytest.mark.parametrize("how", ["emptied", "removed"])
def test_a_chunk_log_emptied_or_removed_is_said(how, tmp_path):
    """The process counted its block events at exit: a log that holds none of them is damage,
    not a quiet run with no events."""
    from tests.conftest import ROOT

    b = tmp_path / "d.kvprof"
    shutil.copytree(os.path.join(ROOT, "fixtures", "demo.kvprof"), b)
    (proc,) = (b / "procs").iterdir()
    log = proc / stage.CHUNKS
    if how == "emptied":
        log.write_bytes(b"")
    else:
        log.unlink()
    r = run_kvprof("analyze", str(b), "--json", "-")
    assert r.returncode == 0, r.stderr
    damage = [f for f in json.loads(r.stdout)["findings"] if f["title"] == "Parts of the bundle could not be read"]
    assert damage and "block events" in damage[0]["detail"] and "are not in its files" in damage[0]["detail"], damage
