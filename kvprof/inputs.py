"""Reading the small input files a user hands to kvprof (analysis JSON, budget TOML).

Every such file is untrusted: it may be a FIFO (reading it waits for a writer that
never comes), a link to /dev/zero (reading it never ends), gigabytes, or nested
ten thousand levels deep (the parsers recurse).  Each of these is one line and exit 2
(:class:`kvprof.errors.UsageError` / :class:`~kvprof.errors.BundleError`), never a
hang, a traceback or the machine's memory.
"""

from __future__ import annotations

import os
import stat

from kvprof.errors import BundleError

MAX_INPUT_BYTES = 64 << 20  # analysis JSONs of long runs are a few MB; budgets a few KB


def _kind(mode: int) -> str:
    for test, word in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return word
    return "not a regular file"


def check_regular(path: str, what: str, error=BundleError, allow_dir: bool = False) -> None:
    """Raise `error` unless `path` is a regular file (or, with allow_dir, a directory).
    Follows links: a link to /dev/zero is a character device."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    if stat.S_ISREG(st.st_mode) or (allow_dir and stat.S_ISDIR(st.st_mode)):
        return
    raise error(f"{what} {path} is {_kind(st.st_mode)}, not a regular file")


def check_input(path: str) -> None:
    """What `analyze`, `report` and `export` read: a bundle directory or a regular file,
    checked (without reading it) before the outputs are."""
    if not os.path.lexists(path):
        raise BundleError(f"no such file or bundle: {path}")
    check_regular(path, "input", allow_dir=True)


def read_bytes(path: str, what: str, error=BundleError, limit: int = MAX_INPUT_BYTES) -> bytes:
    """The whole of a regular file of at most `limit` bytes.

    Opened without blocking (a FIFO swapped in after a check would otherwise wait for a
    writer), checked on the open descriptor, read up to one byte past the limit."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"no such {what}: {path}") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {path} is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise error(f"{what} {path} is {st.st_size:,} bytes, more than the {limit >> 20} MiB kvprof reads")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:  # it grew while we read
            raise error(f"{what} {path} is more than the {limit >> 20} MiB kvprof reads")
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def parse_guarded(parse, text, path: str, what: str, error=BundleError):
    """`parse(text)`, with a nesting too deep for the parser's recursion (RecursionError) or
    a document too big for memory made one line each."""
    try:
        return parse(text)
    except RecursionError:
        raise error(f"{what} {path} is nested too deeply to read") from None
    except MemoryError:
        raise error(f"{what} {path} is too big to read into memory") from None


def brief(value, limit: int = 60) -> str:
    """A value for a one-line message: its repr (an exception's text), cut to `limit`."""
    try:
        text = str(value) if isinstance(value, BaseException) else repr(value)
    except (RecursionError, ValueError):  # deeply nested, or an int too long to print
        text = f"a {type(value).__name__}"
    text = " ".join(text.splitlines())
    return text if len(text) <= limit else text[: limit - 1] + "…"
