"""kvprof.runtime's hooks for probes: on_exit / remove_exit_hook, on_mark / remove_mark_hook."""

from __future__ import annotations

import pytest

from kvprof import runtime


class _Writer:
    """Just what runtime.mark and run_closers use of a ProcessWriter."""

    def __init__(self):
        self.info = {"errors": []}
        self.marks = []

    def intern(self, name):
        return 7

    def note_once(self, text):
        pass

    def mark(self, t, sid, value):
        self.marks.append((t, sid, value))


@pytest.fixture
def writer(monkeypatch):
    w = _Writer()
    monkeypatch.setattr(runtime, "writer", w)
    return w


def test_exit_hooks_run_last_registered_first_once_each(writer):
    ran = []
    first, second = (lambda: ran.append("first")), (lambda: ran.append("second"))
    runtime.on_exit(first)
    runtime.on_exit(second)
    runtime.on_exit(first)  # already registered: nothing changes
    runtime.run_closers()
    assert ran == ["second", "first"]
    runtime.run_closers()  # each ran once and is gone
    assert ran == ["second", "first"]


def test_a_removed_exit_hook_does_not_run_and_a_failing_one_is_recorded(writer):
    ran = []

    def kept():
        ran.append("kept")

    def removed():
        ran.append("removed")

    def failing():
        raise RuntimeError("boom")

    runtime.on_exit(kept)
    runtime.on_exit(removed)
    runtime.on_exit(failing)
    runtime.remove_exit_hook(removed)
    runtime.remove_exit_hook(removed)  # not registered any more: no error
    runtime.run_closers()
    assert ran == ["kept"]
    assert writer.info["errors"] == ["probe exit hook failed: RuntimeError('boom')"]


def test_mark_hooks_run_in_order_once_each_and_can_be_removed(writer):
    seen = []

    def a(sid, value, t):
        seen.append(("a", sid, value, t))

    def b(sid, value, t):
        seen.append(("b", sid, value, t))

    def failing(sid, value, t):
        raise ValueError("bad")

    try:
        runtime.on_mark(a)
        runtime.on_mark(failing)
        runtime.on_mark(b)
        runtime.on_mark(a)  # already registered: nothing changes
        runtime.mark("step", 3, t=100)
        assert writer.marks == [(100, 7, 3)]
        assert seen == [("a", 7, 3, 100), ("b", 7, 3, 100)]
        assert writer.info["errors"] == ["marker hook failed: ValueError('bad')"]
        runtime.remove_mark_hook(a)
        runtime.remove_mark_hook(failing)
        runtime.mark("step", 4, t=200)
        assert seen[2:] == [("b", 7, 4, 200)]
    finally:
        for fn in (a, b, failing):
            runtime.remove_mark_hook(fn)


def test_hooks_do_nothing_when_not_recording(monkeypatch):
    monkeypatch.setattr(runtime, "writer", None)
    called = []

    def hook(sid, value, t):
        called.append(sid)

    runtime.on_mark(hook)
    try:
        runtime.mark("step", 1)
    finally:
        runtime.remove_mark_hook(hook)
    assert called == []
