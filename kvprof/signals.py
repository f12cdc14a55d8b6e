"""Signals inside a recorded process: which ones kvprof keeps away from its threads,
and the rescue of a SIGTERM the main thread would otherwise never handle.

Standard library only, no kvprof imports: kvprof.runtime (the flush-and-die handler)
and kvprof.trace.writer (whose thread runs the rescue) both import this module, and
neither imports the other at module level (tests/test_boundaries.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

# the process-directed signals kvprof keeps away from every thread but the main one
HELD_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2})


def block_process_signals() -> None:
    """In a kvprof thread: leave process-directed signals to the main thread.  A SIGTERM
    delivered to a helper thread would not interrupt the main thread's blocking call, so
    the target's handler (and kvprof's flush-and-die) would run late or never."""
    if hasattr(signal, "pthread_sigmask"):
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        except (OSError, ValueError):
            pass


# A Python signal handler runs in the main thread between bytecodes.  A SIGTERM that lands
# just before the main thread enters a blocking call that does not come back on its own
# (a pool worker waiting on its queue's lock) has already been caught at the C level, so
# the call is not interrupted and kvprof's handler, which replaced the default action
# "die", would never run: Pool.terminate would then wait for that worker forever.  The
# rescue: Python writes each caught signal's number to the wakeup fd; kvprof's writer
# thread reads it there (rescue_missed_sigterm, each tick) and, if the handler has not
# run a moment later, interrupts the main thread with SIGURG, whose handler does nothing:
# the interrupted call checks for pending handlers and runs kvprof's.  Only armed when
# the program has no wakeup fd of its own and no SIGURG handler.  Guarded by
# tests/test_record.py::test_a_sigterm_caught_by_another_thread_still_flushes_and_kills.
_rescue: dict[str, Any] = {"r": -1, "w": -1, "seen": 0, "handled": False, "armed": False, "handler": None}


def _poke(signum: int, frame: FrameType | None) -> None:  # SIGURG: only there to interrupt a blocking call
    pass


def arm_rescue(handler: Callable[[int, FrameType | None], Any]) -> None:
    """Arm the rescue for ``handler``, the SIGTERM handler just installed (it calls
    :func:`sigterm_handled` when it runs)."""
    if not hasattr(signal, "pthread_kill") or not hasattr(signal, "SIGURG"):
        return
    try:
        if signal.getsignal(signal.SIGURG) is not signal.SIG_DFL:
            return
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        if previous != -1:  # the program's own: leave it alone
            signal.set_wakeup_fd(previous)
            os.close(r)
            os.close(w)
            return
        signal.signal(signal.SIGURG, _poke)
    except (ValueError, OSError, TypeError):
        return
    for fd in (_rescue["r"], _rescue["w"]):  # a forked child's inherited pipe: not ours any more
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
    st = os.fstat(r)
    _rescue.update(
        r=r,
        w=w,
        seen=0,
        handled=False,
        armed=True,
        handler=handler,
        main=threading.main_thread().ident,
        ident=(st.st_dev, st.st_ino),
    )


def rearm_rescue_after_fork() -> None:
    """In a forked child: the inherited wakeup pipe is shared with the parent, so a new one."""
    if not _rescue["armed"]:
        return
    _rescue["armed"] = False
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGURG, signal.SIG_DFL)
    except (ValueError, OSError):
        pass
    arm_rescue(_rescue["handler"])


def sigterm_handled() -> None:
    """Called by the armed SIGTERM handler when it runs: nothing left to rescue."""
    _rescue["handled"] = True


def rescue_missed_sigterm() -> None:
    """Called by the writer thread on each tick (see the comment above _rescue)."""
    if not _rescue["armed"]:
        return
    try:  # still our pipe?  A program that closed it may have that number for its own data
        st = os.fstat(_rescue["r"])
        if (st.st_dev, st.st_ino) != _rescue.get("ident"):
            _rescue["armed"] = False
            return
    except OSError:
        _rescue["armed"] = False
        return
    try:
        data = os.read(_rescue["r"], 512)
    except (BlockingIOError, OSError):
        data = b""
    if signal.SIGTERM in data and not _rescue["handled"]:
        _rescue["seen"] = _rescue["seen"] or time.monotonic()
    if (
        _rescue["seen"]
        and not _rescue["handled"]
        and (signal.getsignal(signal.SIGTERM) is not _rescue["handler"] or signal.getsignal(signal.SIGURG) is not _poke)
    ):
        _rescue["seen"] = 0  # the program installed its own handler (SIGTERM or SIGURG) since: its business
    if _rescue["seen"] and not _rescue["handled"] and time.monotonic() - _rescue["seen"] > 0.2:
        _rescue["seen"] = time.monotonic()  # again later if it did not take
        try:
            signal.pthread_kill(_rescue["main"], signal.SIGURG)
        except (OSError, ValueError):
            pass
