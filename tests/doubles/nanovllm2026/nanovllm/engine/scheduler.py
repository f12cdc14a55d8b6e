"""A chunked-prefill scheduler on the 2026 BlockManager: prefill first (only the
first sequence of a step may be chunked), else decode, preempting the newest
running sequence when a block is short."""

import collections

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import SequenceStatus


class Scheduler:
    def __init__(self, config):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.eos = config.eos
        self.block_size = config.kvcache_block_size
        self.block_manager = BlockManager(config.num_kvcache_blocks, config.kvcache_block_size)
        self.waiting = collections.deque()
        self.running = collections.deque()

    def is_finished(self):
        return not self.waiting and not self.running

    def add(self, seq):
        self.waiting.append(seq)

    def schedule(self):
        out, budget = [], self.max_num_batched_tokens
        while self.waiting and len(out) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if not seq.block_table:
                cached = self.block_manager.can_allocate(seq)
                if cached < 0:
                    break
                todo = seq.num_tokens - cached * self.block_size
            else:
                todo = seq.num_tokens - seq.num_cached_tokens
            if todo > budget and out:
                break
            if not seq.block_table:
                self.block_manager.allocate(seq, cached)
            seq.num_scheduled_tokens = min(todo, budget)
            budget -= seq.num_scheduled_tokens
            if seq.num_cached_tokens + seq.num_scheduled_tokens == seq.num_tokens:
                seq.status = SequenceStatus.RUNNING
                self.running.append(self.waiting.popleft())
            out.append(seq)
        if out:
            return out, True
        while self.running and len(out) < self.max_num_seqs:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                seq.num_scheduled_tokens = 1
                self.block_manager.may_append(seq)
                out.append(seq)
        self.running.extendleft(reversed(out))
        return out, False

    def preempt(self, seq):
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, seqs, token_ids, is_prefill):
        for seq, token in zip(seqs, token_ids):
            self.block_manager.hash_blocks(seq)
            seq.num_cached_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            if is_prefill and seq.num_cached_tokens < seq.num_tokens:
                continue
            seq.append_token(token)
            if seq.num_completion_tokens >= seq.max_tokens:
                seq.status = SequenceStatus.FINISHED
                self.block_manager.deallocate(seq)
                self.running.remove(seq)
