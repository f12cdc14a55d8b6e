"""pytest --kvprof (kvprof/pytest_plugin.py), run on small test suites with pytester: a
leaking test fails with the metric, limit, value and bundle; a clean one passes; the
summary; budgets from pyproject; pytest-xdist; the kept bundle opens with kvprof analyze."""

import json
import os

import pytest

# pytester's in-process runs drop the modules a run imported; numpy's extension cannot be
# loaded twice, so what the plugin uses is imported here, once, for every run
import kvprof.analysis  # noqa: E402,F401
import kvprof.blocks  # noqa: F401
import kvprof.compare  # noqa: F401
import kvprof.probes.heap  # noqa: F401
import kvprof.record  # noqa: F401
import kvprof.trace.reader  # noqa: F401
import kvprof.trace.writer  # noqa: F401
import numpy  # noqa: F401
from tests.conftest import run_kvprof

pytestmark = pytest.mark.slow  # runs pytest sessions that record (make test-quick leaves it out)

SUITE = """
import pytest
import kvprof.blocks


def serve(pool, n, leak=False):
    for i in range(n):
        r = f"r{i}"
        pool.request_arrived(r, prompt_tokens=8)
        pool.alloc([2 * i, 2 * i + 1], request=r)
        pool.request_state(r, filled_tokens=8, blocks_held=2)
        pool.free([2 * i] if leak else [2 * i, 2 * i + 1], request=r)
        pool.request_finished(r)


@pytest.mark.kvprof_budget(**{"blocks.leaked_blocks": 0})
def test_leaks():
    serve(kvprof.blocks.Pool(num_blocks=64, block_size=4, name="leaky"), 10, leak=True)


@pytest.mark.kvprof_budget(**{"blocks.leaked_blocks": 0, "blocks.usage.high_watermark": 0.9})
def test_clean():
    serve(kvprof.blocks.Pool(num_blocks=64, block_size=4, name="clean"), 20)


def test_no_pool():
    assert sum(range(10)) == 45
"""


def _bundles(pytester):
    d = pytester.path / ".kvprof"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_a_leaking_test_fails_with_metric_limit_value_and_bundle_and_a_clean_one_passes(pytester):
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest("--kvprof", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    bundle = pytester.path / ".kvprof" / "test_suite.py__test_leaks.kvprof"
    result.stdout.fnmatch_lines(
        [
            "*kvprof budget exceeded:*",
            "*blocks.leaked_blocks = 10 blocks, above its limit: max 0 blocks (@pytest.mark.kvprof_budget)*",
            f"*bundle: {bundle}*",
            "FAILED test_suite.py::test_leaks - kvprof budget exceeded:*",
        ]
    )
    assert _bundles(pytester) == ["test_suite.py__test_leaks.kvprof"]  # the passing tests' bundles are removed
    # the summary: top tests by peak blocks, heap peak and leaks
    result.stdout.fnmatch_lines(
        [
            "*kvprof: 3 test(s) recorded, bundles in *",
            "peak blocks  usage  heap peak  leaked blocks  heap left  test",
            "*11  17.2%*10*test_suite.py::test_leaks  (over budget)",
            "*2   3.1%*0*test_suite.py::test_clean",
            "1 bundle(s) kept*",
        ]
    )
    assert "test_no_pool" not in result.stdout.str().split("kvprof: 3 test(s)")[1]  # nothing measured: not in the table


def test_the_failing_test_s_bundle_is_an_ordinary_bundle(pytester, tmp_path):
    pytester.makepyfile(test_suite=SUITE)
    pytester.runpytest("--kvprof", "-p", "no:cacheprovider").assert_outcomes(passed=2, failed=1)
    bundle = pytester.path / ".kvprof" / "test_suite.py__test_leaks.kvprof"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["command"] == ["pytest", "test_suite.py::test_leaks"]
    assert [p["role"] for p in manifest["processes"]] == ["main"]
    r = run_kvprof("analyze", str(bundle), "--json", str(tmp_path / "a.json"))
    assert r.returncode == 0, r.stderr
    assert "leaked_blocks" in r.stdout and "leaky@" in r.stdout
    metrics = json.loads((tmp_path / "a.json").read_text())["metrics"]
    assert metrics["blocks.leaked_blocks"]["value"] == 10
    assert [
        p["label"].split("@")[0]
        for p in json.loads((tmp_path / "a.json").read_text())["sections"]["blocks"]["aggregate"]["pools"]
    ] == ["leaky"]


def test_keep_every_bundle_and_choose_the_directory(pytester):
    pytester.makepyfile(test_suite=SUITE)
    out = pytester.path / "bundles"
    pytester.runpytest("--kvprof", "--kvprof-keep", "--kvprof-dir", str(out), "-p", "no:cacheprovider").assert_outcomes(
        passed=2, failed=1
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "test_suite.py__test_clean.kvprof",
        "test_suite.py__test_leaks.kvprof",
        "test_suite.py__test_no_pool.kvprof",
    ]


def test_a_directory_that_cannot_be_made_is_a_usage_error(pytester):
    """Not a warning and every budget silently off: the run stops at the start."""
    pytester.makepyfile(test_suite=SUITE)
    (pytester.path / "file").write_text("")
    r = pytester.runpytest("--kvprof", "--kvprof-dir", str(pytester.path / "file" / "sub"), "-p", "no:cacheprovider")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stderr.fnmatch_lines(["*--kvprof-dir*cannot create it*"])


def test_budgets_from_pyproject_apply_to_every_test(pytester):
    pytester.makepyfile(test_suite=SUITE.replace('@pytest.mark.kvprof_budget(**{"blocks.leaked_blocks": 0})\n', ""))
    pytester.makepyprojecttoml(
        '[tool.kvprof.budgets]\n"blocks.leaked_blocks" = { max = 2 }\n"blocks.usage.*" = { max = 0.5 }\n'
    )
    result = pytester.runpytest("--kvprof", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        ["*blocks.leaked_blocks = 10 blocks, above its limit: max 2 blocks (*pyproject.toml [[]tool.kvprof.budgets])*"]
    )


def test_a_heap_budget_records_the_heap_of_its_test(pytester):
    pytester.makepyfile(
        test_heap="""
import pytest

@pytest.mark.kvprof_budget(**{"heap.peak_bytes": "1 MB"})
def test_hog():
    x = [bytearray(10_000) for _ in range(300)]
    assert len(x) == 300

@pytest.mark.kvprof_budget(**{"heap.peak_bytes": "1 MB"})
def test_small():
    x = [bytearray(1_000) for _ in range(30)]
    assert len(x) == 30
"""
    )
    result = pytester.runpytest("--kvprof", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*heap.peak_bytes = * MiB (*bytes), above its limit: max 976.6 KiB (1,000,000 bytes) (@pytest.mark.kvprof_budget)*"
        ]
    )


def test_a_budget_on_a_metric_the_test_did_not_produce_fails_it(pytester):
    pytester.makepyfile(
        test_x="""
import pytest

@pytest.mark.kvprof_budget(**{"blocks.leaked_blocks": 0})
def test_without_a_pool():
    pass
"""
    )
    result = pytester.runpytest("--kvprof", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*blocks.leaked_blocks: not measured in this test (no block pool was used in this test)*"]
    )


def test_a_bad_marker_is_an_error_of_its_test(pytester):
    pytester.makepyfile(
        test_x="""
import pytest

@pytest.mark.kvprof_budget(**{"heap.peak_bytes": "lots"})
def test_bad():
    pass
"""
    )
    result = pytester.runpytest("--kvprof", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*kvprof: kvprof_budget: heap.peak_bytes='lots' is not a size*"])


def test_without_kvprof_the_plugin_does_nothing(pytester):
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest("--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    assert not (pytester.path / ".kvprof").exists()
    assert "kvprof:" not in result.stdout.str() and "budget" not in result.stdout.str()


def test_a_failing_test_keeps_its_bundle_and_says_where(pytester):
    pytester.makepyfile(
        test_x="""
import kvprof.blocks

def test_fails():
    pool = kvprof.blocks.Pool(num_blocks=8, block_size=4)
    pool.alloc([1, 2])
    assert False, "boom"
"""
    )
    result = pytester.runpytest("--kvprof", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: boom*", "*- kvprof -*", "bundle: *test_x.py__test_fails.kvprof*"])
    manifest = json.loads((pytester.path / ".kvprof" / "test_x.py__test_fails.kvprof" / "manifest.json").read_text())
    assert manifest["target"]["exit_code"] == 1 and manifest["target"]["test"] == "test_x.py::test_fails"


def test_a_pool_from_a_wider_fixture_counts_only_in_the_tests_that_use_it(pytester):
    pytester.makepyfile(
        test_shared="""
import pytest
import kvprof.blocks

@pytest.fixture(scope="module")
def shared():
    return kvprof.blocks.Pool(num_blocks=100, block_size=4, name="shared")

def test_uses_its_own(shared):
    pool = kvprof.blocks.Pool(num_blocks=10, block_size=4, name="own")
    pool.alloc([1, 2])
    pool.free([1, 2])

def test_uses_the_shared_one(shared):
    shared.alloc([5])
    shared.free([5])
"""
    )
    result = pytester.runpytest("--kvprof", "--kvprof-keep", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["*2  20.0%*test_shared.py::test_uses_its_own", "*1   1.0%*test_shared.py::test_uses_the_shared_one"]
    )


@pytest.mark.slow
def test_xdist_one_bundle_per_test_and_one_summary(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(test_suite=SUITE)
    pytester.makepyfile(test_more=SUITE.replace("def test_", "def test_more_"))
    result = pytester.runpytest_subprocess(
        "-n", "2", "--kvprof", "--kvprof-keep", "-p", "no:cacheprovider", timeout=300
    )
    result.assert_outcomes(passed=4, failed=2)
    bundles = _bundles(pytester)
    assert len(bundles) == 6 and all(b.endswith((".gw0.kvprof", ".gw1.kvprof")) for b in bundles), bundles
    workers = {b.rsplit(".", 2)[1] for b in bundles}
    assert workers == {"gw0", "gw1"}
    out = result.stdout.str()
    assert out.count("kvprof: 6 test(s) recorded") == 1  # the controller's summary, not one per worker
    assert "test_suite.py::test_leaks  (over budget)" in out and "test_more.py::test_more_leaks  (over budget)" in out
    for b in bundles:
        assert json.loads((pytester.path / ".kvprof" / b / "manifest.json").read_text())["status"] == "complete"


def test_processes_the_test_starts_are_recorded_into_its_bundle(pytester):
    pytester.makepyfile(
        test_child="""
import multiprocessing as mp
import pytest
import kvprof.blocks


def engine():
    pool = kvprof.blocks.Pool(num_blocks=32, block_size=4, name="engine")
    pool.request_arrived("r", prompt_tokens=4)
    pool.alloc([1, 2, 3], request="r")
    pool.request_finished("r")  # and the blocks never freed


@pytest.mark.kvprof_budget(**{"blocks.leaked_blocks": 0})
def test_engine_in_a_spawned_child():
    p = mp.get_context("spawn").Process(target=engine)
    p.start()
    p.join()
    assert p.exitcode == 0
"""
    )
    result = pytester.runpytest("--kvprof", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*blocks.leaked_blocks = 3 blocks, above its limit: max 0 blocks*"])
    manifest = json.loads(
        (
            pytester.path / ".kvprof" / "test_child.py__test_engine_in_a_spawned_child.kvprof" / "manifest.json"
        ).read_text()
    )
    roles = sorted((p["role"], p["records"].get("blocks.bin", 0)) for p in manifest["processes"])
    assert any(role == "child" and n == 3 for role, n in roles) and ("main", 0) in roles, (
        roles
    )  # (and multiprocessing's resource tracker)
    assert os.environ.get("KVPROF_BUNDLE") is None  # the session's variables are gone after it
