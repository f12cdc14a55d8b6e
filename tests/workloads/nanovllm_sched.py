"""Drive nano-vllm's real Scheduler and BlockManager with fake tokens, no model.

    python nanovllm_sched.py TRUTH.json [--api 2025-12|2026] [--requests N] [--blocks N] [--seed S]
        [--no-snapshots] [--min-seconds S]

2025-12: the installed nano-vllm (PyPI nano-vllm-fork). Its package __init__
imports torch and the model runner and its config imports transformers, so the
package and `nanovllm.config` are stood in for here and only the engine modules
(scheduler, block_manager, sequence) are loaded from the installed code.
2026: the API double in tests/doubles/nanovllm2026.

Writes what the engine itself shows, read from its own objects around each
step, independently of kvprof: admissions and their cached tokens (first
admissions and re-admissions of preempted sequences apart), preemptions,
and per step the used blocks and the blocks the prefix cache can find.
"""

import argparse
import importlib.util
import inspect
import json
import os
import random
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))


class Config:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def load(api):
    if api == "2026":
        sys.path.insert(0, os.path.join(HERE, "..", "doubles", "nanovllm2026"))
        from nanovllm.engine.scheduler import Scheduler
        from nanovllm.engine.sequence import Sequence

        return Scheduler, lambda tokens, max_tokens: Sequence(tokens, max_tokens=max_tokens)
    spec = importlib.util.find_spec("nanovllm")
    if spec is None:
        raise SystemExit("nano-vllm is not installed (pip install --no-deps nano-vllm-fork==20260210 xxhash)")
    pkg = types.ModuleType("nanovllm")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["nanovllm"] = pkg
    cfg = types.ModuleType("nanovllm.config")
    cfg.Config = Config
    sys.modules["nanovllm.config"] = cfg
    from nanovllm.engine.scheduler import Scheduler
    from nanovllm.engine.sequence import Sequence
    from nanovllm.sampling_params import SamplingParams

    def make(tokens, max_tokens):
        return Sequence(tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True))

    # nano-vllm-fork 20260210's decode loop preempts a sequence it popped from a copy
    # of `running` and leaves it there (upstream pops it from `running` itself); the
    # next step would then append to an empty block table.  Do what upstream does.
    preempt = Scheduler.preempt

    def preempt_and_unlist(self, seq):
        preempt(self, seq)
        if seq in self.running:
            self.running.remove(seq)

    Scheduler.preempt = preempt_and_unlist
    return Scheduler, make


def findable(mgr):
    return sorted(b.block_id for b in mgr.blocks if b.hash != -1 and mgr.hash_to_block_id.get(b.hash) == b.block_id)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("truth")
    ap.add_argument("--api", default="2025-12", choices=["2025-12", "2026"])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--blocks", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-snapshots", action="store_true", help="skip the per-step engine snapshots (for CPU profiling)"
    )
    ap.add_argument(
        "--min-seconds", type=float, default=0.0, help="repeat the requests until this long has passed (CPU profiling)"
    )
    a = ap.parse_args()
    Scheduler, make = load(a.api)
    B = 256
    sched = Scheduler(
        Config(max_num_seqs=16, max_num_batched_tokens=4096, eos=-1, kvcache_block_size=B, num_kvcache_blocks=a.blocks)
    )
    mgr = sched.block_manager
    rng = random.Random(a.seed)
    takes_prefill = "is_prefill" in inspect.signature(sched.postprocess).parameters
    truth = {
        "api": a.api,
        "queries": 0,
        "hits": 0,
        "preempted_queries": 0,
        "preempted_hits": 0,
        "preemptions": 0,
        "readmissions": 0,
        "steps": [],
        "finished": 0,
    }
    step = 0
    t0 = time.perf_counter()
    while True:  # one round, or rounds until --min-seconds have passed (CPU profiling)
        system = [
            [rng.randrange(1, 30000) for _ in range(B * 2)] for _ in range(3)
        ]  # shared prefixes: 2 full blocks each
        seqs = []
        for i in range(a.requests):
            body = [rng.randrange(1, 30000) for _ in range(rng.randrange(20, 700))]
            tokens = (system[i % 3] + body) if rng.random() < 0.7 else body
            seqs.append(make(tokens, rng.randrange(8, 300)))
        preempted = set()
        pending = list(seqs)
        while pending or not sched.is_finished():
            for _ in range(rng.randrange(0, 3) if step else 4):  # arrivals over time
                if pending:
                    sched.add(pending.pop(0))
            if sched.is_finished():
                continue
            if a.no_snapshots:  # nothing but the engine's own work (CPU profiling)
                out, is_prefill = sched.schedule()
                step += 1
            else:
                truth["steps"].append({"step": step, "used": sorted(mgr.used_block_ids), "cached": findable(mgr)})
                before = {s.seq_id: bool(s.block_table) for s in seqs}
                out, is_prefill = sched.schedule()
                step += 1
                for s in seqs:
                    had, has = before[s.seq_id], bool(s.block_table)
                    if had and not has:
                        truth["preemptions"] += 1
                        preempted.add(s.seq_id)
                    elif not had and has and s.seq_id not in preempted:
                        truth["queries"] += len(s)
                        truth["hits"] += s.num_cached_tokens
                    elif not had and has:  # a preempted sequence re-admitted: its lookup, counted apart
                        truth["readmissions"] += 1
                        truth["preempted_queries"] += len(s)
                        truth["preempted_hits"] += s.num_cached_tokens
            tokens = [17 + step % 1000] * len(out) if a.no_snapshots else [rng.randrange(1, 30000) for _ in out]
            if takes_prefill:
                sched.postprocess(out, tokens, is_prefill)
            else:
                sched.postprocess(out, tokens)
        truth["finished"] += sum(1 for s in seqs if s.is_finished)
        if time.perf_counter() - t0 >= a.min_seconds:
            break
    truth["final_used"] = sorted(mgr.used_block_ids)
    with open(a.truth, "w") as f:
        json.dump(truth, f)
    print(
        f"nano-vllm {a.api}: {truth['finished']} requests, {step} steps, {truth['preemptions']} preemptions, "
        f"prefix cache {truth['hits']}/{truth['queries']} tokens, on {truth['readmissions']} re-admissions "
        f"{truth['preempted_hits']}/{truth['preempted_queries']}"
    )


if __name__ == "__main__":
    main()
