"""A Ray driver for kvprof's Ray tests: connects to a running cluster and starts one engine
actor pinned to each node, plus a victim that ray.kill ends after its work.  Each actor
runs a small paged-KV engine on a kvprof.blocks.Pool (requests sharing a cached system
prompt, preemptions when blocks run out), leaks 8 KiB per step (tracemalloc's suspect) and
churns cycles for the collector, and reports what it did.  The driver passes a
runtime_env of its own (a variable and a PYTHONPATH entry), which must reach the actors.

    python tests/workloads/ray_fleet.py ADDRESS REPORT.json OWN_DIR
"""

import gc
import json
import os
import sys
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import kvprof

BLOCK = 16
SYSTEM_BLOCKS = 2  # the shared system prompt, cached and held by the engine
WAVES = 8
PER_WAVE = 8


class _Counted:
    """The pool, counting the calls made to it (one recorded event each)."""

    def __init__(self, pool):
        self.pool, self.calls = pool, 0

    def __getattr__(self, name):
        fn = getattr(self.pool, name)

        def call(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)

        return call


class Engine:
    def __init__(self, name: str, num_blocks: int):
        import kvprof.blocks

        self.name, self.num_blocks = name, num_blocks
        self.pool = _Counted(kvprof.blocks.Pool(num_blocks=num_blocks, block_size=BLOCK, name=name))
        self.leak = []

    def run(self, seed: int) -> dict:
        import random

        rng = random.Random(seed)
        pool = self.pool
        free = list(range(self.num_blocks))
        system = [free.pop(0) for _ in range(SYSTEM_BLOCKS)]
        pool.alloc(system)
        pool.cache(system)
        in_use = peak = SYSTEM_BLOCKS
        query = hit = preemptions = marks = collections = 0
        gc.disable()  # only the collections made here, in the window between the markers
        stats0 = sum(s["collections"] for s in gc.get_stats())
        kvprof.mark("run_start")
        marks += 1
        for wave in range(WAVES):
            pool.step(wave)
            running = []
            for j in range(PER_WAVE):
                req = f"{self.name}-{wave}-{j}"
                prompt = rng.randint(40, 200)
                need = -(-prompt // BLOCK)
                shared = rng.random() < 0.5
                pool.request_arrived(req, prompt)
                pool.prefix_query(req, prompt, SYSTEM_BLOCKS * BLOCK if shared else 0)
                query += prompt
                hit += SYSTEM_BLOCKS * BLOCK if shared else 0
                if shared:
                    pool.hit(system, req)
                own = max(need - SYSTEM_BLOCKS, 1) if shared else need
                if own > len(free):
                    pool.allocation_failed(req, own, len(free))
                    if running:  # recompute preemption of the newest
                        vreq, vids, vshared = running.pop()
                        pool.preempted(vreq)
                        pool.free(vids + (system if vshared else []), vreq)
                        free.extend(vids)
                        in_use -= len(vids)
                        preemptions += 1
                    if own > len(free):
                        if shared:
                            pool.free(system, req)
                        pool.request_finished(req)
                        continue
                ids = [free.pop() for _ in range(own)]
                pool.alloc(ids, req)
                in_use += own
                peak = max(peak, in_use)
                pool.request_state(req, prompt, own + (SYSTEM_BLOCKS if shared else 0))
                running.append((req, ids, shared))
            kvprof.mark("step", wave)
            marks += 1
            self.leak.append(bytearray(8192))  # the leak: 8 KiB a step, never dropped
            for _ in range(300):  # churn: cycles only the collector frees
                a = {}
                a["self"] = a
            gc.collect(0)
            collections += 1
            for req, ids, shared in running:
                pool.free(ids + (system if shared else []), req)
                free.extend(ids)
                in_use -= len(ids)
                pool.request_finished(req)
        kvprof.mark("run_end")
        marks += 1
        stats1 = sum(s["collections"] for s in gc.get_stats())
        gc.enable()
        import fleet_own_mod  # on the PYTHONPATH the driver's runtime_env gave
        from kvprof import runtime

        return {
            "name": self.name,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "calls": pool.calls,
            "marks": marks,
            "peak_blocks": peak,
            "capacity": self.num_blocks,
            "query_tokens": query,
            "hit_tokens": hit,
            "preemptions": preemptions,
            "collections": collections,
            "gc_stats_delta": stats1 - stats0,
            "own_var": os.environ.get("FLEET_OWN"),
            "own_module": fleet_own_mod.VALUE,
            "recording": runtime.is_recording(),
            "pythonpath": os.environ.get("PYTHONPATH"),
        }


def main() -> None:
    address, report, own_dir = sys.argv[1:4]
    ray.init(
        address=address,
        runtime_env={"env_vars": {"FLEET_OWN": "kept", "PYTHONPATH": own_dir + os.pathsep + "${PYTHONPATH}"}},
    )
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    actor = ray.remote(num_cpus=0)(Engine)

    def on(node):
        return actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))

    engines = [on(node).remote(f"replica{i}", 48 + 16 * i) for i, node in enumerate(nodes)]
    victim = on(nodes[-1]).remote("victim", 40)
    reports = ray.get([e.run.remote(i) for i, e in enumerate(engines)] + [victim.run.remote(99)])
    killed = reports[-1]["pid"]
    ray.kill(victim)
    deadline = time.time() + 60
    while time.time() < deadline:  # the test machine is one host: wait until the victim is gone
        try:
            os.kill(killed, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    kvprof.mark("fleet_done")
    with open(report, "w") as fh:
        json.dump(
            {
                "engines": reports[:-1],
                "victim": reports[-1],
                "nodes": nodes,
                "driver_node": ray.get_runtime_context().get_node_id(),
                "driver_pid": os.getpid(),
            },
            fh,
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
