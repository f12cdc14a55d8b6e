import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = os.path.join(ROOT, "tests", "workloads")


def run_kvprof(*args, cwd=None, env=None, timeout=120, input=None):
    """Run the real entry point as a user would (`python -m kvprof.commands` == `kvprof`)."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "kvprof.commands", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, input=input,
    )


@pytest.fixture
def kvprof_cli():
    return run_kvprof


def recorded_events(bundle) -> dict:
    """The records of a one-process bundle as bytes, whatever the on-disk format: block
    events, their ids, markers (to compare recordings record for record)."""
    import numpy as np

    from kvprof.trace.reader import Bundle

    (proc,) = Bundle(str(bundle)).processes
    pieces = list(proc.block_pieces())
    rows = np.concatenate([p[0] for p in pieces]) if pieces else np.zeros(0)
    ids = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0)
    return {"blocks": rows.tobytes(), "block_ids": ids.tobytes(), "marks": proc.marks().tobytes()}
