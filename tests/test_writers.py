"""Every output writer takes any str: a lone surrogate (a non-UTF-8 argv or file name, as
Python decodes it) is escaped, never a UnicodeEncodeError."""

import io
import json
import os
import sys

import pytest

from kvprof.compare import Check, Comparison, Row, FAIL
from kvprof.report import compare as render
from kvprof.report import json_report
from kvprof.trace import atomic

LONE = "step\udcff"  # kvprof.mark(b"step\xff".decode(errors="surrogateescape"))
HIGH = "x\ud800y"  # a lone high surrogate: not even surrogateescape encodes it


@pytest.mark.parametrize("text", [LONE, HIGH])
def test_write_text_and_write_output_escape_it(tmp_path, text):
    p = tmp_path / "out.txt"
    atomic.write_text(str(p), f"<p>{text}</p>\n")
    assert p.read_bytes() == f"<p>{text}</p>\n".encode("utf-8", "backslashreplace")
    atomic.write_output(str(tmp_path / "o.txt"), text)
    assert (tmp_path / "o.txt").read_text(encoding="utf-8") == text.encode("utf-8", "backslashreplace").decode()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


@pytest.mark.parametrize("text", [LONE, HIGH])
def test_write_output_to_stdout_escapes_it(monkeypatch, text):
    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    atomic.write_output("-", f"a {text} b\n")
    stdout.flush()
    assert raw.getvalue() == f"a {text} b\n".encode("utf-8", "backslashreplace")


def test_write_json_atomic_gives_valid_json_that_reads_back(tmp_path):
    p = tmp_path / "m.json"
    atomic.write_json_atomic(str(p), {"command": ["python", LONE], HIGH: 1})
    raw = p.read_bytes()
    raw.decode("ascii")  # every non-ASCII character escaped
    assert json.loads(raw) == {"command": ["python", LONE], HIGH: 1}


class _Result:
    def to_json(self):
        return {
            "schema": "kvprof.analysis/1",
            "metrics": {},
            "sections": {"marks": [LONE, HIGH]},
            "source": {"bundle": f"/tmp/{LONE}.kvprof"},
            "findings": [{"title": f"marker {LONE}"}],
        }


def test_the_analysis_json_writer(tmp_path, monkeypatch, capfd):
    p = tmp_path / "a.json"
    json_report.write(_Result(), str(p))
    assert json.loads(p.read_text(encoding="ascii"))["sections"]["marks"] == [LONE, HIGH]
    json_report.write(_Result(), "-")
    assert json.loads(capfd.readouterr().out)["findings"][0]["title"] == f"marker {LONE}"


def _comparison():
    row = Row(
        name=f"heap.{LONE}",
        unit="bytes",
        better="lower",
        noisy=False,
        base=1.0,
        new=2.0,
        base_runs=1,
        new_runs=1,
        delta=1.0,
        rel=1.0,
        base_spread=None,
        judged_on_spread=False,
        verdict=FAIL,
        checks=[Check("max", 0.0, False, f"2 B > max 0 B in {HIGH}", f"heap.{LONE}")],
    )
    return Comparison(
        base=[f"/runs/{LONE}.json"],
        new=[f"/runs/{HIGH}\x01.json"],
        budgets=f"b{LONE}.toml",
        tolerance=0.0,
        noisy_tolerance=0.1,
        rows=[row],
    )


def test_compare_markdown_junit_and_json_files(tmp_path, monkeypatch):
    from xml.etree import ElementTree as ET

    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "summary.md"))
    c = _comparison()
    md, xml, js = tmp_path / "c.md", tmp_path / "c.xml", tmp_path / "c.json"
    render.write_all(c, str(md), str(xml), str(js))
    text = md.read_text(encoding="utf-8")
    assert "heap.step\\udcff" in text and "x\\ud800y" in text
    assert (tmp_path / "summary.md").read_text(encoding="utf-8") == text
    root = ET.fromstring(xml.read_bytes())  # well-formed XML: no surrogate, no control character
    case = root.find("testsuite").find("testcase")
    assert case.get("name") == "heap.step\\udcff" and "x\\ud800y" in case.find("failure").get("message")
    assert "\\x01" in root.find("testsuite").find("properties")[1].get("value")
    assert json.loads(js.read_text(encoding="ascii"))["rows"][0]["name"] == f"heap.{LONE}"


def test_compare_json_and_terminal_to_stdout(capfd):
    c = _comparison()
    render.write_all(c, json_path="-")
    assert json.loads(capfd.readouterr().out)["failures"] == [f"heap.{LONE}"]
    from rich.console import Console

    buf = io.StringIO()
    render.terminal(c, console=Console(file=buf, width=120))
    buf.getvalue().encode("utf-8")  # printable anywhere
    assert "heap.step\\udcff" in buf.getvalue()


def test_writing_to_a_device_or_through_a_link_replaces_neither(tmp_path):
    """`-o /dev/null` as root renamed a regular file over the machine's /dev/null."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    import threading

    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    atomic.write_text(str(fifo), "through the fifo\n")
    reader.join(10)
    assert got == [b"through the fifo\n"] and fifo.is_fifo()
    target = tmp_path / "real.json"
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    atomic.write_json_atomic(str(link), {"a": 1})
    assert link.is_symlink() and json.loads(target.read_text()) == {"a": 1}
    import stat

    null = tmp_path / "null"  # a /dev/null of our own: the machine's is shared with other runs
    try:
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, AttributeError):
        null = None
    if null is not None:
        before = os.stat(null)
        atomic.write_output(str(null), "discarded\n")
        atomic.write_json_atomic(str(null), {"discarded": True})
        after = os.stat(null)
        assert stat.S_ISCHR(after.st_mode) and (after.st_mode, after.st_rdev) == (before.st_mode, before.st_rdev)
    with pytest.raises(IsADirectoryError):
        atomic.write_text(str(tmp_path), "x")
