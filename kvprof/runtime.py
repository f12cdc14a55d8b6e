"""The recording session inside a target process.

`kvprof record` sets KVPROF_BUNDLE (and friends) and puts kvprof's startup hook
first on PYTHONPATH; the hook calls :func:`start_from_env` in every Python
process the command creates.  Forked children get a fresh writer through
``os.register_at_fork``.  Everything here must be cheap when not recording and
must never raise into the target.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from typing import Any

from kvprof import signals
from kvprof.signals import HELD_SIGNALS

ENV_BUNDLE = "KVPROF_BUNDLE"
ENV_PROBES = "KVPROF_PROBES"
ENV_RECORDER_PID = "KVPROF_RECORDER_PID"
ENV_OPTIONS = "KVPROF_OPTIONS"

writer: Any = None  # kvprof.trace.writer.ProcessWriter while recording in this process
_declare_lock = threading.Lock()
_pools: list[dict] = []  # pool declarations of this process, re-emitted after fork
_probes: list[str] = []
_closers: list = []  # on_exit hooks, run last first by run_closers; only this module touches it
_mark_hooks: list = []  # on_mark hooks: hook(name_id, value, t); only this module touches it
options: dict = {}  # per-probe options from `kvprof record` (KVPROF_OPTIONS, JSON)
_started_pid = None

now = time.monotonic_ns


def is_recording() -> bool:
    return writer is not None


def start_from_env() -> None:
    """Entry point of the startup hook.  Idempotent per process."""
    global _started_pid
    bundle = os.environ.get(ENV_BUNDLE)
    if not bundle or _started_pid == os.getpid():
        return
    probes = [p for p in os.environ.get(ENV_PROBES, "blocks").split(",") if p]
    raw = os.environ.get(ENV_OPTIONS)
    if raw:
        import json

        try:
            loaded = json.loads(raw)
            options.update(loaded if isinstance(loaded, dict) else {})
        except ValueError:
            sys.stderr.write(f"kvprof: ignoring malformed {ENV_OPTIONS}\n")
    try:
        argv = getattr(sys, "argv", None) or [""]
        if "ray" in str(argv[0]):  # Ray's own daemons are not recorded; its workers when their job is (probes/ray.py)
            from kvprof.probes import ray as ray_probe

            if not ray_probe.prepare_worker(bundle, argv):
                return
        start(bundle, probes)
    except Exception as exc:  # never break the target
        sys.stderr.write(f"kvprof: recording disabled in pid {os.getpid()}: {exc}\n")


class _SignalsHeld:
    """Threads inherit their creator's signal mask.  While kvprof imports numpy (whose BLAS
    starts worker threads at import) and starts its writer thread, the main thread blocks
    the process-directed signals, so none of those threads can ever take a SIGTERM: the
    kernel may hand a process-directed signal to any thread that does not block it, and
    one taken by a helper thread does not interrupt the main thread's blocking call, so
    kvprof's flush-and-die handler would not run (a multiprocessing worker blocked on its
    queue would never die of Pool.terminate's SIGTERM, and the pool would hang in join).
    Signals that arrive meanwhile stay pending and are delivered when the mask returns
    (tests/test_record.py::test_no_thread_kvprof_starts_can_take_a_sigterm)."""

    def __enter__(self):
        self.old = None
        if hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread():
            try:
                self.old = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
            except (OSError, ValueError):
                self.old = None
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.old)
        return False


def start(bundle: str, probes: list[str]) -> None:
    global writer, _started_pid, _probes
    role = "main" if str(os.getppid()) == os.environ.get(ENV_RECORDER_PID) else "child"
    _probes = list(probes)
    # A SIGTERM that arrives while the writer is being set up waits (blocked) until the
    # flush-and-die handler is in place, then finds a writer to close: a pool worker
    # terminated while still starting leaves a closed recording, not a half-open one.
    with _SignalsHeld():
        from kvprof.trace.writer import ProcessWriter

        writer = ProcessWriter(bundle, role, _probes)
        _started_pid = os.getpid()
        for meta in _pools:
            writer.meta(meta)
        atexit.register(_at_exit)
        if hasattr(os, "register_at_fork") and _started_pid is not None:
            _register_fork_handler()
        _install_signal_flush()
    from kvprof import probes as probe_registry

    probe_registry.start_all(_probes, writer)


_fork_handler_registered = False


def _register_fork_handler() -> None:
    global _fork_handler_registered
    if not _fork_handler_registered:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _fork_handler_registered = True


def _before_fork() -> None:
    # Nothing to flush: every record is already in the parent's shared mapping, which
    # the child lets go of (ProcessWriter.abandon) before it records anything.
    pass


def _after_fork_in_child() -> None:
    global writer, _started_pid
    old = writer
    if old is None:
        return
    old.abandon()
    writer = None
    bundle = os.path.dirname(os.path.dirname(old.dir))
    try:
        from kvprof.trace.writer import ProcessWriter

        writer = ProcessWriter(bundle, "child", _probes)
        _started_pid = os.getpid()
        for meta in _pools:
            writer.meta(meta)
        signals.rearm_rescue_after_fork()
        from kvprof import probes as probe_registry

        probe_registry.after_fork(_probes, writer)
        mp_util = sys.modules.get("multiprocessing.util")
        if mp_util is not None:
            # multiprocessing's fork children leave through os._exit, skipping atexit;
            # its finalizers still run (lowest priority last).  Its bootstrap clears the
            # finalizer registry after this hook, then runs the after-fork callbacks.
            mp_util.register_after_fork(writer, _register_mp_finalizer)
    except Exception as exc:
        writer = None
        sys.stderr.write(f"kvprof: recording disabled in forked pid {os.getpid()}: {exc}\n")


def _register_mp_finalizer(_writer) -> None:
    sys.modules["multiprocessing.util"].Finalize(None, _at_exit, exitpriority=-1000)


def run_closers() -> None:
    """Run the probes' exit work once (last snapshots, stopping trackers): the
    :func:`on_exit` hooks, last registered first, each removed as it runs."""
    while _closers:
        fn = _closers.pop()
        try:
            fn()
        except Exception as exc:
            if writer is not None:
                writer.info["errors"].append(f"probe exit hook failed: {exc!r}")


def _at_exit() -> None:
    w = writer
    if w is not None and w.pid == os.getpid():
        w.closing = True  # a SIGTERM from now on waits for the end of this (see _on_sigterm)
        with _SigintDeferred(), w.quiet():
            run_closers()
            w.close()


class _SigintDeferred:
    """While the recording closes at exit, a Ctrl-C (a second one, or one a launcher
    forwarded on top of the terminal's) must not raise KeyboardInterrupt half way through
    the last write: the process is ending anyway.  Only when Python's default handler is
    in place and this is the main thread."""

    def __enter__(self):
        self.old = None
        try:
            if (
                threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler
            ):
                self.old = signal.signal(signal.SIGINT, lambda signum, frame: None)
        except (ValueError, OSError):
            self.old = None
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            try:
                signal.signal(signal.SIGINT, self.old)
            except (ValueError, OSError):
                pass
        return False


def _install_signal_flush() -> None:
    """Flush before dying of SIGTERM when the target left the default action in place."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
            signals.arm_rescue(_on_sigterm)
    except (ValueError, OSError):
        pass


def _on_sigterm(signum, frame) -> None:
    signals.sigterm_handled()
    if signal.getsignal(signum) is not _on_sigterm:
        # The program installed its own handler after kvprof and calls the one it replaced
        # (``old = signal.getsignal(SIGTERM)`` ... ``old(signum, frame)``): in its place the
        # default action would have been there, which a chaining handler does not call.
        # Keep what was recorded and let the program's shutdown go on
        # (tests/test_record.py::test_a_program_handler_that_chains_to_the_previous_one_is_not_cut_short).
        w = writer
        if w is not None and not w.closed:
            w.flush()
        return
    # A second SIGTERM (multiprocessing terminates pool workers, then its exit hook
    # terminates them again) must not re-enter and kill us half way through the flush.
    try:
        signal.signal(signum, signal.SIG_IGN)
    except (OSError, ValueError):
        pass
    w = writer
    if w is not None and (w.closed or w.closing) and not w.finished:
        # we interrupted this thread's own close() (multiprocessing's exit hook runs it,
        # then Pool.terminate's SIGTERM lands): let it finish; it records the signal and
        # dies of it after.  Nothing else here: the close may be serialising w.info
        # (tests/test_record.py::test_a_sigterm_during_the_last_write_of_the_record_still_ends_it).
        w.exit_signal = signum
        return
    if w is not None and not w.closed:
        w.closing = True
        with _SigintDeferred():
            run_closers()
            w.close({"terminated_by_signal": signum})
    elif w is not None:  # closed and written: say how the process ended
        w.info["terminated_by_signal"] = signum
        w.write_process_info()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


# -- helpers used by probes and the public API ---------------------------------------
def on_exit(fn) -> None:
    """Have ``fn()`` run when this process's recording closes (at exit, on a SIGTERM kvprof
    handles, at the end of a session), before the writer's last flush, with the writer's
    background compression held off.  Hooks run last registered first, once each;
    registering a hook that is already registered changes nothing.  An exception is kept
    in process.json's errors and the other hooks still run."""
    if fn not in _closers:
        _closers.append(fn)


def remove_exit_hook(fn) -> None:
    """Undo :func:`on_exit` (nothing happens if ``fn`` is not registered)."""
    while fn in _closers:
        _closers.remove(fn)


def on_mark(fn) -> None:
    """Have ``fn(name_id, value, t)`` called after each :func:`mark` this process records
    (``name_id``: the writer's interned id of the marker's name), in the order the hooks
    were registered; registering a hook that is already registered changes nothing.  An
    exception is kept in process.json's errors and the marker is recorded all the same."""
    if fn not in _mark_hooks:
        _mark_hooks.append(fn)


def remove_mark_hook(fn) -> None:
    """Undo :func:`on_mark` (nothing happens if ``fn`` is not registered)."""
    while fn in _mark_hooks:
        _mark_hooks.remove(fn)


def declare_pool(meta: dict) -> int:
    """Register a block pool of this process; returns its index in the block stream."""
    with _declare_lock:  # engine probes may declare from the writer's flush thread
        index = len(_pools)
        record = {"type": "pool", "pool": index, "t": now(), **meta}
        _pools.append(record)
    if writer is not None:
        writer.meta(record)
    return index


def emit(kind: int, pool: int, req=None, arg: int = 0, arg2: int = 0, ids=None, t=None) -> None:
    """Record one block-stream event.  `req` is any hashable request id (or None)."""
    w = writer
    if w is None:
        return
    w.block(now() if t is None else t, kind, pool, -1 if req is None else w.intern_request(req), arg, arg2, ids or ())


def mark(name: str, value: int = 0, t: int | None = None) -> None:
    w = writer
    if w is None:
        return
    t = now() if t is None else t
    sid = w.intern(name)
    try:
        value = int(value)
    except (TypeError, ValueError, OverflowError):  # None, "abc", nan, inf: recording never raises into the target
        value = 0
        w.note_once("marker values that were no integers were recorded as 0")
    if not -(1 << 63) <= value < (1 << 63):  # the streams hold int64: clamped, and said
        value = max(min(value, (1 << 63) - 1), -(1 << 63))
        w.note_once("marker values outside 64-bit integers were clamped")
    w.mark(t, sid, value)
    for hook in _mark_hooks:
        try:
            hook(sid, value, t)
        except Exception as exc:
            w.info["errors"].append(f"marker hook failed: {exc!r}")


def probe_note(name: str, **fields) -> None:
    w = writer
    if w is not None:
        w.probe_status(name, **fields)


# -- recording part of a running process (the pytest plugin) ---------------------------
# `kvprof record` starts the recording when a process starts and writes the manifest when
# the command ends.  A session records part of a running process's life (one test) into a
# bundle of its own and finishes it with a manifest, so the bundle is an ordinary one that
# every command reads.  One session at a time, in a process that kvprof record is not
# recording already; Python processes the process starts meanwhile (a spawned engine
# core) are recorded into the same bundle, as under kvprof record.
SESSION_PROBES = (
    "blocks",
    "markers",
    "gc",
    "tracemalloc",
)  # memray starts as __main__ begins, torch with CUDA: not inside a running process
_SESSION_ENV = (ENV_BUNDLE, ENV_PROBES, ENV_OPTIONS, ENV_RECORDER_PID, "KVPROF_PATH", "PYTHONPATH")
_session: dict | None = None
_at_fork_seen: set = set()


def start_session(
    bundle: str, probes: list[str] | None = None, probe_options: dict | None = None, command: list[str] | None = None
) -> None:
    """Start recording this process into a new bundle at ``bundle`` (an old bundle there is
    replaced).  ``probes``: of SESSION_PROBES (default blocks; markers always);
    ``probe_options`` as `kvprof record` passes them (``{"tracemalloc": {"interval": 0}}``);
    ``command``: what the manifest names as the command (default sys.argv).

    Probes start again in every session; what a probe sets up once per process (fork
    handlers, marker hooks) is set up once.  Pools declared before the session are
    declared in its bundle only if the session used them (see stop_session)."""
    global _session
    if _session is not None or writer is not None:
        raise RuntimeError(
            "this process is already being recorded"
            + (f" (into {_session['bundle']})" if _session else " (by kvprof record)")
        )
    probes = list(dict.fromkeys([*(probes or ["blocks"]), "markers"]))
    refused = [p for p in probes if p not in SESSION_PROBES]
    if refused:
        raise ValueError(
            f"probe {refused[0]!r} cannot record inside a running process (these can: {', '.join(SESSION_PROBES)}); "
            "record the whole run with `kvprof record -- ...` instead"
        )
    import tracemalloc

    from kvprof import record as rec

    bundle = os.path.abspath(bundle)
    argv = list(command) if command is not None else [sys.executable, *sys.argv]
    manifest = rec.start_session_bundle(bundle, argv, probes)
    if probe_options:
        manifest["probe_options"] = probe_options
    saved_env = {k: os.environ.get(k) for k in _SESSION_ENV}
    import json

    os.environ.update(
        {
            ENV_BUNDLE: bundle,
            ENV_PROBES: ",".join(probes),
            ENV_OPTIONS: json.dumps(probe_options or {}),
            "KVPROF_PATH": rec.PACKAGE_PARENT,
        }
    )
    os.environ.pop(ENV_RECORDER_PID, None)  # the processes it starts are children; this one is the main one
    os.environ["PYTHONPATH"] = rec.HOOK_DIR + (os.pathsep + saved_env["PYTHONPATH"] if saved_env["PYTHONPATH"] else "")
    options.clear()
    options.update(probe_options or {})
    earlier_pools = list(_pools)
    session = {
        "bundle": bundle,
        "manifest": manifest,
        "probes": probes,
        "env": saved_env,
        "traced": tracemalloc.is_tracing(),
        "pools": len(earlier_pools),
        "pid": os.getpid(),
    }
    _pools.clear()  # the writer declares the process's pools as it starts: none of the earlier ones
    real_register = getattr(os, "register_at_fork", None)
    try:
        if real_register is not None:
            os.register_at_fork = _register_at_fork_once
        start(bundle, probes)
    except BaseException:
        _session_env(saved_env)
        raise
    finally:
        if real_register is not None:
            os.register_at_fork = real_register
        _pools[:0] = earlier_pools  # indices stay those the pools were given
    writer.info["role"] = "main"  # type: ignore[attr-defined]  # set by start(); mypy keeps the "is None" check above
    writer.write_process_info()  # type: ignore[attr-defined]
    _session = session


def _register_at_fork_once(**handlers) -> None:
    """os.register_at_fork for probes started in a session: a handler registered by an
    earlier session is not registered again (registrations cannot be undone, and a fork
    handler that takes a lock, run twice, would wait for itself)."""
    key = tuple(sorted(handlers.items()))
    if key not in _at_fork_seen:
        _at_fork_seen.add(key)
        _real_register_at_fork(**handlers)


_real_register_at_fork: Any = getattr(os, "register_at_fork", None)


def _session_env(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def session_bundle() -> str | None:
    """The bundle the current session records into (None when there is none)."""
    return _session["bundle"] if _session is not None else None


def stop_session(outcome: dict | None = None) -> dict:
    """Stop the session: the probes' exit work (last snapshots), the writer closed, the
    earlier pools this session used declared, the final manifest written.  ``outcome``:
    the manifest's ``target`` (default ``{"started": True, "exit_code": 0}``).  Returns
    the manifest."""
    global writer, _session
    s = _session
    if s is None:
        raise RuntimeError("no session is recording")
    _session = None
    w = writer
    try:
        if w is not None and w.pid == os.getpid() and not w.closed:
            w.closing = True
            with _SigintDeferred(), w.quiet():
                run_closers()
                w.close()
    finally:
        writer = None
        _closers.clear()
        _session_env(s["env"])
        import tracemalloc

        if "tracemalloc" in s["probes"] and not s["traced"] and tracemalloc.is_tracing():
            tracemalloc.stop()  # the next session starts with a heap of its own
    if w is not None and s["pools"]:
        _declare_used_pools(w.dir, s["pools"])
    from kvprof import record as rec

    return rec.finish_session_bundle(
        s["bundle"], s["manifest"], s["probes"], outcome or {"started": True, "exit_code": 0, "signal": None}
    )


def _declare_used_pools(directory: str, earlier: int) -> None:
    """Pools declared before a session (by a fixture that outlives a test) are declared in
    its bundle if the session wrote events of them: the others would count in the pool
    capacity of a test that never used them."""
    try:
        from kvprof.trace import format as fmt
        from kvprof.trace.reader import ProcessData

        used: set = set()
        for rows, _ in ProcessData(directory).block_pieces():
            used.update(int(x) for x in set(rows["pool"].tolist()) if int(x) < earlier)
        if not used:
            return
        import json

        lines = "".join(json.dumps(_pools[i], default=str) + "\n" for i in sorted(used))
        with open(os.path.join(directory, fmt.META_JSONL), "a", encoding="utf-8") as fh:
            fh.write(lines)
    except Exception as exc:  # the bundle stays readable; those pools' events are skipped, and said
        sys.stderr.write(f"kvprof: could not declare the earlier pools in {directory}: {exc!r}\n")
