"""kvprof.owncode names code that exists: a rename or a move fails here, not silently in
the CPU and heap analyses (which would count kvprof's idle threads or own allocations as
the program's)."""

from __future__ import annotations

import importlib
import os

import pytest

from kvprof import owncode
from kvprof.analysis import cpu
from tests.conftest import ROOT


@pytest.mark.parametrize(("qualname", "suffix"), owncode.IDLE_LOOPS)
def test_each_idle_loop_is_a_function_of_that_file(qualname, suffix):
    path = os.path.join(ROOT, suffix)
    assert os.path.isfile(path), suffix
    module = importlib.import_module(suffix[: -len(".py")].replace("/", "."))
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        assert obj is not None, f"{qualname} is not in {suffix}"
    code = obj.__code__
    assert os.path.realpath(code.co_filename) == os.path.realpath(path)
    assert getattr(code, "co_qualname", obj.__qualname__) == qualname  # the name py-spy reports


def test_each_own_code_fragment_names_a_file_or_folder_of_kvprof():
    for part in owncode.OWN_CODE:
        assert part.startswith("/kvprof/"), part
        rel = part[len("/") :].rstrip("/")
        target = os.path.join(ROOT, rel)
        assert os.path.isdir(target) if part.endswith("/") else os.path.isfile(target), part


def test_the_cpu_analysis_finds_a_listed_loop_asleep():
    frames = [
        {"name": "Thread.run", "file": "/x/threading.py"},
        {"name": "ProcessWriter._run", "file": "/site-packages/kvprof/trace/writer.py"},
        {"name": "Event.wait", "file": "/x/threading.py"},
        {"name": "pthread_cond_timedwait", "file": "libc.so.6"},
    ]
    assert cpu._waiting_kvprof_thread(frames, [0, 1, 2, 3])
    assert not cpu._waiting_kvprof_thread(frames, [0, 1, 2, 3][:1])
    assert cpu.category_of("ProcessWriter._run", "/site-packages/kvprof/trace/writer.py") == "kvprof"
    assert cpu.category_of("rescue_missed_sigterm", "/site-packages/kvprof/signals.py") == "kvprof"
