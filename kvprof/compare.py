"""Compare runs: the metrics maps of BASE and NEW runs, judged against budgets.

Pure functions from analysis results to a typed :class:`Comparison`; the
renderers in ``kvprof.report.compare`` only render it.

Rules (docs in README "Compare and budgets"):

* every metric present on either side gets a row; one present on one side only
  is listed as such, never dropped;
* each side may hold several runs: values are their medians.  When the BASE runs
  disagree, a change must exceed their spread (max - min) before it counts, and
  the row says it was judged that way;
* a metric with a better direction regresses when it gets worse by more than its
  tolerance (the budget's relative limit in its worse direction if there is one,
  else ``tolerance``, or ``noisy_tolerance`` for noisy metrics); it improves when
  it gets better by more than that;
* budget limits: ``max`` / ``min`` on the NEW value, ``max_increase`` /
  ``max_decrease`` relative to BASE; a relative change from a BASE of 0 is
  infinite unless the value stayed 0.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Any

from kvprof.budgets import Budgets
from kvprof.errors import BundleError, UsageError

SCHEMA = "kvprof.compare/1"
EPS = 1e-12

# verdicts, worst first (the order of the reports)
FAIL, WORSE_OK, IMPROVED, CHANGED, UNCHANGED, ONLY_BASE, ONLY_NEW, NO_DATA = (
    "fail",
    "worse, within tolerance",
    "improved",
    "changed",
    "unchanged",
    "only in base",
    "only in new",
    "no data",
)
VERDICT_ORDER = {
    v: i for i, v in enumerate([FAIL, ONLY_BASE, ONLY_NEW, WORSE_OK, IMPROVED, CHANGED, UNCHANGED, NO_DATA])
}


@dataclass
class Run:
    label: str  # the path it came from
    metrics: dict[str, Any]  # name -> {"value", "unit", "better", "noisy", ...}


@dataclass
class Check:
    kind: str  # "max", "min", "max_increase", "max_decrease", "direction"
    limit: float
    passed: bool
    message: str
    pattern: str | None = None  # the budget entry it came from (None: default tolerance)


@dataclass
class Row:
    name: str
    unit: str
    better: str | None
    noisy: bool
    base: float | None
    new: float | None
    base_runs: int
    new_runs: int
    delta: float | None
    rel: float | None  # delta / |base|; inf when base is 0 and delta is not
    base_spread: float | None  # max - min over base runs (None with fewer than 2)
    judged_on_spread: bool
    verdict: str
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(not c.passed for c in self.checks)


@dataclass
class Comparison:
    base: list[str]
    new: list[str]
    budgets: str | None
    tolerance: float
    noisy_tolerance: float
    rows: list[Row]

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == FAIL]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        import dataclasses

        def clean(x: Any) -> Any:
            if isinstance(x, float) and not math.isfinite(x):
                return "inf" if x > 0 else "-inf" if x < 0 else None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x

        out: dict[str, Any] = clean(
            {
                "schema": SCHEMA,
                "passed": self.passed,
                "base": self.base,
                "new": self.new,
                "budgets": self.budgets,
                "tolerance": self.tolerance,
                "noisy_tolerance": self.noisy_tolerance,
                "failures": [r.name for r in self.failures],
                "rows": [dataclasses.asdict(r) for r in self.rows],
            }
        )
        return out


# -- loading ---------------------------------------------------------------------------
def load_run(path: str) -> Run:
    """Anything `kvprof analyze` reads (analyzed now) or an analysis JSON (``kvprof analyze --json``).

    A run must hold at least one metric: comparing two empty maps checks nothing and
    would pass any gate."""
    from kvprof.inputs import check_regular

    if not os.path.exists(path):
        raise BundleError(f"no such bundle or analysis JSON: {path}")
    # before anything opens it: a FIFO would block the first read, /dev/zero never end
    check_regular(path, "run", allow_dir=True)
    from kvprof.analysis import analyze_path, is_recording

    if is_recording(path):
        run = Run(label=path, metrics=analyze_path(path).metrics)
    else:
        run = Run(label=path, metrics=_load_analysis_json(path))
    if not run.metrics:
        raise BundleError(
            f"{path}: no metrics: the run holds nothing kvprof measures (no block pool, heap, "
            "GC, CPU or GPU data), so there is nothing to compare"
        )
    return run


def _load_analysis_json(path: str) -> dict[str, Any]:
    """The metrics map of an analysis JSON, every entry checked: one line naming the first
    bad one (a value that is not a finite number or null, a bad `better`, unit or noisy)."""
    from kvprof.inputs import brief as _short, parse_guarded, read_bytes

    raw = read_bytes(path, "analysis JSON")

    try:  # NaN and Infinity parse (as Python's json does) and are named below, by metric
        data = parse_guarded(lambda b: json.loads(b.decode("utf-8")), raw, path, "analysis JSON")
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError
        from kvprof.analysis import file_hint

        hint = file_hint(path) or f" (not valid JSON: {_short(exc, 120)})"
        raise BundleError(
            f"{path}: not a kvprof bundle, analysis JSON, PyTorch snapshot or memray capture{hint}"
        ) from None
    from kvprof.analysis.results import SCHEMA as ANALYSIS_SCHEMA  # here: `kvprof --help` imports no analysis

    if not isinstance(data, dict) or data.get("schema") != ANALYSIS_SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise BundleError(f"{path}: not a kvprof analysis JSON (schema {_short(found)}, expected {ANALYSIS_SCHEMA!r})")
    metrics = data.get("metrics")
    if not isinstance(metrics, dict):
        raise BundleError(f"{path}: analysis JSON has no metrics map")
    for name, entry in metrics.items():
        if not isinstance(entry, dict):
            raise BundleError(
                f'{path}: metric {_short(name)} is malformed: expected {{"value": number or null, ...}}, got {_short(entry)}'
            )
        problem = broken_value(entry.get("value"))
        if problem:
            raise BundleError(f"{path}: metric {_short(name)} has value {_short(entry.get('value'))}: {problem}")
        if entry.get("better") not in (None, "lower", "higher"):
            raise BundleError(
                f"{path}: metric {_short(name)} has better={_short(entry.get('better'))} (expected lower, higher or null)"
            )
        if not isinstance(entry.get("unit"), (str, type(None))):
            raise BundleError(f"{path}: metric {_short(name)} has unit={_short(entry.get('unit'))} (expected a string)")
        if not isinstance(entry.get("noisy"), (bool, type(None))):
            raise BundleError(
                f"{path}: metric {_short(name)} has noisy={_short(entry.get('noisy'))} (expected true or false)"
            )
    return metrics


def broken_value(v: Any) -> str | None:
    """Why a metric value cannot be compared, or None when it can (a finite number, or null
    for "not measured")."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f"expected a number or null, not {'a boolean' if isinstance(v, bool) else 'a ' + type(v).__name__}"
    try:
        if math.isfinite(v):
            return None
    except OverflowError:  # an integer beyond any float
        return "a number too large to compare"
    return "not a number (NaN)" if v != v else "an infinite number"


# -- judging ---------------------------------------------------------------------------
def _rel(delta: float, base: float) -> float:
    if abs(delta) <= EPS:
        return 0.0
    if abs(base) <= EPS:
        return math.copysign(math.inf, delta)
    return delta / abs(base)


def _pct(x: float) -> str:
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return f"{100 * x:+.2f}%"


def _values(runs: list[Run], name: str) -> tuple[list[float], bool, list[str]]:
    """Numeric values of `name` over runs, whether any run had the name at all, and why
    each value that cannot be compared cannot be (NaN, infinite, not a number: one per
    run that holds one; a run analysed here, not read from a file, can hold such a value
    only through a bug, and it must not pass as "no data")."""
    present = False
    out, broken = [], []
    for r in runs:
        entry = r.metrics.get(name)
        if entry is None:
            continue
        present = True
        v = entry.get("value") if isinstance(entry, dict) else entry
        problem = broken_value(v)
        if problem:
            broken.append(f"{r.label}: {problem}")
        elif v is not None:
            out.append(v)
    return out, present, broken


def _median(values: list[float]) -> float:
    m = statistics.median(values)
    if all(isinstance(v, int) for v in values) and float(m).is_integer():
        return int(m)
    return m


def _meta(runs: list[Run], name: str) -> dict[str, Any]:
    for r in runs:
        if name in r.metrics:
            meta: dict[str, Any] = r.metrics[name]
            return meta
    return {}


def judge(name: str, base_runs: list[Run], new_runs: list[Run], budgets: Budgets) -> Row:
    from kvprof import metrics as registry

    bvals, bpresent, bbroken = _values(base_runs, name)
    nvals, npresent, nbroken = _values(new_runs, name)
    meta = _meta(new_runs, name) or _meta(base_runs, name)
    reg = registry.get(name)
    unit = meta.get("unit") or (reg.unit if reg else "")
    better = meta.get("better", reg.better if reg else None)
    noisy = bool(meta.get("noisy", reg.noisy if reg else False))
    base = _median(bvals) if bvals else None
    new = _median(nvals) if nvals else None
    spread = (max(bvals) - min(bvals)) if len(bvals) >= 2 else None
    row = Row(
        name=name,
        unit=unit,
        better=better,
        noisy=noisy,
        base=base,
        new=new,
        base_runs=len(bvals),
        new_runs=len(nvals),
        delta=None,
        rel=None,
        base_spread=spread,
        judged_on_spread=bool(spread and spread > EPS),
        verdict=NO_DATA,
    )
    limits = budgets.limits_for(name)
    if bbroken or nbroken:  # a value that is there but no number fails; it is not "no data"
        for side, problems in (("base", bbroken), ("new", nbroken)):
            for problem in problems:
                row.checks.append(Check("value", math.nan, False, f"{side} value is broken ({problem})"))
        row.verdict = FAIL
        return row

    # absolute limits need only the new value
    if new is not None:
        if limits.max is not None:
            ok = new <= limits.max + EPS
            row.checks.append(
                Check(
                    "max",
                    limits.max,
                    ok,
                    f"{_fmt(new, unit)} {'<=' if ok else '>'} max {_fmt(limits.max, unit)}",
                    limits.patterns["max"],
                )
            )
        if limits.min is not None:
            ok = new >= limits.min - EPS
            row.checks.append(
                Check(
                    "min",
                    limits.min,
                    ok,
                    f"{_fmt(new, unit)} {'>=' if ok else '<'} min {_fmt(limits.min, unit)}",
                    limits.patterns["min"],
                )
            )

    if not bpresent or not npresent:
        row.verdict = ONLY_BASE if bpresent else ONLY_NEW
        if row.failed:
            row.verdict = FAIL
        return row
    if base is None or new is None:
        row.verdict = FAIL if row.failed else NO_DATA
        return row

    delta = new - base
    row.delta, row.rel = delta, _rel(delta, base)
    allow = spread or 0.0  # changes within the base runs' own spread are noise

    def relative(kind: str, limit: float, sign: int, pattern: str | None, word: str, note: str = "") -> Check:
        excess = sign * delta - allow  # how far beyond the base spread, in the limit's direction
        if excess <= EPS:
            ok = True
        elif abs(base) <= EPS:
            ok = False  # any change from zero is an infinite relative change
        else:
            ok = excess / abs(base) <= limit + EPS
        assert row.rel is not None  # set above
        spread_note = f", beyond base spread {_fmt(allow, unit)}" if allow > EPS else ""
        msg = (
            f"{_pct(row.rel)} ({_fmt(base, unit)} -> {_fmt(new, unit)}{spread_note}): "
            f"{word} {'within' if ok else 'exceeds'} {100 * limit:.2f}%{note}"
        )
        return Check(kind, limit, ok, msg, pattern)

    if limits.max_increase is not None:
        row.checks.append(
            relative("max_increase", limits.max_increase, +1, limits.patterns["max_increase"], "increase")
        )
    if limits.max_decrease is not None:
        row.checks.append(
            relative("max_decrease", limits.max_decrease, -1, limits.patterns["max_decrease"], "decrease")
        )
    if better in ("lower", "higher"):
        sign = +1 if better == "lower" else -1
        if (limits.max_increase if sign > 0 else limits.max_decrease) is None:
            tol = budgets.noisy_tolerance if noisy else budgets.tolerance
            note = " (noisy-metric tolerance)" if noisy else " (default tolerance)"
            row.checks.append(relative("direction", tol, sign, None, "worsening", note))

    if row.failed:
        row.verdict = FAIL
    elif abs(delta) <= EPS:
        row.verdict = UNCHANGED
    elif better is None:
        row.verdict = CHANGED
    elif _better(delta, better):
        row.verdict = IMPROVED if abs(delta) > allow + EPS else UNCHANGED
    else:
        row.verdict = WORSE_OK
    return row


def _better(delta: float, better: str) -> bool:
    return delta < 0 if better == "lower" else delta > 0


def _fmt(v: Any, unit: Any) -> str:
    from kvprof.report.format import value

    return value(v, unit)


def compare(base_runs: list[Run], new_runs: list[Run], budgets: Budgets) -> Comparison:
    if not base_runs or not new_runs:
        raise UsageError("compare needs at least one BASE and one NEW run")
    for r in base_runs + new_runs:
        if not r.metrics:
            raise BundleError(f"{r.label}: no metrics, so there is nothing to compare")
    names: dict[str, None] = {}
    for r in base_runs + new_runs:
        for n in r.metrics:
            names.setdefault(n, None)
    rows = [judge(n, base_runs, new_runs, budgets) for n in names]
    if not any(r.checks for r in rows):
        only_base = sum(r.verdict == ONLY_BASE for r in rows)
        only_new = sum(r.verdict == ONLY_NEW for r in rows)
        raise BundleError(
            f"nothing compared: no metric with a better direction or a budget limit has a value in both "
            f"BASE and NEW ({len(rows)} metrics: {only_base} only in base, {only_new} only in new)"
        )
    rows.sort(key=lambda r: (VERDICT_ORDER[r.verdict], r.name))
    return Comparison(
        base=[r.label for r in base_runs],
        new=[r.label for r in new_runs],
        budgets=budgets.source,
        tolerance=budgets.tolerance,
        noisy_tolerance=budgets.noisy_tolerance,
        rows=rows,
    )


def check_run(run: Run, budgets: Budgets) -> Comparison:
    """`analyze --budget`: the absolute limits (max, min) on one run; relative limits need a BASE.
    A run with no metric under any absolute limit checked nothing: an error, not a pass."""
    if not run.metrics:
        raise BundleError(f"{run.label}: no metrics, so there is nothing to check against the budget")
    rows = []
    for name in run.metrics:
        row = judge(name, [], [run], budgets)
        row.checks = [c for c in row.checks if c.kind in ("max", "min", "value")]
        row.verdict = FAIL if row.failed else (ONLY_NEW if row.new is not None else NO_DATA)
        if row.checks:
            rows.append(row)
    if not rows:
        raise BundleError(
            f"nothing checked: no metric of {run.label} has a value under a max or min limit of "
            f"{budgets.source or 'the budget'} ({len(run.metrics)} metrics)"
        )
    rows.sort(key=lambda r: (VERDICT_ORDER[r.verdict], r.name))
    return Comparison(
        base=[],
        new=[run.label],
        budgets=budgets.source,
        tolerance=budgets.tolerance,
        noisy_tolerance=budgets.noisy_tolerance,
        rows=rows,
    )
