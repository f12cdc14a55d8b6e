import json
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
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


def analyze_json(bundle, *args, timeout=120, env=None) -> dict:
    """`kvprof analyze BUNDLE --json -` (and `args`), which must succeed: the analysis document."""
    r = run_kvprof("analyze", str(bundle), "--json", "-", *args, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def metric_values(doc) -> dict:
    """{metric: value} of an analysis document."""
    return {k: v["value"] for k, v in doc["metrics"].items()}


def analyzed_metrics(bundle, *args, **kw) -> dict:
    """{metric: value} of `kvprof analyze BUNDLE --json -`."""
    return metric_values(analyze_json(bundle, *args, **kw))


def optional_python(what: str, env_var: str, venv: str, make_target: str, *more: str) -> str:
    """The Python of an optional environment (vLLM's, SGLang's): $env_var, else ROOT/venv, else
    `more`; the test is skipped without one."""
    for cand in (os.environ.get(env_var), os.path.join(ROOT, venv, "bin", "python"), *more):
        if cand and os.path.exists(cand):
            return cand
    pytest.skip(f"no {what} environment: run `make {make_target}` or set {env_var}")


def vllm_python() -> str:
    return optional_python("vLLM", "KVPROF_VLLM_PYTHON", ".venv-vllm", "vllm-env", "/root/.venvs/vllm/bin/python")


def sglang_python() -> str:
    return optional_python("SGLang", "KVPROF_SGLANG_PYTHON", ".venv-sglang", "sglang-env")


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
