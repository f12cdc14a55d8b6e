"""pytest --kvprof: record each test, keep the bundles of failing ones, hold tests to memory budgets.

Registered as a ``pytest11`` entry point, so it loads wherever kvprof is installed; without
``--kvprof`` it only registers its options and the ``kvprof_budget`` marker (a no-op then).

* Each test's body is recorded in-process (as pytest-memray measures the test function)
  into a bundle of its own (kvprof.runtime.start_session), with the probes of
  ``--kvprof-probe`` (default ``blocks``; a budget on ``heap.*`` adds ``tracemalloc``
  for its test, one on ``gc.*`` adds ``gc``).  A pool a fixture made counts in the
  bundle of a test whose body used it; Python processes the body starts (a spawned
  engine core) are recorded into the same bundle.
* The bundle is analysed as `kvprof analyze` does; its metrics are checked against the
  test's budgets: ``[tool.kvprof.budgets]`` of the nearest pyproject.toml, then the
  test's ``@pytest.mark.kvprof_budget(...)`` entries, which win for the names they give.
  The rules are `kvprof analyze --budget`'s (kvprof.compare.check_run): the absolute
  limits ``max`` and ``min``; relative ones need a base run and are left to `kvprof
  compare`.  A broken limit fails the test with the metric, the limit, the value and the
  bundle's path.  A marker that names a metric the test did not produce fails it too;
  pyproject budgets apply where their metrics were measured.
* Bundles of failing tests are kept (every test's with ``--kvprof-keep``) in
  ``--kvprof-dir`` (default ``.kvprof/`` in the rootdir); the others are removed.
* The terminal summary lists the top tests by peak blocks, heap peak and leaks.
* Under pytest-xdist each worker records the tests it runs (one bundle per test); the
  figures reach the summary through the test reports.

Marker values: a number is a ``max``; ``"200 MB"`` / ``"1.5GiB"`` a ``max`` in bytes (the
units of `kvprof whatif --kv-memory`: kB, MB, GB = 10**3.., KiB, MiB, GiB = 2**10..);
``"90%"`` a ``max`` of 0.9; a dict a table of limits as in a budget file
(``{"min": 0.5}``).
"""

from __future__ import annotations

import math
import os
import re

import pytest

MARKER = "kvprof_budget"
PROPERTY = "kvprof"  # report.user_properties entry that carries a test's figures to the summary
SUMMARY_COLUMNS = [  # (metric, header, unit)
    ("blocks.peak_blocks", "peak blocks", "blocks"),
    ("blocks.usage.high_watermark", "usage", "ratio"),
    ("heap.peak_bytes", "heap peak", "bytes"),
    ("blocks.leaked_blocks", "leaked blocks", "blocks"),
    ("heap.live_bytes_at_exit", "heap left", "bytes"),
]
PROBES_FOR = {"heap.": "tracemalloc", "gc.": "gc"}  # metric prefix -> the probe that measures it
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def pytest_addoption(parser):
    group = parser.getgroup("kvprof", "kvprof: KV-block, heap and GPU memory per test")
    group.addoption(
        "--kvprof",
        action="store_true",
        default=False,
        help="Record each test with kvprof and check its memory budgets.",
    )
    group.addoption(
        "--kvprof-probe",
        action="append",
        default=None,
        metavar="NAME",
        help="Probe to record with (repeatable or comma-separated; default blocks): blocks, gc, tracemalloc.",
    )
    group.addoption(
        "--kvprof-keep", action="store_true", default=False, help="Keep every test's bundle, not only failing tests'."
    )
    group.addoption(
        "--kvprof-dir", default=None, metavar="DIR", help="Where the bundles go (default: .kvprof/ in the rootdir)."
    )
    group.addoption(
        "--kvprof-top", type=int, default=10, metavar="N", help="Tests in the summary table (default 10; 0: none)."
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**limits): kvprof memory budget for this test, e.g. "
        '**{"blocks.leaked_blocks": 0, "heap.peak_bytes": "200 MB"} (checked with --kvprof)',
    )
    if config.getoption("kvprof"):
        config.pluginmanager.register(KvprofPlugin(config), "kvprof-recorder")


class BudgetError(Exception):
    """A marker whose limits cannot be read."""


def marker_limits(marker_kwargs: dict) -> dict:
    """A kvprof_budget marker's keyword arguments as a budgets table (name -> limits)."""
    table = {}
    for name, value in marker_kwargs.items():
        if isinstance(value, dict):
            table[name] = dict(value)
        elif isinstance(value, str):
            table[name] = {"max": _amount(value, name)}
        else:
            table[name] = {"max": value}
    return table


def _amount(text: str, name: str) -> float:
    t = text.strip()
    if t.endswith("%"):
        try:
            return float(t[:-1]) / 100
        except ValueError:
            raise BudgetError(f"{MARKER}: {name}={text!r} is not a percentage") from None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)", t)
    if not m or m.group(2).lower() not in _UNITS and m.group(2):
        raise BudgetError(f"{MARKER}: {name}={text!r} is not a size (examples: 200 MB, 1.5GiB, 4096) nor a percentage")
    return float(m.group(1)) * _UNITS[m.group(2).lower() or "b"]


def _node_file_name(nodeid: str, worker: str | None) -> str:
    name = re.sub(r"[^A-Za-z0-9._\[\]-]+", "_", nodeid.replace("::", "__")).strip("._") or "test"
    if len(name) > 150:
        import hashlib

        name = name[:140] + "-" + hashlib.sha1(nodeid.encode()).hexdigest()[:8]
    return f"{name}{'.' + worker if worker else ''}.kvprof"


def _fmt(value, unit: str) -> str:
    from kvprof.report.format import value as fmt_value

    return "-" if value is None else fmt_value(value, unit)


class KvprofPlugin:
    def __init__(self, config):
        self.config = config
        probes = []
        for p in config.getoption("kvprof_probe") or ["blocks"]:
            probes.extend(x.strip() for x in p.split(",") if x.strip())
        from kvprof import runtime

        bad = [p for p in probes if p not in runtime.SESSION_PROBES]
        if bad:
            raise pytest.UsageError(
                f"--kvprof-probe {bad[0]}: not a probe that records inside pytest (one of: {', '.join(runtime.SESSION_PROBES)})"
            )
        self.probes = list(dict.fromkeys(probes))
        self.keep_all = config.getoption("kvprof_keep")
        self.top = config.getoption("kvprof_top")
        d = config.getoption("kvprof_dir")
        self.dir = os.path.abspath(d) if d else os.path.join(str(config.rootpath), ".kvprof")
        try:  # a directory that cannot be made would turn every budget off: refused at the start
            os.makedirs(self.dir, exist_ok=True)
        except OSError as exc:
            raise pytest.UsageError(f"--kvprof-dir {self.dir}: cannot create it ({exc.strerror})") from None
        self.worker = getattr(config, "workerinput", {}).get("workerid")
        self.project_budgets = None  # loaded once, on first use
        self.rows: list[dict] = []  # figures of each recorded test, from the reports (the controller's, under xdist)
        self.disabled = None  # why recording is off in this process, said once

    # -- budgets -------------------------------------------------------------------------
    def _project(self):
        if self.project_budgets is None:
            from kvprof import budgets

            path = budgets.find_pyproject(str(self.config.rootpath))
            self.project_budgets = (
                budgets.discover(None, start=os.path.dirname(path)) if path else budgets.Budgets(entries={})
            )
        return self.project_budgets

    def _budgets(self, item):
        """(Budgets, the names the test's markers give exactly) for one test."""
        from kvprof import budgets

        project = self._project()
        table = {}
        for mark in reversed(list(item.iter_markers(MARKER))):  # the closest marker (the test's own) wins
            if mark.args:
                raise BudgetError(f'{MARKER} takes keyword arguments only (**{{"blocks.leaked_blocks": 0}})')
            table.update(marker_limits(mark.kwargs))
        if not table:
            return project, []
        try:
            from_marker = budgets.parse(table, f"@pytest.mark.{MARKER}")
        except Exception as exc:  # kvprof.errors.UsageError: one line naming the entry
            raise BudgetError(str(exc)) from None
        merged = budgets.Budgets(
            entries={**project.entries, **from_marker.entries},
            tolerance=project.tolerance,
            noisy_tolerance=project.noisy_tolerance,
            source=f"@pytest.mark.{MARKER}" + (f" and {project.source}" if project.source else ""),
        )
        self._from_marker = set(from_marker.entries)
        return merged, [n for n in from_marker.entries if not any(c in n for c in "*?[")]

    # -- one test ----------------------------------------------------------------------------
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        state = {
            "bundle": None,
            "failed": False,
            "error": None,
            "metrics": {},
            "breaches": [],
            "missing": [],
            "named": [],
        }
        item._kvprof = state
        try:
            self._from_marker = set()
            state["budgets"], state["named"] = self._budgets(item)
            state["from_marker"] = self._from_marker
        except BudgetError as exc:
            state["error"] = str(exc)

    def _start(self, item, state) -> None:
        from kvprof import runtime

        if self.disabled or state["error"]:
            return
        probes = list(self.probes)
        for name in [*state["budgets"].entries, *state["named"]]:
            for prefix, probe in PROBES_FOR.items():
                if name.startswith(prefix) and probe not in probes:
                    probes.append(probe)
        bundle = os.path.join(self.dir, _node_file_name(item.nodeid, self.worker))
        options = (
            {"tracemalloc": {"interval": 0}} if "tracemalloc" in probes else None
        )  # snapshots at start, markers and the end
        try:
            os.makedirs(self.dir, exist_ok=True)
            runtime.start_session(bundle, probes, options, command=["pytest", item.nodeid])
        except Exception as exc:  # already recorded (kvprof record -- pytest), an unwritable directory
            self.disabled = f"kvprof: not recording tests in this process: {exc}"
            import warnings

            warnings.warn(pytest.PytestWarning(self.disabled), stacklevel=2)
            return
        state["bundle"] = bundle

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        """The test's body is recorded (as pytest-memray measures it): pools its fixtures
        made count in its bundle when the body used them (runtime.stop_session)."""
        state = getattr(item, "_kvprof", None)
        if state is not None:
            self._start(item, state)
        try:
            return (yield)
        except BaseException as exc:
            if state is not None and not isinstance(exc, pytest.skip.Exception):
                state["failed"] = True
            raise
        finally:
            if state is not None:
                self._finish(item, state)

    def _finish(self, item, state) -> None:
        from kvprof import runtime

        state["done"] = True
        if not state["bundle"] or runtime.session_bundle() != state["bundle"]:
            return
        manifest = runtime.stop_session(
            {"started": True, "exit_code": 1 if state["failed"] else 0, "signal": None, "test": item.nodeid}
        )
        recorded = sum(
            v
            for p in manifest.get("processes", [])
            for k, v in p.get("records", {}).items()
            if k in ("blocks.bin", "heap_snaps.bin", "gc.bin")
        )
        if recorded or state["named"]:
            from kvprof.analysis import analyze_path

            state["metrics"] = analyze_path(state["bundle"]).metrics if recorded else {}
            self._check(state)
        keep = self.keep_all or state["failed"] or state["breaches"] or state["missing"]
        if not keep:
            import shutil

            shutil.rmtree(state["bundle"], ignore_errors=True)
            state["kept"] = None
        else:
            state["kept"] = state["bundle"]

    def _check(self, state) -> None:
        from kvprof.compare import FAIL, Run, check_run
        from kvprof.errors import KvprofError

        metrics, budgets = state["metrics"], state["budgets"]
        state["missing"] = [n for n in state["named"] if (metrics.get(n) or {}).get("value") is None]
        if not budgets.entries or not metrics:
            return
        try:
            result = check_run(Run(label=state["bundle"], metrics=metrics), budgets)
        except KvprofError:  # nothing under a limit was measured in this test
            return
        for row in result.rows:
            if row.verdict != FAIL:
                continue
            for c in row.checks:
                if not c.passed:
                    state["breaches"].append(
                        {
                            "metric": row.name,
                            "value": row.new,
                            "unit": row.unit,
                            "kind": c.kind,
                            "limit": None if isinstance(c.limit, float) and math.isnan(c.limit) else c.limit,
                            "message": c.message,
                            "entry": c.pattern,
                        }
                    )

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        state = getattr(item, "_kvprof", None)
        if state is None or report.when != "call":
            if state is not None and report.when == "setup" and state.get("error"):
                report.outcome = "failed"
                report.longrepr = f"kvprof: {state['error']}"
            return report
        problems = []
        for b in state["breaches"]:
            if b["kind"] in ("max", "min"):
                where = (
                    f"@pytest.mark.{MARKER}"
                    if b["entry"] in state.get("from_marker", ())
                    else (state["budgets"].source or "budgets")
                )
                side = "above" if b["kind"] == "max" else "below"
                problems.append(
                    f"  {b['metric']} = {_exact(b['value'], b['unit'])}, {side} its limit: {b['kind']} "
                    f"{_exact(b['limit'], b['unit'])} ({where})"
                )
            else:
                problems.append(f"  {b['metric']}: {b['message']}")
        for name in state["missing"]:
            need = next((p for prefix, p in PROBES_FOR.items() if name.startswith(prefix)), None)
            hint = (
                f" (is the {need} probe on?)"
                if need
                else " (no block pool was used in this test)"
                if name.startswith("blocks.")
                else ""
            )
            problems.append(f"  {name}: not measured in this test{hint}")
        if problems:
            text = (
                "kvprof budget exceeded:\n"
                + "\n".join(problems)
                + f"\n  bundle: {state.get('kept')}  (kvprof analyze {state.get('kept')})"
            )
            if report.passed:
                report.outcome = "failed"
                report.longrepr = text
            else:
                report.sections.append(("kvprof budget", text))
        elif state.get("kept") and report.failed:
            report.sections.append(("kvprof", f"bundle: {state['kept']}  (kvprof analyze {state['kept']})"))
        if state["bundle"]:
            figures = {m: (state["metrics"].get(m) or {}).get("value") for m, _, _ in SUMMARY_COLUMNS}
            report.user_properties.append(
                (
                    PROPERTY,
                    {
                        "nodeid": item.nodeid,
                        "bundle": state.get("kept"),
                        "figures": figures,
                        "over_budget": bool(problems),
                    },
                )
            )
        return report

    # -- the summary -------------------------------------------------------------------------
    def pytest_runtest_logreport(self, report):
        if report.when != "call":
            return
        for key, value in getattr(report, "user_properties", []) or []:
            if key == PROPERTY and isinstance(value, dict):
                self.rows.append(value)

    def pytest_terminal_summary(self, terminalreporter):
        if self.worker is not None or self.top <= 0:
            return
        tr = terminalreporter
        if self.disabled:
            tr.write_line(self.disabled)
        measured = [r for r in self.rows if any(v is not None for v in r["figures"].values())]
        tr.write_sep("-", f"kvprof: {len(self.rows)} test(s) recorded, bundles in {self.dir}")
        if not measured:
            tr.write_line("no test used a block pool or recorded the heap")
            return

        def key(r):
            f = r["figures"]
            return tuple(
                -(f.get(m) or 0)
                for m in ("blocks.peak_blocks", "heap.peak_bytes", "blocks.leaked_blocks", "heap.live_bytes_at_exit")
            )

        rows = sorted(measured, key=key)[: self.top]
        header = [h for _, h, _ in SUMMARY_COLUMNS]
        cells = [[_cell(r["figures"].get(m), u) for m, _, u in SUMMARY_COLUMNS] for r in rows]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
        tr.write_line("  ".join(f"{h:>{w}}" for h, w in zip(header, widths)) + "  test")
        for r, c in zip(rows, cells):
            flag = "  (over budget)" if r.get("over_budget") else ""
            tr.write_line("  ".join(f"{v:>{w}}" for v, w in zip(c, widths)) + f"  {r['nodeid']}{flag}")
        kept = [r for r in self.rows if r.get("bundle")]
        if kept:
            tr.write_line(
                f"{len(kept)} bundle(s) kept (failing tests'{'' if not self.keep_all else ', and every other'}): kvprof analyze BUNDLE"
            )


def _exact(value, unit: str) -> str:
    """A value in a failure message: sizes with their byte count too ("976.6 KiB (1,000,000 bytes)")."""
    text = _fmt(value, unit)
    return f"{text} ({int(value):,} bytes)" if unit == "bytes" and value is not None and value >= 1024 else text


def _cell(value, unit: str) -> str:
    """A summary cell: block counts as bare numbers (the header says blocks)."""
    if value is not None and unit == "blocks":
        return f"{int(value):,}"
    return _fmt(value, unit)
