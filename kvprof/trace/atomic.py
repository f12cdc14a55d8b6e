"""Atomic file replacement: readers see the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile


def _replace(path: str, write, sync: bool) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
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


def write_json_atomic(path: str, data) -> None:
    _replace(path, lambda fh: json.dump(data, fh, indent=1, default=str), sync=True)


def write_text(path: str, text: str, sync: bool = False) -> None:
    """Write a text file whole or not at all (a report a reader may be opening), with the
    permissions a new file gets (mkstemp's are private; a report is for sharing);
    `sync` waits for the disk (a record that must survive the process dying next)."""

    def write(fh):
        fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fh.fileno(), 0o666 & ~umask)

    _replace(path, write, sync=sync)


def write_output(path: str, text: str) -> None:
    """A command's output file: '-' is stdout, anything else is written whole or not at all;
    a path that cannot be written is a one-line usage error."""
    import sys

    from kvprof.errors import UsageError

    if path == "-":
        sys.stdout.write(text)
        return
    try:
        write_text(path, text)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
