"""Nothing recorded is lost, whatever kills the process: each way of dying, in the main
process, a spawned child and a forked child; the events are counted after analysis."""

import json
import os
import sys

import pytest

from kvprof.trace.reader import Bundle
from tests.conftest import WORKLOADS, run_kvprof

pytestmark = (
    pytest.mark.slow
)  # the crash matrix: a workload recorded and killed 33 ways (make test-quick leaves it out)

N = 4000
WAYS = [
    "os_exit",
    "sigkill",
    "sigsegv",
    "sigabrt",
    "sighup",
    "sigquit",
    "sigusr1",
    "sigusr2",
    "sigterm",
    "exception",
    "sys_exit",
]


@pytest.mark.parametrize("where", ["main", "spawn", "fork"])
@pytest.mark.parametrize("how", WAYS)
def test_no_recorded_event_is_lost(tmp_path, where, how):
    out = tmp_path / "c.kvprof"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(out),
        "--",
        sys.executable,
        os.path.join(WORKLOADS, "crash_matrix.py"),
        where,
        how,
        str(N),
    )
    assert "Traceback" not in r.stderr or how == "exception", r.stderr
    bundle = Bundle(str(out))
    dying = [p for p in bundle.processes if p.pools]
    assert len(dying) == 1, [p.info for p in bundle.processes]
    proc = dying[0]
    rows = [len(r) for r, _ in proc.block_pieces()]
    assert sum(rows) == N, (where, how, sum(rows))
    assert proc.marks()["value"].tolist() == [N]
    a = run_kvprof("analyze", str(out), "--json", "-")
    assert a.returncode == 0, a.stderr
    m = json.loads(a.stdout)["metrics"]
    ids = sum(1 + i % 5 for i in range(N))
    assert m["blocks.events"]["value"] == ids  # every block of every call
    if where == "main" and how not in ("exception", "sys_exit"):
        assert (
            r.returncode
            == 128
            + {
                "os_exit": -128,
                "sigsegv": 11,
                "sigabrt": 6,
                "sigkill": 9,
                "sighup": 1,
                "sigquit": 3,
                "sigusr1": 10,
                "sigusr2": 12,
                "sigterm": 15,
            }[how]
            or how == "os_exit"
        )
