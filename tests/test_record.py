"""`kvprof record` through the real entry point: children, exit codes, signals, crashes."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kvprof.trace.reader import Bundle
from tests.conftest import ROOT, WORKLOADS, run_kvprof


def test_records_every_kind_of_child_and_keeps_exit_code(tmp_path):
    out = tmp_path / "kids.kvprof"
    r = run_kvprof("record", "-o", str(out), "--", sys.executable, os.path.join(WORKLOADS, "children.py"), "3")
    assert r.returncode == 3, r.stderr
    assert "wrote" in r.stderr and "exit code 3" in r.stderr
    b = Bundle(str(out))
    names = sorted(p.name for p in b.block_stream().pools)
    # the fork child inherits the main pool declaration, hence "main" twice
    assert names == ["fork", "forkserver", "main", "main", "spawn", "subprocess"]
    roles = [p["role"] for p in b.manifest["processes"]]
    assert roles.count("main") == 1 and roles.count("child") >= 5
    assert b.manifest["target"] == {"started": True, "exit_code": 3, "signal": None}
    marks = b.marks()
    assert {"phase", "in-spawn", "in-fork", "in-forkserver"} <= set(marks.names)
    main_pid = next(p["pid"] for p in b.manifest["processes"] if p["role"] == "main")
    assert all(p["ppid"] == main_pid or p["pid"] == main_pid or p["ppid"] != 0 for p in b.manifest["processes"])


def test_script_path_and_module_forms(tmp_path):
    r = run_kvprof("record", "-q", "-o", str(tmp_path / "a.kvprof"), os.path.join(WORKLOADS, "children.py"))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    r = run_kvprof("record", "-q", "-o", str(tmp_path / "b.kvprof"), "-m", "kvprof.demo", "--requests", "20")
    assert r.returncode == 0, r.stderr
    assert "demo: 20/20 requests" in r.stdout
    assert Bundle(str(tmp_path / "b.kvprof")).manifest["command"][1:3] == ["-m", "kvprof.demo"]


def test_existing_sitecustomize_still_runs(tmp_path):
    env = {"PYTHONPATH": os.path.join(ROOT, "tests", "sitecustom")}
    code = "import os, sys, kvprof; sys.exit(0 if os.environ.get('KVPROF_TEST_SITECUSTOMIZE_RAN') == '1' and kvprof.is_recording() else 9)"
    r = run_kvprof("record", "-q", "-o", str(tmp_path / "s.kvprof"), "--", sys.executable, "-c", code, env=env)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "how, code",
    [("raise", 1), ("sigkill", 128 + signal.SIGKILL), ("sigterm", 128 + signal.SIGTERM), ("segv", 128 + signal.SIGSEGV)],
)
def test_crashing_target_leaves_a_readable_bundle(tmp_path, how, code):
    out = tmp_path / f"{how}.kvprof"
    r = run_kvprof("record", "-o", str(out), "--", sys.executable, os.path.join(WORKLOADS, "crash.py"), how)
    assert r.returncode == code, r.stderr
    b = Bundle(str(out))
    assert b.manifest["status"] == "complete"
    s = b.block_stream()
    # events older than one flush interval survive even SIGKILL
    assert int((s.kind == 1).sum()) >= 39
    if how in ("raise", "sigterm"):  # atexit / the SIGTERM flush ran: nothing lost
        assert int((s.kind == 1).sum()) == 40
    a = run_kvprof("analyze", str(out), "--json", str(tmp_path / "a.json"))
    assert a.returncode == 0, a.stderr


def test_signals_are_forwarded_to_the_target(tmp_path):
    out = tmp_path / "sig.kvprof"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvprof.commands", "record", "-o", str(out), "--", sys.executable, os.path.join(WORKLOADS, "crash.py"), "sleep"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    b = Bundle(str(out))
    assert b.manifest["target"]["signal_name"] == "SIGTERM"
    assert b.manifest["target"]["signals_forwarded"] == ["SIGTERM"]
    assert int((b.block_stream().kind == 1).sum()) == 40


def test_sigint_is_forwarded_when_not_from_a_terminal(tmp_path):
    out = tmp_path / "int.kvprof"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvprof.commands", "record", "-o", str(out), "--", sys.executable, os.path.join(WORKLOADS, "crash.py"), "sleep"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    # Python re-raises an uncaught KeyboardInterrupt as death by SIGINT: 128 + 2, as a shell shows it
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "KeyboardInterrupt" in err and "signal SIGINT" in err


def test_bad_invocations_are_one_line_errors(tmp_path):
    r = run_kvprof("record", "-o", str(tmp_path / "x.kvprof"), "--", "no-such-command-kvprof")
    assert r.returncode == 127
    assert r.stderr.strip().count("\n") == 0 and "no-such-command-kvprof" in r.stderr
    assert Bundle(str(tmp_path / "x.kvprof")).manifest["target"]["started"] is False
    r = run_kvprof("record", "--probe", "nope", "--", sys.executable, "-c", "pass")
    assert r.returncode == 2 and "unknown probe 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = run_kvprof("record")
    assert r.returncode == 2 and "nothing to record" in r.stderr
    r = run_kvprof("record", "missing_script.py")
    assert r.returncode == 2 and "no such script" in r.stderr
    out = tmp_path / "y.kvprof"
    assert run_kvprof("record", "-q", "-o", str(out), "--", sys.executable, "-c", "pass").returncode == 0
    r = run_kvprof("record", "-o", str(out), "--", sys.executable, "-c", "pass")
    assert r.returncode == 2 and "output exists" in r.stderr
    assert run_kvprof("record", "-q", "--force", "-o", str(out), "--", sys.executable, "-c", "pass").returncode == 0
    (tmp_path / "plain").write_text("keep me")
    r = run_kvprof("record", "--force", "-o", str(tmp_path / "plain"), "--", sys.executable, "-c", "pass")
    assert r.returncode == 2 and (tmp_path / "plain").read_text() == "keep me"


def test_options_after_the_command_belong_to_the_target(tmp_path):
    code = "import sys; sys.exit(0 if sys.argv[1:] == ['-o', 'x', '--probe', 'y'] else 5)"
    r = run_kvprof("record", "-q", "-o", str(tmp_path / "o.kvprof"), sys.executable, "-c", code, "-o", "x", "--probe", "y")
    assert r.returncode == 0, r.stderr


def test_default_output_name(tmp_path):
    r = run_kvprof("record", "-q", "--", sys.executable, os.path.join(WORKLOADS, "children.py"), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    made = [p for p in os.listdir(tmp_path) if p.endswith(".kvprof")]
    assert len(made) == 1 and made[0].startswith("children-")
