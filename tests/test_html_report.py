"""kvprof report (HTML): the report opens in headless Chromium with no console errors and
every chart painted, trace strings are escaped (the Perfetto export: tests/test_perfetto.py)."""

import html
import json
import os
import re
import sys

import pytest

from tests.conftest import ROOT, WORKLOADS, run_kvprof
from tests.test_perfetto import _validate_trace_events

FIXTURES = os.path.join(ROOT, "fixtures")
ARTIFACTS = os.environ.get("KVPROF_TEST_ARTIFACTS", os.path.join(ROOT, "test-artifacts"))
HOSTILE = '<script>alert("kvprof")</script>'


def _browser():
    from tests import browser_check

    missing = None
    if browser_check.find_chromium() is None:
        missing = "Chromium not installed (make browser: Debian's chromium package)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "playwright not installed (make install)"
    if missing:
        if os.environ.get("KVPROF_REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    return browser_check


def _open(browser, report, name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, f"{name}.png")
    res = browser.check(str(report), shot)
    assert os.path.getsize(shot) > 10_000
    return res


def _assert_clean(res, expect_charts):
    assert res["errors"] == [], res["errors"]
    assert res["dialogs"] == [] and res["network"] == [], res
    names = [c["chart"] for c in res["charts"]]
    for want in expect_charts:
        assert any(n.startswith(want) for n in names), (want, names)
    for c in res["charts"]:
        # a canvas of real size, ink beyond the background, and the chart's data colour on it
        assert c["canvases"] >= 1 and c["area"] > 50_000 and c["inked"] > 2_000 and c["data_pixels"] > 50, c


@pytest.mark.slow
def test_demo_report_renders_in_chromium(tmp_path):
    browser = _browser()
    out = tmp_path / "demo.html"
    r = run_kvprof("report", os.path.join(FIXTURES, "demo.kvprof"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    size = out.stat().st_size
    assert size < 3 * 2**20, size  # self-contained, under a few MB
    text = out.read_text()
    assert not re.search(
        r"<(script|link|img)[^>]+(src|href)=", text
    )  # nothing loaded from elsewhere (the browser check sees no requests either)
    res = _open(browser, out, "report-demo")
    _assert_clean(res, ["usage", "blockmap", "frag-hit", "whatif"])
    assert res["title"] == "kvprof report: demo.kvprof"


@pytest.mark.slow
def test_heap_gc_and_torch_reports_render(tmp_path):
    browser = _browser()
    bundle = tmp_path / "h.kvprof"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(bundle),
        "--probe",
        "tracemalloc,memray,gc",
        "--",
        sys.executable,
        os.path.join(WORKLOADS, "heap_faults.py"),
        "leak",
        "--steps",
        "40",
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "h.html"
    r = run_kvprof("analyze", str(bundle), "--no-report", "--html", str(out))
    assert r.returncode == 0, r.stderr
    _assert_clean(_open(browser, out, "report-heap"), ["heap-leaks", "heap-churn", "heap-exit", "heap-live", "gc"])
    out = tmp_path / "t.html"
    r = run_kvprof("report", os.path.join(FIXTURES, "torch-snapshots", "assignment2-systems.pickle"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    _assert_clean(_open(browser, out, "report-torch"), ["torch-timeline", "torch-segments"])


@pytest.mark.slow
def test_hostile_names_are_escaped(tmp_path):
    bundle = tmp_path / "x.kvprof"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(bundle),
        "--probe",
        "blocks,tracemalloc",
        "--",
        sys.executable,
        os.path.join(WORKLOADS, "hostile_names.py"),
        "<script>alert(3)</script>",
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "x.html"
    r = run_kvprof("report", str(bundle), "-o", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    for raw in (HOSTILE, "<img src=x onerror", "<script>alert(3)"):
        assert raw not in text, raw
    # shown as text: the command line, the marker table, the leak suspect's function and file
    assert html.escape("<script>alert(3)</script>") in text
    assert html.escape(HOSTILE, quote=True) in text
    assert html.escape("<img src=x onerror=alert(2)>.py") in text
    browser = _browser()
    res = _open(browser, out, "report-hostile")
    assert res["dialogs"] == [] and res["errors"] == [], res


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["report", "nope.kvprof", "-o", "x.html"], "no such file or bundle"),
        (["report", os.path.join(FIXTURES, "demo.kvprof"), "-o", "/nonexistent-dir/x.html"], "cannot write"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, message):
    r = run_kvprof(*args, cwd=str(tmp_path))
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def _block_map(events, num_blocks, columns, max_rows):
    """The block-map series of one pool fed through the analyzer, as the analysis pass does."""
    from kvprof.analysis.blocks import BlockAnalyzer
    from kvprof.analysis.timeseries import BlockMapSeries
    from kvprof.trace import chunks
    from kvprof.trace.reader import BlockStream

    s = BlockStream.from_events(events, [{"num_blocks": num_blocks, "block_size": 4}], ["a"])
    a = BlockAnalyzer(s.pools)
    m = BlockMapSeries(s.pools[0], int(s.t[0]), columns=columns, max_rows=max_rows)
    a.observers.append(m)
    for c in chunks.from_stream(s, chunk_events=2):
        a.feed(c)
    a.finish()
    return m.result(int(s.t[-1]), a.reserved)


def test_block_map_groups_large_pools_by_their_busiest_state():
    from kvprof.analysis.blocks import CACHED, EMPTY, IN_USE, RESERVED
    from kvprof.trace.format import EventKind as K

    ev = [
        (0, K.RESERVE, 0, -1, 0, 0, (0,)),
        (10, K.ALLOC, 0, 0, 0, 0, (5, 9)),
        (20, K.CACHE, 0, 0, 0, 0, (9,)),
        (30, K.FREE, 0, 0, 0, 0, (9,)),
        (40, K.ALLOC, 0, 0, 0, 0, (2,)),
    ]
    # 4 columns wanted: 8 kept while recording, the width doubling to fit t=40 (8 ns),
    # then pairs merged to at most 4: columns of 16 ns ending at 16, 32 and 48
    m = _block_map(ev, 12, columns=4, max_rows=12)
    g = m["grid"]
    assert m["blocks_per_row"] == 1 and g.shape == (12, 3) and m["t_s"] == [16e-9, 32e-9, 48e-9]
    assert (g[0] == RESERVED).all() and list(g[5]) == [IN_USE] * 3 and list(g[9]) == [IN_USE, CACHED, CACHED]
    assert list(g[2]) == [EMPTY, EMPTY, IN_USE] and (g[11] == EMPTY).all()
    m = _block_map(ev, 12, columns=4, max_rows=4)  # groups of 3 ids: in use > reserved > cached > free
    g = m["grid"]
    assert m["blocks_per_row"] == 3 and g.shape == (4, 3)
    assert list(g[0]) == [RESERVED, RESERVED, IN_USE]  # ids 0-2: the reserved 0, then 2 in use
    assert list(g[3]) == [IN_USE, CACHED, CACHED]  # ids 9-11
    # every column ends in the state after the last event before its end, however the chunks fall
    ev2 = [(t, K.ALLOC if t % 20 == 0 else K.FREE, 0, 0, 0, 0, (1,)) for t in range(0, 1000, 10)]
    g = _block_map(ev2, 4, columns=8, max_rows=4)
    assert g["grid"].shape[1] <= 8 and g["grid"][1][-1] == EMPTY and (g["grid"][0] == EMPTY).all()


@pytest.mark.slow
def test_a_pool_whose_every_allocation_was_refused(tmp_path):
    """No block ever moved, one refusal: analyze counts it, the report renders, the export keeps it."""
    script = tmp_path / "refused.py"
    script.write_text(
        "import kvprof.blocks\n"
        "pool = kvprof.blocks.Pool(num_blocks=4, block_size=16, name='tiny')\n"
        "pool.request_arrived('big', prompt_tokens=1000)\n"
        "pool.allocation_failed('big', 63, 4)\n"
    )
    out = tmp_path / "r.kvprof"
    assert run_kvprof("record", "-q", "-o", str(out), "--", sys.executable, str(script)).returncode == 0
    r = run_kvprof("analyze", str(out), "--json", "-")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)["metrics"]
    assert m["blocks.allocation_failures"]["value"] == 1 and m["blocks.fragmentation_that_hurts"]["value"] == 0
    r = run_kvprof("report", str(out), "-o", str(tmp_path / "r.html"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    text = (tmp_path / "r.html").read_text()
    assert "<tr><td><code>blocks.allocation_failures</code></td><td class=num>1</td>" in text
    doc = json.loads(run_kvprof("export", str(out), "-o", "-").stdout)
    _validate_trace_events(doc)
    assert [e["name"] for e in doc["traceEvents"] if e["ph"] == "i"] == ["allocation refused big"]


@pytest.mark.slow
def test_charts_share_one_time_origin(tmp_path):
    """A pool idle for a second before its traffic: markers, the usage timeline, the block map
    and the hit rate are all measured from the pool's first event."""
    script = tmp_path / "late.py"
    script.write_text(
        "import time, kvprof, kvprof.blocks\n"
        "pool = kvprof.blocks.Pool(num_blocks=32, block_size=16, name='gpu', reserved=[0])\n"
        "time.sleep(0.5)\n"
        "kvprof.mark('serving_start')\n"
        "for step in range(10):\n"
        "    r = f'r{step}'\n"
        "    pool.request_arrived(r, prompt_tokens=40)\n"
        "    pool.alloc([1 + step, 2 + step], request=r)\n"
        "    pool.request_state(r, filled_tokens=20, blocks_held=2)\n"
        "    time.sleep(0.02)\n"
        "    pool.free([1 + step, 2 + step], request=r)\n"
        "    pool.request_finished(r)\n"
        "kvprof.mark('done')\n"
    )
    out = tmp_path / "l.kvprof"
    assert run_kvprof("record", "-q", "-o", str(out), "--", sys.executable, str(script)).returncode == 0
    from kvprof.analysis import analyze_path

    res = analyze_path(str(out), series=True)
    series = res.series
    tl = res.sections["blocks"]["aggregate"]["timeline"]
    marks = {name: t for t, name, _ in series["markers"]}
    # the first allocation follows the serving_start marker by microseconds, not by the idle half second
    assert 0 <= tl["t_s"][0] - marks["serving_start"] < 0.05, (tl["t_s"][0], marks)
    assert tl["t0_ns"] == series["t0_ns"]
    (bm,) = series["block_maps"]
    assert bm["span_s"] == pytest.approx(marks["done"], abs=0.05) and marks["serving_start"] >= 0.45


@pytest.mark.slow
def test_a_window_is_shaded_and_said(tmp_path):
    out = tmp_path / "w.html"
    r = run_kvprof("report", os.path.join(FIXTURES, "demo.kvprof"), "--window", ":steady_state", "-o", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "These charts and the what-if replay cover the whole run" in text and "BoxAnnotation" in text
    assert "preemptions (50; 6 in the window)" in text


@pytest.mark.slow
def test_report_to_stdout_and_output_errors(tmp_path):
    r = run_kvprof("report", os.path.join(FIXTURES, "demo.kvprof"), "-o", "-", cwd=str(tmp_path))
    assert r.returncode == 0 and r.stdout.startswith("<!DOCTYPE html>") and not os.path.exists(tmp_path / "-")
    r = run_kvprof("analyze", os.path.join(FIXTURES, "demo.kvprof"), "--html", "-")
    assert r.returncode == 2 and r.stderr.startswith("kvprof: error: --html -"), r.stderr
    if os.path.exists("/dev/full"):  # a full disk behind stdout: one line, not a traceback
        for args in (
            ["export", os.path.join(FIXTURES, "demo.kvprof"), "-o", "-"],
            ["analyze", os.path.join(FIXTURES, "demo.kvprof"), "--json", "-"],
        ):
            with open("/dev/full", "w") as full:
                p = __import__("subprocess").run(
                    [sys.executable, "-m", "kvprof.commands", *args], stdout=full, stderr=-1, text=True
                )
            assert (
                p.returncode == 2
                and p.stderr.strip() == "kvprof: error: cannot write the output: No space left on device"
            ), p.stderr


@pytest.mark.slow
def test_a_damaged_manifest_is_one_line(tmp_path):
    import shutil

    bundle = tmp_path / "d.kvprof"
    shutil.copytree(os.path.join(FIXTURES, "demo.kvprof"), bundle)
    man = json.loads((bundle / "manifest.json").read_text())
    for key, bad in (("processes", "x"), ("processes", [1]), ("target", []), ("probe_status", 3)):
        (bundle / "manifest.json").write_text(json.dumps({**man, key: bad}))
        for cmd in (
            ["analyze", str(bundle)],
            ["report", str(bundle), "-o", str(tmp_path / "x.html")],
            ["export", str(bundle), "-o", "-"],
        ):
            r = run_kvprof(*cmd)
            assert r.returncode == 2 and r.stderr.startswith(f"kvprof: error: damaged manifest: '{key}'"), (
                cmd,
                r.stderr,
            )
            assert len(r.stderr.strip().splitlines()) == 1


def test_tex_delimiters_in_names_show_as_typed():
    from kvprof.report.html import _plain

    for name in ("pool$$x^2$$", r"a\(b\)", r"c\[d\]"):
        shown = _plain(name)
        assert shown.replace("\u200b", "") == name
        assert not any(d in shown for d in ("$$", r"\(", r"\)", r"\[", r"\]"))
