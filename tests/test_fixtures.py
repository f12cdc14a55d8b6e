"""Fixtures are real bundles from `make fixtures`; they must stay readable and regenerable."""

import os
import sys

import pytest

from kvprof.trace.reader import Bundle
from tests.conftest import ROOT, analyzed_metrics, recorded_events, run_kvprof

pytestmark = pytest.mark.slow  # re-records the fixtures (make test-quick leaves it out)

FIX = os.path.join(ROOT, "fixtures")


def test_demo_fixture_numbers():
    m = analyzed_metrics(os.path.join(FIX, "demo.kvprof"))
    assert m["blocks.events"] == 7174
    assert m["blocks.preemptions"] == 50 and m["blocks.allocation_failures"] == 279
    assert (m["blocks.prefix_cache.query_tokens"], m["blocks.prefix_cache.hit_tokens"]) == (25114, 9760)
    assert m["blocks.evictions"] == 1363 and m["blocks.peak_blocks"] == 255
    assert m["blocks.leaked_blocks"] == 0 and m["blocks.refcount_errors"] == 0
    assert m["blocks.internal_fragmentation.time_weighted"] == pytest.approx(0.035565, abs=1e-5)


def test_leak_fixture_reports_the_planted_leak():
    r = run_kvprof("analyze", os.path.join(FIX, "demo-leak.kvprof"), "--width", "80")
    assert r.returncode == 0
    assert "10 blocks leaked" in r.stdout
    assert analyzed_metrics(os.path.join(FIX, "demo-leak.kvprof"))["blocks.leaked_blocks"] == 10


def test_sigkilled_fixture_keeps_every_event():
    b = Bundle(os.path.join(FIX, "crash-sigkill.kvprof"))
    assert b.manifest["target"]["signal_name"] == "SIGKILL"
    # 39 allocations, then 0.8 s later 2 more just before the SIGKILL: all in the staging
    # segment the killed process left (format 1 lost the last two)
    assert any(f.endswith(".kvs") for f in os.listdir(b.processes[0].dir))
    assert analyzed_metrics(os.path.join(FIX, "crash-sigkill.kvprof"))["blocks.events"] == 41
    r = run_kvprof("analyze", os.path.join(FIX, "crash-sigkill.kvprof"))
    assert "killed by SIGKILL" in r.stdout


def test_demo_fixture_is_regenerable(tmp_path):
    out = tmp_path / "again.kvprof"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(out),
        "--",
        sys.executable,
        "-m",
        "kvprof.commands",
        "demo",
        "--requests",
        "120",
        "--num-blocks",
        "256",
        "--seed",
        "1",
    )
    assert r.returncode == 0, r.stderr
    new, old = recorded_events(out), recorded_events(os.path.join(FIX, "demo.kvprof"))
    assert len(new["blocks"]) > 1000
    assert new["blocks"] == old["blocks"] and new["block_ids"] == old["block_ids"]
