"""A sequence as the 2026 scheduler sees it: chunked prefill counters."""

import enum
import itertools


class SequenceStatus(enum.Enum):
    WAITING = 1
    RUNNING = 2
    FINISHED = 3


class Sequence:
    block_size = 256
    _ids = itertools.count()

    def __init__(self, token_ids, max_tokens=16, ignore_eos=True):
        self.seq_id = next(Sequence._ids)
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_tokens = len(self.token_ids)
        self.num_prompt_tokens = self.num_tokens
        self.num_cached_tokens = 0  # tokens whose KV is computed (or came from the cache)
        self.num_scheduled_tokens = 0  # tokens the current step computes
        self.block_table = []
        self.max_tokens = max_tokens
        self.ignore_eos = ignore_eos

    def __len__(self):
        return self.num_tokens

    @property
    def num_blocks(self):
        return -(-self.num_tokens // self.block_size)

    @property
    def num_completion_tokens(self):
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self):
        return self.status is SequenceStatus.FINISHED

    def block(self, i):
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]

    def append_token(self, token_id):
        self.token_ids.append(token_id)
        self.num_tokens += 1
