"""`kvprof record` of a server stopped by Ctrl-C: the recorded argv keeps the module name,
and the helper processes the server ends itself (vLLM SIGKILLs its engine core and worker
on the way out) are not reported as unclean exits; a helper that crashed still is."""

import json
import os
import pty
import select
import sys
import time

import pytest

from kvprof.record import _ended_in_order, module_argv
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # records servers shut down under a terminal (make test-quick leaves it out)


def _record_on_a_terminal(tmp_path, *args, ctrl_c=True):
    """kvprof record -- python -m tests.workloads.server_shutdown ARGS, on a pseudo-terminal
    of its own (a controlling terminal: Ctrl-C reaches the whole foreground group, as at a
    shell), Ctrl-C typed once the server is up; the manifest."""
    bundle = tmp_path / "server.kvprof"
    argv = [
        sys.executable,
        "-m",
        "kvprof",
        "record",
        "-o",
        str(bundle),
        "--",
        sys.executable,
        "-m",
        "tests.workloads.server_shutdown",
        *args,
    ]
    env = dict(os.environ, KVPROF_TEST_PIDS=str(tmp_path / "pids"), PYTHONPATH=ROOT)
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(ROOT)
        os.execve(argv[0], argv, env)
    out, deadline, sent = b"", time.monotonic() + 180, False
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            out += data
        if ctrl_c and not sent and b"server ready" in out:
            time.sleep(0.3)
            os.write(fd, b"\x03")
            sent = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return (
        os.waitstatus_to_exitcode(status),
        out.decode(errors="replace"),
        json.loads((bundle / "manifest.json").read_text()),
    )


def test_ctrl_c_of_a_server_that_kills_its_helpers_in_order(tmp_path):
    rc, out, m = _record_on_a_terminal(tmp_path)
    assert rc == 0 and "server stopped" in out, out
    procs = {p["role"] if p["role"] == "main" else len(p["argv"]): p for p in m["processes"]}
    main = next(p for p in m["processes"] if p["role"] == "main")
    assert main["argv"] == ["-m", "tests.workloads.server_shutdown"]
    children = [p for p in m["processes"] if p["role"] == "child"]
    assert len(children) >= 2, m["processes"]  # the engine core and its worker (and multiprocessing's helpers)
    core_pid, worker_pid = map(int, (tmp_path / "pids").read_text().split())
    by_pid = {p["pid"]: p for p in m["processes"]}
    for pid in (core_pid, worker_pid):
        p = by_pid[pid]
        assert p["ended"] == "stopped_with_parent" and p["stopped_by"] == main["pid"] and p["exited_cleanly"] is True, p
    assert main["ended"] == "closed" and main["exited_cleanly"] is True
    assert procs


def test_a_helper_that_crashed_is_still_an_unclean_exit(tmp_path):
    rc, out, m = _record_on_a_terminal(tmp_path, "--crash", ctrl_c=False)
    assert rc == 1 and "engine core died" in out, out
    core_pid, _ = map(int, (tmp_path / "pids").read_text().split())
    core = next(p for p in m["processes"] if p["pid"] == core_pid)
    assert core["exited_cleanly"] is False and core["ended"] == "unknown", core


@pytest.mark.parametrize(
    "argv,command,want",
    [
        (
            ["-m", "--model", "x"],
            ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "x"],
            ["-m", "vllm.entrypoints.openai.api_server", "--model", "x"],
        ),
        (["-m"], ["/usr/bin/python3", "-X", "dev", "-mjson.tool"], ["-m", "json.tool"]),
        (["-m", "a"], ["python", "-m", "mod", "b"], ["-m", "a"]),  # not what the recorder started: left alone
        (["serve.py", "-m"], ["python", "serve.py", "-m"], ["serve.py", "-m"]),
        (["-c", "x"], ["python", "-c", "x"], ["-c", "x"]),
    ],
)
def test_module_argv(argv, command, want):
    assert module_argv(argv, command) == want


def test_what_counts_as_a_run_that_ended_in_order():
    import signal

    assert _ended_in_order({"started": True, "exit_code": 0}, [])
    assert _ended_in_order({"started": True, "exit_code": 130, "signal": signal.SIGINT}, [signal.SIGINT])
    assert not _ended_in_order(
        {"started": True, "exit_code": 130, "signal": signal.SIGINT}, []
    )  # a Ctrl-C nobody typed at kvprof
    assert not _ended_in_order({"started": True, "exit_code": 1, "signal": None}, [signal.SIGINT])
    assert not _ended_in_order({"started": False, "error": "x"}, [])
