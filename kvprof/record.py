"""`kvprof record`: run a command with the startup hook in place and finish its bundle.

The recorder process itself records nothing; it prepares the bundle, starts
the target with KVPROF_* variables and the hook on PYTHONPATH, forwards
signals, waits, and writes the final manifest whatever happened to the target.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from kvprof import runtime
from kvprof._shim import in_terminal_foreground
from kvprof._version import __version__
from kvprof.errors import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_OK, SIGNAL_BASE, RecordError, UsageError
from kvprof.trace import format as fmt
from kvprof.trace import hostinfo
from kvprof.trace.atomic import write_json_atomic

HOOK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_hook")
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


@dataclass
class RecordResult:
    bundle: str
    exit_code: int
    manifest: dict


def target_argv(command: list[str], module: str | None) -> list[str]:
    """Turn what the user typed into an argv: ``-m mod``, ``script.py``, or any command."""
    if module:
        return [sys.executable, "-m", module, *command]
    if not command:
        raise UsageError("nothing to record: give a command, a script, or -m MODULE")
    if command[0].endswith(".py") or (os.path.isfile(command[0]) and not os.access(command[0], os.X_OK)):
        if not os.path.exists(command[0]):
            raise UsageError(f"no such script: {command[0]}")
        return [sys.executable, *command]
    return list(command)


def default_output(argv: list[str], module: str | None) -> str:
    if module:
        stem = module.rsplit(".", 1)[-1]
    else:
        words = [a for a in argv if not a.startswith("-")]
        script = next((a for a in words[1:] if a.endswith(".py")), None) if len(words) > 1 else None
        stem = os.path.splitext(os.path.basename(script or words[0] if words else "run"))[0]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "run"
    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, n = f"{base}.kvprof", 1
    while os.path.lexists(name):  # runs started in the same second: -2, -3, ... (never an existing bundle)
        n += 1
        name = f"{base}-{n}.kvprof"
    return name


def _scan_processes(
    bundle: str, command: list[str] | None = None, outcome: dict | None = None, received: list[int] | None = None
) -> list[dict]:
    """The manifest's list of recorded processes, from their process records.

    ``command`` (the argv the recorder started) restores the module name in the main
    process's argv; ``outcome`` and ``received`` (the signals the recorder got) say whether
    the run ended in order, for processes that never closed their recording (see _how_ended)."""
    from kvprof.inputs import read_bytes

    out: list[dict] = []
    procs = os.path.join(bundle, fmt.PROCS_DIR)
    if not os.path.isdir(procs):
        return out
    for name in sorted(os.listdir(procs)):
        path = os.path.join(procs, name, fmt.PROCESS_JSON)
        try:
            info = json.loads(read_bytes(path, "process record"))
            if not isinstance(info, dict):
                continue
        except Exception:  # unreadable or cut short: listed as such by _incomplete_reasons
            continue
        probes, errors = info.get("probes"), info.get("errors")
        sizes = _record_counts(os.path.join(procs, name), info)
        argv = info.get("argv")
        if info.get("role") == "main" and command:
            argv = module_argv(argv, command)
        out.append(
            {
                "dir": f"{fmt.PROCS_DIR}/{name}",
                "pid": info.get("pid"),
                "ppid": info.get("ppid"),
                "role": info.get("role"),
                "argv": argv,
                "start_time": info.get("start_time"),
                "exited_cleanly": info.get("end_ns") is not None,
                "ended": "closed" if info.get("end_ns") is not None else "unknown",
                "probes": probes if isinstance(probes, dict) else {},
                "errors": errors if isinstance(errors, list) else [],
                "records": sizes,
                **{
                    k: info[k] for k in ("host", "clock", "ray") if isinstance(info.get(k), dict)
                },  # docs/distributed.md
            }
        )
    starts = {p["pid"] for p in out}
    for p in out:  # the first recorded process under the recorder is "main"; others are children
        if p["role"] == "child" and p["ppid"] not in starts:
            p["parent_recorded"] = False
    _how_ended(out, outcome, received)
    return out


def module_argv(argv, command: list[str]):
    """The argv of a process started as ``python -m MODULE ARGS``: Python puts "-m" where
    the module's path will go until it has found the module, and the startup hook runs
    before that, so the process recorded ``["-m", ARGS...]``.  The recorder knows the
    command it started: ``["-m", MODULE, ARGS...]``.  Anything else is returned as it was."""
    if not isinstance(argv, list) or not argv or argv[0] != "-m":
        return argv
    skip = False
    for i, word in enumerate(command[1:], 1):
        if skip:  # the value of -X / -W
            skip = False
            continue
        if word in ("-X", "-W", "--check-hash-based-pycs"):
            skip = True
            continue
        if word == "-m" and i + 1 < len(command):
            module, rest = command[i + 1], command[i + 2 :]
        elif word.startswith("-m") and len(word) > 2:  # python -mjson.tool
            module, rest = word[2:], command[i + 1 :]
        elif word in ("-c", "--") or not word.startswith("-"):
            return argv  # a script or -c: not started as a module
        else:
            continue
        return ["-m", module, *rest] if list(rest) == argv[1:] else argv
    return argv


# A process that never closed its recording either crashed, was killed, or is still running.
# Servers end their helpers themselves: vLLM's API server, on Ctrl-C, sends SIGTERM to its
# engine core and, with its default --shutdown-timeout of 0, SIGKILLs it and its workers at
# once.  Their events are all in the bundle (every
# record is in a MAP_SHARED file before the call returns) but end_ns never got written.
ORDERLY_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _how_ended(processes: list[dict], outcome: dict | None, received: list[int] | None) -> None:
    """Say how each process that did not close its recording ended, where the bundle tells:

    * ``running``: still alive when the recorder finished (an orphan the target left);
    * ``stopped_with_parent`` (``exited_cleanly`` true, ``stopped_by`` its recorded
      ancestor): the run ended in order (the target exited 0, or of the very signal the
      recorder was stopped with: a Ctrl-C, a SIGTERM), and a recorded ancestor closed its
      own recording, so the process was ended by that ancestor's shutdown;
    * ``unknown`` otherwise (killed or crashed).

    A child that crashes while its parent lives on, in a run that then ends in order,
    reads as stopped_with_parent: the bundle cannot tell the two apart (its events are
    complete either way)."""
    by_pid = {p["pid"]: p for p in processes if isinstance(p.get("pid"), int)}
    orderly = _ended_in_order(outcome, received)
    for p in processes:
        if p["ended"] == "closed":
            continue
        if _still_running(p.get("pid"), p.get("start_time")):
            p["ended"] = "running"
            continue
        if not orderly or p["errors"]:
            continue
        q, seen = by_pid.get(p.get("ppid")), set()
        while q is not None and q["pid"] not in seen:
            seen.add(q["pid"])
            if q["ended"] == "closed":
                p.update(ended="stopped_with_parent", stopped_by=q["pid"], exited_cleanly=True)
                break
            q = by_pid.get(q.get("ppid"))


STRAGGLER_WAIT_S = 2.0


def _wait_for_stragglers(bundle: str, timeout: float = STRAGGLER_WAIT_S) -> None:
    """Recorded processes that outlive the target by a moment (multiprocessing's resource
    tracker, which exits once its pipe closes, after a leak report) would be listed as
    still running: wait for them to end, up to ``timeout`` seconds, whatever runs on."""
    deadline = time.monotonic() + timeout
    procs = os.path.join(bundle, fmt.PROCS_DIR)
    try:
        names = os.listdir(procs)
    except OSError:
        return
    waiting = []
    for name in names:
        try:
            with open(os.path.join(procs, name, fmt.PROCESS_JSON), "rb") as fh:
                info = json.loads(fh.read(1 << 20))
        except (OSError, ValueError):
            continue
        if (
            isinstance(info, dict)
            and info.get("end_ns") is None
            and _still_running(info.get("pid"), info.get("start_time"))
        ):
            waiting.append((info.get("pid"), info.get("start_time")))
    while waiting and time.monotonic() < deadline:
        time.sleep(0.05)
        waiting = [w for w in waiting if _still_running(*w)]


def _ended_in_order(outcome: dict | None, received: list[int] | None) -> bool:
    if not outcome or not outcome.get("started"):
        return False
    stops = [s for s in received or [] if s in ORDERLY_STOP_SIGNALS]
    if outcome.get("exit_code") == 0:
        return True
    died_of = outcome.get("signal") or ((outcome.get("exit_code") or 0) - SIGNAL_BASE)
    return died_of in stops


def _still_running(pid, start_time) -> bool:
    """Whether the process of this pid that started at ``start_time`` (seconds since the
    epoch) is alive, on Linux (elsewhere: False): a reused pid has another start time."""
    if not isinstance(pid, int) or pid <= 0 or not isinstance(start_time, (int, float)):
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        if fields[0] == "Z":  # dead, not yet reaped
            return False
        with open("/proc/stat") as fh:
            btime = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
        started = btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return abs(started - start_time) < 2.0


def _record_counts(directory: str, info: dict) -> dict:
    """Records per stream of one process (keys are the version-1 file names): what its
    writer counted at exit, or, for a process that never got there, what is on disk."""
    from kvprof.trace.stage import PROCESS_FORMAT

    counts = info.get("counts")
    if info.get("format") == PROCESS_FORMAT:
        if not isinstance(counts, dict):
            from kvprof.trace.reader import ProcessData

            try:
                counts = ProcessData(directory).counts()
            except Exception:  # a damaged directory: the analysis says what it can read
                counts = {}
        return {f"{k}.bin": int(v) for k, v in counts.items() if isinstance(v, int)}
    sizes = {}
    for stream, dtype in fmt.STREAM_DTYPES.items():
        p = os.path.join(directory, stream)
        if os.path.exists(p):
            sizes[stream] = os.path.getsize(p) // dtype.itemsize
    return sizes


def _probe_cost(bundle: str, processes: list[dict], probes: list[str]) -> dict:
    """What the heap probes cost, where it can be told: time in the target, bytes written."""
    out: dict = {}
    if "tracemalloc" in probes:
        secs = sum(float((p["probes"].get("tracemalloc") or {}).get("snapshot_seconds") or 0) for p in processes)
        size = sum(
            p["records"].get(name, 0) * fmt.STREAM_DTYPES[name].itemsize
            for p in processes
            for name in ("heap_snaps.bin", "heap_sites.bin")
        )
        out["tracemalloc"] = {
            "snapshot_seconds": round(secs, 6),
            "bytes_written": size,
            "note": "time taken by snapshots in the target; tracing every allocation costs more, see benchmarks/bench_heap.py",
        }
    if "memray" in probes:
        size = 0
        for p in processes:
            d = os.path.join(bundle, p["dir"])
            size += (
                sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.startswith("memray.bin"))
                if os.path.isdir(d)
                else 0
            )
        out["memray"] = {
            "bytes_written": size,
            "seconds": None,
            "note": "memray's cost is spread over every allocation and cannot be told apart in the run; see benchmarks/bench_heap.py",
        }
    return out


class _SignalForwarder:
    """Forwards signals to the target; a terminal's Ctrl-C already reaches it, so that is not doubled."""

    def __init__(self):
        self.proc = None
        self.received: list[int] = []
        self._old = {}

    def __enter__(self):
        for sig in FORWARDED:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except (OSError, ValueError):
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    pid_of = None  # where signals go instead of proc (the py-spy shim), when set

    def _handle(self, signum, frame):
        self.received.append(signum)
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if signum == signal.SIGINT and in_terminal_foreground(proc.pid):
            return  # the terminal sent SIGINT to the whole foreground group, the target has it
        pid = (self.pid_of() if self.pid_of else None) or proc.pid
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


# -- the py-spy probe: py-spy runs in the recorder, sampling the target from outside ---------
SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_shim.py")


def find_pyspy() -> str | None:
    """$KVPROF_PYSPY, else py-spy beside this Python, else on PATH."""
    chosen = os.environ.get("KVPROF_PYSPY")
    if chosen:
        return chosen if os.access(chosen, os.X_OK) else None
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return here if os.access(here, os.X_OK) else shutil.which("py-spy")


def _run(launch: list[str], env: dict, fwd: _SignalForwarder, **popen) -> int:
    proc = subprocess.Popen(launch, env=env, **popen)
    fwd.proc = proc
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # pragma: no cover - the forwarder's handler normally swallows it
            continue


def _pyspy_setup(bundle: str, argv: list[str], options: dict, manifest: dict) -> dict | None:
    """py-spy's command line around the target, or None (said once, in the manifest and on stderr)."""
    exe = find_pyspy()
    note = manifest.setdefault("probe_status", {})
    if exe is None:
        why = (
            f"py-spy not found at $KVPROF_PYSPY ({os.environ['KVPROF_PYSPY']})"
            if os.environ.get("KVPROF_PYSPY")
            else "py-spy not found (pip install 'kvprof[pyspy]')"
        )
        note["pyspy"] = {"status": "unavailable", "reason": why}
        sys.stderr.write(f"kvprof: py-spy probe off: {why}\n")
        return None
    out_dir = os.path.join(bundle, "pyspy")
    os.makedirs(out_dir, exist_ok=True)
    rate = int(options.get("rate") or 100)
    profile = os.path.join(out_dir, "profile.speedscope.json")
    status = os.path.join(out_dir, "target-status.json")
    native = bool(options.get("native"))
    cmd = [
        exe,
        "record",
        "--format",
        "speedscope",
        "--output",
        profile,
        "--rate",
        str(rate),
        "--subprocesses",
        "--full-filenames",
    ]
    # native stacks need the target paused while it is read; Python stacks do not
    cmd.append("--native" if native else "--nonblocking")
    try:  # the target's stdout, passed around py-spy (which prints its own progress there)
        out_fd = os.dup(sys.stdout.fileno())
        os.set_inheritable(out_fd, True)
    except (OSError, ValueError, AttributeError):
        out_fd = -1
    cmd += ["--", sys.executable, "-S", SHIM, status, str(out_fd), "--", *argv]
    note["pyspy"] = {
        "status": "sampling",
        "py_spy": exe,
        "rate": rate,
        "native": bool(options.get("native")),
        "profile": os.path.relpath(profile, bundle),
        "idle": False,
        "nonblocking": not native,
    }
    return {
        "argv": cmd,
        "status": status,
        "profile": profile,
        "stdout_fd": out_fd,
        "log": os.path.join(out_dir, "py-spy.log"),
    }


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as fh:
            return int(fh.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _pyspy_finish(pyspy: dict, rc: int, manifest: dict):
    """The target's own return code (py-spy always exits 0), and a failure outcome if it never started."""
    import json

    note = manifest["probe_status"]["pyspy"]
    shim = _read_pid(pyspy["status"] + ".pid")
    if shim is not None and not os.path.exists(pyspy["status"]):
        # py-spy is gone but its launcher, which started the target, may still be waiting
        # for it (a signal to the whole process group ends py-spy first): wait for its word
        _wait_gone(shim)
        _reap(shim)
    try:
        with open(pyspy["status"]) as fh:
            status = json.load(fh)
    except (OSError, ValueError):
        if shim is not None:  # the target was started: never run it a second time
            note["status"] = "sampled" if os.path.exists(pyspy["profile"]) else "no profile written"
            # py-spy SIGKILLs its launcher when it stops on Ctrl-C; the target, orphaned,
            # became kvprof's child (a subreaper): its own exit status is still ours to wait for
            target = _read_pid(pyspy["status"] + ".target")
            if target is not None:
                try:
                    _, st = os.waitpid(target, 0)
                    return os.waitstatus_to_exitcode(st), None
                except ChildProcessError:  # no subreaper here: it is not our child
                    _wait_gone(target)
            note["reason"] = "py-spy and its launcher ended before the target's exit status was known"
            return (rc if rc >= 0 else SIGNAL_BASE - rc), None
        # the shim never ran: py-spy itself failed (permissions, unsupported platform)
        note.update(
            status="failed", reason=f"py-spy exited with {rc} before starting the target; ran the target without it"
        )
        return rc, {"retry": True}
    if not status.get("started"):
        note.update(status="target not started")
        return EXIT_NOT_FOUND, {"started": False, "error": status.get("error", "unknown"), "errno": status.get("errno")}
    note["status"] = "sampled" if os.path.exists(pyspy["profile"]) else "no profile written"
    return int(status["returncode"]), None


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)  # an orphan handed to us (subreaper): not left a zombie
    except ChildProcessError:
        pass


def _become_subreaper() -> bool:
    """Linux: orphans of our descendants are re-parented to us instead of to init, so the
    target's exit status survives py-spy killing the launcher between us and it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _wait_gone(pid: int) -> None:
    """Wait until a process that is not our child has ended (it is reaped by its new parent)."""
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:  # the pid was reused by someone else's process: ours is gone
            return
        try:
            with open(f"/proc/{pid}/stat") as fh:  # a zombie nobody reaped yet is gone for us
                if fh.read().rsplit(")", 1)[-1].split()[0] == "Z":
                    return
        except (OSError, IndexError):
            pass
        time.sleep(0.05)


# -- one recorder per bundle path -----------------------------------------------------------
def lock_path(bundle: str) -> str:
    """The lock file of a bundle path: beside it, so that --force deleting and recreating
    the bundle directory does not drop the lock."""
    parent, name = os.path.split(os.path.abspath(bundle))
    return os.path.join(parent, f".{name}.lock")


class BundleLock:
    """An exclusive lock on a bundle path for the whole recording.

    flock on ``.NAME.lock`` beside the bundle: a second recorder of the same path fails
    at once (one line naming the holder, from what the holder wrote into the file) and
    touches nothing; the kernel drops the lock with the process that held it, so a
    SIGKILLed recorder blocks no one.  The descriptor is not inherited by the target.
    The holder removes the file when done; a recorder that opened it just before then
    finds, once it has the lock, that the path no longer names the file it locked, and
    starts over (else two recorders could each lock a different file of one name)."""

    def __init__(self, bundle: str):
        self.bundle = bundle
        self.path = lock_path(bundle)
        self.fd = -1

    def acquire(self) -> BundleLock:
        import fcntl

        for _ in range(50):
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)  # -o new/dir/run.kvprof
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise RecordError(
                    f"cannot create bundle {self.bundle}: {exc.strerror} (its lock file {self.path})"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _holder(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RecordError(
                        f"another kvprof record ({holder}) is recording {self.bundle}; "
                        f"not touching it (its lock: {self.path})"
                    ) from None
                raise RecordError(f"cannot lock {self.bundle}: {exc.strerror} ({self.path})") from None
            if _same_file(fd, self.path):
                self.fd = fd
                self._say_who()
                return self
            os.close(fd)  # the holder finished and removed it between our open and our lock
        raise RecordError(f"cannot lock {self.bundle}: its lock file {self.path} keeps being replaced")

    def _say_who(self) -> None:
        who = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": time.time(), "argv": sys.argv[1:]}
        try:
            data = json.dumps(who).encode()
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)
        except OSError:  # a full disk: the lock holds all the same, the holder is unnamed
            pass

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            if _same_file(self.fd, self.path):
                os.unlink(self.path)  # while still locked: nobody can take a lock on it in between
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _holder(fd: int) -> str:
    """Who holds a lock, in words, from what it wrote into the lock file."""
    try:
        who = json.loads(os.pread(fd, 65536, 0) or b"null")
        pid, host = int(who["pid"]), str(who.get("host") or "")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(who["start_time"])))
    except (OSError, ValueError, TypeError, KeyError, OverflowError):
        return "pid unknown"
    here = "" if host == socket.gethostname() else f" on {host}"
    return f"pid {pid}{here}, since {since}"


# -- the bundle's manifest, written whatever the disk says ----------------------------------
RESERVE = "manifest.reserve"
RESERVE_BYTES = 64 << 10  # the final manifest of a few dozen processes; freed just before it is written


def _reserve_space(bundle: str) -> str | None:
    """Set aside room for the final manifest: the targets may fill the disk, and the one
    record that says how the run ended must still fit."""
    path = os.path.join(bundle, RESERVE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except (OSError, AttributeError):  # no fallocate here: zeros take the room as well
            os.write(fd, bytes(RESERVE_BYTES))
        return path
    except OSError:  # the disk is already (nearly) full
        os.close(fd)
        fd = -1
        try:
            os.unlink(path)
        except OSError:
            pass
        return None
    finally:
        if fd >= 0:
            os.close(fd)


def _release_space(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def _incomplete_reasons(bundle: str, processes: list[dict]) -> list[str]:
    """Why the streams may stop short of the run's end: a process whose writer failed (a
    full disk), a process directory without a readable record, and a full disk itself."""
    out = []
    procs = os.path.join(bundle, fmt.PROCS_DIR)
    try:
        names = sorted(os.listdir(procs))
    except OSError:
        names = []
    scanned = {p["dir"].rsplit("/", 1)[-1] for p in processes}
    for name in names:
        if name not in scanned:
            out.append(f"process directory {fmt.PROCS_DIR}/{name} has no readable process record")
    for p in processes:
        failed = [str(e) for e in p.get("errors") or [] if "writer failed" in str(e) or "No space left" in str(e)]
        if failed:
            out.append(f"pid {p.get('pid')}: {failed[0]}")
    try:
        st = os.statvfs(bundle)
        free = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may use the reserved blocks
        if free == 0 and st.f_blocks:
            out.append("the disk holding the bundle is full")
    except OSError:
        pass
    return out


def _write_final_manifest(mpath: str, manifest: dict, reserve: str | None) -> str | None:
    """Write the last manifest: whole, else without the per-process list (the reader finds
    the processes in procs/ itself).  None when written; else why not, and the manifest on
    disk is the previous one (status "recording": write_json_atomic never leaves half a file)."""
    _release_space(reserve)
    try:
        write_json_atomic(mpath, manifest)
        return None
    except OSError as exc:
        first = exc
    compact = {k: v for k, v in manifest.items() if k not in ("processes", "probe_cost")}
    compact["status"] = "incomplete"
    compact.setdefault("incomplete", {}).setdefault("reasons", []).append(
        f"the full manifest could not be written ({first.strerror or first}): the per-process list is left out"
    )
    try:
        write_json_atomic(mpath, compact)
        manifest.update(status="incomplete", incomplete=compact["incomplete"])
        return None
    except OSError:
        return first.strerror or str(first)


def record(
    command: list[str],
    output: str | None = None,
    probes: list[str] | None = None,
    module: str | None = None,
    force: bool = False,
    quiet: bool = False,
    pyspy_options: dict | None = None,
    probe_options: dict | None = None,
    ray_output: str | None = None,
) -> RecordResult:
    from kvprof import probes as probe_registry

    argv = target_argv(command, module)
    probes = list(dict.fromkeys(probes or list(probe_registry.DEFAULT_PROBES)))
    unknown = [p for p in probes if p not in probe_registry.known()]
    if unknown:
        raise UsageError(f"unknown probe {unknown[0]!r}; known probes: {', '.join(probe_registry.known())}")
    if "markers" not in probes:
        probes.append("markers")
    bundle = os.path.abspath(output or default_output(argv, module))
    ray_output = os.path.abspath(ray_output) if ray_output and os.path.abspath(ray_output) != bundle else None
    # the lock first: --force must not remove a bundle another recorder is writing
    with BundleLock(bundle):
        return _record_locked(bundle, argv, probes, force, pyspy_options, probe_options, ray_output)


def new_manifest(argv: list[str], probes: list[str]) -> dict:
    """A bundle's first manifest (status "recording"), as the recorder writes it before the
    target starts."""
    from kvprof import probes as probe_registry

    return {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "kvprof_version": __version__,
        "status": "recording",
        "command": argv,
        "cwd": os.getcwd(),
        "python": {"executable": sys.executable, "version": platform.python_version()},
        "host": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "boot_id": hostinfo.boot_id(),
        },
        "clock": {"wall_minus_mono_ns": {"start": hostinfo.wall_minus_mono_ns(), "end": None}},
        "start_time": time.time(),
        "start_ns": time.monotonic_ns(),
        "end_time": None,
        "probes": {p: probe_registry.PROBES[p][1] for p in probes},
        "recorder_pid": os.getpid(),
    }


def start_session_bundle(bundle: str, argv: list[str], probes: list[str]) -> dict:
    """Create the bundle of a recording made inside a running process (kvprof.runtime
    start_session): its directory, replacing a bundle already there, and its first
    manifest.  The manifest, to be finished by finish_session_bundle."""
    if os.path.lexists(bundle):
        if os.path.isdir(bundle) and not os.path.islink(bundle) and os.path.exists(os.path.join(bundle, fmt.MANIFEST)):
            shutil.rmtree(bundle)
        else:
            raise UsageError(f"output exists and is not a kvprof bundle, not replacing it: {bundle}")
    os.makedirs(os.path.join(bundle, fmt.PROCS_DIR))
    manifest = new_manifest(argv, probes)
    manifest["session"] = {"pid": os.getpid()}  # recorded from inside this process, not by a recorder around it
    write_json_atomic(os.path.join(bundle, fmt.MANIFEST), manifest)
    return manifest


def finish_session_bundle(bundle: str, manifest: dict, probes: list[str], outcome: dict) -> dict:
    """The final manifest of a session's bundle, as `kvprof record` writes it at the end."""
    _finish(bundle, os.path.join(bundle, fmt.MANIFEST), manifest, outcome, probes, None, None)
    return manifest


def _record_locked(
    bundle: str,
    argv: list[str],
    probes: list[str],
    force: bool,
    pyspy_options: dict | None,
    probe_options: dict | None,
    ray_output: str | None = None,
) -> RecordResult:
    if os.path.lexists(bundle):
        if not force:
            raise UsageError(f"output exists: {bundle} (use --force to replace it)")
        if os.path.isdir(bundle) and not os.path.islink(bundle) and os.path.exists(os.path.join(bundle, fmt.MANIFEST)):
            shutil.rmtree(bundle)
        else:
            raise UsageError(f"output exists and is not a kvprof bundle, not replacing it: {bundle}")
    from kvprof.probes import ray as ray_probe

    if ray_output:
        ray_probe.prepare_output(ray_output, force, bundle)
    try:
        os.makedirs(os.path.join(bundle, fmt.PROCS_DIR))
    except OSError as exc:
        raise UsageError(f"cannot create bundle {bundle}: {exc.strerror}") from None
    manifest = new_manifest(argv, probes)
    mpath = os.path.join(bundle, fmt.MANIFEST)
    try:
        write_json_atomic(mpath, manifest)
    except OSError as exc:  # nothing recorded yet and nowhere to record it: do not start the target
        shutil.rmtree(bundle, ignore_errors=True)
        raise RecordError(f"cannot create bundle {bundle}: {exc.strerror or exc}") from None
    reserve = _reserve_space(bundle)

    env = dict(os.environ)
    env[runtime.ENV_BUNDLE] = bundle
    env[runtime.ENV_PROBES] = ",".join(probes)
    env[runtime.ENV_RECORDER_PID] = str(os.getpid())
    env["KVPROF_PATH"] = PACKAGE_PARENT
    if probe_options:
        env[runtime.ENV_OPTIONS] = json.dumps(probe_options)
        manifest["probe_options"] = probe_options
    env["PYTHONPATH"] = HOOK_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    manifest["ray"] = ray_probe.recorder_env(
        env, ray_output
    )  # Ray workers: through the job's runtime_env (docs/distributed.md)

    launch, pyspy = argv, None
    if "pyspy" in probes:
        pyspy = _pyspy_setup(bundle, argv, pyspy_options or {}, manifest)
        if pyspy is not None:
            launch = pyspy["argv"]
            _become_subreaper()
        _update_manifest(mpath, manifest)

    nvml = None
    if "nvml" in probes:
        from kvprof.probes.nvml import Sampler

        nvml = Sampler(bundle, float((probe_options or {}).get("nvml", {}).get("interval", 0.5)))
        manifest.setdefault("probe_status", {})["nvml"] = nvml.start()
        _update_manifest(mpath, manifest)
        if nvml.status.get("status") != "sampling":
            sys.stderr.write(f"kvprof: nvml probe off: {nvml.status['reason']}\n")

    exit_code = EXIT_OK
    outcome: dict
    with _SignalForwarder() as fwd:
        if pyspy is not None:
            fwd.pid_of = lambda: _read_pid(pyspy["status"] + ".pid")
        try:
            if pyspy is not None:
                with open(pyspy["log"], "wb") as log:
                    rc = _run(
                        launch, env, fwd, stdout=log, pass_fds=(pyspy["stdout_fd"],) if pyspy["stdout_fd"] >= 0 else ()
                    )
                if pyspy["stdout_fd"] >= 0:
                    os.close(pyspy["stdout_fd"])
            else:
                rc = _run(launch, env, fwd)
            failure = None
            if pyspy is not None:
                rc, failure = _pyspy_finish(pyspy, rc, manifest)
                if failure is not None and failure.get("retry"):
                    # py-spy failed before it started anything: run the target without it
                    sys.stderr.write(f"kvprof: py-spy probe off: {manifest['probe_status']['pyspy']['reason']}\n")
                    fwd.pid_of = None
                    rc, failure = _run(argv, env, fwd), None
        except OSError as exc:  # not found, not executable, not a format the kernel runs
            outcome = {"started": False, "error": f"{exc.strerror or exc}: {argv[0]}"}
            exit_code = EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_EXECUTE
        else:
            if failure is not None:
                outcome = {"started": False, "error": failure["error"]}
                exit_code = EXIT_NOT_FOUND if failure.get("errno") == errno.ENOENT else EXIT_CANNOT_EXECUTE
            elif rc < 0:
                exit_code = SIGNAL_BASE - rc
                outcome = {
                    "started": True,
                    "exit_code": exit_code,
                    "signal": -rc,
                    "signal_name": signal.Signals(-rc).name,
                }
            else:
                exit_code = rc
                outcome = {"started": True, "exit_code": rc, "signal": None}
            if fwd.received:
                outcome["signals_forwarded"] = [signal.Signals(s).name for s in fwd.received]
    # From here on the target has ended: whatever happens to the bundle, its exit code is ours.
    _finish(bundle, mpath, manifest, outcome, probes, nvml, reserve, fwd.received)
    if not outcome.get("started"):
        raise RecordError(f"cannot start {argv[0]}: {outcome['error']} (bundle kept: {bundle})", exit_code)
    return RecordResult(bundle, exit_code, manifest)


def _update_manifest(mpath: str, manifest: dict) -> None:
    """A manifest update while recording: on a full disk the previous one stays, and the
    final write (with the room set aside for it) says what happened."""
    try:
        write_json_atomic(mpath, manifest)
    except OSError:
        pass


def _finish(
    bundle: str,
    mpath: str,
    manifest: dict,
    outcome: dict,
    probes: list[str],
    nvml,
    reserve,
    received: list[int] | None = None,
) -> None:
    """The final manifest: status complete, or incomplete with the reasons (a process's
    writer failed, the disk filled).  Never raises: a manifest that cannot be written at all
    is one warning line, the previous manifest (status "recording") stays."""
    try:
        if nvml is not None:
            manifest["probe_status"]["nvml"] = nvml.stop()
        manifest.update({"end_time": time.time(), "end_ns": time.monotonic_ns(), "target": outcome})
        manifest.setdefault("clock", {}).setdefault("wall_minus_mono_ns", {})["end"] = hostinfo.wall_minus_mono_ns()
        _wait_for_stragglers(bundle)
        if (manifest.get("ray") or {}).get("output"):  # Ray workers recorded apart (docs/distributed.md)
            from kvprof.probes import ray as ray_probe

            manifest["ray"]["output_processes"] = ray_probe.finish_output(manifest["ray"]["output"], _scan_processes)
        manifest["processes"] = _scan_processes(bundle, manifest.get("command"), outcome, received)
        manifest["probe_cost"] = _probe_cost(bundle, manifest["processes"], probes)
        reasons = _incomplete_reasons(bundle, manifest["processes"])
        manifest["status"] = "incomplete" if reasons else "complete"
        if reasons:
            manifest["incomplete"] = {"reasons": reasons}
        why = _write_final_manifest(mpath, manifest, reserve)
    except OSError as exc:
        why = exc.strerror or str(exc)
    except Exception as exc:  # a bug in kvprof: said as one, but the target's exit code still stands
        import traceback

        traceback.print_exc()
        why = f"{exc!r}, a bug in kvprof {__version__}: please report it with the traceback above"
    if why is not None:
        _release_space(reserve)
        sys.stderr.write(
            f"kvprof: warning: could not write the final manifest of {bundle} ({why}); it still says "
            '"recording", and the streams are readable as far as they were written\n'
        )
    elif manifest.get("status") == "incomplete":
        reasons = manifest["incomplete"]["reasons"]
        more = f" (and {len(reasons) - 1} more, listed in its manifest)" if len(reasons) > 1 else ""
        sys.stderr.write(f"kvprof: warning: bundle {bundle} is incomplete: {reasons[0]}{more}\n")


def summary_line(result: RecordResult) -> str:
    procs = result.manifest.get("processes", [])
    blocks = sum(p["records"].get("blocks.bin", 0) for p in procs)
    marks = sum(p["records"].get("marks.bin", 0) for p in procs)
    gcs = sum(p["records"].get("gc.bin", 0) for p in procs)
    target = result.manifest.get("target", {})
    how = f"signal {target['signal_name']}" if target.get("signal") else f"exit code {target.get('exit_code')}"
    rel = os.path.relpath(result.bundle)
    shown = rel if not rel.startswith("..") else result.bundle
    return (
        f"kvprof: wrote {shown} ({len(procs)} process{'es' if len(procs) != 1 else ''}, "
        f"{blocks:,} block events, {marks:,} markers"
        + (f", {gcs:,} GC pauses" if gcs else "")
        + f"); target ended with {how}"
    )
