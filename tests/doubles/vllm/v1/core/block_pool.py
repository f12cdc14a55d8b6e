"""Shape of vLLM v1's BlockPool (0.3x): slots blocks, a null block, LRU free queue,
blocks that know their pool, free_blocks forwarding other pools' blocks."""

from collections import OrderedDict


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "pool", "block_hash", "is_null")

    def __init__(self, block_id, pool=None):
        self.block_id = block_id
        self.ref_cnt = 0
        self.pool = pool
        self.block_hash = None
        self.is_null = False


class BlockPool:
    def __init__(self, num_gpu_blocks, enable_caching=True, hash_block_size=16):
        self.num_gpu_blocks = num_gpu_blocks
        self.enable_caching = enable_caching
        self.hash_block_size = hash_block_size
        self.blocks = [KVCacheBlock(i, pool=self) for i in range(num_gpu_blocks)]
        self.free = OrderedDict((b.block_id, b) for b in self.blocks)
        self.null_block = self.free.popitem(last=False)[1]
        self.null_block.is_null = True

    def get_num_free_blocks(self):
        return len(self.free)

    def get_new_blocks(self, num_blocks):
        if num_blocks > len(self.free):
            raise ValueError(f"Cannot get {num_blocks} free blocks from the pool")
        out = [self.free.popitem(last=False)[1] for _ in range(num_blocks)]
        for b in out:
            b.ref_cnt += 1
        return out

    def touch(self, blocks):
        for b in blocks:
            if b.ref_cnt == 0 and not b.is_null:
                del self.free[b.block_id]
            b.ref_cnt += 1

    def free_blocks(self, ordered_blocks):
        others = {}
        for b in ordered_blocks:
            if b.pool is not None and b.pool is not self:
                others.setdefault(b.pool, []).append(b)
                continue
            b.ref_cnt -= 1
            if b.ref_cnt == 0 and not b.is_null:
                self.free[b.block_id] = b
        for pool, blocks in others.items():
            pool.free_blocks(blocks)
