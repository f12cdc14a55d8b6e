"""Atomic file replacement: readers see the old file or the new one, never half of one.

Every writer here takes any str: a lone surrogate (from a non-UTF-8 argv or file name,
which Python keeps as U+DC80..U+DCFF) is written as a backslash escape, never raised as
UnicodeEncodeError; JSON escapes it as \\udcff, which is valid JSON."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from collections.abc import Callable
from typing import IO, Any


def _replace(path: str, write: Callable[[IO[str]], None], sync: bool) -> None:
    """Write through a temporary file renamed over `path`.  A link is followed (the file it
    names is replaced, not the link); an existing path that is not a regular file (/dev/null,
    /dev/stdout, a FIFO) is written in place: renaming over it would put a regular file where
    a device was (as root, `-o /dev/null` would replace the machine's /dev/null;
    tests/test_writers.py::test_writing_to_a_device_or_through_a_link_replaces_neither)."""
    path = os.path.realpath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        with open(path, "w", encoding="utf-8", errors="backslashreplace") as fh:
            write(fh)
        return
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as fh:
            write(fh)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (os.umask can only
    be read by setting it, which for a moment applies to every thread of the target)."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _shareable(fh: IO[str]) -> None:
    """The permissions a new file gets (mkstemp's are private; a bundle and a report are for
    sharing).  Only on the temporary file: a device written in place keeps its own."""
    if stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
        os.fchmod(fh.fileno(), 0o666 & ~_umask())


def write_json_atomic(path: str, data: Any) -> None:
    # ensure_ascii (the default): every non-ASCII character, lone surrogates included, escaped
    def write(fh: IO[str]) -> None:
        json.dump(data, fh, indent=1, default=str, ensure_ascii=True)
        _shareable(fh)

    _replace(path, write, sync=True)


def write_text(path: str, text: str, sync: bool = False) -> None:
    """Write a text file whole or not at all (a report a reader may be opening), with the
    permissions a new file gets; `sync` waits for the disk (a record that must survive the
    process dying next)."""

    def write(fh: IO[str]) -> None:
        fh.write(text)
        _shareable(fh)

    _replace(path, write, sync=sync)


def write_output(path: str, text: str) -> None:
    """A command's output file: '-' is stdout, anything else is written whole or not at all;
    a path that cannot be written is a one-line usage error."""
    import sys

    from kvprof.errors import UsageError

    if path == "-":
        _write_stdout(sys.stdout, text)
        return
    try:
        write_text(path, text)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None


def check_output(path: str | None) -> None:
    """Refuse, before any work, an output path that can never be written (its directory is
    missing or read-only, or it is a directory): one-line usage error, as write_output's.
    Judged as _replace writes: through links, a device or a pipe written in place."""
    import os

    from kvprof.errors import UsageError

    if not path or path == "-":
        return
    if os.path.isdir(path):
        raise UsageError(f"cannot write {path}: it is a directory")
    if os.path.exists(path) and not os.path.isfile(path):  # /dev/stdout to a pipe, a FIFO: written in place
        return
    parent = os.path.dirname(os.path.realpath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write {path}: no directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {path}: the directory {parent} is not writable")


def _write_stdout(stream: IO[str], text: str) -> None:
    """Text to standard output, all of it, whatever its encoding holds.

    Characters the stream cannot encode (a lone surrogate; an ASCII locale) go out as
    backslash escapes.  The bytes go through the binary buffer in a loop: unbuffered
    (PYTHONUNBUFFERED=1), the text layer takes a partial write of a pipe whose reader
    left as done and drops the rest without an error.  A reader that left is
    OutputClosed (exit 141), not a success and not a regression."""
    from kvprof.errors import OutputClosed

    enc = getattr(stream, "encoding", None) or "utf-8"
    buffer = getattr(stream, "buffer", None)
    try:
        if buffer is None:  # a stream without bytes underneath (a test's StringIO)
            stream.write(text.encode(enc, "backslashreplace").decode(enc, "replace"))
            return
        stream.flush()
        view = memoryview(text.encode(enc, "backslashreplace"))
        while view:
            written = buffer.write(view)
            if written is None:  # a non-blocking stdout that is full: wait for room
                import select

                select.select([], [buffer], [], 1.0)
                continue
            view = view[written:]
        buffer.flush()
    except BrokenPipeError:
        raise OutputClosed("the reader of the standard output closed it") from None
