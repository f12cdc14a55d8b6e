"""The CLI as a user meets it: help, version, analyze output, bad input."""

import json
import subprocess
import sys

import pytest

from tests.conftest import analyze_json, run_kvprof


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    out = d / "demo.kvprof"
    r = run_kvprof("record", "-q", "-o", str(out), "-m", "kvprof.demo", "--seed", "3")
    assert r.returncode == 0, r.stderr
    return out


# What a help line must not pull in: the analysis and recording stacks, each a second or more
# of start-up on a cold cache (kvprof.commands' docstring: help builds typer's app, nothing else).
HEAVY = ("torch", "numpy", "memray", "pyarrow", "numba", "bokeh", "kvprof.analysis", "kvprof.report.html")
HELP_LINES = [["--version"], ["--help"]] + [
    [name, "--help"] for name in ("record", "analyze", "compare", "whatif", "report", "export", "combine", "demo")
]
# Runs each line through the CLI's main() in one interpreter, in order, and prints (as JSON, on
# the real stdout) each line's exit status, what it wrote, and the heavy modules loaded so far.
_IMPORTS_AFTER = """
import contextlib, io, json, sys
from kvprof.commands import main
lines, heavy, seen = json.loads(sys.argv[1]), json.loads(sys.argv[2]), []
for argv in lines:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    seen.append({"argv": argv, "rc": rc, "out": buf.getvalue(), "heavy": sorted(m for m in heavy if m in sys.modules)})
print(json.dumps(seen))
"""


def test_help_and_version_import_nothing_heavy():
    """Not a stopwatch (a loaded machine makes any threshold flaky): what --version and every
    --help load, which is what makes them slow or fast."""
    r = subprocess.run(
        [sys.executable, "-c", _IMPORTS_AFTER, json.dumps(HELP_LINES), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert [s["argv"] for s in seen] == HELP_LINES
    for s in seen:
        assert s["rc"] in (0, None), s
        assert s["heavy"] == [], s  # the first line that loaded one is named
    version, top = seen[0], seen[1]
    assert version["out"].startswith("kvprof ")
    assert "record" in top["out"] and "analyze" in top["out"]
    for s in seen[2:]:
        assert "Usage: kvprof " + s["argv"][0] in s["out"], s


@pytest.mark.slow
def test_analyze_terminal_report_fits_80_columns(demo):
    r = run_kvprof("analyze", str(demo), "--width", "80")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    for needle in (
        "usage.high_watermark",
        "internal_fragmentation.time_weighted",
        "Block map at the high watermark",
        "Block-size rounding",
        "Findings",
        "preemptions",
    ):
        assert needle in r.stdout


@pytest.mark.slow
def test_analyze_json_schema(demo, tmp_path):
    out = tmp_path / "a.json"
    r = run_kvprof("analyze", str(demo), "--json", str(out), "--no-report")
    assert r.returncode == 0 and r.stdout == ""
    d = json.loads(out.read_text())
    assert d["schema"] == "kvprof.analysis/1"
    required = [
        "blocks.usage.high_watermark",
        "blocks.internal_fragmentation.time_weighted",
        "blocks.internal_fragmentation.at_peak",
        "blocks.external_fragmentation.at_peak",
        "blocks.prefix_cache.query_tokens",
        "blocks.prefix_cache.hit_tokens",
        "blocks.prefix_cache.hit_rate",
        "blocks.evictions",
        "blocks.evicted_before_reuse_ratio",
        "blocks.preemptions",
        "blocks.allocation_failures",
        "blocks.leaked_blocks",
        "blocks.events",
    ]
    for name in required:
        entry = d["metrics"][name]
        assert set(entry) >= {"value", "unit", "better", "window"}
        assert entry["better"] in ("lower", "higher", None)
    assert d["metrics"]["blocks.preemptions"]["value"] > 0
    assert d["metrics"]["blocks.prefix_cache.hit_tokens"]["value"] > 0
    assert d["sections"]["blocks"]["aggregate"]["rounding"]
    assert d["findings"] and all(f["severity"] in ("error", "warning", "info") for f in d["findings"])
    r = run_kvprof("analyze", str(demo), "--json", "-")
    assert json.loads(r.stdout)["schema"] == "kvprof.analysis/1"


@pytest.mark.slow
def test_window_between_markers(demo, tmp_path):
    whole = analyze_json(str(demo))
    r = run_kvprof("analyze", str(demo), "--json", "-", "--window", "steady_state:drained")
    assert r.returncode == 0, r.stderr
    win = json.loads(r.stdout)
    assert win["source"]["window"] == "between markers steady_state and drained"
    assert (
        0
        < win["metrics"]["blocks.prefix_cache.query_tokens"]["value"]
        < whole["metrics"]["blocks.prefix_cache.query_tokens"]["value"]
    )
    r = run_kvprof("analyze", str(demo), "--window", "nope")
    assert r.returncode == 2 and "no marker named 'nope'" in r.stderr


@pytest.mark.slow
def test_unknown_option_and_missing_argument(tmp_path):
    r = run_kvprof("analyze", "--frobnicate")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run_kvprof("analyze")
    assert r.returncode == 2 and "Missing argument" in r.stderr
    r = run_kvprof("nosuchcommand")
    assert r.returncode == 2
    r = run_kvprof("analyze", str(tmp_path / "x.json"), "--json", "/nonexistent/dir/out.json")
    assert r.returncode == 2 and "no such file" in r.stderr


@pytest.mark.slow
def test_unwritable_json_output(demo):
    r = run_kvprof("analyze", str(demo), "--json", "/nonexistent/dir/out.json")
    assert r.returncode == 2 and "cannot write /nonexistent/dir/out.json" in r.stderr
