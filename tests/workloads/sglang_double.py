"""Drive the SGLang memory-layer double (tests/doubles/sglang) as SGLang's scheduler does:
match, lock, evict for room, allocate, checkpoint into the tree, free the rest, unlock.

    python sglang_double.py TRUTH.json [--requests N] [--seed S]

Writes the double's own state after every request's admission and release (free pages,
evictable and protected pages), each after a kvprof marker, and the match lengths."""

import json
import random
import sys

import numpy as np

from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.radix_cache import RadixCache

try:
    from kvprof import mark
except ImportError:  # pragma: no cover

    def mark(name, value=0):
        pass


class Req:
    def __init__(self, tokens):
        self.tokens, self.row, self.node, self.protected = tokens, None, None, 0


def main(out, n_requests=40, seed=0):
    ps, pages = 4, 24
    alloc = PagedTokenToKVPoolAllocator(pages * ps, ps)
    tree = RadixCache(alloc, ps)
    rng = random.Random(seed)
    system = [[rng.randrange(1, 99) for _ in range(n)] for n in (9, 14)]
    truth = {"pages": pages, "page_size": ps, "snaps": [], "hits": 0}
    running: list = []
    snap = 0

    def record():
        nonlocal snap
        mark("state", snap)
        truth["snaps"].append(
            {
                "free_pages": alloc.available_size() // ps,
                "evictable_pages": tree.evictable_size_ // ps,
                "protected_pages": tree.protected_size_ // ps,
            }
        )
        snap += 1

    def release(req):
        tree.checkpoint(req)
        alloc.free(req.row[req.protected :])  # the partial last page the tree does not keep
        tree.dec_lock_ref(req.node)

    for i in range(n_requests):
        tokens = (system[i % 2] if i % 3 else []) + [rng.randrange(1, 99) for _ in range(rng.randrange(3, 20))]
        req = Req(tokens)
        n, node = tree.match_prefix(tokens)
        tree.inc_lock_ref(node)
        truth["hits"] += n
        need = -(-(len(tokens) - n) // ps) * ps
        while alloc.available_size() < need and running:
            if tree.evict(need - alloc.available_size()) == 0:
                release(running.pop(0))
        got = alloc.alloc(need)
        path, walk = [], node
        while walk is not tree.root_node:
            path.append(walk.value)
            walk = walk.parent
        req.row = np.concatenate(path[::-1] + [got])[: len(tokens)] if path else got[: len(tokens)]
        req.node, req.protected = node, n
        running.append(req)
        record()
        if len(running) > 3:
            release(running.pop(0))
            record()
    while running:
        release(running.pop(0))
        record()
    with open(out, "w") as fh:
        json.dump(truth, fh)


if __name__ == "__main__":
    main(sys.argv[1])
