"""Record N block events in one process, then die a given way at once.

    python crash_matrix.py WHERE HOW N

WHERE: main (this process dies), spawn (a multiprocessing child made by spawn dies),
fork (a child made by a raw os.fork() dies).  HOW: os_exit, sigkill, sigsegv, sigabrt,
sighup, sigquit, sigusr1, sigusr2, sigterm, exception, sys_exit.
"""

import os
import signal
import sys


def record_then_die(how: str, n: int) -> None:
    import kvprof
    import kvprof.blocks

    pool = kvprof.blocks.Pool(num_blocks=64, block_size=16, name="crash")
    for i in range(n):
        k = 1 + i % 5  # 1 to 5 ids: events with and without continuation records
        ids = [(i + j) % 64 for j in range(k)]
        if i % 2 == 0:
            pool.alloc(ids, request=f"r{i % 7}")
        else:
            pool.free(ids, request=f"r{i % 7}")
    kvprof.mark("last", n)
    if how == "os_exit":
        os._exit(0)
    if how == "sigsegv":
        import ctypes

        ctypes.string_at(0)
    if how == "sigabrt":
        os.abort()
    if how == "exception":
        raise RuntimeError("planted")
    if how == "sys_exit":
        sys.exit(3)
    os.kill(os.getpid(), getattr(signal, how.upper()))
    signal.pause()


def _child(how: str, n: int) -> None:
    record_then_die(how, n)


if __name__ == "__main__":
    where, how, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if where == "main":
        record_then_die(how, n)
    elif where == "spawn":
        import multiprocessing as mp

        p = mp.get_context("spawn").Process(target=_child, args=(how, n))
        p.start()
        p.join()
    elif where == "fork":
        pid = os.fork()
        if pid == 0:
            try:
                record_then_die(how, n)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
