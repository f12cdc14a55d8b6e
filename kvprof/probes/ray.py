"""Ray: kvprof's probes in every Ray worker of a recorded job, on every node.

Ray workers are started by each node's raylet, not by the recorded command, so they do
not inherit its environment (on a cluster started elsewhere, none of them would be
recorded).  kvprof goes through Ray's own mechanism, the job's ``runtime_env``:

* ``kvprof record`` sets ``RAY_RUNTIME_ENV_HOOK=kvprof.probes.ray.runtime_env_hook``.
  Ray calls that function inside ``ray.init`` (explicit, or the one a first ``.remote()``
  makes) with the runtime_env the program passed and uses what it returns as the job's.
  A hook the environment already named is kept (``KVPROF_RAY_CHAINED_HOOK``) and called
  first.
* The hook adds kvprof's ``KVPROF_*`` variables to the runtime_env's ``env_vars`` and puts
  kvprof's startup hook first on its ``PYTHONPATH`` (:func:`merge_runtime_env`): the
  program's own variables are kept as they are, its own PYTHONPATH entries too (after the
  hook), and without one the cluster's is kept through Ray's ``${PYTHONPATH}``.
* Every worker of the job, on every node, then starts with kvprof's startup hook, which
  records it (kvprof.runtime.start_from_env asks :func:`prepare_worker` first).  Ray's own
  daemons (dashboard, agents, monitors, the worker set-up step) and workers of no recorded
  job (idle ones the raylet started ahead) are left alone.
* A worker writes on its own node: into ``record --ray-output DIR`` (a directory every node
  reaches), else at the bundle's path.  Where no bundle is there (another node), it makes
  that directory a *part*: a manifest with ``"status": "part"``, which ``kvprof combine``
  merges (docs/distributed.md).

The driver's process.json says its Ray node (a post-init hook of Ray's), each worker's
its node, worker and job ids (kvprof/trace/hostinfo.py reads them from its command line).
Nothing here imports Ray; nothing raises into the program.
"""

from __future__ import annotations

import os
import time

ENV_HOOK = "RAY_RUNTIME_ENV_HOOK"
ENV_CHAINED = "KVPROF_RAY_CHAINED_HOOK"
ENV_OUTPUT = "KVPROF_RAY_OUTPUT"  # record --ray-output DIR
ENV_JOB = "KVPROF_RAY_JOB"  # set in the workers of a recorded job (by its runtime_env): "HOST:PID" of the driver
HOOK_SPEC = "kvprof.probes.ray.runtime_env_hook"
HOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_hook")
FORWARDED = ("KVPROF_PROBES", "KVPROF_OPTIONS", "KVPROF_PATH")
PYTHONPATH = "PYTHONPATH"
_RAY_DIRS = ("/ray/_private/", "/ray/dashboard/", "/ray/autoscaler/", "/ray/util/client/", "/ray/scripts/")
_WORKER = os.path.join("workers", "default_worker.py")


# -- the driver: the job's runtime_env ----------------------------------------------------
def kvprof_env_vars(environ=None) -> dict | None:
    """The variables a worker needs to record into this recording (None: not recording)."""
    environ = os.environ if environ is None else environ
    bundle = environ.get(ENV_OUTPUT) or environ.get("KVPROF_BUNDLE")
    if not bundle:
        return None
    out = {"KVPROF_BUNDLE": bundle, ENV_JOB: f"{os.uname().nodename}:{os.getpid()}"}
    if environ.get(ENV_OUTPUT):
        out[ENV_OUTPUT] = environ[ENV_OUTPUT]
    for key in FORWARDED:
        if environ.get(key):
            out[key] = environ[key]
    return out


def merge_runtime_env(runtime_env, ours: dict, hook_dir: str = HOOK_DIR) -> dict:
    """The program's runtime_env with kvprof's variables added, never replaced: every key
    of it kept; in ``env_vars`` the program's own values win, kvprof's are added beside
    them; ``PYTHONPATH`` is kvprof's startup hook, then the program's own PYTHONPATH as it
    gave it (its entries, and ``${PYTHONPATH}`` if it wrote one), or, when it gave none,
    the node's own (``${PYTHONPATH}``, which Ray expands on the node).  Merging twice
    gives the same result."""
    merged = dict(runtime_env or {})
    env_vars = dict(merged.get("env_vars") or {})
    for key, value in ours.items():
        if key != PYTHONPATH:
            env_vars.setdefault(key, str(value))
    own = env_vars.get(PYTHONPATH)
    rest = [p for p in str(own).split(os.pathsep) if p != hook_dir] if own else ["${PYTHONPATH}"]
    env_vars[PYTHONPATH] = os.pathsep.join([hook_dir, *rest])
    merged["env_vars"] = env_vars
    return merged


def runtime_env_hook(runtime_env):
    """RAY_RUNTIME_ENV_HOOK: called by ``ray.init`` with the job's runtime_env (a dict, a
    RuntimeEnv or None); returns it with kvprof's variables merged in.  A failure here
    leaves the program's runtime_env as it was (and is said in process.json)."""
    chained = os.environ.get(ENV_CHAINED)
    if chained and chained != HOOK_SPEC:
        runtime_env = _load(chained)(runtime_env)  # the program's own hook: its errors are its own
    try:
        ours = kvprof_env_vars()
        if ours is None:
            return runtime_env
        merged = merge_runtime_env(runtime_env, ours)
        _note_driver(sorted(ours) + [PYTHONPATH])
        return merged
    except Exception as exc:  # never break ray.init
        _note({"role": "driver", "error": f"runtime_env not extended, Ray workers are not recorded: {exc!r}"})
        return runtime_env


def _load(spec: str):
    import importlib

    module, _, attr = spec.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _note(fields: dict) -> None:
    from kvprof import runtime

    w = runtime.writer
    if w is not None:
        w.info.setdefault("ray", {}).update(fields)
        w.write_process_info()


def _note_driver(keys: list) -> None:
    import sys

    _note({"role": "driver", "runtime_env_vars": keys})
    worker = sys.modules.get("ray._private.worker")  # imported: we are inside its init()
    hooks = getattr(worker, "_post_init_hooks", None)
    if isinstance(hooks, list) and _after_init not in hooks:
        hooks.append(_after_init)


def _after_init() -> None:
    """After ray.init connected: the driver's node and job."""
    try:
        import ray

        ctx = ray.get_runtime_context()
        _note({"node_id": ctx.get_node_id(), "job_id": ctx.get_job_id()})
    except Exception as exc:
        _note({"node_error": repr(exc)})


# -- the recorder: kvprof record --------------------------------------------------------------
def recorder_env(env: dict, ray_output: str | None) -> dict:
    """Set the target's environment so that its ray.init extends the job's runtime_env;
    returns what the manifest says about it."""
    previous = env.get(ENV_HOOK)
    if previous and previous != HOOK_SPEC:
        env[ENV_CHAINED] = previous
    env[ENV_HOOK] = HOOK_SPEC
    if ray_output:
        env[ENV_OUTPUT] = ray_output
    else:
        env.pop(ENV_OUTPUT, None)
    return {
        "runtime_env_hook": HOOK_SPEC,
        "chained_hook": previous if previous != HOOK_SPEC else None,
        "output": ray_output,
    }


def prepare_output(path: str, force: bool, bundle: str) -> None:
    """``record --ray-output DIR``: a new part for the Ray workers (an existing one only with --force)."""
    import shutil

    from kvprof.errors import UsageError
    from kvprof.trace import format as fmt

    if path.startswith(bundle + os.sep) or bundle.startswith(path + os.sep):
        raise UsageError(f"--ray-output must be apart from the bundle, not inside it or around it: {path}")
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.listdir(path):
            pass
        elif not force:
            raise UsageError(f"--ray-output exists: {path} (use --force to replace it)")
        elif os.path.isdir(path) and not os.path.islink(path) and os.path.exists(os.path.join(path, fmt.MANIFEST)):
            shutil.rmtree(path)
        else:
            raise UsageError(f"--ray-output exists and is not a kvprof bundle, not replacing it: {path}")
    try:
        os.makedirs(os.path.join(path, fmt.PROCS_DIR), exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --ray-output {path}: {exc.strerror}") from None
    _write_part_manifest(path, part_manifest(os.environ, "recorder"))


def finish_output(path: str, scan) -> dict:
    """At the end of ``record``: the part's manifest lists its processes (``scan(path)``,
    the recorder's own listing); returns {"processes", "hosts"} for the closing line."""
    from kvprof.trace import format as fmt
    from kvprof.trace import hostinfo
    from kvprof.trace.atomic import write_json_atomic
    from kvprof.trace.reader import load_json_file

    mpath = os.path.join(path, fmt.MANIFEST)
    try:
        man = load_json_file(mpath, "manifest")
    except Exception:
        man = part_manifest(os.environ, "recorder")
    procs = scan(path)
    man.update(processes=procs, end_time=time.time(), end_ns=time.monotonic_ns())
    _set_end_offset(man)
    try:
        write_json_atomic(mpath, man)
    except OSError:
        pass
    hosts = {hostinfo.hostname(p) for p in procs} - {None}
    return {"processes": len(procs), "hosts": len(hosts)}


def _set_end_offset(man: dict) -> None:
    from kvprof.trace import hostinfo

    clock = man.setdefault("clock", {}).setdefault("wall_minus_mono_ns", {})
    clock["end"] = hostinfo.wall_minus_mono_ns()


# -- a worker, at start-up ------------------------------------------------------------------
def is_ray_daemon(argv) -> bool:
    """Ray's own processes: dashboard, agents, monitors, log monitor, the set-up step that
    becomes a worker, client server (anything run from inside the ray package but a worker)."""
    path = os.path.normpath(str(argv[0])) if argv else ""
    if path.endswith(_WORKER):
        return False
    parts = path.split(os.sep)
    in_package = any(
        parts[i] == "ray" and parts[i - 1] in ("site-packages", "dist-packages") for i in range(1, len(parts) - 1)
    )
    return in_package or any(d in path + os.sep for d in _RAY_DIRS)


def prepare_worker(bundle: str, argv, environ=None) -> bool:
    """Whether this process is to be recorded, as far as Ray is concerned: not Ray's own
    daemons, nor a worker of no recorded job (the raylet starts some ahead of any job:
    they inherit a recorded driver's environment when it started the cluster, but not the
    job's runtime_env).  A recorded worker on a node where the bundle's directory holds
    no manifest makes it a part."""
    environ = os.environ if environ is None else environ
    if is_ray_daemon(argv):
        return False
    path = os.path.normpath(str(argv[0])) if argv else ""
    if not path.endswith(_WORKER):
        return True
    if not environ.get(ENV_JOB):
        return False
    try:
        from kvprof.trace import format as fmt

        if not os.path.exists(os.path.join(bundle, fmt.MANIFEST)):
            os.makedirs(os.path.join(bundle, fmt.PROCS_DIR), exist_ok=True)
            _write_part_manifest(bundle, part_manifest(environ, "worker"))
    except Exception:  # the worker still records; combine finds its processes without a manifest of its own
        pass
    return True


def part_manifest(environ, created_by: str) -> dict:
    """The manifest of a part: what the processes recorded into it on one node (or, under
    --ray-output, on every node) need to be read and combined."""
    from kvprof._version import __version__
    from kvprof.trace import format as fmt
    from kvprof.trace import hostinfo

    probes = [p for p in str(environ.get("KVPROF_PROBES", "blocks")).split(",") if p]
    return {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "kvprof_version": __version__,
        "status": "part",
        "part": {"created_by": created_by, "pid": os.getpid(), "ray_job_driver": environ.get(ENV_JOB)},
        "host": hostinfo.host(),
        "clock": {"wall_minus_mono_ns": {"start": hostinfo.wall_minus_mono_ns(), "end": None}},
        "start_time": time.time(),
        "start_ns": time.monotonic_ns(),
        "end_time": None,
        "probes": {p: "" for p in probes},
    }


def _write_part_manifest(path: str, man: dict) -> None:
    """Written whole or not at all, and never over another one: the first process of a
    node makes the part, the others find it."""
    import json

    from kvprof.trace import format as fmt

    target = os.path.join(path, fmt.MANIFEST)
    tmp = os.path.join(path, f".{fmt.MANIFEST}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(man, fh)
    try:
        os.link(tmp, target)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
