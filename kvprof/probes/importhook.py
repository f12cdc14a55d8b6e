"""Run a callback right after a module is imported, or now if it already is.

Used by the block probe to patch engine classes in whichever process imports
them (vLLM's engine core imports them in a spawned child), without importing
anything heavy ourselves.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading

_callbacks: dict[str, list] = {}
_lock = threading.RLock()
_finder = None


def when_imported(module_name: str, callback) -> None:
    """Call ``callback(module)`` once ``module_name`` has been imported."""
    mod = sys.modules.get(module_name)
    if mod is not None and getattr(getattr(mod, "__spec__", None), "_initializing", False) is False:
        _safe_call(callback, mod)
        return
    with _lock:
        _callbacks.setdefault(module_name, []).append(callback)
        _ensure_finder()


def _safe_call(callback, module) -> None:
    try:
        callback(module)
    except Exception as exc:  # a probe that fails steps aside
        from kvprof import runtime

        if runtime.writer is not None:
            runtime.writer.error(f"probe callback for {module.__name__} failed: {exc!r}")


def _ensure_finder() -> None:
    global _finder
    if _finder is None:
        _finder = _PostImportFinder()
        sys.meta_path.insert(0, _finder)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    _busy = threading.local()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _callbacks or getattr(self._busy, fullname, False):
            return None
        setattr(self._busy, fullname, True)
        try:
            import importlib.util

            spec = importlib.util.find_spec(fullname)
        except Exception:
            spec = None
        finally:
            setattr(self._busy, fullname, False)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        loader = spec.loader
        original_exec = loader.exec_module

        class _Wrapped(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                original_exec(module)
                with _lock:
                    callbacks = _callbacks.pop(fullname, [])
                for cb in callbacks:
                    _safe_call(cb, module)

        spec.loader = _Wrapped()
        return spec
