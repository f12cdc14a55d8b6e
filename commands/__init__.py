"""The kvprof command line: one module per subcommand, registered in COMMANDS.

The CLI only parses arguments and calls the library.  Expected failures
(:class:`kvprof.errors.KvprofError`) become one line on stderr and their exit
code; tracebacks are for bugs.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from kvprof._version import __version__

# (module, command name): each module defines `run`, whose docstring is its help line.
COMMANDS = [
    ("record", "record"),
    ("analyze", "analyze"),
    ("compare", "compare"),
    ("whatif", "whatif"),
    ("report", "report"),
    ("export", "export"),
    ("demo", "demo"),
]

app = typer.Typer(
    name="kvprof",
    help="Memory profiler for LLM serving: KV block pools, heap, PyTorch and GPU memory in one trace.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool):
    if value:
        typer.echo(f"kvprof {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    """Memory profiler for LLM serving."""


for _module, _name in COMMANDS:
    _mod = importlib.import_module(f"kvprof.commands.{_module}")
    app.command(_name, **getattr(_mod, "COMMAND_SETTINGS", {}))(_mod.run)


def main(argv: list[str] | None = None) -> int:
    from kvprof.errors import KvprofError

    import click

    try:
        rc = app(args=argv, prog_name="kvprof", standalone_mode=False)
        return rc if isinstance(rc, int) else 0
    except click.exceptions.UsageError as exc:  # typer's own argument errors: one line too
        if not exc.format_message():  # `kvprof` alone: the help was the answer
            return exc.exit_code
        cmd = exc.ctx.command_path if exc.ctx is not None else "kvprof"
        sys.stderr.write(f"kvprof: error: {exc.format_message()} (see `{cmd} --help`)\n")
        return 2
    except click.exceptions.Abort:
        sys.stderr.write("kvprof: interrupted\n")
        return 130
    except KvprofError as exc:
        sys.stderr.write(f"kvprof: error: {exc}\n")
        return exc.exit_code
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except KeyboardInterrupt:
        sys.stderr.write("kvprof: interrupted\n")
        return 130
    except BrokenPipeError:  # `kvprof analyze X --json - | head`: the reader left
        _quiet_stdout()
        return 1
    except OSError as exc:
        if exc.filename is None:  # writing to stdout (a full disk, a closed pipe): not a kvprof bug
            _quiet_stdout()
            sys.stderr.write(f"kvprof: error: cannot write the output: {exc.strerror or exc}\n")
            return 1
        raise
    return 0


def _quiet_stdout() -> None:
    """After a failed write to stdout, the interpreter's own flush at exit would fail again
    and print a second error: point stdout at /dev/null."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
