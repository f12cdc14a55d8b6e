"""Fuzzing the snapshot loader: whatever the bytes, `loads` gives a snapshot that the analysis
and the JSON section read, or a one-line BundleError; never another exception, never more
than BOUND_S seconds, and nothing a pickle asks for runs.

Three sources: real snapshots' pickle bytes mutated (bits flipped, opcodes written over,
pieces inserted, cut, repeated), opcode sequences generated from the pickle machine's whole
vocabulary (globals, BUILD, memo, frames, deep nesting included), and snapshot-shaped plain
data with odd values where numbers and strings belong, pickled with protocols 2 to 5.

Seeded and bounded: KVPROF_FUZZ_EXAMPLES examples per source (default 25, a few seconds);
KVPROF_FUZZ_EXAMPLES=5000 for a long run; KVPROF_FUZZ_SEED picks another seed."""

import dataclasses
import json
import os
import pickle
import struct
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from kvprof.analysis.torch_memory import snapshot_section
from kvprof.analysis.torch_memory import analyze_snapshot
from kvprof.errors import BundleError
from kvprof.trace.torch_snapshot import loads
from tests.conftest import ROOT

pytestmark = (
    pytest.mark.slow
)  # the fuzz suite: hundreds of generated and mutated snapshots (make test-quick leaves it out)

EXAMPLES = int(os.environ.get("KVPROF_FUZZ_EXAMPLES", "25"))
SEED = int(os.environ.get("KVPROF_FUZZ_SEED", "20261201"))
BOUND_S = 30
SNAPS = os.path.join(ROOT, "fixtures", "torch-snapshots")
MARKER = os.path.join(tempfile.gettempdir(), f"kvprof-fuzz-ran-{os.getpid()}")
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def _small_trace_snapshot(protocol: int) -> bytes:
    site = [
        {"filename": "/m/model.py", "line": 3, "name": "forward"},
        {"filename": "run.py", "line": 9, "name": "<module>"},
    ]
    trace = [
        {
            "action": a,
            "addr": 1 << 20 | (i % 3) << 12,
            "size": 4096 * (1 + i % 2),
            "stream": 0,
            "time_us": 100 + i,
            "frames": site if a == "alloc" else [],
        }
        for i, a in enumerate(
            ["segment_alloc", "alloc", "free_requested", "free_completed", "alloc", "oom", "alloc", "free", "snapshot"]
        )
    ]
    trace[5]["device_free"] = 0
    seg = {
        "device": 0,
        "address": 1 << 20,
        "total_size": 3 << 12,
        "stream": 0,
        "segment_type": "small",
        "segment_pool_id": (0, 0),
        "is_expandable": False,
        "blocks": [
            {"address": 1 << 20, "size": 4096, "requested_size": 4000, "state": "active_allocated", "frames": site},
            {"address": 1 << 20 | 4096, "size": 8192, "requested_size": 0, "state": "inactive", "frames": []},
        ],
    }
    return pickle.dumps(
        {"segments": [seg], "device_traces": [trace], "allocator_settings": {"expandable_segments": False}},
        protocol=protocol,
    )


BASES = [
    open(os.path.join(SNAPS, f), "rb").read()
    for f in ("docubox.pickle", "sketchkv2.pickle", "assignment2-systems.pickle")
]
BASES += [_small_trace_snapshot(p) for p in (2, 3, 4, 5)]


def _check(data: bytes) -> None:
    t0 = time.monotonic()
    try:
        snap = loads(data, "fuzz.pickle")
    except BundleError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("fuzz.pickle")
    else:
        a = analyze_snapshot(snap)
        part = snapshot_section(a, source="fuzz.pickle")
        json.dumps(part.section)
        json.dumps({k: v for k, v in part.metrics.items()})
        assert dataclasses.asdict(a)["segments"] == len(snap["segments"])
        for s in snap["segments"][:3]:  # the segment map reads the blocks as dicts
            list(s["blocks"])
        for dev in snap["device_traces"][:2]:
            list(dev)[:50]
    assert time.monotonic() - t0 < BOUND_S
    assert not os.path.exists(MARKER), "a pickle ran code"


# -- mutations of real pickles ------------------------------------------------------------------
OPCODE_BYTES = b"(.012NPQRSabcdeghijklmopqrstu}])\x80\x81\x82\x83\x84\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x90\x91\x92\x93\x94\x95\x96\x97\x98"


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "opcode", "insert", "delete", "repeat", "truncate", "number"]))
        i = draw(st.integers(2, max(2, len(data) - 1)))
        if kind == "flip" and i < len(data):
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "opcode" and i < len(data):
            data[i] = draw(st.sampled_from(OPCODE_BYTES))
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=12))
        elif kind == "delete":
            del data[i : i + draw(st.integers(1, 64))]
        elif kind == "repeat":
            n = draw(st.integers(1, 32))
            data[i:i] = data[i : i + n] * draw(st.integers(2, 50))
        elif kind == "truncate":
            del data[i:]
        elif kind == "number" and i + 4 <= len(data):  # a length, an index or a size gone wild
            data[i : i + 4] = struct.pack(
                "<I", draw(st.sampled_from([0, 1, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
            )
    return bytes(data)


@seed(SEED)
@FUZZ
@given(mutated())
def test_mutated_real_snapshots(data):
    _check(data)


# -- generated opcode sequences ---------------------------------------------------------------
WORDS = [
    "segments",
    "blocks",
    "size",
    "state",
    "active_allocated",
    "inactive",
    "total_size",
    "device_traces",
    "action",
    "alloc",
    "free_requested",
    "free_completed",
    "oom",
    "addr",
    "time_us",
    "frames",
    "filename",
    "line",
    "name",
    "segment_pool_id",
    "allocator_settings",
    "requested_size",
    "os",
    "system",
    "builtins",
    "eval",
    f"touch {MARKER}",
    "",
    "é\u2028\n",
]


def _string(word: str) -> bytes:
    raw = word.encode("utf-8", "surrogatepass")
    return b"\x8c" + bytes([len(raw)]) + raw


@st.composite
def opcode(draw):
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return _string(draw(st.sampled_from(WORDS)))
    if kind == 1:
        return b"K" + bytes([draw(st.integers(0, 255))])
    if kind == 2:
        return b"J" + struct.pack("<i", draw(st.integers(-(1 << 31), (1 << 31) - 1)))
    if kind == 3:
        v = draw(st.sampled_from([0, -1, 1 << 40, 1 << 63, -(1 << 63), 10**30]))
        enc = pickle.encode_long(v)
        return b"\x8a" + bytes([len(enc)]) + enc
    if kind == 4:
        return draw(st.sampled_from([b"h", b"q"])) + bytes([draw(st.integers(0, 8))])  # BINGET, BINPUT
    if kind == 5:
        return b"c" + draw(st.sampled_from([b"os\nsystem\n", b"builtins\neval\n", b"posix\nsystem\n", b"kvprof\nx\n"]))
    if kind == 6:
        return draw(st.sampled_from([b"r", b"j"])) + struct.pack(
            "<I", draw(st.sampled_from([0, 1, 5, 0x7FFFFFFF, 0xFFFFFFFF]))
        )
    if kind == 7:
        return b"G" + struct.pack(">d", draw(st.floats(allow_nan=True, allow_infinity=True)))
    if kind == 8:
        return b")" + b"\x85" * draw(st.sampled_from([1, 40, 100_000]))  # nesting, shallow or deep
    return bytes([draw(st.sampled_from(b"(.0N}])tldaesub\x85\x86\x87\x88\x89\x8f\x90\x91\x93\x94\x81Ro"))])


@st.composite
def opcode_stream(draw):
    proto = draw(st.sampled_from([b"\x80\x02", b"\x80\x04", b"\x80\x05"]))
    body = b"".join(draw(st.lists(opcode(), min_size=1, max_size=60)))
    return proto + body + draw(st.sampled_from([b".", b"", b"s."]))


@seed(SEED)
@FUZZ
@given(opcode_stream())
def test_generated_opcode_streams(data):
    _check(data)


# -- snapshot-shaped plain data with odd values ------------------------------------------------
ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(),
    st.text(max_size=6),
    st.binary(max_size=4),
    st.lists(st.integers(0, 3), max_size=3),
    st.tuples(st.integers(), st.integers()),
    st.just({}),
)


def _field(good):
    return st.one_of(good, good, good, ODD)


BLOCK = st.fixed_dictionaries(
    {
        "size": _field(st.integers(0, 1 << 30)),
        "state": _field(st.sampled_from(["active_allocated", "inactive", "active_pending_free"])),
    },
    optional={
        "requested_size": _field(st.integers(0, 1 << 30)),
        "address": _field(st.integers(0, 1 << 48)),
        "frames": _field(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "filename": _field(st.text(max_size=8)),
                        "line": _field(st.integers(0, 99)),
                        "name": _field(st.text(max_size=8)),
                    }
                ),
                max_size=3,
            )
        ),
        "history": _field(st.lists(st.fixed_dictionaries({"real_size": _field(st.integers(0, 1 << 30))}), max_size=2)),
    },
)
SEGMENT = st.fixed_dictionaries(
    {"total_size": _field(st.integers(0, 1 << 34)), "blocks": _field(st.lists(BLOCK, max_size=4))},
    optional={
        "device": _field(st.integers(0, 3)),
        "address": _field(st.integers(0, 1 << 48)),
        "stream": _field(st.integers(0, 9)),
        "segment_type": _field(st.sampled_from(["large", "small"])),
        "segment_pool_id": _field(st.tuples(st.integers(0, 2), st.integers(0, 2))),
        "is_expandable": ODD,
    },
)
ENTRY = st.fixed_dictionaries(
    {
        "action": _field(
            st.sampled_from(
                [
                    "alloc",
                    "free_requested",
                    "free_completed",
                    "free",
                    "segment_alloc",
                    "segment_free",
                    "oom",
                    "snapshot",
                    "x",
                ]
            )
        )
    },
    optional={
        "addr": _field(st.integers(0, 7)),
        "size": _field(st.integers(0, 1 << 30)),
        "stream": _field(st.integers(0, 3)),
        "time_us": _field(st.integers(0, 1000)),
        "device_free": _field(st.integers(0, 1 << 30)),
        "frames": _field(
            st.lists(
                st.fixed_dictionaries(
                    {"filename": st.text(max_size=8), "line": st.integers(0, 9), "name": st.text(max_size=8)}
                ),
                max_size=5,
            )
        ),
    },
)
SNAPSHOT = st.one_of(
    st.fixed_dictionaries(
        {"segments": _field(st.lists(SEGMENT, max_size=4))},
        optional={
            "device_traces": _field(st.lists(_field(st.lists(ENTRY, max_size=30)), max_size=3)),
            "allocator_settings": _field(
                st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-(1 << 70), 1 << 70)), ODD, max_size=4)
            ),
            "external_annotations": _field(st.lists(ODD, max_size=3)),
        },
    ),
    st.lists(SEGMENT, max_size=3),
)


@seed(SEED)
@FUZZ
@given(SNAPSHOT, st.integers(2, 5))
def test_snapshot_shaped_data_with_odd_values(obj, protocol):
    _check(pickle.dumps(obj, protocol=protocol))
