"""Bundle format v1: writer/reader round trip, crash leftovers, and refusals."""

import json
import os

import numpy as np
import pytest

from kvprof.errors import BundleError
from kvprof.trace import format as fmt
from kvprof.trace.reader import Bundle
from tests.conftest import run_kvprof


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "demo.kvprof"
    r = run_kvprof("record", "-q", "-o", str(out), "-m", "kvprof.demo", "--requests", "60")
    assert r.returncode == 0, r.stderr
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_streams_open_with_plain_numpy(demo_bundle):
    proc = next((demo_bundle / "procs").iterdir())
    ev = np.fromfile(proc / "blocks.bin", dtype=fmt.BLOCK_EVENT_DTYPE)
    ids = np.fromfile(proc / "block_ids.bin", dtype=fmt.BLOCK_ID_DTYPE)
    assert len(ev) > 100 and int(ev["n"].sum()) == len(ids)
    assert (np.diff(ev["t"]) >= 0).all()
    meta = [json.loads(line) for line in open(proc / "meta.jsonl")]
    assert any(m["type"] == "pool" and m["num_blocks"] == 512 for m in meta)
    info = json.load(open(proc / "process.json"))
    assert info["counts"]["blocks"] == len(ev)


def test_truncated_streams_are_read_up_to_the_cut(demo_bundle, tmp_path):
    b = _copy(demo_bundle, tmp_path / "cut.kvprof")
    proc = next((b / "procs").iterdir())
    full = Bundle(str(demo_bundle)).block_stream()
    # cut the events mid-record and the ids even shorter, as a crash between writes could
    with open(proc / "blocks.bin", "r+b") as fh:
        fh.truncate(os.path.getsize(proc / "blocks.bin") - fmt.BLOCK_EVENT_DTYPE.itemsize * 10 - 5)
    with open(proc / "block_ids.bin", "r+b") as fh:
        fh.truncate(os.path.getsize(proc / "block_ids.bin") - 4 * 200 - 2)
    with open(proc / "meta.jsonl", "ab") as fh:
        fh.write(b'{"type": "string", "id": 99')  # partial last line
    s = Bundle(str(b)).block_stream()
    assert 0 < len(s) < len(full) - 10
    assert int(s.n.sum()) <= len(s.ids)
    np.testing.assert_array_equal(s.t, full.t[: len(s)])
    r = run_kvprof("analyze", str(b), "--no-report", "--json", str(tmp_path / "o.json"))
    assert r.returncode == 0, r.stderr


def test_interrupted_recorder_manifest_still_reads(demo_bundle, tmp_path):
    b = _copy(demo_bundle, tmp_path / "rec.kvprof")
    man = json.load(open(b / "manifest.json"))
    man["status"] = "recording"
    for k in ("processes", "target", "end_time"):
        man.pop(k, None)
    json.dump(man, open(b / "manifest.json", "w"))
    bundle = Bundle(str(b))
    assert len(bundle.processes) == 1 and len(bundle.block_stream()) > 0
    r = run_kvprof("analyze", str(b))
    assert r.returncode == 0 and "did not finish" in r.stdout


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such bundle"),
        (lambda p: p.write_text("x"), "not a directory"),
        (lambda p: p.mkdir(), "no manifest.json"),
        (lambda p: (p.mkdir(), (p / "manifest.json").write_text("{nope")), "manifest unreadable"),
        (lambda p: (p.mkdir(), (p / "manifest.json").write_text("[1]")), "not a JSON object"),
        (lambda p: (p.mkdir(), (p / "manifest.json").write_text('{"format": "other"}')), "manifest format 'other'"),
        (lambda p: (p.mkdir(), (p / "manifest.json").write_text('{"format": "kvprof.bundle", "format_version": 9}')), "newer than this kvprof"),
    ],
)
def test_foreign_or_broken_bundles_raise_one_error_type(tmp_path, make, message):
    p = tmp_path / "thing.kvprof"
    make(p)
    with pytest.raises(BundleError, match=message):
        Bundle(str(p))
    r = run_kvprof("analyze", str(p))
    assert r.returncode == 2
    cli_message = {"no such bundle": "no such", "not a directory": "not a kvprof bundle"}.get(message, message.split("'")[0])
    assert cli_message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_corrupt_side_record_is_a_bundle_error(demo_bundle, tmp_path):
    b = _copy(demo_bundle, tmp_path / "bad.kvprof")
    proc = next((b / "procs").iterdir())
    with open(proc / "meta.jsonl", "ab") as fh:
        fh.write(b"garbage\n")
    with pytest.raises(BundleError, match="corrupt side record"):
        Bundle(str(b))
