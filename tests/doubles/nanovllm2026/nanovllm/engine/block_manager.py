"""BlockManager with the 2026 signatures: can_allocate returns the number of cached
leading blocks (or -1), allocate takes it, hash_blocks caches what a step filled,
and taking a free block drops the content it still advertised."""

import collections
import hashlib


class Block:
    def __init__(self, block_id):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.token_ids = []


class BlockManager:
    def __init__(self, num_blocks, block_size):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id = {}
        self.free_block_ids = collections.deque(range(num_blocks))
        self.used_block_ids = set()

    @staticmethod
    def compute_hash(token_ids, prefix=-1):
        data = repr((prefix, list(token_ids))).encode()
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")

    def _lookup(self, seq, i, prefix):
        tokens = seq.block(i)
        h = self.compute_hash(tokens, prefix)
        bid = self.hash_to_block_id.get(h)
        if bid is None or self.blocks[bid].token_ids != tokens:
            return h, None
        return h, bid

    def _take_free(self):
        bid = self.free_block_ids.popleft()
        blk = self.blocks[bid]
        if blk.hash != -1 and self.hash_to_block_id.get(blk.hash) == bid:
            del self.hash_to_block_id[blk.hash]  # its cached content is gone
        blk.hash, blk.token_ids, blk.ref_count = -1, [], 1
        self.used_block_ids.add(bid)
        return bid

    def can_allocate(self, seq):
        cached, fresh, prefix = 0, seq.num_blocks, -1
        for i in range(seq.num_blocks - 1):  # the last block is always computed
            prefix, bid = self._lookup(seq, i, prefix)
            if bid is None:
                break
            cached += 1
            if bid in self.used_block_ids:
                fresh -= 1
        return cached if len(self.free_block_ids) >= fresh else -1

    def allocate(self, seq, num_cached_blocks):
        assert not seq.block_table
        prefix = -1
        for i in range(num_cached_blocks):
            prefix, bid = self._lookup(seq, i, prefix)
            blk = self.blocks[bid]
            if bid in self.used_block_ids:
                blk.ref_count += 1
            else:
                self.free_block_ids.remove(bid)
                self.used_block_ids.add(bid)
                blk.ref_count = 1
            seq.block_table.append(bid)
        while len(seq.block_table) < seq.num_blocks:
            seq.block_table.append(self._take_free())
        seq.num_cached_tokens = num_cached_blocks * self.block_size

    def deallocate(self, seq):
        for bid in reversed(seq.block_table):
            blk = self.blocks[bid]
            blk.ref_count -= 1
            if blk.ref_count == 0:
                self.used_block_ids.discard(bid)
                self.free_block_ids.append(bid)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def can_append(self, seq):
        need = 1 if len(seq) % self.block_size == 1 else 0
        return len(self.free_block_ids) >= need

    def may_append(self, seq):
        if len(seq) % self.block_size == 1:
            seq.block_table.append(self._take_free())

    def hash_blocks(self, seq):
        first = seq.num_cached_tokens // self.block_size
        last = (seq.num_cached_tokens + seq.num_scheduled_tokens) // self.block_size
        prefix = self.blocks[seq.block_table[first - 1]].hash if first else -1
        for i in range(first, last):
            blk = self.blocks[seq.block_table[i]]
            tokens = seq.block(i)
            prefix = self.compute_hash(tokens, prefix)
            blk.hash, blk.token_ids = prefix, tokens
            self.hash_to_block_id[prefix] = blk.block_id
