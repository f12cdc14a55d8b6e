"""Value formatting and the terminal console shared by the text renderers (terminal, Markdown)."""

from __future__ import annotations

import os

DEFAULT_WIDTH = 80


def no_color() -> bool:
    """NO_COLOR (https://no-color.org): set and not empty."""
    return bool(os.environ.get("NO_COLOR"))


def term_width(default: int = DEFAULT_WIDTH) -> int:
    """Columns of the terminal on stdout ($COLUMNS first).  A terminal that reports 0
    columns (a pty nobody sized: `docker exec -t`, some CI runners), or no terminal at all,
    gets ``default``."""
    import shutil

    return shutil.get_terminal_size((default, 24)).columns or default


def console(width: int | None = None, **kwargs):
    """A rich Console for a report.  Under NO_COLOR it writes no escape sequence at all:
    rich's own NO_COLOR handling drops the colours but keeps bold, dim and italic."""
    from rich.console import Console

    if no_color():
        kwargs["color_system"] = None
    kwargs.setdefault("highlight", False)
    kwargs.setdefault("soft_wrap", False)
    return Console(width=width, **kwargs)


def value(v, unit: str) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if unit == "ratio":
        return f"{100 * v:.1f}%"
    if unit == "seconds":
        if v < 1e-3:
            return f"{v * 1e6:.0f} µs"
        if v < 1:
            return f"{v * 1e3:.1f} ms"
        return f"{v:.2f} s"
    if unit == "bytes":
        return bytes_(v)
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
        text = f"{int(v):,}"
    else:
        text = f"{v:,.2f}"
    suffix = {"blocks": " block", "tokens": " token", "slots": " slot"}.get(unit)
    if suffix:
        return text + suffix + ("" if text == "1" else "s")
    return text + ("/s" if unit == "1/s" else "")


def bytes_(n) -> str:
    n = float(n)
    for u in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or u == "TiB":
            return f"{n:.0f} {u}" if u == "B" else f"{n:.1f} {u}"
        n /= 1024
    return f"{n:.1f} TiB"
