"""The kvprof command line: one module per subcommand, registered in COMMANDS.

The CLI only parses arguments and calls the library.  Expected failures
(:class:`kvprof.errors.KvprofError`) become one line on stderr and their exit
code; tracebacks are for bugs.

Start-up: ``--version`` imports nothing but kvprof's version; an ordinary command
line is parsed by :mod:`kvprof.commands._fastpath` from the commands' own typer
declarations, without building the typer app (typer 0.26+ would import pydantic
and build a TypeAdapter per parameter: 0.15 s); ``--help``, shell completion and
any line the fast path leaves go to typer, built on first use (:func:`build_app`).
"""

from __future__ import annotations

import importlib
import os
import sys

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
HELP = "Memory profiler for LLM serving: KV block pools, heap, PyTorch and GPU memory in one trace."
COMPLETE_VAR = "_KVPROF_COMPLETE"  # set by the shell completion scripts (typer's protocol)

_app = None


def build_app():
    """The typer app with every command registered: for --help, shell completion and any
    command line the fast path leaves to typer (see _fastpath)."""
    global _app
    if _app is not None:
        return _app
    import typer

    from kvprof.commands import completion
    from kvprof.report.format import no_color

    app = typer.Typer(
        name="kvprof",
        help=HELP,
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
        rich_markup_mode=None if no_color() else "rich",  # NO_COLOR: click's plain help, no styles at all
    )

    @app.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ):
        """Memory profiler for LLM serving."""

    for module, name in COMMANDS:
        mod = importlib.import_module(f"kvprof.commands.{module}")
        completion.attach(mod.run)
        app.command(name, **getattr(mod, "COMMAND_SETTINGS", {}))(mod.run)
    _app = app
    return app


def _version(value: bool):
    if value:
        import typer

        from kvprof.errors import EXIT_OK

        typer.echo(f"kvprof {__version__}")
        raise typer.Exit(EXIT_OK)


def __getattr__(name: str):  # `from kvprof.commands import app`: built on first use
    if name == "app":
        return build_app()
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> int:
    """The CLI's exit status (kvprof.errors: EXIT_*).  Expected failures are one line; any
    other exception is a bug: its traceback, a line asking for a report, EXIT_INTERNAL."""
    from kvprof import errors

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except MemoryError:
        sys.stderr.write("kvprof: error: out of memory\n")
        return errors.EXIT_INTERNAL
    except Exception:
        import traceback

        traceback.print_exc()
        sys.stderr.write(
            f"kvprof: internal error: this is a bug in kvprof {__version__}; please report it, "
            "with the command you ran and the traceback above\n"
        )
        return errors.EXIT_INTERNAL


def _dispatch(argv: list[str]) -> int:
    """Run one command line: the fast path when it can parse it (no typer app, no pydantic),
    else typer."""
    from kvprof import errors

    if os.environ.get(COMPLETE_VAR):
        # a shell asking for completions: typer renders the help texts it answers with
        # through rich, which would wrap them at 80 columns, and fish reads each line as
        # an answer of its own
        os.environ["COLUMNS"] = "10000"
    else:
        if argv == ["--version"]:
            sys.stdout.write(f"kvprof {__version__}\n")
            return errors.EXIT_OK
        names = dict((name, module) for module, name in COMMANDS)
        if argv and argv[0] in names:
            from kvprof.commands import _fastpath

            mod = importlib.import_module(f"kvprof.commands.{names[argv[0]]}")
            kwargs = None if getattr(mod, "COMMAND_SETTINGS", None) else _fastpath.parse(mod.run, argv[1:], argv[0])
            if kwargs is not None:
                rc = mod.run(**kwargs)
                return rc if isinstance(rc, int) else errors.EXIT_OK
    rc = build_app()(args=argv, prog_name="kvprof", standalone_mode=False)
    return rc if isinstance(rc, int) else errors.EXIT_OK


def _main(argv: list[str]) -> int:
    from kvprof import errors

    try:
        return _dispatch(argv)
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
    except Exception as exc:
        rc = _typer_exception(exc)
        if rc is None:
            raise
        return rc


def _typer_exception(exc: Exception) -> int | None:
    """typer's and click's own exceptions (argument errors, Exit, Abort): their exit code,
    argument errors as one line; None for anything else.  Only when typer was imported:
    nothing else raises them."""
    from kvprof import errors

    if "typer" not in sys.modules:
        return None
    import typer

    cx = _click().exceptions

    def kinds(*names):  # the classes of these names that this typer (or its click) has
        return tuple(k for m in (cx, typer) for k in (getattr(m, n, None) for n in names) if isinstance(k, type))

    if isinstance(exc, kinds("UsageError")):  # typer's own argument errors: one line too
        if not exc.format_message():  # `kvprof` alone: the help was the answer
            return exc.exit_code
        cmd = exc.ctx.command_path if exc.ctx is not None else "kvprof"
        sys.stderr.write(f"kvprof: error: {_one_line(exc.format_message())} (see `{cmd} --help`)\n")
        return errors.EXIT_BAD_INPUT
    if isinstance(exc, kinds("Abort")):
        sys.stderr.write("kvprof: interrupted\n")
        return errors.EXIT_INTERRUPTED
    if isinstance(exc, kinds("Exit")):
        return exc.exit_code
    return None


def _click():
    """The click typer runs on: its own copy (typer >= 0.26 vendors it as typer._click), else click."""
    try:
        from typer import _click as click
    except ImportError:
        import click
    return click


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
