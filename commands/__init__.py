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
    ("combine", "combine"),
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
    """The CLI's exit status (kvprof.errors: EXIT_*).  Expected failures are one line; any
    other exception is a bug: its traceback, a line asking for a report, EXIT_INTERNAL."""
    from kvprof import errors

    try:
        return _main(argv)
    except MemoryError:
        sys.stderr.write("kvprof: error: out of memory\n")
        return errors.EXIT_INTERNAL
    except Exception:
        import traceback

        traceback.print_exc()
        sys.stderr.write(f"kvprof: internal error: this is a bug in kvprof {__version__}; please report it, "
                         "with the command you ran and the traceback above\n")
        return errors.EXIT_INTERNAL


def _main(argv: list[str] | None) -> int:
    from kvprof import errors

    import click

    try:
        rc = app(args=argv, prog_name="kvprof", standalone_mode=False)
        return rc if isinstance(rc, int) else errors.EXIT_OK
    except click.exceptions.UsageError as exc:  # typer's own argument errors: one line too
        if not exc.format_message():  # `kvprof` alone: the help was the answer
            return exc.exit_code
        cmd = exc.ctx.command_path if exc.ctx is not None else "kvprof"
        sys.stderr.write(f"kvprof: error: {_one_line(exc.format_message())} (see `{cmd} --help`)\n")
        return errors.EXIT_BAD_INPUT
    except click.exceptions.Abort:
        sys.stderr.write("kvprof: interrupted\n")
        return errors.EXIT_INTERRUPTED
    except errors.OutputClosed as exc:
        _quiet_stdout()
        return exc.exit_code
    except errors.KvprofError as exc:
        sys.stderr.write(f"kvprof: error: {_one_line(str(exc))}\n")
        return exc.exit_code
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return errors.EXIT_OK
        if isinstance(code, int):
            if isinstance(exc.__context__, BrokenPipeError):
                # rich (the terminal report) and click turn a reader that left (`| head`)
                # into exit 1, which a CI gate reads as "regressed"
                _quiet_stdout()
                return errors.EXIT_BROKEN_PIPE
            return code
        sys.stderr.write(f"kvprof: error: {_one_line(str(code))}\n")  # sys.exit("message") somewhere below
        return errors.EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("kvprof: interrupted\n")
        return errors.EXIT_INTERRUPTED
    except BrokenPipeError:  # `kvprof analyze X --json - | head`: the reader left
        _quiet_stdout()
        return errors.EXIT_BROKEN_PIPE
    except OSError as exc:
        # the disk, the permissions, the descriptors: the machine's state, not kvprof's logic
        if exc.filename is None:  # writing to stdout (a full disk, a closed pipe)
            _quiet_stdout()
            sys.stderr.write(f"kvprof: error: cannot write the output: {exc.strerror or exc}\n")
        else:
            sys.stderr.write(f"kvprof: error: {exc.strerror or exc}: {exc.filename}\n")
        return errors.EXIT_BAD_INPUT


def _one_line(text: str) -> str:
    """Messages carry user-supplied names (paths, metric names): keep them to one line and
    to characters stderr can encode (a lone surrogate from a non-UTF-8 argv)."""
    text = " ".join(str(text).splitlines())
    enc = getattr(sys.stderr, "encoding", None) or "utf-8"
    return text.encode(enc, "backslashreplace").decode(enc, "replace")


def _quiet_stdout() -> None:
    """After a failed write to stdout, the interpreter's own flush at exit would fail again
    and print a second error: point stdout at /dev/null."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
