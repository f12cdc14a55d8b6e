"""--probe torch and --probe nvml, as far as a machine without a GPU allows: the probes
run against the stand-ins in tests/doubles/fake_gpu (a torch whose "device" serves a real
snapshot from fixtures/torch-snapshots, and a pynvml with one fake GPU), and their clean
refusal where CUDA or NVML is missing.  What this cannot show (real allocations, a real
OOM, real NVML figures) needs a GPU: README, "GPU memory"."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

from kvprof.trace import torch_snapshot
from tests.conftest import ROOT, WORKLOADS, analyze_json, run_kvprof

pytestmark = pytest.mark.slow  # records the fake-GPU workloads (make test-quick leaves it out)

FAKE = os.path.join(ROOT, "tests", "doubles", "fake_gpu")
SNAP = os.path.join(ROOT, "fixtures", "torch-snapshots", "sketchkv2.pickle")
MiB = 1 << 20


def _env(tmp_path, **extra):
    used = tmp_path / "nvml_used"
    used.write_text("0")
    env = {"PYTHONPATH": FAKE, "FAKE_TORCH_SNAPSHOT": SNAP, "FAKE_NVML_USED": str(used)}
    env.update(extra)
    return env


def _record(tmp_path, *args, env=None, workload_args=()):
    out = tmp_path / "g.kvprof"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(out),
        *args,
        "--",
        sys.executable,
        os.path.join(WORKLOADS, "torch_cuda.py"),
        *workload_args,
        env=env or _env(tmp_path),
        timeout=300,
    )
    return out, r


def _proc_dir(bundle):
    (d,) = [os.path.join(bundle, "procs", x) for x in os.listdir(os.path.join(bundle, "procs"))]
    return d


def _meta(bundle, kind):
    with open(os.path.join(_proc_dir(bundle), "meta.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r.get("type") == kind]


def test_snapshots_at_markers_oom_and_exit_with_history_settings(tmp_path):
    out, r = _record(
        tmp_path,
        "--probe",
        "torch",
        "--torch-snapshot-at",
        "step",
        "--torch-max-entries",
        "5000",
        "--torch-stack-depth",
        "2",
        workload_args=("--oom",),
    )
    assert r.returncode == 0, r.stderr
    snaps = _meta(out, "torch_snapshot")
    assert [s["reason"] for s in snaps] == ["mark", "mark", "mark", "oom", "exit"]
    assert [s["mark"] for s in snaps[:3]] == ["step"] * 3
    for s in snaps:
        path = os.path.join(_proc_dir(out), s["file"])
        assert torch_snapshot.load(path)["segments"]  # kvprof's own safe loader reads it (no globals needed)
        with open(path, "rb") as fh:  # the double notes what the probe asked of the allocator, and when
            fake = pickle.load(fh)["kvprof_fake"]
        # turned on once, right after CUDA's initialisation (not at torch's import)
        assert fake["history_calls"] == [
            {"enabled": "all", "context": "all", "stacks": "python", "max_entries": 5000, "cuda_initialized": True}
        ]
        # and the probe never asked torch.cuda.is_available() before that (it can initialise CUDA and break a later fork)
        assert not [f for f in fake["available_callers_before_init"] if os.sep + "kvprof" + os.sep in f], fake
    with open(os.path.join(_proc_dir(out), snaps[-1]["file"]), "rb") as fh:
        raw = pickle.load(fh)
    depths = [len(e["frames"]) for tr in raw.get("device_traces") or [] for e in tr if "frames" in e]
    depths += [len(b["frames"]) for s in raw["segments"] for b in s["blocks"] if "frames" in b]
    assert depths and max(depths) <= 2  # --torch-stack-depth
    stats = _meta(out, "torch_stats")
    assert len(stats) == 5  # warmup, three steps, exit
    reserved = stats[0]["devices"]["0"]["reserved"]
    status = json.loads(open(os.path.join(_proc_dir(out), "process.json")).read())["probes"]["torch"]
    assert status["status"] == "attached" and status["oom_observer"] == "attached"

    # the bundle's torch section is the bare snapshot's analysis (the exit snapshot: the same file here)
    a = analyze_json(str(out))
    b = analyze_json(SNAP)
    for k in (
        "torch.reserved_bytes",
        "torch.allocated_bytes",
        "torch.external_fragmentation",
        "torch.cached_free_bytes",
    ):
        assert a["metrics"][k]["value"] == b["metrics"][k]["value"], k
    assert a["metrics"]["torch.reserved_bytes"]["value"] == reserved
    t = a["sections"]["torch"]
    assert t["process"]["reason"] == "exit" and len(t["snapshots"]) == 5
    assert t["observed_ooms"][0]["requested"] == 1 << 30
    assert a["findings"][0]["title"].startswith("CUDA out of memory") and a["findings"][0]["severity"] == "error"


def test_sigterm_still_leaves_an_exit_snapshot(tmp_path):
    out = tmp_path / "s.kvprof"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvprof.commands",
            "record",
            "-q",
            "-o",
            str(out),
            "--probe",
            "torch",
            "--",
            sys.executable,
            os.path.join(WORKLOADS, "torch_cuda.py"),
            "--sleep",
            "30",
        ],
        env={**os.environ, **_env(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "done"
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert [s["reason"] for s in _meta(out, "torch_snapshot")] == ["exit"]


def test_without_cuda_the_probe_says_so_and_records_nothing(tmp_path):
    out, r = _record(tmp_path, "--probe", "torch", env=_env(tmp_path, FAKE_CUDA="0"))
    assert r.returncode == 0, r.stderr
    status = json.loads(open(os.path.join(_proc_dir(out), "process.json")).read())["probes"]["torch"]
    assert status["status"] == "no CUDA" and "is_available() is False" in status["reason"]
    assert not os.path.exists(os.path.join(_proc_dir(out), "torch"))
    r = run_kvprof("analyze", str(out))
    assert r.returncode == 0 and "no snapshot recorded" in r.stdout and "is_available() is False" in r.stdout
    # torch imported on a machine with CUDA, CUDA never used: nothing turned on, said so
    out = tmp_path / "cpu.kvprof"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(out),
        "--probe",
        "torch",
        "--",
        sys.executable,
        "-c",
        "import torch",
        env=_env(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    status = json.loads(open(os.path.join(_proc_dir(out), "process.json")).read())["probes"]["torch"]
    assert status["status"] == "no CUDA" and "never used by this process" in status["reason"]


def test_a_process_without_torch_is_left_alone(tmp_path):
    out = tmp_path / "n.kvprof"
    r = run_kvprof(
        "record", "-q", "-o", str(out), "--probe", "torch", "--", sys.executable, "-c", "print('no torch here')"
    )
    assert r.returncode == 0 and r.stdout == "no torch here\n", r.stderr
    status = json.loads(open(os.path.join(_proc_dir(out), "process.json")).read())["probes"]["torch"]
    assert status["status"] == "waiting for torch to be imported"
    assert "torch" not in analyze_json(str(out))["sections"]


def test_nvml_samples_and_memory_outside_torch(tmp_path):
    out, r = _record(tmp_path, "--probe", "torch,nvml", "--nvml-interval", "0.05")
    assert r.returncode == 0, r.stderr
    m = json.loads(open(out / "manifest.json").read())["probe_status"]["nvml"]
    assert m["status"] == "sampling" and m["gpus"] == 1 and m["names"] == ["Fake GPU 80GB"] and m["samples"] >= 10
    a = analyze_json(str(out))
    sec = a["sections"]["nvml"]
    reserved = a["metrics"]["torch.reserved_bytes"]["value"]
    (row,) = [p for p in sec["processes"] if p["recorded"]]
    assert row["role"] == "main" and row["used_peak"] == reserved + 300 * MiB
    assert row["outside_torch_peak"] == 300 * MiB  # the fake's CUDA context, exactly
    assert a["metrics"]["nvml.outside_torch_bytes"]["value"] == 300 * MiB
    assert a["metrics"]["nvml.used_peak_bytes"]["value"] == reserved + 300 * MiB
    assert sec["gpus"][0]["total"] == 80 << 30


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"FAKE_NVML": "0"}, "NVML could not start"),
        ({"PYTHONPATH": ""}, "nvidia-ml-py is not installed"),
    ],
)
def test_nvml_missing_is_one_line_and_the_target_runs(tmp_path, env, reason):
    try:
        import pynvml  # noqa: F401

        if env.get("PYTHONPATH") == "":
            pytest.skip("a real nvidia-ml-py is installed here")
    except ImportError:
        pass
    out = tmp_path / "x.kvprof"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(out),
        "--probe",
        "nvml",
        "--",
        sys.executable,
        "-c",
        "import sys; sys.exit(3)",
        env={**_env(tmp_path), **env},
    )
    assert r.returncode == 3
    lines = [ln for ln in r.stderr.splitlines() if "nvml" in ln]
    assert len(lines) == 1 and reason in lines[0], r.stderr
    m = json.loads(open(out / "manifest.json").read())["probe_status"]["nvml"]
    assert m["status"] == "unavailable" and reason in m["reason"]
    assert not (out / "nvml_gpus.bin").exists()


def test_a_hostile_snapshot_record_is_ignored(tmp_path):
    out, r = _record(tmp_path, "--probe", "torch")
    assert r.returncode == 0, r.stderr
    with open(os.path.join(_proc_dir(out), "meta.jsonl"), "a") as fh:
        fh.write(
            json.dumps({"type": "torch_snapshot", "t": 1 << 62, "reason": "exit", "file": "../../../../../etc/passwd"})
            + "\n"
        )
    a = analyze_json(str(out))
    assert all("passwd" not in s["file"] for s in a["sections"]["torch"]["snapshots"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--torch-stacks", "cpp"], "--torch-stacks must be python, all or none"),
        (["--torch-max-entries", "0"], "--torch-max-entries must be 1 or more"),
        (["--torch-stack-depth", "0"], "--torch-stack-depth must be between 1 and 1000"),
        (["--nvml-interval", "0"], "--nvml-interval must be a positive number"),
    ],
)
def test_bad_gpu_options(tmp_path, args, message):
    r = run_kvprof(
        "record", "-o", str(tmp_path / "b.kvprof"), "--probe", "torch,nvml", *args, "--", sys.executable, "-c", "pass"
    )
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_perfetto_export_carries_torch_samples_and_ooms(tmp_path):
    from tests.test_perfetto import _validate_trace_events

    out, r = _record(tmp_path, "--probe", "torch", workload_args=("--oom",))
    assert r.returncode == 0, r.stderr
    r = run_kvprof("export", str(out), "-o", "-")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    _validate_trace_events(doc)
    mem = [e for e in doc["traceEvents"] if e["name"] == "torch memory cuda:0"]
    assert len(mem) == 5 and all(e["args"]["reserved"] >= e["args"]["allocated"] > 0 for e in mem)
    (oom,) = [e for e in doc["traceEvents"] if e["name"] == "CUDA OOM"]
    assert oom["args"]["requested"] == 1 << 30


def test_max_snapshots_caps_marker_snapshots_only(tmp_path):
    """--torch-max-snapshots N: at most N marker snapshots; an OOM snapshot taken before
    them does not use up one of the N."""
    script = tmp_path / "oom_first.py"
    script.write_text(
        "import kvprof, torch\ntorch.cuda.init()\ntorch.cuda.fake_oom(0, 1 << 30)\nfor i in range(5):\n    kvprof.mark('step', i)\n"
    )
    out = tmp_path / "o.kvprof"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(out),
        "--probe",
        "torch",
        "--torch-snapshot-at",
        "step",
        "--torch-max-snapshots",
        "3",
        "--",
        sys.executable,
        str(script),
        env=_env(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert [s["reason"] for s in _meta(out, "torch_snapshot")] == ["oom", "mark", "mark", "mark", "exit"]
