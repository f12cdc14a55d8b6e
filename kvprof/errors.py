"""Expected failures.  Each carries the exit code the CLI uses; the CLI prints one line.

Tracebacks are for bugs only: anything a user can cause (a missing file, a
truncated or foreign bundle, a hostile pickle, a bad option) raises one of these.
"""

from __future__ import annotations


class KvprofError(Exception):
    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(KvprofError):
    exit_code = 2


class BundleError(KvprofError):
    """A bundle (or another input file) that cannot be read."""

    exit_code = 2


class RecordError(KvprofError):
    """The target could not be started."""

    exit_code = 2
