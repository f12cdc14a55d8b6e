"""`kvprof compare` and budgets through the real entry point: the CI gate."""

import json
import os
import sys

import pytest

from kvprof.budgets import Budgets, parse
from kvprof.compare import FAIL, IMPROVED, UNCHANGED, WORSE_OK, Run, compare
from tests.conftest import ROOT, run_kvprof

DEMO = ["-m", "kvprof.commands", "demo", "--requests", "80", "--seed", "4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Analysis JSONs of demo runs: two identical, and planted regressions."""
    d = tmp_path_factory.mktemp("runs")
    variants = {
        "base": [],
        "again": [],
        "leak": ["--leak-every", "8"],
        "bigblocks": ["--block-size", "32"],
        "smallpool": ["--num-blocks", "160"],
    }
    out = {}
    for name, extra in variants.items():
        bundle = d / f"{name}.kvprof"
        args = DEMO + (extra if "--num-blocks" in extra else ["--num-blocks", "256"] + extra)
        r = run_kvprof("record", "-q", "-o", str(bundle), "--", sys.executable, *args)
        assert r.returncode == 0, r.stderr
        js = d / f"{name}.json"
        r = run_kvprof("analyze", str(bundle), "--no-report", "--json", str(js))
        assert r.returncode == 0, r.stderr
        out[name] = (str(bundle), str(js))
    return out


@pytest.mark.slow
def test_identical_runs_pass_with_zero_tolerance(runs, tmp_path):
    r = run_kvprof("compare", runs["base"][0], runs["again"][0], "--json", str(tmp_path / "c.json"), cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "passed" in r.stdout
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["schema"] == "kvprof.compare/1" and c["passed"] and c["tolerance"] == 0
    assert {row["verdict"] for row in c["rows"]} == {UNCHANGED}  # every metric, timing ones included (simulated clock)


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant, metric",
    [
        ("leak", "blocks.leaked_blocks"),
        ("bigblocks", "blocks.internal_fragmentation.time_weighted"),
        ("smallpool", "blocks.preemptions"),
    ],
)
def test_planted_regressions_fail_and_name_the_metric(runs, tmp_path, variant, metric):
    r = run_kvprof("compare", runs["base"][1], runs[variant][1], "--width", "100", cwd=str(tmp_path))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"✗ {metric}:" in r.stdout
    assert "FAILED" in r.stdout


@pytest.mark.slow
def test_bundle_and_json_sides_mix(runs, tmp_path):
    r = run_kvprof("compare", runs["base"][0], runs["again"][1], "-q", cwd=str(tmp_path))
    assert r.returncode == 0 and r.stdout.startswith("passed"), r.stdout + r.stderr


@pytest.mark.slow
def test_budgets_absolute_and_relative_with_globs(runs, tmp_path):
    budget = tmp_path / "budget.toml"
    budget.write_text(
        "[budgets]\n"
        '"blocks.usage.high_watermark" = { max = 0.5 }\n'  # breached by every run of this demo
        '"blocks.internal_fragmentation.*" = { max_increase = "1000%" }\n'
        '"blocks.leaked_blocks" = { max = 100 }\n'
        'tolerance = "0%"\n'
    )
    r = run_kvprof(
        "compare",
        runs["base"][1],
        runs["again"][1],
        "--budget",
        str(budget),
        "--junit",
        str(tmp_path / "j.xml"),
        cwd=str(tmp_path),
    )
    assert r.returncode == 1
    assert "✗ blocks.usage.high_watermark:" in r.stdout and "> max 50.0%" in r.stdout
    # the glob's generous relative limit replaces the zero default tolerance for those metrics
    r = run_kvprof(
        "compare", runs["base"][1], runs["bigblocks"][1], "--budget", str(budget), "--json", "-", cwd=str(tmp_path)
    )
    rows = {row["name"]: row for row in json.loads(r.stdout)["rows"]}
    frag = rows["blocks.internal_fragmentation.time_weighted"]
    assert frag["verdict"] != FAIL and [c["kind"] for c in frag["checks"]] == ["max_increase"]
    assert frag["checks"][0]["pattern"] == "blocks.internal_fragmentation.*"


@pytest.mark.slow
def test_pyproject_budgets_are_found_and_analyze_checks_one_run(runs, tmp_path):
    proj = tmp_path / "proj"
    (proj / "sub").mkdir(parents=True)
    (proj / "pyproject.toml").write_text('[tool.kvprof.budgets]\n"blocks.leaked_blocks" = { max = 0 }\n')
    r = run_kvprof("compare", runs["base"][1], runs["again"][1], "--width", "400", cwd=str(proj / "sub"))
    assert r.returncode == 0 and "pyproject.toml [tool.kvprof.budgets]" in r.stdout
    r = run_kvprof("analyze", runs["leak"][0], "--budget", str(proj / "pyproject.toml"), "--no-report")
    assert r.returncode == 1 and "✗ blocks.leaked_blocks:" in r.stdout
    r = run_kvprof("analyze", runs["base"][0], "--budget", str(proj / "pyproject.toml"), "--no-report")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_markdown_junit_and_step_summary(runs, tmp_path):
    import xmlschema

    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    r = run_kvprof(
        "compare",
        runs["base"][1],
        runs["leak"][1],
        "--markdown",
        str(tmp_path / "c.md"),
        "--junit",
        str(tmp_path / "c.xml"),
        env={"GITHUB_STEP_SUMMARY": str(summary)},
        cwd=str(tmp_path),
    )
    assert r.returncode == 1
    md = (tmp_path / "c.md").read_text()
    lines = md.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("| metric"))
    assert lines[header + 1].startswith("|---") and all(
        ln.count("|") - ln.count("\\|") == 7 for ln in lines[header:] if ln
    )
    assert "**fail**" in md and "`blocks.leaked_blocks`" in md
    assert summary.read_text() == "earlier step\n" + md  # appended, as GitHub expects
    xml = (tmp_path / "c.xml").read_text()
    xmlschema.XMLSchema(os.path.join(ROOT, "tests", "data", "junit.xsd")).validate(xml)
    from xml.etree import ElementTree as ET

    suite = ET.fromstring(xml).find("testsuite")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert int(suite.get("failures")) == sum(1 for c in cases.values() if c.find("failure") is not None) > 0
    fail = cases["blocks.leaked_blocks"].find("failure")
    assert fail.get("type") == "regression" and "(0 blocks -> 10 blocks)" in fail.get("message")
    assert "base: 0 blocks" in fail.text and "new: 10 blocks" in fail.text


@pytest.mark.slow
def test_bad_inputs_exit_2_with_one_line(runs, tmp_path):
    cases = {
        "notjson": "this is not json",
        "foreign": json.dumps({"schema": "something/else", "metrics": {}}),
        "badmetric": json.dumps({"schema": "kvprof.analysis/1", "metrics": {"x": {"value": "high"}}}),
    }
    for name, text in cases.items():
        p = tmp_path / f"{name}.json"
        p.write_text(text)
        r = run_kvprof("compare", runs["base"][1], str(p))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (name, r.stderr)
        assert str(p) in r.stderr
    bad_budget = tmp_path / "b.toml"
    for text in [
        '[budgets]\n"x" = { maximum = 1 }\n',
        '[budgets]\n"x" = { max_increase = "lots" }\n',
        "not = toml = at all",
        "[other]\n",
    ]:
        bad_budget.write_text(text)
        r = run_kvprof("compare", runs["base"][1], runs["again"][1], "--budget", str(bad_budget))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (text, r.stderr)
    for args in (
        ["compare", runs["base"][1]],
        ["compare", "a", "b", "c"],
        ["compare", "--base", runs["base"][1]],
        ["compare", str(tmp_path / "missing.kvprof"), runs["base"][1]],
    ):
        r = run_kvprof(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)


# -- the judging rules, on hand-made runs ------------------------------------------------------
def _run(label, **values):
    return Run(
        label,
        {
            k.replace("_", "."): {"value": v, "unit": "count", "better": "lower", "noisy": False}
            for k, v in values.items()
        },
    )


def test_repeated_runs_are_judged_beyond_the_base_spread():
    base = [_run("b1", a=100, b=10), _run("b2", a=110, b=10), _run("b3", a=105, b=10)]
    within = compare(base, [_run("n1", a=114, b=10), _run("n2", a=113, b=10)], Budgets(entries={}))
    row = next(r for r in within.rows if r.name == "a")
    assert row.base == 105 and row.new == 113.5 and row.judged_on_spread and row.base_spread == 10
    assert row.verdict == WORSE_OK and within.passed  # +8.5 is within the spread of 10
    beyond = compare(base, [_run("n", a=116, b=10)], Budgets(entries={}))
    assert next(r for r in beyond.rows if r.name == "a").verdict == FAIL
    better = compare(base, [_run("n", a=90, b=10)], Budgets(entries={}))
    assert next(r for r in better.rows if r.name == "a").verdict == IMPROVED


def test_one_sided_metrics_are_listed_and_zero_base_is_infinite_change():
    c = compare([_run("b", a=0, gone=1)], [_run("n", a=1, fresh=2)], Budgets(entries={}))
    verdicts = {r.name: r.verdict for r in c.rows}
    assert verdicts == {"a": FAIL, "gone": "only in base", "fresh": "only in new"}
    loose = compare([_run("b", a=0)], [_run("n", a=1)], parse({"a": {"max_increase": "1000%"}}, "t"))
    assert loose.rows[0].verdict == FAIL  # any rise from 0 exceeds every relative limit
    absolute = compare([_run("b", a=0)], [_run("n", a=1)], parse({"a": {"max_increase": "1000%", "max": 5}}, "t"))
    assert absolute.rows[0].verdict == FAIL


def test_most_specific_budget_entry_wins():
    b = parse(
        {"blocks.*": {"max": 1, "max_increase": "5%"}, "blocks.usage.*": {"max": 2}, "blocks.usage.peak": {"max": 3}},
        "t",
    )
    lim = b.limits_for("blocks.usage.peak")
    assert (lim.max, lim.max_increase, lim.patterns["max"]) == (3, 0.05, "blocks.usage.peak")
    assert b.limits_for("blocks.usage.other").max == 2 and b.limits_for("blocks.x").max == 1
    assert b.limits_for("heap.x").any() is False


# -- broken values, empty runs, hostile files: one line, exit 2, never a pass --------------------
def _analysis(path, metrics):
    path.write_text(json.dumps({"schema": "kvprof.analysis/1", "metrics": metrics}))
    return str(path)


def _one_line_2(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("kvprof: error: ") and "Traceback" not in r.stderr, (
        r.stderr
    )
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_a_nan_value_never_passes_a_budget(tmp_path):
    """`{"value": NaN}` parses (Python's json takes it): it is named and refused, not read as
    "no data", which passed `max = 0`."""
    good = _analysis(
        tmp_path / "good.json", {"blocks.leaked_blocks": {"value": 0, "unit": "blocks", "better": "lower"}}
    )
    budget = tmp_path / "b.toml"
    budget.write_text('[budgets]\n"blocks.leaked_blocks" = { max = 0 }\n')
    for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
        bad = tmp_path / "nan.json"
        bad.write_text(
            '{"schema": "kvprof.analysis/1", "metrics": {"blocks.leaked_blocks": {"value": %s, "unit": "blocks", "better": "lower"}}}'
            % literal
        )
        r = run_kvprof("compare", good, str(bad), "--budget", str(budget))
        _one_line_2(r, "'blocks.leaked_blocks'", str(bad))
    # a run analysed in this process (not read from a file) with a NaN: a failing row, not "no data"
    nan = float("nan")
    c = compare([_run("b", a=1)], [_run("n", a=nan)], parse({"a": {"max": 0}}, "t"))
    assert not c.passed and c.rows[0].verdict == FAIL and "NaN" in c.rows[0].checks[0].message
    c = compare([_run("b", a=nan, b=1)], [_run("n", a=nan, b=1)], Budgets(entries={}))
    assert not c.passed


@pytest.mark.slow
def test_values_of_the_wrong_type_are_named(tmp_path):
    good = _analysis(tmp_path / "good.json", {"m": {"value": 1, "better": "lower"}})
    for name, entry in {
        "str": {"value": "12"},
        "list": {"value": [1]},
        "bool": {"value": True},
        "dict": {"value": {"v": 1}},
        "huge": {"value": 10**400},
        "unit": {"value": 1, "unit": ["bytes"]},
        "noisy": {"value": 1, "noisy": "yes"},
        "better": {"value": 1, "better": "up"},
        "entry": 5,
    }.items():
        bad = _analysis(tmp_path / f"{name}.json", {"m": {"value": 2, "better": "lower"}, f"bad.{name}": entry})
        r = run_kvprof("compare", good, bad)
        _one_line_2(r, f"'bad.{name}'", bad)


@pytest.mark.slow
def test_nothing_to_compare_is_an_error_not_a_pass(tmp_path):
    empty = _analysis(tmp_path / "empty.json", {})
    good = _analysis(tmp_path / "good.json", {"m": {"value": 1, "better": "lower"}})
    _one_line_2(run_kvprof("compare", empty, good), "no metrics", "empty.json")
    _one_line_2(run_kvprof("compare", good, empty), "no metrics", "empty.json")
    # a recorded run with nothing in it: no pool, no heap probe
    bundle = tmp_path / "nothing.kvprof"
    assert run_kvprof("record", "-q", "-o", str(bundle), "--", sys.executable, "-c", "pass").returncode == 0
    _one_line_2(run_kvprof("compare", str(bundle), str(bundle)), "no metrics", "nothing.kvprof")
    # metrics on both sides, none in common (or none with a direction): nothing was compared
    other = _analysis(tmp_path / "other.json", {"n": {"value": 1, "better": "lower"}})
    _one_line_2(run_kvprof("compare", good, other), "nothing compared")
    info = _analysis(tmp_path / "info.json", {"i": {"value": 1, "better": None}})
    _one_line_2(run_kvprof("compare", info, info), "nothing compared")
    # analyze --budget: a budget that limits nothing in the run checked nothing
    budget = tmp_path / "b.toml"
    budget.write_text('[budgets]\n"heap.*" = { max = 0 }\n')
    fixture = os.path.join(ROOT, "fixtures", "demo.kvprof")
    _one_line_2(run_kvprof("analyze", fixture, "--budget", str(budget), "--no-report"), "nothing checked")
    _one_line_2(run_kvprof("analyze", str(bundle), "--budget", str(budget), "--no-report"), "no metrics")


def test_deep_nesting_is_one_line(tmp_path):
    good = _analysis(tmp_path / "good.json", {"m": {"value": 1, "better": "lower"}})
    deep = tmp_path / "deep.json"
    deep.write_text('{"schema": "kvprof.analysis/1", "metrics": {}, "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    _one_line_2(run_kvprof("compare", good, str(deep)), "nested too deeply", "deep.json")
    budget = tmp_path / "deep.toml"
    budget.write_text("[budgets]\nx = " + "[" * 200_000 + "]" * 200_000 + "\n")
    _one_line_2(run_kvprof("compare", good, good, "--budget", str(budget)), "nested too deeply", "deep.toml")
    budget.write_text("[budgets]\nx = " + "{a = " * 50_000 + "1" + "}" * 50_000 + "\n")
    _one_line_2(run_kvprof("compare", good, good, "--budget", str(budget)), "deep.toml")
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "pyproject.toml").write_text("[tool]\nx = " + "[" * 200_000 + "]" * 200_000 + "\n")
    _one_line_2(run_kvprof("compare", good, good, cwd=str(proj)), "nested too deeply", "pyproject.toml")
    (proj / "pyproject.toml").write_text("tool = 3\n")  # not where budgets live: defaults
    assert run_kvprof("compare", good, good, cwd=str(proj)).returncode == 0


@pytest.mark.slow
def test_fifos_devices_and_huge_files_are_refused_without_reading(tmp_path):
    good = _analysis(tmp_path / "good.json", {"m": {"value": 1, "better": "lower"}})
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.json"
    os.symlink("/dev/zero", zero)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as fh:  # sparse: 65 MiB that take no disk
        fh.truncate(65 << 20)
    for path, why in ((fifo, "a FIFO"), (zero, "a character device"), (huge, "more than the 64 MiB")):
        _one_line_2(run_kvprof("compare", good, str(path), timeout=30), why, str(path))
        _one_line_2(run_kvprof("compare", good, good, "--budget", str(path), timeout=30), why, str(path))
        _one_line_2(
            run_kvprof(
                "analyze",
                os.path.join(ROOT, "fixtures", "demo.kvprof"),
                "--budget",
                str(path),
                "--no-report",
                timeout=60,
            ),
            str(path),
        )
    for cmd in (
        ["analyze", str(fifo)],
        ["report", str(fifo), "-o", str(tmp_path / "r.html")],
        ["export", str(zero), "-o", "-"],
    ):
        _one_line_2(run_kvprof(*cmd, timeout=30), "not a regular file")


@pytest.mark.slow
def test_one_output_on_stdout_holds_it_alone(runs, tmp_path):
    """`--junit -` (or --markdown -, --json -): stdout is that output and nothing else (the
    terminal report would make the XML unreadable); two of them on stdout are refused."""
    from xml.etree import ElementTree as ET

    r = run_kvprof("compare", runs["base"][1], runs["leak"][1], "--junit", "-")
    assert r.returncode == 1 and ET.fromstring(r.stdout).find("testsuite") is not None, r.stdout[-300:]
    r = run_kvprof("compare", runs["base"][1], runs["leak"][1], "--markdown", "-")
    assert r.returncode == 1 and r.stdout.lstrip().startswith("#") and "kvprof compare  base" not in r.stdout
    r = run_kvprof("compare", runs["base"][1], runs["leak"][1], "--junit", "-", "--json", "-")
    assert r.returncode == 2 and r.stderr.startswith("kvprof: error: only one of") and r.stdout == ""
