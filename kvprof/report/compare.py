"""Renderers of a Comparison (kvprof.compare): terminal, Markdown, JUnit XML, JSON.

They format; every verdict was decided in kvprof.compare.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from xml.etree import ElementTree as ET

from kvprof.compare import FAIL, IMPROVED, WORSE_OK, Comparison, Row
from kvprof.errors import UsageError
from kvprof.report import format as fmt

STYLE = {FAIL: "bold red", WORSE_OK: "yellow", IMPROVED: "green"}


def _text(s) -> str:
    """A name or path from the runs (metric names, file names from argv) as text every
    output can hold: a lone surrogate (a non-UTF-8 file name) becomes its backslash escape,
    and characters XML 1.0 forbids (control characters) their escape too."""
    s = str(s)
    if s.isprintable() and s.isascii():
        return s
    out = []
    for ch in s:
        cp = ord(ch)
        if 0xD800 <= cp <= 0xDFFF or (cp < 0x20 and ch not in "\t\n\r") or cp in (0xFFFE, 0xFFFF):
            out.append(ch.encode("unicode_escape").decode("ascii") if cp >= 0x20 else f"\\x{cp:02x}")
        else:
            out.append(ch)
    return "".join(out)


def _value(v, unit) -> str:
    return fmt.value(v, unit)


def _short(v, unit) -> str:
    """A value without its unit word (the metric name says it): for table cells."""
    if unit in ("ratio", "seconds", "bytes") or v is None:
        return fmt.value(v, unit)
    return fmt.value(v, "count") + ("/s" if unit == "1/s" else "")


def _change(r: Row) -> str:
    if r.delta is None:
        return ""
    if abs(r.delta) <= 1e-12:
        return "0"
    if r.unit == "ratio":
        return f"{100 * r.delta:+.2f} pt"
    if r.rel is None or math.isinf(r.rel):
        return ("+" if r.delta > 0 else "-") + _short(abs(r.delta), r.unit)
    return f"{100 * r.rel:+.1f}%"


def _why(r: Row) -> str:
    failed = [c.message for c in r.checks if not c.passed]
    if failed:
        return "; ".join(failed)
    notes = []
    if r.judged_on_spread:
        notes.append(f"median of {r.base_runs} vs {r.new_runs} runs, base spread {_value(r.base_spread, r.unit)}")
    if r.noisy:
        notes.append("noisy")
    return ", ".join(notes)


def title(c: Comparison) -> str:
    n = len(c.failures)
    checked = sum(1 for r in c.rows if r.checks)
    if n:
        names = ", ".join(_text(r.name) for r in c.failures[:3]) + (", …" if n > 3 else "")
        return f"FAILED: {n} of {checked} checked metrics regressed or broke a budget ({names})"
    return f"passed: {checked} checked metrics within budget"


def terminal(c: Comparison, width: int | None = None, console=None, show_all: bool = False) -> None:
    """The table (regressions first; unchanged rows only with show_all), then why each failure failed."""
    from rich.table import Table
    from rich.text import Text

    from kvprof.compare import NO_DATA, UNCHANGED
    from kvprof.report.format import term_width

    if console is None:
        from kvprof.report.format import console as make_console

        console = make_console(width=width or term_width(), markup=False)  # paths may hold [brackets]
    if c.base:
        console.print(
            Text("kvprof compare", style="bold")
            + Text(f"  base: {_text(', '.join(c.base))}  new: {_text(', '.join(c.new))}", style="dim")
        )
    else:
        console.print(Text("kvprof budget check", style="bold") + Text(f"  {_text(', '.join(c.new))}", style="dim"))
    console.print(
        f"budgets: {_text(c.budgets or 'none (defaults)')}; tolerance {100 * c.tolerance:g}%, noisy metrics {100 * c.noisy_tolerance:g}%",
        style="dim",
    )
    shown = [r for r in c.rows if show_all or r.verdict not in (UNCHANGED, NO_DATA)]
    if shown:
        table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        table.add_column("metric", overflow="fold")
        if c.base:
            table.add_column("base", justify="right", no_wrap=True)
        table.add_column("new", justify="right", no_wrap=True)
        if c.base:
            table.add_column("change", justify="right", no_wrap=True)
        table.add_column("verdict", no_wrap=True)
        for r in shown:
            cells: list = [_text(r.name)] + ([_short(r.base, r.unit)] if c.base else []) + [_short(r.new, r.unit)]
            cells += [_change(r)] if c.base else []
            mark = "*" if r.judged_on_spread else ""
            cells.append(Text(r.verdict + mark, style=STYLE.get(r.verdict, "")))
            table.add_row(*cells)
        console.print(table)
    hidden = len(c.rows) - len(shown)
    if hidden:
        console.print(f"{hidden} more metric(s) unchanged or without data (--all lists them)", style="dim")
    if any(r.judged_on_spread for r in shown):
        console.print("* judged on medians, beyond the spread of the base runs", style="dim")
    for r in c.failures:
        console.print(Text("✗ ", style="bold red") + Text(_text(r.name), style="bold") + Text(": " + _text(_why(r))))
    console.print(Text(title(c), style="bold red" if c.failures else "bold green"))


def markdown(c: Comparison) -> str:
    def esc(s: str) -> str:
        return _text(str(s).replace("|", "\\|").replace("\n", " "))

    out = [f"### kvprof compare: {'❌ ' if c.failures else '✅ '}{esc(title(c))}", ""]
    if c.base:
        out.append(
            f"Base: {esc(', '.join(c.base))} · New: {esc(', '.join(c.new))} · Budgets: {esc(c.budgets or 'none (defaults)')}"
        )
        out += ["", "| metric | base | new | change | verdict | details |", "|---|---:|---:|---:|---|---|"]
    else:
        out.append(f"Run: {esc(', '.join(c.new))} · Budgets: {esc(c.budgets or 'none')}")
        out += ["", "| metric | value | verdict | details |", "|---|---:|---|---|"]
    for r in c.rows:
        verdict = f"**{r.verdict}**" if r.verdict == FAIL else r.verdict
        if c.base:
            out.append(
                f"| `{esc(r.name)}` | {esc(_value(r.base, r.unit))} | {esc(_value(r.new, r.unit))} | {esc(_change(r))} | {verdict} | {esc(_why(r))} |"
            )
        else:
            out.append(f"| `{esc(r.name)}` | {esc(_value(r.new, r.unit))} | {verdict} | {esc(_why(r))} |")
    return "\n".join(out) + "\n"


def junit(c: Comparison) -> str:
    """One testcase per checked metric; failures carry the numbers.  Follows the common
    JUnit XML layout CI systems read (Jenkins xUnit's junit-10 schema)."""
    checked = [r for r in c.rows if r.checks]
    failures = sum(1 for r in checked if r.failed)
    skipped = sum(1 for r in checked if not r.failed and r.new is None)
    root = ET.Element(
        "testsuites", name="kvprof compare", tests=str(len(checked)), failures=str(failures), errors="0", time="0"
    )
    suite = ET.SubElement(
        root,
        "testsuite",
        name="kvprof.compare",
        tests=str(len(checked)),
        failures=str(failures),
        errors="0",
        skipped=str(skipped),
        time="0",
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
        hostname=socket.gethostname(),
    )
    props = ET.SubElement(suite, "properties")
    for key, val in (("base", ", ".join(c.base)), ("new", ", ".join(c.new)), ("budgets", c.budgets or "none")):
        ET.SubElement(props, "property", name=key, value=_text(val))
    for r in checked:
        name = _text(r.name)
        case = ET.SubElement(suite, "testcase", name=name, classname=f"kvprof.{name.split('.')[0]}", time="0")
        if r.failed:
            bad = [ch for ch in r.checks if not ch.passed]
            el = ET.SubElement(
                case,
                "failure",
                message=_text(f"{r.name}: " + "; ".join(ch.message for ch in bad)),
                type="budget" if any(ch.kind != "direction" for ch in bad) else "regression",
            )
            el.text = _text(
                "\n".join(
                    [
                        f"base: {_value(r.base, r.unit)} ({r.base_runs} run(s))",
                        f"new: {_value(r.new, r.unit)} ({r.new_runs} run(s))",
                    ]
                    + [f"{ch.kind}{' [' + ch.pattern + ']' if ch.pattern else ''}: {ch.message}" for ch in r.checks]
                )
            )
        elif r.new is None:
            ET.SubElement(case, "skipped", message=f"{r.verdict}: no value to check")
        else:
            ET.SubElement(case, "system-out").text = _text("; ".join(ch.message for ch in r.checks))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _append(path: str, text: str) -> None:
    """Add to a file another step may have written (GitHub concatenates step summaries):
    appended, not replaced, so not through kvprof.trace.atomic."""
    try:
        with open(path, "a", encoding="utf-8", errors="backslashreplace") as fh:
            fh.write(text)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None


def write_all(c: Comparison, markdown_path=None, junit_path=None, json_path=None) -> list[str]:
    """Write the requested files (and $GITHUB_STEP_SUMMARY when set); returns what was written.
    Each file is written whole or not at all, '-' is stdout (kvprof.trace.atomic.write_output)."""
    from kvprof.trace.atomic import write_output

    written = []
    if markdown_path:
        write_output(markdown_path, markdown(c))
        written.append(markdown_path)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        _append(summary, markdown(c))
        written.append(summary)
    if junit_path:
        write_output(junit_path, junit(c))
        written.append(junit_path)
    if json_path:
        text = json.dumps(c.to_json(), indent=1) + "\n"  # ensure_ascii: lone surrogates escaped
        write_output(json_path, text)
        if json_path != "-":
            written.append(json_path)
    return written
