"""Two spawned processes, each with a pool, and two threads sharing a third pool in the
main process: block events of several processes and racing threads to merge."""

import multiprocessing as mp
import threading

import kvprof.blocks


def engine(name: str, n: int) -> None:
    pool = kvprof.blocks.Pool(num_blocks=32, block_size=16, name=name, reserved=[0])
    for i in range(n):
        r = f"{name}-{i}"
        pool.request_arrived(r, prompt_tokens=20 + i % 30)
        pool.prefix_query(r, 32, 16 * (i % 2))
        ids = [1 + i % 31, 1 + (i + 7) % 31]
        pool.alloc(ids, request=r)
        pool.request_state(r, filled_tokens=20 + i % 30, blocks_held=2)
        pool.cache(ids[:1])
        pool.step(i)
        pool.free(ids, request=r)
        pool.request_finished(r)


def racer(pool, k: int, n: int) -> None:
    for i in range(n):
        pool.alloc([k * 8 + i % 8], request=f"t{k}-{i}")
        pool.free([k * 8 + i % 8], request=f"t{k}-{i}")


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=engine, args=(f"e{j}", 3000)) for j in range(2)]
    for p in procs:
        p.start()
    shared = kvprof.blocks.Pool(num_blocks=16, block_size=16, name="shared")
    threads = [threading.Thread(target=racer, args=(shared, k, 20000)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join()
