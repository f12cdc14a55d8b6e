"""Budgets: limits on metrics, read from TOML, that `compare` and `analyze` check.

A budget file holds a top-level ``[budgets]`` table; ``pyproject.toml`` holds
the same entries under ``[tool.kvprof.budgets]``.  Inside the table:

* a metric name or a glob over names (``fnmatch``: ``*``, ``?``, ``[...]``) maps
  to a table of limits: ``max`` / ``min`` (absolute, on the new run's value),
  ``max_increase`` / ``max_decrease`` (relative to BASE: ``"5%"`` or ``0.05``);
* ``tolerance`` (default ``"0%"``) and ``noisy_tolerance`` (default ``"10%"``):
  how much worse than BASE, relatively, a metric with a better direction may get
  before it counts as a regression, when no entry gives it a relative limit in
  its worse direction.  Noisy metrics (timing) get ``noisy_tolerance``.

Where several entries match a metric, an exact name wins over globs, and a
longer glob over a shorter one; limits of different kinds from several entries
are combined (the most specific entry of each kind wins).
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass, field

from kvprof.errors import UsageError

LIMIT_KEYS = ("max", "min", "max_increase", "max_decrease")
DEFAULT_TOLERANCE = 0.0
DEFAULT_NOISY_TOLERANCE = 0.10


@dataclass
class Limits:
    max: float | None = None
    min: float | None = None
    max_increase: float | None = None  # fraction: 0.05 = 5 %
    max_decrease: float | None = None
    patterns: dict = field(default_factory=dict)  # limit kind -> the entry that set it

    def any(self) -> bool:
        return any(getattr(self, k) is not None for k in LIMIT_KEYS)


@dataclass
class Budgets:
    entries: dict  # pattern -> {limit kind: value}
    tolerance: float = DEFAULT_TOLERANCE
    noisy_tolerance: float = DEFAULT_NOISY_TOLERANCE
    source: str | None = None  # "path" or "path [tool.kvprof.budgets]"; None: defaults only

    def limits_for(self, name: str) -> Limits:
        matching = [p for p in self.entries if p == name or fnmatch.fnmatchcase(name, p)]
        # most specific first: the exact name, then longer patterns, then fewer wildcards
        matching.sort(key=lambda p: (p != name, -len(p), sum(p.count(c) for c in "*?[")))
        out = Limits()
        for p in reversed(matching):  # least specific first, so specific ones overwrite
            for k, v in self.entries[p].items():
                setattr(out, k, v)
                out.patterns[k] = p
        return out


def _fraction(value, where: str) -> float:
    if isinstance(value, bool):
        raise UsageError(f"{where}: expected a percentage like \"5%\" or a fraction like 0.05, got {value!r}")
    if isinstance(value, (int, float)):
        f = float(value)
    elif isinstance(value, str) and value.strip().endswith("%"):
        try:
            f = float(value.strip()[:-1]) / 100
        except ValueError:
            raise UsageError(f"{where}: not a percentage: {value!r}") from None
    else:
        raise UsageError(f"{where}: expected a percentage like \"5%\" or a fraction like 0.05, got {value!r}")
    if not math.isfinite(f) or f < 0:
        raise UsageError(f"{where}: must be a finite, non-negative amount, got {value!r}")
    return f


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{where}: expected a number, got {value!r}")
    return float(value)


def parse(table: dict, source: str) -> Budgets:
    """Validate a budgets table; every problem is one UsageError naming the entry."""
    if not isinstance(table, dict):
        raise UsageError(f"{source}: budgets must be a table")
    b = Budgets(entries={}, source=source)
    for key, value in table.items():
        where = f"{source}: budgets.{key}" if "*" not in key else f"{source}: budgets.\"{key}\""
        if key == "tolerance":
            b.tolerance = _fraction(value, where)
            continue
        if key == "noisy_tolerance":
            b.noisy_tolerance = _fraction(value, where)
            continue
        if not isinstance(value, dict):
            raise UsageError(f"{where}: expected a table of limits ({', '.join(LIMIT_KEYS)}), got {value!r}")
        unknown = sorted(set(value) - set(LIMIT_KEYS))
        if unknown:
            raise UsageError(f"{where}: unknown limit {unknown[0]!r} (known: {', '.join(LIMIT_KEYS)})")
        if not value:
            raise UsageError(f"{where}: no limits given")
        entry = {}
        for k, v in value.items():
            entry[k] = _number(v, f"{where}.{k}") if k in ("max", "min") else _fraction(v, f"{where}.{k}")
        b.entries[key] = entry
    return b


def _load_toml(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"no such budget file: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read budget file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"budget file {path} is not valid TOML: {exc}") from None


def load_file(path: str) -> Budgets:
    """A budget file: ``[budgets]`` at top level (or a pyproject's ``[tool.kvprof.budgets]``)."""
    data = _load_toml(path)
    if "budgets" in data:
        return parse(data["budgets"], path)
    table = data.get("tool", {}).get("kvprof", {}).get("budgets")
    if table is not None:
        return parse(table, f"{path} [tool.kvprof.budgets]")
    raise UsageError(f"budget file {path} has no [budgets] table (nor [tool.kvprof.budgets])")


def find_pyproject(start: str) -> str | None:
    """The nearest pyproject.toml at or above `start`."""
    d = os.path.abspath(start)
    while True:
        candidate = os.path.join(d, "pyproject.toml")
        if os.path.isfile(candidate):
            return candidate
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def discover(explicit: str | None, start: str | None = None) -> Budgets:
    """The budget file given, else ``[tool.kvprof.budgets]`` of the nearest pyproject.toml,
    else defaults only (no limits, zero tolerance)."""
    if explicit:
        return load_file(explicit)
    path = find_pyproject(start or os.getcwd())
    if path:
        table = _load_toml(path).get("tool", {}).get("kvprof", {}).get("budgets")
        if table is not None:
            return parse(table, f"{path} [tool.kvprof.budgets]")
    return Budgets(entries={})
