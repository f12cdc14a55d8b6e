"""Run the target under py-spy and report how it ended (stdlib only, run with `python -S`).

    python -S _shim.py STATUS_FILE STDOUT_FD -- CMD ARGS...

`kvprof record --probe pyspy` starts `py-spy record ... -- python -S _shim.py ...`:
py-spy is then the ancestor of every process it samples (no ptrace privilege
needed), but it exits 0 whatever its command did. This shim runs the command,
forwards the signals kvprof forwards to it, and writes the command's exit code
or signal to STATUS_FILE (its own pid first, to STATUS_FILE.pid, so kvprof can
reach it), then ends the same way. py-spy prints its progress on its stdout;
kvprof sends that to a log and hands the shim the real stdout as STDOUT_FD, so
the command's output stays clean.
"""

import json
import os
import signal
import subprocess
import sys

FORWARDED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


def in_terminal_foreground(pid: int) -> bool:
    """Is ``pid`` in the foreground process group of our controlling terminal?  Then a
    Ctrl-C reached it from the terminal already, whatever stdin is (``< /dev/null``)."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgid(pid)
    except OSError:
        return False
    finally:
        os.close(fd)


def main() -> int:
    status_path, stdout_fd = sys.argv[1], int(sys.argv[2])
    argv = sys.argv[4:] if sys.argv[3:4] == ["--"] else sys.argv[3:]
    with open(status_path + ".pid", "w") as fh:
        fh.write(str(os.getpid()))
    env = dict(os.environ)
    env["KVPROF_RECORDER_PID"] = str(os.getpid())  # the command is still the run's "main" process
    try:
        proc = subprocess.Popen(argv, env=env, stdout=stdout_fd if stdout_fd >= 0 else None)
    except OSError as exc:
        with open(status_path, "w") as fh:
            json.dump({"started": False, "error": f"{exc.strerror}: {argv[0]}", "errno": exc.errno}, fh)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    with open(
        status_path + ".target", "w"
    ) as fh:  # py-spy kills this shim on Ctrl-C: kvprof then waits for the command itself
        fh.write(str(proc.pid))

    def forward(signum, frame):
        if signum == signal.SIGINT and in_terminal_foreground(proc.pid):
            return  # the terminal's Ctrl-C went to the whole foreground group: the command has it
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    for name in FORWARDED:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, forward)
    while True:
        try:
            rc = proc.wait()
            break
        except InterruptedError:  # pragma: no cover
            continue
    with open(status_path, "w") as fh:
        json.dump({"started": True, "returncode": rc}, fh)
    if rc < 0:  # die of the same signal, as the command did
        try:
            signal.signal(-rc, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL, SIGSTOP: their action is already the default
            pass
        os.kill(os.getpid(), -rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
