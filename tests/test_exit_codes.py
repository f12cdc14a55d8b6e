"""Exit codes a CI gate can trust: a bug is EXIT_INTERNAL (3), never 0 (pass) nor 1
(regressed); every code comes from kvprof.errors."""

import os
import re
import subprocess
import sys

import pytest

from kvprof import errors
from tests.conftest import ROOT

DEMO = os.path.join(ROOT, "fixtures", "demo.kvprof")


def test_the_codes_are_distinct_and_documented():
    codes = {n: v for n, v in vars(errors).items() if n.startswith("EXIT_")}
    assert (
        codes["EXIT_OK"] == 0
        and codes["EXIT_REGRESSED"] == 1
        and codes["EXIT_BAD_INPUT"] == 2
        and codes["EXIT_INTERNAL"] == 3
    )
    assert len(set(codes.values())) == len(codes)
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = readme[readme.index("## Exit codes") :]
    table = table[: table.index("\n## ", 4)]
    for code in (0, 1, 2, 3, 126, 127, 130, 141):
        assert re.search(rf"^\| {code}\b", table, re.M) or f"| {code} " in table or f"/ {code} " in table, code


def test_commands_use_the_named_codes():
    """No bare `typer.Exit(0 if ... else 1)` left in the commands."""
    here = os.path.join(ROOT, "commands")
    for name in os.listdir(here):
        if name.endswith(".py") and name != "whatif.py":
            text = open(os.path.join(here, name), encoding="utf-8").read()
            assert not re.search(r"Exit\(\s*\d", text), name
            assert not re.search(r"return [0-9]+\b", text), name


def test_a_bug_exits_3_with_its_traceback_and_a_request_to_report_it(monkeypatch, capsys):
    import kvprof.analysis
    from kvprof.commands import main

    def broken(*args, **kwargs):
        raise KeyError("planted bug")

    monkeypatch.setattr(kvprof.analysis, "analyze_path", broken)
    rc = main(["analyze", DEMO, "--no-report"])
    err = capsys.readouterr().err
    assert rc == errors.EXIT_INTERNAL == 3
    assert "Traceback (most recent call last)" in err and "KeyError: 'planted bug'" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("kvprof: internal error:") and "bug" in last and "report" in last


@pytest.mark.parametrize("command", [["compare", DEMO, DEMO], ["analyze", DEMO, "--budget", "BUDGET"]])
def test_a_bug_in_the_gate_is_not_a_regression_nor_a_pass(monkeypatch, capsys, tmp_path, command):
    import kvprof.compare
    from kvprof.commands import main

    budget = tmp_path / "b.toml"
    budget.write_text('[budgets]\n"blocks.leaked_blocks" = { max = 0 }\n')
    command = [str(budget) if c == "BUDGET" else c for c in command]

    def broken(*args, **kwargs):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(kvprof.compare, "judge", broken)
    rc = main(command)
    assert rc == 3, capsys.readouterr()
    assert "kvprof: internal error" in capsys.readouterr().err


def test_out_of_memory_is_one_line_and_not_a_pass(monkeypatch, capsys):
    import kvprof.analysis
    from kvprof.commands import main

    def hungry(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(kvprof.analysis, "analyze_path", hungry)
    assert main(["analyze", DEMO]) == errors.EXIT_INTERNAL
    assert capsys.readouterr().err == "kvprof: error: out of memory\n"


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--json", "-"], [], ["--budget", "BUDGET"]])
def test_a_reader_that_left_is_not_a_regression(tmp_path, args):
    """`kvprof analyze X --json - | head -c 10`: 141 (128 + SIGPIPE, as a shell reports a
    process killed by it), not 1 (rich and click both turn a broken pipe into exit 1)."""
    budget = tmp_path / "b.toml"
    budget.write_text('[budgets]\n"blocks.leaked_blocks" = { max = 0 }\n')
    args = [str(budget) if a == "BUDGET" else a for a in args]
    r, w = os.pipe()
    os.close(r)  # the reader has already gone: every write fails
    try:
        p = subprocess.run(
            [sys.executable, "-m", "kvprof.commands", "analyze", DEMO, *args],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(w)
    assert p.returncode == errors.EXIT_BROKEN_PIPE == 141, p.stderr
    assert p.stderr == ""
