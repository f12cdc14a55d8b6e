"""Workload: records events then dies the way argv[1] says (raise, sigkill, sigterm, segv, sleep)."""

import os
import signal
import sys
import time

import kvprof.blocks

pool = kvprof.blocks.Pool(64, 16, name="crashy")
for i in range(1, 40):
    pool.alloc([i], request=f"r{i}")
how = sys.argv[1] if len(sys.argv) > 1 else "raise"
time.sleep(0.8)  # past one flush interval: these events must survive anything below
pool.alloc([40, 41], request="late")
if how == "raise":
    raise RuntimeError("planted crash")
if how == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
if how == "sigterm":
    os.kill(os.getpid(), signal.SIGTERM)
if how == "segv":
    os.kill(os.getpid(), signal.SIGSEGV)
if how == "sleep":
    print("ready", flush=True)
    time.sleep(60)
