"""Drive the BlockPool test double (tests/doubles) the way vLLM's managers do."""

import sys

from vllm.v1.core.block_pool import BlockPool

iters = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
a = BlockPool(64)
b = BlockPool(16)
for i in range(iters):
    blocks = a.get_new_blocks(4)
    a.touch([a.null_block] + blocks[:2])  # a sliding-window style null entry: never an event
    a.free_blocks(reversed(blocks[:2]))
    if i % 100 == 0:
        other = b.get_new_blocks(2)
        a.free_blocks(iter(blocks + other))  # b's blocks are forwarded to b and recorded there
    else:
        a.free_blocks(reversed(blocks))
