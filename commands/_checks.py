"""How a command refuses an option: one way for every command.

A command checks its own options with :func:`require`, whose message names the option
("--jobs must be at least 1"); validation that lives in the library (a config's own
checks, a parser of sizes) raises ValueError naming the option, and the command calls it
inside :func:`usage_errors`.  Either way it is a :class:`kvprof.errors.UsageError`: one
line on stderr and exit status EXIT_BAD_INPUT (2), as for typer's own argument errors and
for a number out of its range, which the fast path (_fastpath) refuses the same way.
"""

from __future__ import annotations

import contextlib

from kvprof.errors import UsageError


def require(ok, message: str) -> None:
    """Refuse the command line with ``message`` (one line, naming the option) unless ``ok``."""
    if not ok:
        raise UsageError(message)


@contextlib.contextmanager
def usage_errors():
    """Library-side validation: a ValueError raised inside is the command's usage error."""
    try:
        yield
    except ValueError as exc:
        raise UsageError(str(exc)) from None
