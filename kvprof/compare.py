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

from kvprof.budgets import Budgets
from kvprof.errors import BundleError, UsageError

SCHEMA = "kvprof.compare/1"
EPS = 1e-12

# verdicts, worst first (the order of the reports)
FAIL, WORSE_OK, IMPROVED, CHANGED, UNCHANGED, ONLY_BASE, ONLY_NEW, NO_DATA = (
    "fail", "worse, within tolerance", "improved", "changed", "unchanged", "only in base", "only in new", "no data",
)
VERDICT_ORDER = {v: i for i, v in enumerate([FAIL, ONLY_BASE, ONLY_NEW, WORSE_OK, IMPROVED, CHANGED, UNCHANGED, NO_DATA])}


@dataclass
class Run:
    label: str  # the path it came from
    metrics: dict  # name -> {"value", "unit", "better", "noisy", ...}


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

    def to_json(self) -> dict:
        import dataclasses

        def clean(x):
            if isinstance(x, float) and not math.isfinite(x):
                return "inf" if x > 0 else "-inf" if x < 0 else None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x

        return clean({
            "schema": SCHEMA,
            "passed": self.passed,
            "base": self.base,
            "new": self.new,
            "budgets": self.budgets,
            "tolerance": self.tolerance,
            "noisy_tolerance": self.noisy_tolerance,
            "failures": [r.name for r in self.failures],
            "rows": [dataclasses.asdict(r) for r in self.rows],
        })


# -- loading ---------------------------------------------------------------------------
def load_run(path: str) -> Run:
    """Anything `kvprof analyze` reads (analyzed now) or an analysis JSON (``kvprof analyze --json``)."""
    if not os.path.exists(path):
        raise BundleError(f"no such bundle or analysis JSON: {path}")
    from kvprof.analysis import analyze_path, is_recording

    if is_recording(path):

        return Run(label=path, metrics=analyze_path(path).metrics)
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        from kvprof.analysis import file_hint

        hint = file_hint(path) or f" (not valid JSON: {exc})"
        raise BundleError(f"{path}: not a kvprof bundle, analysis JSON, PyTorch snapshot or memray capture{hint}") from None
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(data, dict) or data.get("schema") != "kvprof.analysis/1":
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise BundleError(f"{path}: not a kvprof analysis JSON (schema {found!r}, expected 'kvprof.analysis/1')")
    metrics = data.get("metrics")
    if not isinstance(metrics, dict):
        raise BundleError(f"{path}: analysis JSON has no metrics map")
    for name, entry in metrics.items():
        value = entry.get("value") if isinstance(entry, dict) else entry
        if not isinstance(entry, dict) or not (value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)) or isinstance(value, bool)):
            raise BundleError(f"{path}: metric {name!r} is malformed (expected {{\"value\": number or null, ...}})")
        if entry.get("better") not in (None, "lower", "higher"):
            raise BundleError(f"{path}: metric {name!r} has better={entry.get('better')!r} (expected lower, higher or null)")
    return Run(label=path, metrics=metrics)


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


def _values(runs: list[Run], name: str) -> tuple[list[float], bool]:
    """Numeric values of `name` over runs, and whether any run had the name at all."""
    present = False
    out = []
    for r in runs:
        entry = r.metrics.get(name)
        if entry is None:
            continue
        present = True
        v = entry.get("value")
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, int) or (isinstance(v, float) and math.isfinite(v)):
            out.append(v)
    return out, present


def _median(values: list):
    m = statistics.median(values)
    if all(isinstance(v, int) for v in values) and float(m).is_integer():
        return int(m)
    return m


def _meta(runs: list[Run], name: str) -> dict:
    for r in runs:
        if name in r.metrics:
            return r.metrics[name]
    return {}


def judge(name: str, base_runs: list[Run], new_runs: list[Run], budgets: Budgets) -> Row:
    from kvprof import metrics as registry

    bvals, bpresent = _values(base_runs, name)
    nvals, npresent = _values(new_runs, name)
    meta = _meta(new_runs, name) or _meta(base_runs, name)
    reg = registry.get(name)
    unit = meta.get("unit") or (reg.unit if reg else "")
    better = meta.get("better", reg.better if reg else None)
    noisy = bool(meta.get("noisy", reg.noisy if reg else False))
    base = _median(bvals) if bvals else None
    new = _median(nvals) if nvals else None
    spread = (max(bvals) - min(bvals)) if len(bvals) >= 2 else None
    row = Row(name=name, unit=unit, better=better, noisy=noisy, base=base, new=new, base_runs=len(bvals), new_runs=len(nvals),
              delta=None, rel=None, base_spread=spread, judged_on_spread=bool(spread and spread > EPS), verdict=NO_DATA)
    limits = budgets.limits_for(name)

    # absolute limits need only the new value
    if new is not None:
        if limits.max is not None:
            ok = new <= limits.max + EPS
            row.checks.append(Check("max", limits.max, ok, f"{_fmt(new, unit)} {'<=' if ok else '>'} max {_fmt(limits.max, unit)}", limits.patterns["max"]))
        if limits.min is not None:
            ok = new >= limits.min - EPS
            row.checks.append(Check("min", limits.min, ok, f"{_fmt(new, unit)} {'>=' if ok else '<'} min {_fmt(limits.min, unit)}", limits.patterns["min"]))

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

    def relative(kind: str, limit: float, sign: int, pattern, word: str, note: str = "") -> Check:
        excess = sign * delta - allow  # how far beyond the base spread, in the limit's direction
        if excess <= EPS:
            ok = True
        elif abs(base) <= EPS:
            ok = False  # any change from zero is an infinite relative change
        else:
            ok = excess / abs(base) <= limit + EPS
        spread_note = f", beyond base spread {_fmt(allow, unit)}" if allow > EPS else ""
        msg = (f"{_pct(row.rel)} ({_fmt(base, unit)} -> {_fmt(new, unit)}{spread_note}): "
               f"{word} {'within' if ok else 'exceeds'} {100 * limit:.2f}%{note}")
        return Check(kind, limit, ok, msg, pattern)

    if limits.max_increase is not None:
        row.checks.append(relative("max_increase", limits.max_increase, +1, limits.patterns["max_increase"], "increase"))
    if limits.max_decrease is not None:
        row.checks.append(relative("max_decrease", limits.max_decrease, -1, limits.patterns["max_decrease"], "decrease"))
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


def _fmt(v, unit) -> str:
    from kvprof.report.format import value

    return value(v, unit)


def compare(base_runs: list[Run], new_runs: list[Run], budgets: Budgets) -> Comparison:
    if not base_runs or not new_runs:
        raise UsageError("compare needs at least one BASE and one NEW run")
    names: dict[str, None] = {}
    for r in base_runs + new_runs:
        for n in r.metrics:
            names.setdefault(n, None)
    rows = [judge(n, base_runs, new_runs, budgets) for n in names]
    rows.sort(key=lambda r: (VERDICT_ORDER[r.verdict], r.name))
    return Comparison(base=[r.label for r in base_runs], new=[r.label for r in new_runs], budgets=budgets.source,
                      tolerance=budgets.tolerance, noisy_tolerance=budgets.noisy_tolerance, rows=rows)


def check_run(run: Run, budgets: Budgets) -> Comparison:
    """`analyze --budget`: the absolute limits (max, min) on one run; relative limits need a BASE."""
    rows = []
    for name in run.metrics:
        row = judge(name, [], [run], budgets)
        row.checks = [c for c in row.checks if c.kind in ("max", "min")]
        row.verdict = FAIL if row.failed else (ONLY_NEW if row.new is not None else NO_DATA)
        if row.checks:
            rows.append(row)
    rows.sort(key=lambda r: (VERDICT_ORDER[r.verdict], r.name))
    return Comparison(base=[], new=[run.label], budgets=budgets.source, tolerance=budgets.tolerance,
                      noisy_tolerance=budgets.noisy_tolerance, rows=rows)
