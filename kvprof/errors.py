"""Exit codes and expected failures.  Each failure carries the exit code the CLI uses; the
CLI prints one line.

Tracebacks are for bugs only: anything a user can cause (a missing file, a
truncated or foreign bundle, a hostile pickle, a bad option) raises one of these.
A bug is caught once, at the top of ``kvprof.commands.main``, and exits with
EXIT_INTERNAL: never 0 (a CI gate would pass) nor 1 (it would read "regressed").
"""

from __future__ import annotations

# The exit codes, in one place (README "Exit codes" lists them).
EXIT_OK = 0  # success; `compare` / `analyze --budget`: within budget
EXIT_REGRESSED = 1  # `compare` / `analyze --budget`: a metric regressed or broke a budget
EXIT_BAD_INPUT = 2  # bad input or usage, or an output that cannot be written: one line on stderr
EXIT_INTERNAL = 3  # a bug in kvprof (traceback printed), or out of memory
EXIT_CANNOT_EXECUTE = 126  # `record`: the command exists but could not be executed
EXIT_NOT_FOUND = 127  # `record`: the command was not found
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_BROKEN_PIPE = 141  # the reader of stdout left (128 + SIGPIPE, as a shell reports it)
SIGNAL_BASE = 128  # `record`: a target killed by signal N exits 128 + N


class KvprofError(Exception):
    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(KvprofError):
    exit_code = EXIT_BAD_INPUT


class BundleError(KvprofError):
    """A bundle (or another input file) that cannot be read."""

    exit_code = EXIT_BAD_INPUT


class RecordError(KvprofError):
    """The target could not be started, or the bundle path is taken."""

    exit_code = EXIT_BAD_INPUT


class OutputClosed(KvprofError):
    """The program reading kvprof's standard output closed it (``| head``): nothing to say."""

    exit_code = EXIT_BROKEN_PIPE
