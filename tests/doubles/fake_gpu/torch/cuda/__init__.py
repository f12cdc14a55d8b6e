import os
import sys

from . import memory  # noqa: F401

_state = {"initialized": False}
_queued_calls = []
# who asked is_available() before CUDA was initialised (asking can initialise CUDA in real
# torch, which breaks a later fork): the probe must never be among them
available_callers_before_init = []


def _lazy_call(fn, **kw):
    """As torch's: run now if CUDA is initialised, else right after its initialisation."""
    if _state["initialized"]:
        fn()
    else:
        _queued_calls.append(fn)


def is_available():
    if not _state["initialized"]:
        available_callers_before_init.append(sys._getframe(1).f_code.co_filename)
    return os.environ.get("FAKE_CUDA", "1") == "1"


def is_initialized():
    return _state["initialized"]


def init():
    if not is_available():
        raise RuntimeError("no CUDA (fake)")
    if _state["initialized"]:
        return
    _state["initialized"] = True
    for fn in _queued_calls:  # as torch.cuda._lazy_init: after _cuda_init(), before the first allocation
        fn()


def device_count():
    return 1 if os.environ.get("FAKE_CUDA", "1") == "1" else 0


def memory_stats(device=0):
    snap = memory._snapshot()
    reserved = sum(s["total_size"] for s in snap["segments"])
    allocated = sum(b["size"] for s in snap["segments"] for b in s["blocks"] if b["state"] == "active_allocated")
    return {
        "allocated_bytes.all.current": allocated,
        "reserved_bytes.all.current": reserved,
        "num_ooms": len(memory._ooms),
    }


def fake_oom(device=0, size=1 << 30):
    """What the allocator does when cudaMalloc fails: tell the observers."""
    from torch import _C

    memory._ooms.append(size)
    for fn in list(_C._observers):
        fn(device, size, 123 << 20, 7 << 20)
