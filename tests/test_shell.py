"""Shell and terminal conventions: completion in bash, zsh and fish; NO_COLOR; a terminal
that reports 0x0 columns; wrapped findings that keep their indent."""

import fcntl
import os
import shutil
import struct
import subprocess
import sys
import termios

import pytest

from tests.conftest import ROOT

BIN = os.path.dirname(sys.executable)
DEMO = os.path.join(ROOT, "fixtures", "demo.kvprof")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR")}
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def _complete(shell: str, line: str, cwd=ROOT, raw=False) -> list[str]:
    """What kvprof answers a shell that asks for completions (typer's protocol, the one the
    scripts from --show-completion speak)."""
    env = _env(_KVPROF_COMPLETE=f"complete_{shell}")
    if shell == "bash":
        words = line.split(" ")
        env.update(COMP_WORDS=line, COMP_CWORD=str(len(words) - 1))
    else:
        env["_TYPER_COMPLETE_ARGS"] = line
        if shell == "fish":
            env["_TYPER_COMPLETE_FISH_ACTION"] = "get-args"
    r = subprocess.run([sys.executable, "-m", "kvprof"], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    if raw:
        return r.stdout.splitlines()
    if shell == "zsh":  # _arguments '*: :(("value":"help"\n"value2"))', or _files when there is nothing to offer
        if r.stdout.strip() == "_files":
            return []
        body = r.stdout.strip().removeprefix("_arguments '*: :((").removesuffix("))'")
        return [line[1:].split('"', 1)[0].replace("\\\\:", ":") for line in body.splitlines()]
    return [line.split("\t", 1)[0] for line in r.stdout.splitlines()]  # fish: value<TAB>help


@pytest.mark.slow
@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_of_subcommands_options_probes_and_bundles(shell):
    assert _complete(shell, "kvprof ana") == ["analyze"]
    assert _complete(shell, "kvprof analyze --n") == ["--no-report"]
    assert sorted(_complete(shell, "kvprof record --probe t")) == ["torch", "tracemalloc"]
    assert _complete(shell, "kvprof record --probe blocks,g") == ["blocks,gc"]
    assert _complete(shell, "kvprof analyze fixtures/de") == ["fixtures/demo-leak.kvprof", "fixtures/demo.kvprof"]
    assert _complete(shell, "kvprof export fixtures/demo.kvprof --format p") == ["perfetto", "parquet"]


def test_bundle_completion_opens_a_lone_directory_and_lists_what_kvprof_reads(tmp_path):
    (tmp_path / "runs" / "a.kvprof").mkdir(parents=True)
    (tmp_path / "runs" / "b.kvprof").mkdir()
    (tmp_path / "runs" / "snap.pickle").write_bytes(b"")
    (tmp_path / "runs" / "notes.txt").write_text("")
    got = _complete("bash", "kvprof compare r", cwd=tmp_path)
    assert got == ["runs/a.kvprof", "runs/b.kvprof", "runs/snap.pickle"]  # not "runs/ " with a space after it
    assert _complete("bash", "kvprof compare --base runs/a", cwd=tmp_path) == ["runs/a.kvprof"]


def test_fish_gets_one_line_per_answer_with_its_help():
    lines = _complete("fish", "kvprof analyze --", raw=True)
    assert all(line.startswith("--") for line in lines), lines  # no help text wrapped onto a line of its own
    assert any(line.startswith("--budget\t") and "exit 1" in line for line in lines)


def test_bash_completes_through_the_script_it_installs():
    script = subprocess.run(
        [sys.executable, "-m", "kvprof", "--show-completion", "bash"],
        capture_output=True,
        text=True,
        env=_env(_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1"),
        timeout=60,
    ).stdout
    assert "complete -o default -F _kvprof_completion kvprof" in script
    probe = (
        script
        + '\nCOMP_WORDS=(kvprof record --probe g); COMP_CWORD=3; _kvprof_completion kvprof; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    r = subprocess.run(
        ["bash", "--norc", "-c", probe], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=60
    )
    assert r.stdout.split() == ["gc"], r.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completes_through_the_script_it_installs(tmp_path):
    script = subprocess.run(
        [sys.executable, "-m", "kvprof", "--show-completion", "fish"],
        capture_output=True,
        text=True,
        env=_env(_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1"),
        timeout=60,
    ).stdout
    (tmp_path / "kvprof.fish").write_text(script)
    r = subprocess.run(
        [
            "fish",
            "--no-config",
            "-c",
            f"source {tmp_path / 'kvprof.fish'}; complete -C 'kvprof ana'; complete -C 'kvprof record --probe bl'",
        ],
        capture_output=True,
        text=True,
        env=_env(HOME=str(tmp_path)),
        cwd=ROOT,
        timeout=60,
    )
    assert r.stdout.splitlines()[0].startswith("analyze"), (r.stdout, r.stderr)
    assert any(line.startswith("blocks") for line in r.stdout.splitlines()), r.stdout


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_script_parses():
    script = subprocess.run(
        [sys.executable, "-m", "kvprof", "--show-completion", "zsh"],
        capture_output=True,
        text=True,
        env=_env(_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1"),
        timeout=60,
    ).stdout
    assert "compdef _kvprof_completion kvprof" in script
    r = subprocess.run(["zsh", "-n", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "shell,rc", [("bash", ".bashrc"), ("zsh", ".zshrc"), ("fish", ".config/fish/completions/kvprof.fish")]
)
def test_install_completion_writes_the_shell_s_startup_file(tmp_path, shell, rc):
    r = subprocess.run(
        [sys.executable, "-m", "kvprof", "--install-completion", shell],
        capture_output=True,
        text=True,
        env=_env(HOME=str(tmp_path), _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1"),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert f"{shell} completion installed" in r.stdout
    assert (tmp_path / rc).exists()


def _on_pty(argv, env, cols=0, rows=0, expect_rc=0) -> str:
    """Run with stdout on a pseudo-terminal of the given size; what it printed (its exit
    status must be expect_rc: compare exits 1 on a regression)."""
    import pty

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    p = subprocess.Popen(argv, stdout=slave, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    os.close(slave)
    out = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not data:
            break
        out += data
    os.close(master)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == expect_rc, err
    return out.decode().replace("\r\n", "\n")


def test_a_terminal_of_0x0_columns_gets_the_report_at_80():
    out = _on_pty(
        [sys.executable, "-m", "kvprof", "analyze", DEMO], _env(TERM="xterm-256color", NO_COLOR="1"), cols=0, rows=0
    )
    lines = out.splitlines()
    assert "Findings" in out and "usage.high_watermark" in out
    assert max(len(line) for line in lines) <= 80 and max(len(line) for line in lines) > 70


@pytest.mark.slow
def test_no_color_removes_every_style():
    styled = _on_pty([sys.executable, "-m", "kvprof", "analyze", DEMO], _env(TERM="xterm-256color"), cols=100, rows=40)
    assert "\x1b[1m" in styled  # bold, on a terminal, without NO_COLOR
    for argv in (
        ["analyze", DEMO],
        ["compare", DEMO, os.path.join(ROOT, "fixtures", "demo-leak.kvprof")],
        ["--help"],
        ["analyze", "--help"],
    ):
        plain = _on_pty(
            [sys.executable, "-m", "kvprof", *argv],
            _env(TERM="xterm-256color", NO_COLOR="1"),
            cols=100,
            rows=40,
            expect_rc=1 if argv[0] == "compare" else 0,
        )
        assert plain.strip() and "\x1b[" not in plain, (argv, plain[:300])


def test_wrapped_findings_keep_their_indent():
    from rich.console import Console

    from kvprof.analysis import AnalysisResult, Finding
    from kvprof.report import terminal

    long = "word " * 60
    f = Finding(severity="warning", title="A title long enough to wrap " * 3, detail=long.strip(), evidence={})
    result = AnalysisResult(source={"bundle": "b.kvprof", "window": "whole run"}, metrics={}, sections={}, findings=[f])
    console = Console(width=60, record=True, color_system=None)
    terminal.render(result, console=console)
    text = console.export_text()
    block = text[text.index("Findings") :].splitlines()[1:]
    assert block[0].startswith(" ! A title")
    assert len(block) > 4 and all(line.startswith("   ") for line in block[1:]), block
    assert all(len(line) <= 60 for line in block)
