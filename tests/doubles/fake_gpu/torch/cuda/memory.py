import os
import pickle

history_calls = []
_ooms = []


def _record_memory_history(enabled="all", context="all", stacks="all", max_entries=1, **kw):
    import torch

    history_calls.append(
        {
            "enabled": enabled,
            "context": context,
            "stacks": stacks,
            "max_entries": max_entries,
            "cuda_initialized": torch.cuda.is_initialized(),
        }
    )


def _snapshot():
    import torch

    with open(os.environ["FAKE_TORCH_SNAPSHOT"], "rb") as fh:
        snap = pickle.load(fh)  # a fixture: plain dicts and lists
    snap["kvprof_fake"] = {
        "history_calls": list(history_calls),
        "available_callers_before_init": list(torch.cuda.available_callers_before_init),
    }
    return snap
