"""What a path given to kvprof is: a bundle, a PyTorch memory snapshot, a memray capture,
or something else (an analysis JSON for `compare`).  The one place that decides it."""

from __future__ import annotations

import os

BUNDLE, SNAPSHOT, MEMRAY, OTHER = "bundle", "snapshot", "memray", "other"


def kind_of(path: str) -> str:
    """BUNDLE for a directory, SNAPSHOT or MEMRAY by the file's first bytes, else OTHER."""
    if is_bundle(path):
        return BUNDLE
    if looks_like_memray(path):
        return MEMRAY
    from kvprof.trace.torch_snapshot import looks_like_pickle

    return SNAPSHOT if looks_like_pickle(path) else OTHER


def kind_of_existing(path: str, missing: str = "no such file or bundle") -> str:
    """kind_of a path that must be there: BundleError("{missing}: {path}") when it is not."""
    if not os.path.exists(path):
        from kvprof.errors import BundleError

        raise BundleError(f"{missing}: {path}")
    return kind_of(path)


def require_bundle(path: str, otherwise: str) -> None:
    """For a command that reads bundles only: BundleError "no such bundle" when nothing is
    at ``path``, ``otherwise`` when something that is not a bundle is.  Reads nothing (a
    FIFO would block the read)."""
    if not is_bundle(path):
        from kvprof.errors import BundleError

        raise BundleError(otherwise if os.path.exists(path) else f"no such bundle: {path}")


def is_bundle(path: str) -> bool:
    """A bundle is a directory: what the path alone says, without opening anything."""
    return os.path.isdir(path)


def is_recording(path: str) -> bool:
    """Whether the analysis reads this as a recording (a bundle, a PyTorch snapshot, a
    memray capture) rather than something else, such as an analysis JSON."""
    return kind_of(path) != OTHER


def looks_like_memray(path: str) -> bool:
    """memray's capture files start with b"memray", or an lz4 frame when compressed on exit."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
    except OSError:
        return False
    return head.startswith(b"memray") or (head[:4] == b"\x04\x22\x4d\x18" and b"memray" in head)


def file_hint(path: str) -> str:
    """A hint for the files people mistake for snapshots."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return ""
    if not head:
        return " (an empty file)"
    if head == b"PK\x03\x04":
        return (
            " (a zip archive, as torch.save writes; a memory snapshot is torch.cuda.memory._dump_snapshot()'s pickle)"
        )
    return ""
