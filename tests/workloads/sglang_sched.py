"""Drive SGLang's real scheduler-side memory code with fake tokens, no model, no GPU.

    python sglang_sched.py TRUTH.json [--page-size N] [--pages N] [--requests N] [--seed S]
        [--max-running N] [--new-token-ratio R] [--ratio-decay D]

The objects are SGLang's own (installed `sglang`, tested on 0.5.23): the token-to-KV
pool allocator (`PagedTokenToKVPoolAllocator`, or `TokenToKVPoolAllocator` with
--page-size 1), `ReqToTokenPool`, `RadixCache`, `Req`, `PrefillAdder` and
`ScheduleBatch` (prepare_for_extend, prepare_for_decode, check_decode_mem,
retract_decode, filter_batch, merge_batch), and `release_kv_cache` /
`checkpoint_kv_cache`.  The loop around them follows `Scheduler.get_next_batch_to_run`
(one prefill batch when requests can be admitted, else one decode step that
retracts under memory pressure) and the batch-result processors (append the
sampled token, release finished requests into the tree, checkpoint the others
after prefill).  The forward pass is left out: a random token per request.

Importing SGLang's memory modules pulls its multimodal configs, which import
torchvision at module level; PyPI's torchvision does not load beside the CPU torch
used here, so an empty stand-in is importable under that name (transformers is
asked first, so it still sees no torchvision).  Nothing in the memory path uses it.

Writes what SGLang itself shows, read from its own objects, independently of
kvprof: before each batch the allocator's free pages, the tree's evictable and
protected sizes and the pages held by request rows; every admission's
`prefix_len` (the match_prefix result the scheduler used), first admissions and
re-admissions of retracted requests apart, and PrefillAdder's own
log_hit_tokens / reprocessed_log_hit_tokens.
"""

import argparse
import importlib.abc
import importlib.machinery
import json
import random
import sys
import types
from array import array


def stand_in_torchvision() -> None:
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()  # cached False before the stand-in exists

    class _Any:
        def __init__(self, *a, **k):
            pass

        def __call__(self, *a, **k):
            return self

        def __getattr__(self, name):
            return _Any()

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            mod = types.ModuleType(spec.name)
            mod.__path__ = []
            mod.__getattr__ = lambda name: _Any()
            return mod

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _Finder())


class ModelConfig:
    """What ScheduleBatch reads of the model config."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.is_encoder_decoder = False
        self.is_multimodal = False
        self.hf_eos_token_id = None

    def __getattr__(self, name):
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("truth")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--pages", type=int, default=96)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-running", type=int, default=12)
    ap.add_argument(
        "--ratio-decay",
        type=float,
        default=0.01,
        help="how fast the ratio falls back after a retraction, per decode step",
    )
    ap.add_argument(
        "--new-token-ratio",
        type=float,
        default=0.05,
        help="the share of max_new_tokens admission reserves (SGLang decays it to its minimum under steady load)",
    )
    a = ap.parse_args()

    stand_in_torchvision()
    import torch

    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    # the process-wide configuration a scheduler process publishes (defaults, CPU)
    publish(ServerArgs(model_path="dummy", device="cpu", page_size=a.page_size), role="scheduler")

    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
    from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.common import checkpoint_kv_cache, release_kv_cache
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.mem_cache.radix_cache import RadixCache
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    try:
        from kvprof import mark
    except ImportError:  # the workload also runs bare

        def mark(name, value=0):
            pass

    ps, vocab = a.page_size, 30000
    size = a.pages * ps
    if ps == 1:
        allocator = TokenToKVPoolAllocator(size, torch.float16, "cpu", None, need_sort=False)
    else:
        allocator = PagedTokenToKVPoolAllocator(size, ps, torch.float16, "cpu", None, need_sort=False)
    req_pool = ReqToTokenPool(a.max_running + 4, 4096, "cpu", False)
    tree = RadixCache(
        CacheInitParams(disable=False, req_to_token_pool=req_pool, token_to_kv_pool_allocator=allocator, page_size=ps)
    )
    model_config = ModelConfig(vocab)
    spec = SpeculativeAlgorithm.NONE

    rng = random.Random(a.seed)
    u = 16  # lengths in units of 16 tokens, whatever the page size
    system = [[rng.randrange(1, vocab) for _ in range(n)] for n in (5 * u + 3, 9 * u, 3 * u + 7)]
    prompts = []
    for i in range(a.requests):
        body = [rng.randrange(1, vocab) for _ in range(rng.randrange(4, 12 * u))]
        tokens = (system[i % 3] + body) if rng.random() < 0.75 else body
        prompts.append((f"r{i}", tokens, rng.randrange(4, 10 * u)))

    def arrive(rid, tokens, max_new):
        sp = SamplingParams(max_new_tokens=max_new)  # no EOS is ever sampled: requests stop at their length
        sp.normalize(None)
        return Req(rid, "", array("q", tokens), sp, vocab_size=vocab)

    truth = {
        "page_size": ps,
        "pages": a.pages,
        "steps": [],
        "admissions": 0,
        "readmissions": 0,
        "queries": 0,
        "hits": 0,
        "preempted_queries": 0,
        "preempted_hits": 0,
        "log_hit_tokens": 0,
        "reprocessed_log_hit_tokens": 0,
        "retractions": 0,
        "finished": 0,
    }

    def pages_held_by_rows():
        # pages of running requests' rows that the tree does not own (their own, uncached KV)
        return (
            allocator.size // ps
            - allocator.available_size() // ps
            - (tree.evictable_size() + tree.protected_size()) // ps
        )

    def snapshot(step):
        truth["steps"].append(
            {
                "step": step,
                "free_pages": allocator.available_size() // ps,
                "evictable_pages": tree.evictable_size() // ps,
                "protected_pages": tree.protected_size() // ps,
                "row_pages": pages_held_by_rows(),
            }
        )
        mark("sglang_step", step)

    waiting: list = []
    pending = list(prompts)
    running = None
    step = 0
    max_prefill_tokens = 8 * 1024
    new_token_ratio = a.new_token_ratio
    while pending or waiting or (running is not None and not running.is_empty()):
        for _ in range(rng.randrange(0, 3) if step else 6):  # arrivals over time
            if pending:
                waiting.append(arrive(*pending.pop(0)))
        running_bs = 0 if running is None else len(running.reqs)
        batch = None
        if waiting and running_bs < a.max_running:
            adder = PrefillAdder(
                ps, tree, allocator, running, new_token_ratio, max_prefill_tokens, None
            )  # no chunked prefill
            for req in waiting:
                if len(adder.can_run_list) + running_bs >= a.max_running:
                    break
                req.init_next_round_input(tree)
                res = adder.add_one_req(req, has_chunked_req=False, truncation_align_size=None)
                if res != AddReqResult.CONTINUE:
                    break
            for req in adder.can_run_list:
                if req.retraction_count > 0:
                    truth["readmissions"] += 1
                    truth["preempted_queries"] += len(req.full_untruncated_fill_ids)
                    truth["preempted_hits"] += req.prefix_len
                else:
                    truth["admissions"] += 1
                    truth["queries"] += len(req.full_untruncated_fill_ids)
                    truth["hits"] += req.prefix_len
            truth["log_hit_tokens"] += adder.log_hit_tokens
            truth["reprocessed_log_hit_tokens"] += adder.reprocessed_log_hit_tokens
            if adder.can_run_list:
                admitted = set(map(id, adder.can_run_list))
                waiting = [r for r in waiting if id(r) not in admitted]
                batch = ScheduleBatch.init_new(adder.can_run_list, req_pool, allocator, tree, model_config, False, spec)
                snapshot(step)
                batch.prepare_for_extend()
                step += 1
                for req in batch.reqs:  # the prefill result
                    req.output_ids.append(rng.randrange(1, vocab))
                    req.update_finish_state()
                    if req.finished():
                        release_kv_cache(req, tree, checkpoint=True)
                        truth["finished"] += 1
                    else:
                        checkpoint_kv_cache(req, tree)
                batch.filter_batch()
                if not batch.is_empty():
                    batch.prepare_for_decode_ready = True
                    if running is None or running.is_empty():
                        running = batch
                    else:
                        running.merge_batch(batch)
                continue
        if running is None or running.is_empty():
            continue
        # decode, retracting under memory pressure (Scheduler.update_running_batch)
        running.filter_batch()
        if running.is_empty():
            continue
        if not running.check_decode_mem():
            retracted, new_token_ratio, aborted = running.retract_decode()
            assert not aborted, "a request was aborted: the pool is too small for one request"
            truth["retractions"] += len(retracted)
            waiting = list(retracted) + waiting
        else:  # the scheduler lowers the ratio again step by step (NewTokenRatioTracker's decay)
            new_token_ratio = max(new_token_ratio - a.ratio_decay, a.new_token_ratio)
        snapshot(step)
        running.prepare_for_decode()
        step += 1
        for req in running.reqs:
            req.output_ids.append(rng.randrange(1, vocab))
            req.update_finish_state(1)
            if req.finished():
                release_kv_cache(req, tree, checkpoint=True)
                truth["finished"] += 1
        running.filter_batch()
    truth["final"] = {
        "free_pages": allocator.available_size() // ps,
        "evictable_pages": tree.evictable_size() // ps,
        "protected_pages": tree.protected_size() // ps,
    }
    with open(a.truth, "w") as fh:
        json.dump(truth, fh)
    print(
        f"sglang: {truth['finished']} requests, {step} steps, {truth['retractions']} retractions, prefix cache "
        f"{truth['hits']}/{truth['queries']} tokens, on {truth['readmissions']} re-admissions "
        f"{truth['preempted_hits']}/{truth['preempted_queries']}"
    )


if __name__ == "__main__":
    main()
