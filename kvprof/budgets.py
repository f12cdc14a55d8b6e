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
from kvprof.inputs import brief as _short

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
        raise UsageError(f'{where}: expected a percentage like "5%" or a fraction like 0.05, got {value!r}')
    try:
        if isinstance(value, (int, float)):
            f = float(value)
        elif isinstance(value, str) and value.strip().endswith("%"):
            f = float(value.strip()[:-1]) / 100
        else:
            raise UsageError(f'{where}: expected a percentage like "5%" or a fraction like 0.05, got {_short(value)}')
    except (ValueError, OverflowError):
        raise UsageError(f"{where}: not a percentage: {_short(value)}") from None
    if not math.isfinite(f) or f < 0:
        raise UsageError(f"{where}: must be a finite, non-negative amount, got {_short(value)}")
    return f


def _number(value, where: str) -> float:
    try:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        ok = False
    if not ok:
        raise UsageError(f"{where}: expected a finite number, got {_short(value)}")
    return float(value)


def parse(table: dict, source: str) -> Budgets:
    """Validate a budgets table; every problem is one UsageError naming the entry."""
    if not isinstance(table, dict):
        raise UsageError(f"{source}: budgets must be a table")
    b = Budgets(entries={}, source=source)
    for key, value in table.items():
        where = f"{source}: budgets.{key}" if "*" not in key else f'{source}: budgets."{key}"'
        if key == "tolerance":
            b.tolerance = _fraction(value, where)
            continue
        if key == "noisy_tolerance":
            b.noisy_tolerance = _fraction(value, where)
            continue
        if not isinstance(value, dict):
            raise UsageError(f"{where}: expected a table of limits ({', '.join(LIMIT_KEYS)}), got {_short(value)}")
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
    from kvprof.inputs import parse_guarded, read_bytes

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    data = read_bytes(path, "budget file", error=UsageError)
    try:
        return parse_guarded(lambda b: tomllib.loads(b.decode("utf-8")), data, path, "budget file", error=UsageError)
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"budget file {path} is not valid TOML: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"budget file {path} is not valid TOML: {exc}") from None


def _budgets_table(data: dict, path: str):
    """(table, source) of a parsed file: ``[budgets]``, else ``[tool.kvprof.budgets]``, else (None, None)."""
    if "budgets" in data:
        return data["budgets"], path
    node: object = data
    for key in ("tool", "kvprof", "budgets"):
        if not isinstance(node, dict):
            return None, None  # `tool = 3`: not where budgets live
        node = node.get(key)
    return (node, f"{path} [tool.kvprof.budgets]") if node is not None else (None, None)


def load_file(path: str) -> Budgets:
    """A budget file: ``[budgets]`` at top level (or a pyproject's ``[tool.kvprof.budgets]``)."""
    table, source = _budgets_table(_load_toml(path), path)
    if table is None:
        raise UsageError(f"budget file {path} has no [budgets] table (nor [tool.kvprof.budgets])")
    return parse(table, source)


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
        data = _load_toml(path)
        table, source = _budgets_table({k: v for k, v in data.items() if k != "budgets"}, path)
        if table is not None:
            return parse(table, source)
    return Budgets(entries={})
