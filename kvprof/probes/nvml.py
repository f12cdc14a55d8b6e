"""--probe nvml: GPU memory from NVML, sampled by `kvprof record` itself (not the target).

A thread in the recorder reads, every ``--nvml-interval`` seconds, each GPU's used and
total memory and the memory each process uses on it (compute and graphics processes),
into ``nvml_gpus.bin`` and ``nvml_procs.bin`` at the bundle's top level.  Where NVML is
missing (no ``nvidia-ml-py``, no driver) it says why once and records nothing.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np

from kvprof.trace import format as fmt


class Sampler:
    def __init__(self, bundle: str, interval: float):
        self.bundle = bundle
        self.interval = interval
        self.status: dict = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None  # the pynvml module, once loaded
        self.samples = 0

    def start(self) -> dict:
        try:
            import pynvml  # nvidia-ml-py
        except ImportError:
            self.status = {
                "status": "unavailable",
                "reason": "nvidia-ml-py is not installed (pip install 'kvprof[gpu]'): nothing recorded",
            }
            return self.status
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.status = {"status": "unavailable", "reason": f"NVML could not start ({exc}): nothing recorded"}
            return self.status
        self._nvml = pynvml
        names = []
        for i in range(count):
            try:
                n = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                names.append(n.decode() if isinstance(n, bytes) else str(n))
            except Exception:  # noqa: BLE001
                names.append("?")
        self.status = {"status": "sampling", "gpus": count, "names": names, "interval_s": self.interval}
        self._thread = threading.Thread(target=self._run, name="kvprof-nvml", daemon=True)
        self._thread.start()
        return self.status

    def _sample(self, gpus_fh, procs_fh) -> None:
        nv = self._nvml
        t = time.monotonic_ns()
        g_rows: list[tuple[int, ...]] = []
        p_rows: list[tuple[int, ...]] = []
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            g_rows.append((t, i, int(mem.used), int(mem.total)))
            seen: dict[int, int] = {}
            for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
                try:
                    for p in getattr(nv, getter)(h):
                        used = getattr(p, "usedGpuMemory", None)
                        seen[int(p.pid)] = max(seen.get(int(p.pid), 0), int(used) if used is not None else -1)
                except Exception:  # noqa: BLE001 - not supported on this GPU / driver
                    pass
            p_rows.extend((t, i, pid, used) for pid, used in seen.items())
        gpus_fh.write(np.array(g_rows, dtype=fmt.NVML_GPU_DTYPE).tobytes())
        if p_rows:
            procs_fh.write(np.array(p_rows, dtype=fmt.NVML_PROC_DTYPE).tobytes())
        gpus_fh.flush()
        procs_fh.flush()
        self.samples += 1

    def _run(self) -> None:
        with (
            open(os.path.join(self.bundle, fmt.NVML_GPUS), "ab") as gf,
            open(os.path.join(self.bundle, fmt.NVML_PROCS), "ab") as pf,
        ):
            while True:
                try:
                    self._sample(gf, pf)
                except Exception as exc:  # noqa: BLE001 - a GPU fell off the bus: stop, say why
                    self.status.update(status="stopped", reason=f"NVML sampling failed: {exc}")
                    return
                if self._stop.wait(self.interval):
                    self._sample(gf, pf)  # one last reading at the end
                    return

    def stop(self) -> dict:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            self.status["samples"] = self.samples
        return self.status
