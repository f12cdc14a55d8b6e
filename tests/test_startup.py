"""Start-up: kvprof installs beside vLLM's typer (no upper bound), and the command lines
people type often never wait for typer's pydantic coercion.  The fast path parses a
line only when typer would make the same of it: checked here against typer itself."""

import functools
import importlib
import os
import random
import subprocess
import sys

import pytest

from tests.conftest import ROOT

DEMO = os.path.join(ROOT, "fixtures", "demo.kvprof")

# Lines the fast path parses, per command: typer must give the same arguments.
PARSED = {
    "analyze": [
        ["B"],
        ["B", "--json", "-"],
        ["B", "--json=x.json", "--no-report"],
        ["--width", "80", "B"],
        ["B", "--window", "warm:drained", "--width", "40"],
        ["B", "--html", "r.html", "--budget", "b.toml"],
        ["--", "B"],
        ["B", "--window", "a:"],
        ["-"],
    ],
    "compare": [
        ["a", "b"],
        ["--base", "a", "--base", "b", "--new", "c", "-q", "--all"],
        ["a", "b", "--width", "100", "--json", "-"],
        ["a", "b", "--markdown", "m.md", "--junit", "j.xml", "--quiet"],
        ["--base=a", "--new=b"],
    ],
    "demo": [
        [],
        ["--seed", "-3", "--no-prefix-cache", "--prefix-share", "0.25", "--free-order", "lifo"],
        ["--prefix-share", ".5"],
        ["--requests", "120", "--num-blocks", "256", "--seed", "1", "--leak-every", "12"],
        ["--prefix-share", "1e-1", "--prefix-cache"],
    ],
    "export": [["B", "-o", "x.json"], ["B", "--format", "parquet", "--output", "d"], ["-o", "-", "B"]],
    "report": [["B", "-o", "-", "--no-whatif"], ["B", "--output", "r.html", "--window", "a:b"]],
    "whatif": [
        ["B"],
        ["B", "--block-size", "8,16", "-j", "2", "--width", "120"],
        ["B", "--bytes-per-token", "1e3", "--policy", "buddy"],
        ["B", "--num-blocks", "unlimited", "--json", "-"],
    ],
}
# Lines left to typer (help, typos, values typer words its own error for, missing values).
LEFT = {
    "analyze": [
        ["--help"],
        ["B", "--frobnicate"],
        ["B", "--width", "39", "--nope"],
        ["B", "--json"],
        ["--json", "-"],
        ["B", "extra"],
        ["B", "--width", "8o"],
        ["B", "--no-report=1"],
        ["B", "--json", "--no-report"],
        ["B", "--width", "1_000"],
    ],
    "compare": [["a", "b", "-qx"], ["a", "b", "--width", "20", "--nope"]],
    "demo": [["--seed", "3.5"], ["--prefix-share", "half"], ["-h"]],
    "export": [["B"], ["B", "-ox.json"]],
    "whatif": [["B", "-j4"]],
}


# Lines refused by the fast path itself: a number out of range, in click's words under any typer.
REFUSED = [
    ("analyze", ["B", "--width", "39"], "Invalid value for '--width': 39 is not in the range x>=40."),
    ("whatif", ["B", "--width", "-3"], "Invalid value for '--width': -3 is not in the range x>=40."),
    ("compare", ["a", "b", "--width", "20"], "Invalid value for '--width': 20 is not in the range x>=40."),
]


def _typer_kwargs(name: str, args: list[str]):
    """What typer calls the command's run() with for `args` (an exception when it refuses)."""
    import typer

    mod = importlib.import_module(f"kvprof.commands.{name}")
    seen = {}

    @functools.wraps(mod.run)
    def capture(**kwargs):
        seen.update(kwargs)

    app = typer.Typer()
    app.command(name)(capture)

    @app.callback()
    def _root():
        pass

    app(args=[name, *args], prog_name="kvprof", standalone_mode=False)
    return seen


def _fast(name: str, args: list[str]):
    from kvprof.commands import _fastpath

    return _fastpath.parse(importlib.import_module(f"kvprof.commands.{name}").run, args)


@pytest.mark.parametrize("name,args", [(n, a) for n, lines in PARSED.items() for a in lines])
def test_the_fast_path_parses_a_line_as_typer_does(name, args):
    fast = _fast(name, args)
    assert fast is not None, "expected the fast path to take this line"
    assert fast == _typer_kwargs(name, args)


@pytest.mark.parametrize("name,args", [(n, a) for n, lines in LEFT.items() for a in lines])
def test_lines_the_fast_path_leaves_to_typer(name, args):
    assert _fast(name, args) is None


@pytest.mark.parametrize("name,args,message", REFUSED)
def test_a_number_out_of_range_is_refused_in_the_same_words_under_any_typer(name, args, message):
    from kvprof.errors import UsageError

    with pytest.raises(UsageError) as exc:
        _fast(name, args)
    assert str(exc.value) == message
    with pytest.raises(Exception):  # noqa: B017 typer refuses it too (in its version's own words)
        _typer_kwargs(name, args)


def test_random_lines_parse_as_typer_parses_them_or_go_to_typer():
    """Seeded random command lines from the commands' own option names and tricky values:
    wherever the fast path answers, typer answers the same; where typer refuses a line, the
    fast path has left it to typer."""
    tokens = {
        "analyze": [
            "B",
            "C",
            "--json",
            "--window",
            "--no-report",
            "--width",
            "--budget",
            "--html",
            "-",
            "--",
            "80",
            "39",
            "x",
            "-5",
            "--nope",
            "a:b",
        ],
        "demo": [
            "--seed",
            "--block-size",
            "--num-blocks",
            "--requests",
            "--free-order",
            "--prefix-share",
            "--leak-every",
            "--prefix-cache",
            "--no-prefix-cache",
            "3",
            "-2",
            "0.5",
            "1e2",
            "lru",
            "x",
            "--",
        ],
        "compare": [
            "a",
            "b",
            "--base",
            "--new",
            "--budget",
            "--markdown",
            "--junit",
            "--json",
            "-q",
            "--quiet",
            "--all",
            "--width",
            "120",
            "-",
            "--",
        ],
    }
    rng = random.Random(16)
    parsed = 0
    for _ in range(400):
        name = rng.choice(sorted(tokens))
        args = [rng.choice(tokens[name]) for _ in range(rng.randrange(0, 7))]
        try:
            fast = _fast(name, args)
        except Exception as exc:  # refused here (a number out of range): typer must refuse it too
            fast = exc
        try:
            slow = _typer_kwargs(name, args)
        except Exception as exc:  # typer refused the line (usage error) or showed help
            assert fast is None or isinstance(fast, Exception), (args, fast, exc)
            continue
        assert not isinstance(fast, Exception), (args, fast)
        if fast is not None:
            parsed += 1
            assert fast == slow, args
    assert parsed > 80  # the generator does reach the fast path


def _modules_after(*argv) -> set:
    code = (
        "import sys; from kvprof.commands import main; rc = main(sys.argv[1:]); "
        "sys.stderr.write(' '.join(sorted(m for m in ('pydantic', 'typer', 'rich.console', 'numpy') if m in sys.modules)))"
    )
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    return set(r.stderr.strip().splitlines()[-1].split()) if r.stderr.strip() else set()


def test_version_imports_no_framework_and_analyze_no_pydantic():
    assert _modules_after("--version") == set()
    mods = _modules_after("analyze", DEMO, "--no-report")
    assert "pydantic" not in mods and "numpy" in mods


def test_typer_has_no_upper_bound_and_kvprof_runs_on_the_installed_one():
    import tomllib
    from importlib.metadata import version

    deps = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["dependencies"]
    (typer_dep,) = [d for d in deps if d.startswith("typer")]
    assert "<" not in typer_dep
    r = subprocess.run(
        [sys.executable, "-m", "kvprof", "analyze", "--nope"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and r.stderr.startswith("kvprof: error: No such option") and "--nope" in r.stderr, (
        version("typer"),
        r.stderr,
    )


def test_python_dash_m_kvprof(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvprof", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("kvprof ")
    r = subprocess.run(
        [sys.executable, "-m", "kvprof", "analyze", DEMO, "--json", "-", "--no-report"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and '"schema": "kvprof.analysis/1"' in r.stdout
    r = subprocess.run([sys.executable, "-m", "kvprof"], capture_output=True, text=True, timeout=60)
    assert "Usage: kvprof" in r.stdout and "analyze" in r.stdout
