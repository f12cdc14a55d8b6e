"""The one way a command refuses an option (commands/_checks.py), the one place that says
what an input is (kvprof.analysis.sources), and compare's files through the one writer."""

import os

import pytest

from kvprof.analysis import sources
from kvprof.commands._checks import require, usage_errors
from kvprof.errors import EXIT_BAD_INPUT, BundleError, UsageError


def test_require_and_usage_errors_are_one_line_usage_errors():
    require(True, "--jobs must be at least 1")
    with pytest.raises(UsageError, match=r"^--jobs must be at least 1$") as exc:
        require(False, "--jobs must be at least 1")
    assert exc.value.exit_code == EXIT_BAD_INPUT
    with pytest.raises(UsageError, match=r"^--block-size must be between 1 and 4096, not 0$") as exc:
        with usage_errors():
            raise ValueError("--block-size must be between 1 and 4096, not 0")
    assert exc.value.__cause__ is None and exc.value.exit_code == EXIT_BAD_INPUT
    with pytest.raises(KeyError):  # only ValueError is the library's way of refusing an option
        with usage_errors():
            raise KeyError("x")


def test_kind_of_existing(tmp_path):
    with pytest.raises(BundleError, match="no such file or bundle: "):
        sources.kind_of_existing(str(tmp_path / "nope"))
    with pytest.raises(BundleError, match="^no such bundle: "):
        sources.kind_of_existing(str(tmp_path / "nope"), "no such bundle")
    assert sources.kind_of_existing(str(tmp_path)) == sources.BUNDLE
    (tmp_path / "x.json").write_text("{}")
    assert sources.kind_of_existing(str(tmp_path / "x.json")) == sources.OTHER


def test_compare_files_are_written_whole(tmp_path, monkeypatch):
    """Markdown and JUnit go through trace.atomic.write_output like the JSON: no temporary
    file left, an unwritable path one usage error."""
    from tests.test_writers import _comparison

    from kvprof.report import compare as render

    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    md, xml = tmp_path / "c.md", tmp_path / "c.xml"
    md.write_text("old " * 10000)
    render.write_all(_comparison(), str(md), str(xml))
    assert md.read_text(encoding="utf-8").startswith(
        render.markdown(_comparison())[:20]
    ) and "old old" not in md.read_text(encoding="utf-8")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    with pytest.raises(UsageError, match="cannot write "):
        render.write_all(_comparison(), str(tmp_path / "no" / "such" / "c.md"))


def test_require_bundle_reads_nothing(tmp_path):
    require = sources.require_bundle
    require(str(tmp_path), "unused")
    with pytest.raises(BundleError, match="^no such bundle: "):
        require(str(tmp_path / "nope"), "not a bundle")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it to read would block: require_bundle must not
    with pytest.raises(BundleError, match="^not a bundle$"):
        require(str(fifo), "not a bundle")


@pytest.mark.parametrize(
    "args",
    [
        ("report", "{demo}", "-o", "{tmp}/no/r.html"),
        ("analyze", "{demo}", "--json", "{tmp}/no/a.json"),
        ("analyze", "{demo}", "--html", "{tmp}"),
        ("compare", "{demo}", "{demo}", "--junit", "{tmp}/no/j.xml"),
        ("whatif", "{demo}", "--json", "{tmp}/no/w.json"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_the_work(args, tmp_path):
    """Refused in one line before the input is read (a report of an hour's recording would
    be built, then thrown away): the input here is an empty directory, which reading would
    refuse with another message."""
    from tests.conftest import run_kvprof

    (tmp_path / "empty").mkdir()
    r = run_kvprof(*(a.format(demo=tmp_path / "empty", tmp=tmp_path) for a in args))
    assert r.returncode == 2 and r.stderr.startswith("kvprof: error: cannot write ") and r.stderr.count("\n") == 1, (
        r.stderr
    )


def test_an_output_is_judged_where_it_is_written(tmp_path, monkeypatch):
    """Through a link, the directory written is the target's (as the atomic writer writes):
    a link in a directory the user cannot write, to a file in one they can, is accepted;
    a device or a pipe (`--json /dev/stdout`) is written in place."""
    from kvprof.trace.atomic import check_output

    ro, w = tmp_path / "ro", tmp_path / "w"
    ro.mkdir()
    w.mkdir()
    (w / "out.json").write_text("{}")
    (ro / "out.json").symlink_to(w / "out.json")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(ro)) else real_access(p, mode))
    check_output(str(ro / "out.json"))
    with pytest.raises(UsageError, match="is not writable"):
        check_output(str(ro / "new.json"))
    r, wfd = os.pipe()
    try:
        check_output(f"/proc/self/fd/{wfd}")
    finally:
        os.close(r)
        os.close(wfd)
