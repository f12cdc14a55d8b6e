"""`kvprof record` through the real entry point: children, exit codes, signals, crashes."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from kvprof.trace.reader import Bundle
from tests.conftest import ROOT, WORKLOADS, analyze_json, run_kvprof

pytestmark = pytest.mark.slow  # records real workloads: children, signals, terminals (make test-quick leaves it out)


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
    [
        ("raise", 1),
        ("sigkill", 128 + signal.SIGKILL),
        ("sigterm", 128 + signal.SIGTERM),
        ("segv", 128 + signal.SIGSEGV),
    ],
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
        [
            sys.executable,
            "-m",
            "kvprof.commands",
            "record",
            "-o",
            str(out),
            "--",
            sys.executable,
            os.path.join(WORKLOADS, "crash.py"),
            "sleep",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
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
        [
            sys.executable,
            "-m",
            "kvprof.commands",
            "record",
            "-o",
            str(out),
            "--",
            sys.executable,
            os.path.join(WORKLOADS, "crash.py"),
            "sleep",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
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
    r = run_kvprof(
        "record", "-q", "-o", str(tmp_path / "o.kvprof"), sys.executable, "-c", code, "-o", "x", "--probe", "y"
    )
    assert r.returncode == 0, r.stderr


def test_default_output_name(tmp_path):
    r = run_kvprof("record", "-q", "--", sys.executable, os.path.join(WORKLOADS, "children.py"), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    made = [p for p in os.listdir(tmp_path) if p.endswith(".kvprof")]
    # the script's name and the start time: children-YYYYMMDD-HHMMSS.kvprof, a bundle of that run
    assert len(made) == 1 and re.fullmatch(r"children-20\d{6}-\d{6}\.kvprof", made[0]), made
    assert Bundle(str(tmp_path / made[0])).manifest["target"]["exit_code"] == 0


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_no_thread_kvprof_starts_can_take_a_sigterm(tmp_path):
    """The kernel may hand a process-directed SIGTERM to any thread that does not block it,
    and one taken by a helper thread does not interrupt the main thread's blocking call: a
    pool worker blocked on its queue then never ran kvprof's flush-and-die handler and the
    pool hung in join (seen 1 run in 180).  Every thread present once kvprof has started
    (its writer, numpy's BLAS workers) must block it; only the main thread takes it."""
    script = tmp_path / "threads.py"
    script.write_text(
        "import json, os, sys, threading\n"
        "rows = []\n"
        "for tid in os.listdir('/proc/self/task'):\n"
        "    status = open(f'/proc/self/task/{tid}/status').read()\n"
        "    blk = int(status.split('SigBlk:')[1].split()[0], 16)\n"
        "    rows.append({'tid': int(tid), 'main': int(tid) == os.getpid(), 'sigterm_blocked': bool(blk & (1 << 14))})\n"
        "json.dump(rows, open(sys.argv[1], 'w'))\n"
    )
    out = tmp_path / "t.kvprof"
    r = run_kvprof(
        "record", "-q", "-o", str(out), "--probe", "gc", "--", sys.executable, str(script), str(tmp_path / "t.json")
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "t.json").read_text())
    helpers = [x for x in rows if not x["main"]]
    assert helpers, rows  # at least kvprof's writer
    assert all(x["sigterm_blocked"] for x in helpers), rows
    assert not [x for x in rows if x["main"]][0]["sigterm_blocked"]


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_a_sigterm_caught_by_another_thread_still_flushes_and_kills(tmp_path):
    """The C-level handler can run while the main thread sits in a blocking call that no
    signal will interrupt (here: a helper thread of the program takes the SIGTERM; in the
    wild: it lands just before a pool worker blocks on its queue's lock).  Python's handler
    then never runs and, kvprof having replaced the default action, the process would never
    die.  kvprof's writer sees the signal on the wakeup fd and nudges the main thread."""
    script = tmp_path / "stuck.py"
    script.write_text(
        "import multiprocessing, signal, threading, time\n"
        "sem = multiprocessing.Semaphore(0)\n"
        "def helper():\n"
        "    time.sleep(0.5)\n"
        "    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # caught in this thread\n"
        "threading.Thread(target=helper, daemon=True).start()\n"
        "sem.acquire()  # sem_wait: the main thread is not interrupted\n"
        "print('not reached')\n"
    )
    out = tmp_path / "s.kvprof"
    r = run_kvprof("record", "-q", "-o", str(out), "--", sys.executable, str(script), timeout=60)
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr)
    assert "not reached" not in r.stdout
    (proc,) = json.loads((out / "manifest.json").read_text())["processes"]
    assert proc["exited_cleanly"]


def test_a_sigterm_during_the_last_write_of_the_record_still_ends_it(tmp_path):
    """`with Pool(...)` terminates workers that may already be closing their recording.  A
    SIGTERM whose handler ran while close() was serialising process.json changed the dict
    being written: the write failed, end_ns was lost (1 CI run in ~150) and the process
    exited 0 instead of dying of the signal.  Here the signal is sent from inside that very
    serialisation, every time."""
    script = tmp_path / "late.py"
    script.write_text(
        "import os, signal\n"
        "import kvprof.runtime as rt\n"
        "class Bomb:\n"
        "    fired = False\n"
        "    def __str__(self):  # called by the JSON encoder while it writes process.json\n"
        "        if not Bomb.fired:\n"
        "            Bomb.fired = True\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "        return 'bomb'\n"
        "rt.on_exit(lambda: rt.writer.info.__setitem__('bomb', Bomb()))  # armed at exit\n"
        "print('done', flush=True)\n"
    )
    out = tmp_path / "l.kvprof"
    r = run_kvprof("record", "-q", "-o", str(out), "--", sys.executable, str(script), timeout=60)
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr)
    assert "done" in r.stdout and "Traceback" not in r.stderr, r.stderr
    (proc,) = json.loads((out / "manifest.json").read_text())["processes"]
    assert proc["exited_cleanly"], proc
    info = json.loads((out / proc["dir"] / "process.json").read_text())
    assert info["terminated_by_signal"] == signal.SIGTERM and info["bomb"] == "bomb"


def test_a_program_handler_that_chains_to_the_previous_one_is_not_cut_short(tmp_path):
    """kvprof's flush-and-die handler replaced the default action; a program that saves the
    handler it replaces and calls it from its own would have found SIG_DFL there, which is not
    callable.  Called that way, kvprof keeps the data and lets the program's shutdown run."""
    script = tmp_path / "chain.py"
    script.write_text(
        "import signal, sys, time, kvprof\n"
        "old = signal.getsignal(signal.SIGTERM)\n"
        "def h(s, f):\n"
        "    if callable(old):\n"
        "        old(s, f)\n"
        "    print('graceful shutdown done', flush=True)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, h)\n"
        "kvprof.mark('ready')\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    out = tmp_path / "c.kvprof"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvprof.commands", "record", "-q", "-o", str(out), "--", sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert proc.stdout.read().strip() == "graceful shutdown done"
    (p,) = json.loads((out / "manifest.json").read_text())["processes"]
    assert p["exited_cleanly"]
    assert analyze_json(str(out))["sections"]["markers"]["ready"]["count"] == 1


def test_a_marker_value_out_of_range_loses_nothing_else(tmp_path):
    script = tmp_path / "big.py"
    script.write_text(
        "import kvprof\nkvprof.mark('huge', 2**63)\nfor i in range(20):\n    kvprof.mark('m', i)\nkvprof.mark('neg', -2**70)\n"
    )
    out = tmp_path / "b.kvprof"
    assert run_kvprof("record", "-q", "-o", str(out), str(script)).returncode == 0
    marks = analyze_json(str(out))["sections"]["markers"]
    assert {k: v["count"] for k, v in marks.items()} == {"huge": 1, "m": 20, "neg": 1}
    (d,) = (out / "procs").iterdir()
    assert json.loads((d / "process.json").read_text())["errors"] == [
        "marker values outside 64-bit integers were clamped"
    ]


def test_a_mistyped_option_is_not_run_as_the_command(tmp_path):
    r = run_kvprof("record", "--outptu", "x", "t.py", cwd=str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("kvprof: error: no such option: --outptu"), r.stderr
    assert os.listdir(tmp_path) == []


def _under_a_terminal(command: str, tmp_path, ready: bytes = b"ready", wait: float = 30.0):
    """Run `command` (a shell line) in a new pseudo-terminal, press Ctrl-C once it printed
    `ready`, return its output."""
    import pty
    import select

    try:
        pid, fd = pty.fork()
    except OSError as exc:  # a sandbox without pseudo-terminals
        pytest.skip(f"no pseudo-terminal: {exc}")
    if pid == 0:  # pragma: no cover - the child
        os.chdir(str(tmp_path))
        os.execvp("bash", ["bash", "-c", command])
    out = b""

    def drain(seconds, until=None):
        nonlocal out
        end = time.time() + seconds
        while time.time() < end and not (until and until in out):
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    return False
                if not chunk:
                    return False
                out += chunk
        return True

    drain(wait, until=ready)
    time.sleep(0.2)
    os.write(fd, b"\x03")
    drain(wait)
    os.waitpid(pid, 0)
    return out.decode(errors="replace")


COUNT_SIGINTS = (
    "import signal, time\n"
    "n = []\n"
    "signal.signal(signal.SIGINT, lambda s, f: n.append(s))\n"
    "open('runs.log', 'a').write('started\\n')\n"
    "print('ready', flush=True)\n"
    "t = time.time()\n"
    "while time.time() - t < 2: time.sleep(0.05)\n"
    "print('SIGINTs received:', len(n), flush=True)\n"
)


@pytest.mark.parametrize("probes", ["blocks", "blocks,pyspy"])
def test_ctrl_c_in_a_terminal_reaches_the_target_once(tmp_path, probes):
    """The terminal sends Ctrl-C to its whole foreground group: kvprof (and the py-spy
    launcher) must not forward a second one, whatever stdin is; with py-spy, which kills its
    launcher when it stops on Ctrl-C, the target still runs once and its exit code is kept."""
    if probes.endswith("pyspy"):
        from kvprof.record import find_pyspy

        if find_pyspy() is None:
            pytest.skip("py-spy not installed")
    (tmp_path / "count.py").write_text(COUNT_SIGINTS)
    line = f"{sys.executable} -m kvprof.commands record -q -o c.kvprof -p {probes} count.py < /dev/null; echo rc=$?"
    out = _under_a_terminal(line, tmp_path)
    assert "SIGINTs received: 1" in out and "rc=0" in out, out
    assert (tmp_path / "runs.log").read_text() == "started\n"
    m = json.loads((tmp_path / "c.kvprof" / "manifest.json").read_text())
    assert m["target"]["exit_code"] == 0 and [p["exited_cleanly"] for p in m["processes"]] == [True], m


def test_a_program_that_closes_every_descriptor_keeps_its_files_and_ours(tmp_path):
    """A daemon's closerange() closes kvprof's files; the numbers then go to the program's own
    files and pipes.  kvprof must neither write its records there nor read the program's pipe."""
    script = tmp_path / "closer.py"
    script.write_text(
        "import kvprof, os, sys, time\n"
        "kvprof.mark('a', 1)\n"
        "time.sleep(0.8)  # kvprof's writer has opened its files\n"
        "os.closerange(3, 1024)\n"
        "r, w = os.pipe()\n"
        f"fds = [os.open(os.path.join({str(tmp_path)!r}, f'user{{i}}.txt'), os.O_WRONLY | os.O_CREAT | os.O_TRUNC) for i in range(6)]\n"
        "os.write(w, b'hello')\n"
        "kvprof.mark('b', 2)\n"
        "time.sleep(0.8)\n"
        "os.set_blocking(r, False)\n"
        "print(os.read(r, 100).decode(), flush=True)\n"
        "kvprof.mark('c', 3)\n"
    )
    out = tmp_path / "c.kvprof"
    r = run_kvprof("record", "-q", "-o", str(out), str(script))
    assert r.returncode == 0 and r.stdout == "hello\n", (r.stdout, r.stderr)
    assert all((tmp_path / f"user{i}.txt").stat().st_size == 0 for i in range(6))
    marks = analyze_json(str(out))["sections"]["markers"]
    assert {k: v["count"] for k, v in marks.items()} == {"a": 1, "b": 1, "c": 1}


# -- a full disk: the target's exit code wins, what fit stays readable ----------------------------
FILL = (
    "import os, signal, sys, time, kvprof\n"
    "for i in range(400_000):\n"
    "    kvprof.mark('step', i)\n"
    "    if i % 50_000 == 0:\n"
    "        time.sleep(0.6)\n"
    "time.sleep(0.6)\n"
    "if sys.argv[1] == 'term':\n"
    "    os.kill(os.getpid(), signal.SIGTERM)\n"
    "    time.sleep(5)\n"
    "sys.exit(int(sys.argv[1]))\n"
)


def _markers(manifest) -> int:
    return sum(p["records"].get("marks.bin", 0) for p in manifest["processes"])


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("how, code", [("5", 5), ("0", 0), ("term", 128 + signal.SIGTERM)])
def test_a_full_disk_keeps_the_targets_exit_code(tmp_path, small_disk, how, code):
    script = tmp_path / "fill.py"
    script.write_text(FILL)
    out = small_disk / "run.kvprof"
    r = run_kvprof("record", "-o", str(out), "--", sys.executable, str(script), how, timeout=120)
    assert r.returncode == code, r.stderr
    warning, summary = r.stderr.splitlines()
    assert warning.startswith(f"kvprof: warning: bundle {out} is incomplete: ") and "disk" in warning, warning
    assert summary.startswith("kvprof: wrote") and "Traceback" not in r.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "incomplete" and man["target"]["exit_code"] == code
    assert any("full" in why for why in man["incomplete"]["reasons"]), man["incomplete"]
    assert not (out / "manifest.reserve").exists()
    assert 0 < _markers(man) < 400_000  # what fit: a prefix of the markers
    a = run_kvprof("analyze", str(out), "--json", "-")
    assert a.returncode == 0, a.stderr


def test_a_disk_full_before_the_start_is_one_line_and_leaves_nothing(tmp_path, small_disk):
    with open(small_disk / "filler", "wb") as fh:
        try:
            while True:
                fh.write(bytes(1 << 16))
                fh.flush()
        except OSError:
            pass
    out = small_disk / "run.kvprof"
    r = run_kvprof("record", "-o", str(out), "--", sys.executable, "-c", "print('ran')")
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr == f"kvprof: error: cannot create bundle {out}: No space left on device\n"
    assert sorted(os.listdir(small_disk)) == ["filler"]


def test_a_final_manifest_that_cannot_be_written_leaves_the_previous_one(tmp_path, monkeypatch, capsys):
    """No room at all at the end (the room set aside for it taken too, simulated: the final
    write fails with ENOSPC): the target's code, one warning line, and the manifest on disk
    is the one written at the start, status "recording", which the reader reads as a
    recording that did not finish."""
    import errno

    from kvprof import record as rec
    from kvprof.analysis import analyze_path
    from kvprof.commands import main

    real, calls = rec.write_json_atomic, []

    def full_disk(path, data):
        calls.append(data.get("status"))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(path, data)

    monkeypatch.setattr(rec, "write_json_atomic", full_disk)
    out = tmp_path / "run.kvprof"
    rc = main(
        ["record", "-o", str(out), "--", sys.executable, "-c", "import kvprof, sys; kvprof.mark('m', 1); sys.exit(5)"]
    )
    err = capsys.readouterr().err
    assert rc == 5, err
    warning = err.splitlines()[0]
    assert warning == (
        f"kvprof: warning: could not write the final manifest of {out} (No space left on device); "
        'it still says "recording", and the streams are readable as far as they were written'
    )
    assert calls == ["recording", "complete", "incomplete"]  # the whole manifest, then the compact one
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "recording" and man["end_time"] is None
    result = analyze_path(str(out))
    assert any(f.title == "The recording did not finish" for f in result.findings)
    assert len(Bundle(str(out)).marks().t) == 1


def test_a_full_manifest_too_big_for_what_is_left_is_written_compact(tmp_path, monkeypatch, capsys):
    import errno

    from kvprof import record as rec

    real = rec.write_json_atomic

    def tight(path, data):
        if "processes" in data:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(path, data)

    monkeypatch.setattr(rec, "write_json_atomic", tight)
    out = tmp_path / "run.kvprof"
    result = rec.record([sys.executable, "-c", "raise SystemExit(3)"], output=str(out))
    assert result.exit_code == 3
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "incomplete" and man["target"]["exit_code"] == 3 and "processes" not in man
    assert "per-process list is left out" in man["incomplete"]["reasons"][-1]
    assert "is incomplete" in capsys.readouterr().err
    Bundle(str(out))  # still opens: the processes are found in procs/


# -- one recorder per bundle path ---------------------------------------------------------------
SLOW = "import kvprof, time\nfor i in range(20):\n    kvprof.mark('tick', i)\n    time.sleep(0.1)\n"


def _start_recorder(out, *extra, script=None):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvprof.commands",
            "record",
            "-q",
            *extra,
            "-o",
            str(out),
            "--",
            sys.executable,
            "-c",
            script or SLOW,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_recording(out, proc, timeout=60):
    deadline = time.time() + timeout
    while not any(True for _ in (out / "procs").glob("*/process.json")) if (out / "procs").is_dir() else True:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)


def test_a_second_recorder_of_the_same_bundle_fails_at_once_and_touches_nothing(tmp_path):
    out = tmp_path / "same.kvprof"
    first = _start_recorder(out, "--force")
    _wait_recording(out, first)
    before = sorted(p.name for p in (out / "procs").iterdir())
    for extra in (["--force"], []):
        t0 = time.time()
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "kvprof.commands",
                "record",
                "-q",
                *extra,
                "-o",
                str(out),
                "--",
                sys.executable,
                "-c",
                "print('must not run')",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2 and second.stdout == "", second
        line = second.stderr
        assert line.count("\n") == 1 and line.startswith("kvprof: error: another kvprof record (pid "), line
        assert f"pid {first.pid}," in line and str(out) in line
        assert time.time() - t0 < 20
    assert sorted(p.name for p in (out / "procs").iterdir()) == before  # --force removed nothing
    assert first.wait(timeout=120) == 0, first.communicate()
    b = Bundle(str(out))
    assert b.manifest["status"] == "complete" and len(b.manifest["processes"]) == 1
    assert _markers(b.manifest) == 20  # one run's events, not two
    assert not (tmp_path / ".same.kvprof.lock").exists()  # no lock file left behind


def test_concurrent_forced_recorders_never_merge(tmp_path):
    """The bug: of two `record --force -o same.kvprof` at once, both exited 0 and the
    bundle held both runs' events (5 of 17 tries)."""
    out = tmp_path / "race.kvprof"
    procs = [_start_recorder(out, "--force") for _ in range(4)]
    results = [(p.wait(timeout=180), p.communicate()[1]) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes.count(0) >= 1 and set(codes) <= {0, 2}, results
    for rc, err in results:
        if rc == 2:
            assert err.startswith("kvprof: error: another kvprof record (pid ") and err.count("\n") == 1, err
    b = Bundle(str(out))
    assert len(b.manifest["processes"]) == 1 and _markers(b.manifest) == 20


def test_a_killed_recorders_lock_does_not_block_the_next(tmp_path):
    out = tmp_path / "killed.kvprof"
    first = _start_recorder(out, script="import time; time.sleep(1.5)")
    _wait_recording(out, first)
    first.kill()  # SIGKILL: no cleanup; its lock file stays, its lock goes with it
    first.wait()
    assert (tmp_path / ".killed.kvprof.lock").exists()
    r = run_kvprof(
        "record", "-q", "--force", "-o", str(out), "--", sys.executable, "-c", "import kvprof; kvprof.mark('again')"
    )
    assert r.returncode == 0, r.stderr
    man = Bundle(str(out)).manifest
    assert len(man["processes"]) == 1 and _markers(man) == 1
    assert not (tmp_path / ".killed.kvprof.lock").exists()


def test_a_bundle_in_a_new_directory_still_works_and_leaves_no_lock(tmp_path):
    out = tmp_path / "new" / "dir" / "run.kvprof"
    r = run_kvprof("record", "-q", "-o", str(out), "--", sys.executable, "-c", "pass")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out.parent)) == ["run.kvprof"]
    assert Bundle(str(out)).manifest["status"] == "complete"
    assert not (out / "manifest.reserve").exists()


def test_a_marker_value_that_is_no_integer_never_raises_into_the_target(tmp_path):
    script = tmp_path / "odd.py"
    script.write_text(
        "import kvprof\nfor v in ('abc', None, float('nan'), float('inf'), 2.7, '5'):\n"
        "    kvprof.mark('odd', v)\nprint('fine')\n"
    )
    out = tmp_path / "o.kvprof"
    r = run_kvprof("record", "-q", "-o", str(out), str(script))
    assert r.returncode == 0 and r.stdout.strip() == "fine", r.stderr
    assert analyze_json(str(out))["sections"]["markers"]["odd"]["count"] == 6
    (d,) = (out / "procs").iterdir()
    assert json.loads((d / "process.json").read_text())["errors"] == [
        "marker values that were no integers were recorded as 0"
    ]


def test_default_names_of_runs_started_in_one_second_differ(tmp_path, monkeypatch):
    from kvprof import record

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(record.time, "strftime", lambda fmt, *a: "20261202-034508")
    first = record.default_output(["true"], None)
    assert first == "true-20261202-034508.kvprof"
    os.mkdir(first)
    assert record.default_output(["true"], None) == "true-20261202-034508-2.kvprof"
    os.mkdir("true-20261202-034508-2.kvprof")
    assert record.default_output(["true"], None) == "true-20261202-034508-3.kvprof"
