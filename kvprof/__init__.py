"""kvprof: a memory profiler for LLM serving.

Import cost is kept minimal: this module pulls in nothing heavy, so
``kvprof.mark`` can stay in production code.
"""

from kvprof import runtime as _runtime  # stdlib only
from kvprof._version import __version__


def mark(name: str, value: int = 0) -> None:
    """Record a user marker (a step, a phase) in the current trace; a no-op when not recording."""
    if _runtime.writer is not None:
        _runtime.mark(name, value)


def is_recording() -> bool:
    return _runtime.writer is not None


__all__ = ["__version__", "mark", "is_recording"]
