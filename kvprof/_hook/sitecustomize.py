"""kvprof startup hook.

`kvprof record` puts this directory first on PYTHONPATH, so every Python
process the recorded command starts (spawned multiprocessing children and
subprocesses included) imports this module at start-up and begins recording.
The sitecustomize that would otherwise have run is then run too.
"""

import os as _os
import sys as _sys


def _kvprof_start():
    try:
        import kvprof.runtime as runtime
    except ImportError:
        path = _os.environ.get("KVPROF_PATH")
        if not path:
            return
        _sys.path.append(path)
        try:
            import kvprof.runtime as runtime
        except ImportError as exc:
            _sys.stderr.write(f"kvprof: cannot record pid {_os.getpid()}: {exc}\n")
            return
    if _os.environ.get("KVPROF_BUNDLE") and "memray" in _os.environ.get("KVPROF_PROBES", "").split(","):
        # memray's after-fork hook must be registered before kvprof's (see import_memray_first)
        try:
            from kvprof.probes.heap import import_memray_first

            import_memray_first()
        except Exception:
            pass
    runtime.start_from_env()


def _chain_sitecustomize():
    import importlib.machinery
    import importlib.util

    here = _os.path.dirname(_os.path.abspath(__file__))
    paths = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != here]
    try:
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", paths)
    except Exception:
        return
    if spec is None or spec.loader is None or not spec.origin:
        return
    if _os.path.dirname(_os.path.abspath(spec.origin)) == here:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


_kvprof_start()
_chain_sitecustomize()
