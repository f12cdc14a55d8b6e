"""Attaching engine adapters by feature detection, and saying what attached."""

from __future__ import annotations

import functools


class Hooks:
    """The hook points one engine adapter patched, and those it did not find."""

    def __init__(self, engine: str):
        self.engine = engine
        self.attached: list[str] = []
        self.missing: list[str] = []

    def patch(self, cls, name: str, make) -> None:
        """Replace ``cls.name`` with ``make(original)``; a missing method is noted, never fatal."""
        original = getattr(cls, name, None)
        label = f"{cls.__name__}.{name}"
        if original is None:
            self.missing.append(label)
            return
        if getattr(original, "__kvprof__", False):  # already patched (module re-imported)
            return
        wrapper = functools.wraps(original)(make(original))
        wrapper.__kvprof__ = True  # type: ignore[attr-defined]  # a function attribute: the mark of a patch
        setattr(cls, name, wrapper)
        self.attached.append(label)

    def note(self, **fields) -> None:
        """Write the engine's entry in process.json (and so in the manifest)."""
        from kvprof.probes import engine_note

        engine_note(self.engine, **fields, attached=sorted(set(self.attached)), missing=sorted(set(self.missing)))
