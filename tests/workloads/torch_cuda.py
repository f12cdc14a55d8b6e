"""A CUDA workload for the torch and nvml probes: with the fake torch and pynvml of
tests/doubles/fake_gpu on PYTHONPATH it runs anywhere; with real torch on a GPU it
allocates for real (a planted leak and a fragmentation OOM).

    python torch_cuda.py [--sleep S] [--oom]
"""

import argparse
import os
import time

import kvprof

ap = argparse.ArgumentParser()
ap.add_argument("--sleep", type=float, default=0.0)
ap.add_argument("--oom", action="store_true")
a = ap.parse_args()

import torch  # noqa: E402

used_file = os.environ.get("FAKE_NVML_USED")


def nvml(used):
    if used_file:
        with open(used_file, "w") as fh:
            fh.write(f"{used} {os.getpid()}:{used}")


fake = getattr(torch, "__version__", "").endswith("+fake")
keep = []
if torch.cuda.is_available():
    torch.cuda.init()
    kvprof.mark("warmup")
    for step in range(3):
        if not fake:
            keep.append(torch.empty(64 << 20, dtype=torch.uint8, device="cuda"))  # the planted leak: 64 MiB per step
            tmp = [torch.empty(8 << 20, dtype=torch.uint8, device="cuda") for _ in range(8)]
            del tmp[::2]  # holes between live blocks
        if fake:  # what NVML would say: torch's reserved pool plus 300 MiB of CUDA context
            nvml(torch.cuda.memory_stats()["reserved_bytes.all.current"] + (300 << 20))
        kvprof.mark("step", step)
        time.sleep(0.3)
    if a.oom:
        if fake:
            torch.cuda.fake_oom(0, 1 << 30)
        else:
            free, total = torch.cuda.mem_get_info()
            try:
                torch.empty(free + (1 << 30), dtype=torch.uint8, device="cuda")
            except torch.cuda.OutOfMemoryError:
                pass
print("done", flush=True)
time.sleep(a.sleep)
