"""The bundle format: writer/reader round trip (version 2), crash leftovers, damage the
reader steps over, version-1 bundles, and refusals."""

import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest

from kvprof.errors import BundleError
from kvprof.trace import format as fmt
from kvprof.trace import stage
from kvprof.trace.reader import Bundle
from tests.conftest import ROOT, recorded_events, run_kvprof

V1 = os.path.join(ROOT, "fixtures", "format-v1", "demo.kvprof")


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "demo.kvprof"
    r = run_kvprof("record", "-q", "-o", str(out), "-m", "kvprof.demo", "--requests", "600")
    assert r.returncode == 0, r.stderr
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _chunks(path):
    """The chunk log parsed with struct, zlib and numpy alone, as docs/trace-format.md says."""
    out = []
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
        magic, payload, tags, _, nrec, raw_len, comp_len, seg_seq, seg_count, crc = struct.unpack_from(
            "<4sBBHIIIqII", data, pos
        )
        assert magic == b"KVC2" and zlib.crc32(data[pos : pos + 36]) == struct.unpack_from("<I", data, pos + 36)[0]
        body = data[pos + 40 : pos + 40 + comp_len]
        assert zlib.crc32(body) == crc
        raw = zlib.decompress(body)
        width = 48 if payload == 1 else 24
        assert len(raw) == raw_len == nrec * width
        out.append((payload, np.frombuffer(raw, np.uint8).reshape(width, nrec).T.copy()))
        pos += 40 + comp_len
    return out


@pytest.mark.slow
def test_chunks_open_with_struct_zlib_and_numpy(demo_bundle):
    proc = next((demo_bundle / "procs").iterdir())
    assert not [f for f in os.listdir(proc) if f.endswith(".kvs")]  # a clean exit compressed every segment
    recs = np.concatenate([r for p, r in _chunks(proc / "events.kvc") if p == 1])
    tags = recs[:, 47]
    blocks = recs[tags == stage.TAG_BLOCK]
    ev = np.ascontiguousarray(blocks[:, :35]).view(fmt.BLOCK_EVENT_DTYPE).ravel()
    assert len(ev) > 1000 and (np.diff(ev["t"]) >= 0).all()
    # block ids: up to 3 in the event record, the rest in the continuation records after it
    assert int(ev["n"].sum()) == int(np.minimum(ev["n"], 3).sum()) + int((tags == stage.TAG_IDS).sum() * 11) - int(
        (-(np.maximum(ev["n"].astype(np.int64) - 3, 0)) % 11).sum()
    )
    meta = [json.loads(line) for line in open(proc / "meta.jsonl")]
    assert any(m["type"] == "pool" and m["num_blocks"] == 512 for m in meta)
    info = json.load(open(proc / "process.json"))
    assert info["counts"]["blocks"] == len(ev) and info["format"] == "stage+chunks"
    stream = Bundle(str(demo_bundle)).block_stream()
    np.testing.assert_array_equal(stream.t, ev["t"])
    np.testing.assert_array_equal(stream.kind, ev["kind"])


@pytest.mark.slow
def test_a_damaged_chunk_ends_the_log_and_says_so(demo_bundle, tmp_path):
    b = _copy(demo_bundle, tmp_path / "cut.kvprof")
    proc = next((b / "procs").iterdir())
    full = Bundle(str(demo_bundle)).block_stream()
    chunks = _chunks(proc / "events.kvc")
    assert len(chunks) >= 2
    data = (proc / "events.kvc").read_bytes()
    first_len = 40 + struct.unpack_from("<I", data, 16)[0]
    (proc / "events.kvc").write_bytes(data[: first_len + 100])  # the second chunk cut short (a full disk)
    with open(proc / "meta.jsonl", "ab") as fh:
        fh.write(b'{"type": "string", "id": 99')  # partial last line
    bundle = Bundle(str(b))
    s = bundle.block_stream()
    assert 0 < len(s) < len(full)
    np.testing.assert_array_equal(s.t, full.t[: len(s)])
    assert any("events.kvc damaged" in d and "cut short" in d for d in bundle.damage())
    for flip in (45, first_len + 41, first_len + 200):  # a byte of a header, a payload
        bad = bytearray(data)
        bad[flip] ^= 0xFF
        (proc / "events.kvc").write_bytes(bytes(bad))
        r = run_kvprof("analyze", str(b), "--json", "-")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert any(f["title"] == "Parts of the bundle could not be read" for f in out["findings"])


@pytest.mark.slow
def test_staging_left_by_a_dead_process_is_read_and_a_torn_entry_dropped(demo_bundle, tmp_path):
    b = _copy(demo_bundle, tmp_path / "torn.kvprof")
    proc = next((b / "procs").iterdir())
    before = recorded_events(b)
    # a staging segment as a killed process leaves it: two whole events, then an event
    # whose continuation records never got written
    seg = stage.PACK_N[1].pack(10**15, 1, 0, -1, 0, 0, 1, 7, stage.TAG_BLOCK)
    seg += stage.pack_block(10**15 + 1, 2, 0, -1, 0, 0, list(range(20)))
    seg += stage.BLOCK_REC.pack(10**15 + 2, 1, 0, -1, 0, 0, 9, 1, 2, 3, stage.TAG_BLOCK)  # claims 9 ids, has 3
    (proc / stage.stage_name(999)).write_bytes(seg + bytes(4096))
    after = recorded_events(b)
    n = fmt.BLOCK_EVENT_DTYPE.itemsize
    assert len(after["blocks"]) == len(before["blocks"]) + 2 * n
    tail = np.frombuffer(after["blocks"][-2 * n :], dtype=fmt.BLOCK_EVENT_DTYPE)
    assert tail["t"].tolist() == [10**15, 10**15 + 1] and tail["n"].tolist() == [1, 20]
    ids = np.frombuffer(after["block_ids"], dtype=np.int32)
    assert ids[-21:].tolist() == [7] + list(range(20))


def test_a_segment_beside_its_chunk_is_not_read_twice(tmp_path):
    """The process died after compressing a segment but before removing it."""
    from kvprof.trace.writer import ProcessWriter

    w = ProcessWriter(str(tmp_path / "b.kvprof"), "main", ["blocks"])
    for i in range(100):
        w.block(i, 1, 0, -1, 0, 0, [i % 5])
    seg = w._seg
    kept = open(seg.path, "rb").read()
    w.close()
    assert not os.path.exists(seg.path)
    open(seg.path, "wb").write(kept)  # as if the unlink never happened
    (tmp_path / "b.kvprof" / "manifest.json").write_text(json.dumps({"format": "kvprof.bundle", "format_version": 2}))
    (proc,) = Bundle(str(tmp_path / "b.kvprof")).processes
    rows = np.concatenate([r for r, _ in proc.block_pieces()])
    assert rows["t"].tolist() == list(range(100))


def test_version_1_bundles_still_read():
    bundle = Bundle(V1)
    assert bundle.processes[0].version == 1
    r = run_kvprof("analyze", V1, "--json", "-")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["blocks.events"]["value"] > 1000


def test_truncated_version_1_streams_are_read_up_to_the_cut(tmp_path):
    b = _copy(V1, tmp_path / "cut.kvprof")
    proc = next((b / "procs").iterdir())
    full = Bundle(V1).block_stream()
    # cut the events mid-record and the ids even shorter, as a crash between writes could
    with open(proc / "blocks.bin", "r+b") as fh:
        fh.truncate(os.path.getsize(proc / "blocks.bin") - fmt.BLOCK_EVENT_DTYPE.itemsize * 10 - 5)
    with open(proc / "block_ids.bin", "r+b") as fh:
        fh.truncate(os.path.getsize(proc / "block_ids.bin") - 4 * 200 - 2)
    s = Bundle(str(b)).block_stream()
    assert 0 < len(s) < len(full) - 10
    assert int(s.n.sum()) <= len(s.ids)
    np.testing.assert_array_equal(s.t, full.t[: len(s)])
    r = run_kvprof("analyze", str(b), "--no-report", "--json", str(tmp_path / "o.json"))
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
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
        (
            lambda p: (p.mkdir(), (p / "manifest.json").write_text('{"format": "kvprof.bundle", "format_version": 9}')),
            "newer than this kvprof",
        ),
    ],
)
def test_foreign_or_broken_bundles_raise_one_error_type(tmp_path, make, message):
    p = tmp_path / "thing.kvprof"
    make(p)
    with pytest.raises(BundleError, match=message):
        Bundle(str(p))
    r = run_kvprof("analyze", str(p))
    assert r.returncode == 2
    cli_message = {"no such bundle": "no such", "not a directory": "not a kvprof bundle"}.get(
        message, message.split("'")[0]
    )
    assert cli_message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.slow
def test_a_damaged_side_record_line_is_skipped_and_said(demo_bundle, tmp_path):
    b = _copy(demo_bundle, tmp_path / "bad.kvprof")
    proc = next((b / "procs").iterdir())
    lines = (proc / "meta.jsonl").read_bytes().split(b"\n")
    lines.insert(len(lines) // 2, b"garbage")
    (proc / "meta.jsonl").write_bytes(b"\n".join(lines))
    bundle = Bundle(str(b))
    assert any("1 damaged side record line(s) skipped" in d for d in bundle.damage())
    assert len(bundle.block_stream()) == len(Bundle(str(demo_bundle)).block_stream())


def test_bad_values_from_a_pool_are_clamped_or_dropped_and_the_rest_kept(tmp_path):
    """Out-of-range block ids and arguments are clamped to their columns, values that are
    no integers dropped; every other event of the process is kept, and both are said."""
    script = tmp_path / "bad.py"
    script.write_text(
        "import kvprof.blocks\n"
        "pool = kvprof.blocks.Pool(num_blocks=8, block_size=16, name='p')\n"
        "for i in range(4000):\n"
        "    pool.alloc([i % 8], request='r')\n"
        "    if i == 100:\n"
        "        pool.alloc([2**31], request='r')\n"
        "        pool.alloc([2**40, 1], request='r')\n"
        "        pool.alloc([None], request='r')\n"
        "        pool.request_state('r', 2**70, None)\n"
        "        pool.allocation_failed('r', 'x', 3)\n"
        "    pool.free([i % 8], request='r')\n"
    )
    out = tmp_path / "b.kvprof"
    r = run_kvprof("record", "-q", "-o", str(out), "--", __import__("sys").executable, str(script))
    assert r.returncode == 0, r.stderr
    (proc,) = Bundle(str(out)).processes
    rows = np.concatenate([r for r, _ in proc.block_pieces()])
    # the two clamped allocations, the state (2**70 clamped, None as 0), the refusal ('x' as 0)
    # kept; the allocation of block None dropped
    assert len(rows) == 8000 + 4
    errors = json.load(open(os.path.join(proc.dir, "process.json")))["errors"]
    assert (
        any("clamped" in e for e in errors) and any("dropped" in e for e in errors) and any("as 0" in e for e in errors)
    )
    a = run_kvprof("analyze", str(out), "--json", "-")
    assert a.returncode == 0, a.stderr
    assert (
        json.loads(a.stdout)["metrics"]["blocks.events"]["value"] == 8000 + 1
    )  # the 2**40 pair's id 1; the rest out of range


def test_segments_are_read_in_their_order_wherever_they_are(tmp_path):
    """A rotation interrupted by a signal handler that closes the recording leaves the old
    segment as a file while the newer one went into the chunk log: read in order anyway."""
    from kvprof.trace import codec
    from kvprof.trace.writer import ProcessWriter

    w = ProcessWriter(str(tmp_path / "o.kvprof"), "main", ["blocks"])
    for i in range(10000):  # the first 256 KiB segment holds 5,461 records: two segments
        w.block(i, 1, 0, -1, 0, 0, [i % 5])
    w.close()
    log = os.path.join(w.dir, stage.CHUNKS)
    data = open(log, "rb").read()
    first_len = 40 + struct.unpack_from("<I", data, 16)[0]
    head = stage.ChunkHeader(data[:40])
    assert head.seg_seq == 0 and len(data) > first_len
    # as if segment 0 had never been compressed: its records back in its file, its chunk gone
    recs = codec.decode_chunk(head, data[40:first_len])
    open(os.path.join(w.dir, stage.stage_name(0)), "wb").write(recs.tobytes() + bytes(4096))
    open(log, "wb").write(data[first_len:])
    (tmp_path / "o.kvprof" / "manifest.json").write_text(json.dumps({"format": "kvprof.bundle", "format_version": 2}))
    (proc,) = Bundle(str(tmp_path / "o.kvprof")).processes
    rows = np.concatenate([r for r, _ in proc.block_pieces()])
    assert rows["t"].tolist() == list(range(10000))


def test_interned_request_ids_are_kvprofs_copies(tmp_path):
    """The writer's table of request ids holds copies it made, not the program's strings: a
    program that drops its request ids frees them (tracemalloc would otherwise charge the
    program's line with kvprof's table, as a leak)."""
    import gc
    import weakref

    from kvprof.trace.writer import ProcessWriter

    class Rid(str):  # a str subclass so that a weak reference can watch it
        pass

    w = ProcessWriter(str(tmp_path / "r.kvprof"), "main", ["blocks"])
    rid = Rid("request-0001")
    watch = weakref.ref(rid)
    sid = w.intern_request(rid)
    assert w.intern_request("request-0001") == sid  # the same id, the same number
    del rid
    gc.collect()
    assert watch() is None
    plain = "".join(["request-", "0002"])
    w.intern_request(plain)
    assert all(k is not plain for k in w._strings)
    w.close()
