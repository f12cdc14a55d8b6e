import os

from . import memory  # noqa: F401

_state = {"initialized": False}


def is_available():
    return os.environ.get("FAKE_CUDA", "1") == "1"


def is_initialized():
    return _state["initialized"]


def init():
    if not is_available():
        raise RuntimeError("no CUDA (fake)")
    _state["initialized"] = True


def device_count():
    return 1 if is_available() else 0


def memory_stats(device=0):
    snap = memory._snapshot()
    reserved = sum(s["total_size"] for s in snap["segments"])
    allocated = sum(b["size"] for s in snap["segments"] for b in s["blocks"] if b["state"] == "active_allocated")
    return {"allocated_bytes.all.current": allocated, "reserved_bytes.all.current": reserved, "num_ooms": len(memory._ooms)}


def fake_oom(device=0, size=1 << 30):
    """What the allocator does when cudaMalloc fails: tell the observers."""
    from torch import _C

    memory._ooms.append(size)
    for fn in list(_C._observers):
        fn(device, size, 123 << 20, 7 << 20)
