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
