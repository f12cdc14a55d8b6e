"""Ray support without Ray: the runtime_env merge, the hook Ray calls, which processes a
Ray node starts are recorded, a worker on a node without the bundle making a part, and
the host and clock fields every process and manifest carry.  (The real cluster:
tests/test_ray_cluster.py, `make test-ray`.)"""

import json
import os
import subprocess
import sys

import pytest

from kvprof.probes import ray as ray_probe
from kvprof.trace import hostinfo
from kvprof.trace.reader import Bundle
from tests.conftest import ROOT, run_kvprof

HOOK = ray_probe.HOOK_DIR
OURS = {"KVPROF_BUNDLE": "/b", "KVPROF_PROBES": "blocks,gc", "KVPROF_RAY_JOB": "h:1"}


class FakeRuntimeEnv(dict):
    """Ray's RuntimeEnv is a dict subclass."""


def test_merge_into_nothing_gives_kvprof_vars_and_the_nodes_pythonpath():
    env = ray_probe.merge_runtime_env(None, OURS)
    assert env == {"env_vars": {**OURS, "PYTHONPATH": f"{HOOK}:${{PYTHONPATH}}"}}


def test_merge_keeps_the_programs_own_runtime_env():
    own = FakeRuntimeEnv(
        env_vars={"MY_VAR": "x", "KVPROF_PROBES": "mine", "PYTHONPATH": "/my/lib:/other:${PYTHONPATH}"},
        pip=["requests"],
        working_dir=".",
    )
    merged = ray_probe.merge_runtime_env(own, OURS)
    assert merged["pip"] == ["requests"] and merged["working_dir"] == "."
    ev = merged["env_vars"]
    assert ev["MY_VAR"] == "x"
    assert ev["KVPROF_PROBES"] == "mine"  # the program's own value wins
    assert ev["KVPROF_BUNDLE"] == "/b" and ev["KVPROF_RAY_JOB"] == "h:1"
    assert ev["PYTHONPATH"] == f"{HOOK}:/my/lib:/other:${{PYTHONPATH}}"
    assert own["env_vars"]["PYTHONPATH"] == "/my/lib:/other:${PYTHONPATH}", "the program's dict is not modified"
    assert ray_probe.merge_runtime_env(merged, OURS) == merged, "merging twice changes nothing"


def test_merge_keeps_a_pythonpath_without_the_nodes_own():
    merged = ray_probe.merge_runtime_env({"env_vars": {"PYTHONPATH": "/only/mine"}}, OURS)
    assert merged["env_vars"]["PYTHONPATH"] == f"{HOOK}:/only/mine"


def test_hook_adds_kvprof_when_recording_and_chains_the_previous_hook(monkeypatch):
    monkeypatch.setenv("KVPROF_BUNDLE", "/tmp/x.kvprof")
    monkeypatch.setenv("KVPROF_PROBES", "blocks")
    monkeypatch.setenv(ray_probe.ENV_CHAINED, "tests.test_ray_env.chained_hook")
    env = ray_probe.runtime_env_hook({"env_vars": {"A": "1"}})
    assert env["env_vars"]["A"] == "1" and env["env_vars"]["CHAINED"] == "yes"
    assert env["env_vars"]["KVPROF_BUNDLE"] == "/tmp/x.kvprof" and env["env_vars"]["PYTHONPATH"].startswith(HOOK + ":")
    monkeypatch.setenv(ray_probe.ENV_OUTPUT, "/shared/parts")  # --ray-output: workers write there
    assert ray_probe.runtime_env_hook(None)["env_vars"]["KVPROF_BUNDLE"] == "/shared/parts"


def chained_hook(runtime_env):
    runtime_env = dict(runtime_env or {})
    runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), "CHAINED": "yes"}
    return runtime_env


def test_hook_leaves_the_runtime_env_alone_when_not_recording(monkeypatch):
    monkeypatch.delenv("KVPROF_BUNDLE", raising=False)
    monkeypatch.delenv(ray_probe.ENV_OUTPUT, raising=False)
    monkeypatch.delenv(ray_probe.ENV_CHAINED, raising=False)
    own = {"env_vars": {"A": "1"}}
    assert ray_probe.runtime_env_hook(own) is own
    assert ray_probe.runtime_env_hook(None) is None


def test_recorder_env_sets_rays_hook_and_keeps_one_already_there():
    env = {"RAY_RUNTIME_ENV_HOOK": "corp.hooks.add_secrets"}
    note = ray_probe.recorder_env(env, None)
    assert env["RAY_RUNTIME_ENV_HOOK"] == ray_probe.HOOK_SPEC and env[ray_probe.ENV_CHAINED] == "corp.hooks.add_secrets"
    assert note["chained_hook"] == "corp.hooks.add_secrets" and note["output"] is None


@pytest.mark.parametrize(
    "argv0, recorded",
    [
        ("/venv/lib/python3.11/site-packages/ray/dashboard/dashboard.py", False),
        ("/venv/lib/python3.11/site-packages/ray/_private/log_monitor.py", False),
        ("/venv/lib/python3.11/site-packages/ray/_private/runtime_env/agent/main.py", False),
        ("/venv/lib/python3.11/site-packages/ray/_private/workers/setup_worker.py", False),
        ("/venv/lib/python3.11/site-packages/ray/autoscaler/_private/monitor.py", False),
        ("/home/me/array_job.py", True),
    ],
)
def test_rays_own_daemons_are_not_recorded(argv0, recorded, tmp_path):
    assert ray_probe.prepare_worker(str(tmp_path), [argv0]) is recorded


def test_a_worker_of_no_recorded_job_is_not_recorded(tmp_path):
    worker = "/venv/lib/python3.11/site-packages/ray/_private/workers/default_worker.py"
    assert ray_probe.prepare_worker(str(tmp_path), [worker], environ={}) is False
    assert (
        ray_probe.prepare_worker(str(tmp_path), [worker], environ={"KVPROF_RAY_JOB": "h:1", "KVPROF_PROBES": "blocks"})
        is True
    )
    man = json.load(open(tmp_path / "manifest.json"))  # no bundle there: this node's part
    assert (
        man["status"] == "part"
        and man["host"]["hostname"] == os.uname().nodename
        and man["part"]["ray_job_driver"] == "h:1"
    )


def test_ray_worker_ids_from_its_command_line(monkeypatch):
    monkeypatch.setenv("RAY_JOB_ID", "02000000")
    argv = [
        "/x/ray/_private/workers/default_worker.py",
        "--node-ip-address=10.0.0.2",
        "--node-id=abc123",
        "--worker-id=w9",
        "--other=1",
    ]
    assert hostinfo.ray_worker(argv) == {
        "role": "worker",
        "node_ip_address": "10.0.0.2",
        "node_id": "abc123",
        "worker_id": "w9",
        "job_id": "02000000",
    }
    assert hostinfo.ray_worker(["serve.py"]) is None


def test_clock_shifts_put_every_host_on_the_references_clock():
    def info(host, *offs):
        return {
            "host": {"hostname": host, "boot_id": f"boot-{host}"},
            "clock": {"wall_minus_mono_ns": {"start": offs[0], "end": offs[1] if len(offs) > 1 else None}},
        }

    manifest = info("a", 1000)
    procs = [info("a", 1002, 1004), info("b", 5000, 5002), info("b", 5004), {"host": None}, info("c", 7000)]
    shifts, summary = hostinfo.clock_shifts(manifest, procs)
    # a: 1000, 1002, 1004 -> median 1002; b: 5000, 5002, 5004 -> 5002; c: 7000
    assert shifts == [0, 4000, 4000, 0, 5998]
    assert summary["reference"] == "boot-a" and summary["domains"]["boot-b"]["spread_ns"] == 4
    combined = {"clock": {"reference": "boot-b"}}  # a combined bundle names its reference (a: 1002, 1004 -> 1004)
    assert hostinfo.clock_shifts(combined, procs)[0] == [-3998, 0, 0, 0, 1998]
    assert hostinfo.clock_shifts({}, [{}, {}])[0] == [0, 0], "bundles of an older kvprof are read as recorded"


def test_node_names():
    def info(host, boot, node=None):
        return {"host": {"hostname": host, "boot_id": boot}, **({"ray": {"node_id": node}} if node else {})}

    # two hosts: their names; a host with one Ray node: its other processes count as that node
    keys = hostinfo.node_keys([info("gpu-1.dc", "b1", "n1"), info("gpu-1.dc", "b1"), info("gpu-2", "b2")])
    assert keys == [("n1", "gpu-1"), ("n1", "gpu-1"), ("b2", "gpu-2")]
    # one host, several Ray nodes (a local test cluster): the node id tells them apart
    keys = hostinfo.node_keys([info("vm", "b", "aaaaaaa1"), info("vm", "b", "bbbbbbb2"), info("vm", "b")])
    assert keys == [("aaaaaaa1", "vm/aaaaaa"), ("bbbbbbb2", "vm/bbbbbb"), ("b", "vm")]


SCRIPT = """
import kvprof.blocks
p = kvprof.blocks.Pool(num_blocks=8, block_size=16, name="w")
p.alloc([1, 2], "r")
p.free([1, 2], "r")
"""


def test_a_worker_on_a_node_without_the_bundle_makes_a_part_there(tmp_path):
    """What a Ray worker on another node does, without Ray: started by a raylet (whose
    command line names its node) with the job's runtime_env, at a bundle path this node
    does not have."""
    worker = tmp_path / "site-packages" / "ray" / "_private" / "workers" / "default_worker.py"
    worker.parent.mkdir(parents=True)
    worker.write_text(SCRIPT)
    part = tmp_path / "node-local.kvprof"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVPROF_")}
    env.update(
        ray_probe.merge_runtime_env(
            None,
            {"KVPROF_BUNDLE": str(part), "KVPROF_PROBES": "blocks", "KVPROF_RAY_JOB": "head:1", "KVPROF_PATH": ROOT},
        )["env_vars"]
    )
    env["PYTHONPATH"] = env["PYTHONPATH"].replace("${PYTHONPATH}", ROOT)  # what Ray's expansion does on the node
    r = subprocess.run(
        [sys.executable, str(worker), "--node-id=feedface", "--worker-id=w1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    b = Bundle(str(part))
    assert b.manifest["status"] == "part"
    (proc,) = b.processes
    assert proc.info["ray"]["node_id"] == "feedface" and proc.info["host"]["hostname"] == os.uname().nodename
    assert (
        len(proc.info["clock"]["wall_minus_mono_ns"]) == 2
        and proc.info["clock"]["wall_minus_mono_ns"]["end"] is not None
    )
    assert len(b.block_stream()) == 2
    # and a Ray daemon started the same way is left alone
    daemon = tmp_path / "site-packages" / "ray" / "dashboard" / "agent.py"
    daemon.parent.mkdir(parents=True)
    daemon.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(daemon)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(Bundle(str(part)).processes) == 1


def test_record_says_host_clock_and_rays_hook(tmp_path):
    out = tmp_path / "r.kvprof"
    code = "import os; assert os.environ['RAY_RUNTIME_ENV_HOOK'] == 'kvprof.probes.ray.runtime_env_hook'"
    r = run_kvprof("record", "-q", "-o", str(out), "--", sys.executable, "-c", code)
    assert r.returncode == 0, r.stderr
    b = Bundle(str(out))
    m = b.manifest
    assert m["host"]["boot_id"] == hostinfo.boot_id()
    w = m["clock"]["wall_minus_mono_ns"]
    assert abs(w["end"] - w["start"]) < 50_000_000  # same host, same clocks: ms apart at most
    (p,) = m["processes"]
    assert p["host"]["hostname"] == os.uname().nodename and p["clock"]["wall_minus_mono_ns"]["end"] is not None
    assert m["ray"]["runtime_env_hook"] == ray_probe.HOOK_SPEC and m["ray"]["output"] is None
    assert b.processes[0].clock_shift == 0


@pytest.mark.slow
def test_record_ray_output_makes_a_part_and_says_how_to_combine(tmp_path):
    out, parts = tmp_path / "r.kvprof", tmp_path / "shared" / "ray-parts"
    code = "import os; assert os.environ['KVPROF_RAY_OUTPUT'] == os.environ['RAY_OUT']"
    r = run_kvprof(
        "record",
        "-o",
        str(out),
        "--ray-output",
        str(parts),
        "--",
        sys.executable,
        "-c",
        code,
        env={"RAY_OUT": str(parts)},
    )
    assert r.returncode == 0, r.stderr
    man = json.load(open(parts / "manifest.json"))
    assert man["status"] == "part" and man["processes"] == []
    assert f"kvprof combine OUT.kvprof {out} {parts}" in r.stderr
    r = run_kvprof(
        "record", "-o", str(tmp_path / "again.kvprof"), "--ray-output", str(parts), "--", sys.executable, "-c", "pass"
    )
    assert r.returncode == 2 and "--ray-output exists" in r.stderr
    r = run_kvprof(
        "record",
        "-o",
        str(tmp_path / "x.kvprof"),
        "--ray-output",
        str(tmp_path / "x.kvprof" / "in"),
        "--",
        sys.executable,
        "-c",
        "pass",
    )
    assert r.returncode == 2 and "apart from the bundle" in r.stderr


@pytest.mark.slow
def test_hostile_host_and_clock_fields_are_read_as_no_alignment(tmp_path):
    """A bundle is untrusted input: host and clock fields of the wrong types or impossible
    values leave the times as recorded, never a traceback."""
    out = tmp_path / "h.kvprof"
    two = (
        SCRIPT
        + "import subprocess, sys\nif len(sys.argv) < 2: subprocess.run([sys.executable, __file__, 'child'], check=True)\n"
    )
    (tmp_path / "two.py").write_text(two)
    assert run_kvprof("record", "-q", "-o", str(out), "--", sys.executable, str(tmp_path / "two.py")).returncode == 0
    man = json.load(open(out / "manifest.json"))
    man["clock"] = {"hosts": 7, "reference": ["x"], "wall_minus_mono_ns": {"start": 10**40}}
    json.dump(man, open(out / "manifest.json", "w"))
    hostile = [
        {
            "host": {"hostname": 5, "boot_id": "other"},
            "clock": {"wall_minus_mono_ns": {"start": -(10**30), "end": "x"}},
            "ray": [1],
        },
        {"host": [1], "clock": 3, "ray": {"node_id": 7}},
    ]
    for proc_dir, fields in zip(sorted((out / "procs").iterdir()), hostile):
        info = json.load(open(proc_dir / "process.json"))
        info.update(fields)
        json.dump(info, open(proc_dir / "process.json", "w"))
    b = Bundle(str(out))
    assert [p.clock_shift for p in b.processes] == [0, 0] and len(b.block_stream()) == 4
    r = run_kvprof("analyze", str(out))
    assert r.returncode == 0, r.stderr
    assert "Fleet" in r.stdout  # two engines in two processes
    r = run_kvprof("combine", str(tmp_path / "c.kvprof"), str(out))
    assert r.returncode == 0, r.stderr
