"""A stand-in for nvidia-ml-py (pynvml) with one fake GPU whose usage follows a file:
$FAKE_NVML_USED holds "used_bytes pid:bytes pid:bytes ..." (rewritten by the workload),
so tests know what the sampler should have seen.  FAKE_NVML=0: the library is "missing"."""

import os
from types import SimpleNamespace


class NVMLError(Exception):
    pass


def nvmlInit():
    if os.environ.get("FAKE_NVML", "1") != "1":
        raise NVMLError("NVML Shared Library Not Found (fake)")


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    return 1


def nvmlDeviceGetHandleByIndex(i):
    return i


def nvmlDeviceGetName(h):
    return b"Fake GPU 80GB"


def _read():
    try:
        with open(os.environ["FAKE_NVML_USED"]) as fh:
            parts = fh.read().split()
    except (OSError, KeyError):
        return 0, {}
    used = int(parts[0]) if parts else 0
    procs = {int(p.split(":")[0]): int(p.split(":")[1]) for p in parts[1:]}
    return used, procs


def nvmlDeviceGetMemoryInfo(h):
    used, _ = _read()
    return SimpleNamespace(total=80 << 30, used=used, free=(80 << 30) - used)


def nvmlDeviceGetComputeRunningProcesses(h):
    _, procs = _read()
    return [SimpleNamespace(pid=pid, usedGpuMemory=b) for pid, b in procs.items()]


def nvmlDeviceGetGraphicsRunningProcesses(h):
    return []
