"""Built-in demo workload: a paged-KV serving simulation (no GPU, no model).

Requests arrive with ShareGPT-like prompt and output lengths; some start with
one of a few shared system prompts, so the prefix cache has something to find.
A continuous-batching scheduler admits requests while blocks last, decodes one
token per running request per step, preempts the newest request (recompute)
when a block cannot be had, and frees finished requests' blocks (tail first,
as vLLM does).  It reports everything through the public `kvprof.blocks` API
and a simulated clock, so the same seed gives the same events, timestamps
included, run after run.

Run it under the recorder: ``kvprof record -- python -m kvprof.demo``.
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
from collections import deque
from dataclasses import dataclass

from kvprof.blocks import Pool
from kvprof.errors import EXIT_OK

FREE_ORDERS = ("lru", "lifo", "lowest-id")  # which free block an allocation takes (whatif --policy is the allocator)


@dataclass
class DemoConfig:
    seed: int = 0
    block_size: int = 16
    num_blocks: int = 512
    requests: int = 400
    free_order: str = "lru"
    prefix_share: float = 0.5
    leak_every: int = 0
    prefix_cache: bool = True
    max_running: int = 64
    arrival_rate: float = 60.0  # requests per simulated second

    def __post_init__(self):
        if self.block_size < 1 or self.block_size > 4096:
            raise ValueError(f"--block-size must be between 1 and 4096, not {self.block_size}")
        if self.num_blocks < 2:
            raise ValueError(f"--num-blocks must be at least 2, not {self.num_blocks}")
        if self.requests < 1:
            raise ValueError(f"--requests must be at least 1, not {self.requests}")
        if self.free_order not in FREE_ORDERS:
            raise ValueError(f"--free-order must be one of {', '.join(FREE_ORDERS)}, not {self.free_order!r}")
        if not 0.0 <= self.prefix_share <= 1.0:
            raise ValueError(f"--prefix-share must be between 0 and 1, not {self.prefix_share}")
        if self.leak_every < 0:
            raise ValueError("--leak-every must be 0 (off) or positive")


@dataclass
class DemoStats:
    requests: int = 0
    finished: int = 0
    rejected: int = 0
    steps: int = 0
    preemptions: int = 0
    preempted_query_tokens: int = 0
    preempted_hit_tokens: int = 0
    peak_blocks: int = 0
    hit_tokens: int = 0
    query_tokens: int = 0
    sim_seconds: float = 0.0
    leaked: int = 0

    def summary(self) -> str:
        hr = f"{100 * self.hit_tokens / self.query_tokens:.1f}%" if self.query_tokens else "n/a"
        return (
            f"demo: {self.finished}/{self.requests} requests in {self.steps} steps ({self.sim_seconds:.1f} simulated s), "
            f"{self.preemptions} preemptions, peak {self.peak_blocks} blocks, prefix-cache hit rate {hr}"
            + (f", {self.rejected} rejected (longer than the pool)" if self.rejected else "")
            + (f", {self.leaked} blocks leaked on purpose" if self.leaked else "")
        )


class _Request:
    __slots__ = ("rid", "tokens", "prompt_len", "output_len", "generated", "blocks", "hashes", "arrival", "preempted")

    def __init__(self, rid, tokens, prompt_len, output_len, arrival):
        self.rid = rid
        self.tokens = tokens  # prompt + generated token ids
        self.prompt_len = prompt_len
        self.output_len = output_len
        self.generated = 0
        self.blocks: list[int] = []
        self.hashes: list[int] = []
        self.arrival = arrival
        self.preempted = False


class _FreeBlocks:
    """Free blocks, taken in a free order: lru (the block freed longest ago, as vLLM's free
    queue), lifo (the block freed last), lowest-id.  Invariant: every block here has ref count 0."""

    def __init__(self, ids, order):
        self.order = order
        self.members = set(ids)
        if order == "lowest-id":
            self.heap = list(ids)
            heapq.heapify(self.heap)
        else:
            self.queue = deque(ids)

    def __len__(self):
        return len(self.members)

    def push(self, block):
        self.members.add(block)
        if self.order == "lowest-id":
            heapq.heappush(self.heap, block)
        else:
            self.queue.append(block)

    def pop(self):
        while True:
            if self.order == "lowest-id":
                b = heapq.heappop(self.heap)
            elif self.order == "lifo":
                b = self.queue.pop()
            else:
                b = self.queue.popleft()
            if b in self.members:  # lazily skip blocks taken out by a cache hit
                self.members.remove(b)
                return b

    def remove(self, block):
        self.members.discard(block)
        if self.order != "lowest-id" and len(self.queue) > 4 * len(self.members) + 64:
            self.queue = deque(b for b in self.queue if b in self.members)


def _lengths(rng: random.Random) -> tuple[int, int]:
    # ShareGPT-like: long-tailed prompts and outputs (lognormal, clipped)
    prompt = int(min(2048, max(4, rng.lognormvariate(4.6, 0.9))))
    output = int(min(1024, max(1, rng.lognormvariate(4.2, 0.8))))
    return prompt, output


def run_demo(cfg: DemoConfig) -> DemoStats:
    rng = random.Random(cfg.seed)
    B = cfg.block_size
    clock_ns = [0]
    pool = Pool(
        cfg.num_blocks,
        B,
        name="demo",
        engine="kvprof-demo",
        reserved=[0],
        clock=lambda: clock_ns[0],
        free_order=cfg.free_order,
    )
    free = _FreeBlocks(range(1, cfg.num_blocks), cfg.free_order)
    ref = [0] * cfg.num_blocks
    block_hash: dict[int, int] = {}
    hash_to_block: dict[int, int] = {}
    system_prompts = [[rng.randrange(32000) for _ in range(rng.choice([48, 96, 200, 400]))] for _ in range(4)]
    stats = DemoStats(requests=cfg.requests)
    leaked_blocks: list[int] = []

    # arrivals
    pending: deque[_Request] = deque()
    t = 0.0
    for i in range(cfg.requests):
        t += rng.expovariate(cfg.arrival_rate)
        prompt_len, output_len = _lengths(rng)
        tokens = []
        if rng.random() < cfg.prefix_share:
            tokens = list(rng.choice(system_prompts))
        tokens += [rng.randrange(32000) for _ in range(max(1, prompt_len - len(tokens)))]
        pending.append(_Request(f"req-{i}", tokens, len(tokens), output_len, int(t * 1e9)))

    waiting: deque[_Request] = deque()
    running: list[_Request] = []
    finished_count = 0
    step = 0
    steady_marked = False

    def chain_hash(parent: int, toks) -> int:
        return hash((parent, tuple(toks)))

    def take_block() -> int:
        b = free.pop()
        h = block_hash.pop(b, None)
        if h is not None and hash_to_block.get(h) == b:
            del hash_to_block[h]
        return b

    def cache_full_blocks(req: _Request, upto_tokens: int) -> None:
        if not cfg.prefix_cache:
            return
        new = []
        while len(req.hashes) < upto_tokens // B and len(req.hashes) < len(req.blocks):
            k = len(req.hashes)
            parent = req.hashes[-1] if req.hashes else 0
            h = chain_hash(parent, req.tokens[k * B : (k + 1) * B])
            req.hashes.append(h)
            b = req.blocks[k]
            if b not in block_hash and h not in hash_to_block:
                block_hash[b] = h
                hash_to_block[h] = b
                new.append(b)
        if new:
            pool.cache(new)

    def release(req: _Request, leak: bool = False) -> None:
        blocks = list(reversed(req.blocks))  # tail first: evicted first
        if leak and blocks:
            leaked_blocks.append(blocks.pop(0))
        for b in blocks:
            ref[b] -= 1
            if ref[b] == 0:
                free.push(b)
        if blocks:
            pool.free(blocks, request=req.rid)
        req.blocks = []
        req.hashes = []

    def preempt_newest() -> _Request:
        victim = running.pop()
        release(victim)
        pool.preempted(victim.rid)
        victim.preempted = True
        stats.preemptions += 1
        waiting.appendleft(victim)
        return victim

    total_capacity = cfg.num_blocks - 1
    while pending or waiting or running:
        now = clock_ns[0]
        while pending and pending[0].arrival <= now:
            r = pending.popleft()
            pool.request_arrived(r.rid, r.prompt_len, r.output_len)
            waiting.append(r)
        pool.step(step)
        # -- admit (prefill) ------------------------------------------------------------
        batch_tokens = 0
        while waiting and len(running) < cfg.max_running:
            req = waiting[0]
            length = len(req.tokens)
            if -(-(length + req.output_len - req.generated) // B) > total_capacity:
                waiting.popleft()  # can never fit: reject, as an engine would
                stats.rejected += 1
                pool.request_finished(req.rid)
                continue
            hits: list[int] = []
            if cfg.prefix_cache:
                parent = 0
                for k in range((length - 1) // B):
                    h = chain_hash(parent, req.tokens[k * B : (k + 1) * B])
                    b = hash_to_block.get(h)
                    if b is None:
                        break
                    hits.append(b)
                    parent = h
            need = -(-length // B) - len(hits)
            from_free = need + sum(1 for b in hits if ref[b] == 0)  # cached free hits leave the free pool too
            if from_free > len(free):
                pool.allocation_failed(req.rid, from_free, len(free))
                break
            waiting.popleft()
            if not req.preempted:  # re-admissions are counted apart, as vLLM counts them
                pool.prefix_query(req.rid, length, len(hits) * B)
                stats.query_tokens += length
                stats.hit_tokens += len(hits) * B
            else:
                pool.prefix_query(req.rid, length, len(hits) * B, preempted=True)
                stats.preempted_query_tokens += length
                stats.preempted_hit_tokens += len(hits) * B
            for b in hits:
                if ref[b] == 0:
                    free.remove(b)
                ref[b] += 1
            if hits:
                pool.hit(hits, request=req.rid)
            new = [take_block() for _ in range(need)]
            for b in new:
                ref[b] = 1
            if new:
                pool.alloc(new, request=req.rid)
            req.blocks = hits + new
            parent = 0
            for k in range(len(hits)):
                parent = chain_hash(parent, req.tokens[k * B : (k + 1) * B])
                req.hashes.append(parent)
            cache_full_blocks(req, length)
            pool.request_state(req.rid, length, len(req.blocks))
            running.append(req)
            batch_tokens += length - len(hits) * B
        # -- decode one token per running request ---------------------------------------------
        i = 0
        while i < len(running):
            req = running[i]
            length = len(req.tokens)
            if length % B == 0:  # the next token needs a new block
                while not len(free):
                    pool.allocation_failed(req.rid, 1, 0)
                    victim = preempt_newest()
                    if victim is req:
                        break
                if req not in running:
                    continue
                b = take_block()
                ref[b] = 1
                pool.alloc([b], request=req.rid)
                req.blocks.append(b)
            req.tokens.append(rng.randrange(32000))
            req.generated += 1
            batch_tokens += 1
            cache_full_blocks(req, len(req.tokens))
            pool.request_state(req.rid, len(req.tokens), len(req.blocks))
            i += 1
        stats.peak_blocks = max(stats.peak_blocks, total_capacity - len(free))
        # -- finish -------------------------------------------------------------------------------
        still = []
        for req in running:
            if req.generated >= req.output_len:
                finished_count += 1
                leak = cfg.leak_every > 0 and finished_count % cfg.leak_every == 0
                release(req, leak=leak)
                pool.request_finished(req.rid)
            else:
                still.append(req)
        running = still
        if not steady_marked and finished_count >= max(1, cfg.requests // 10):
            pool.mark("steady_state")
            steady_marked = True
        step += 1
        # simulated step time: fixed overhead plus per-token work
        clock_ns[0] += int((4e-3 + 2.5e-5 * batch_tokens) * 1e9)
        if not running and not waiting and pending:
            clock_ns[0] = max(clock_ns[0], pending[0].arrival)
    pool.mark("drained")
    stats.finished = finished_count
    stats.steps = step
    stats.sim_seconds = clock_ns[0] / 1e9
    stats.leaked = len(leaked_blocks)
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvprof.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=512)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--free-order", default="lru", choices=FREE_ORDERS)
    ap.add_argument("--prefix-share", type=float, default=0.5)
    ap.add_argument("--leak-every", type=int, default=0)
    ap.add_argument("--no-prefix-cache", action="store_true")
    a = ap.parse_args(argv)
    try:
        cfg = DemoConfig(
            a.seed,
            a.block_size,
            a.num_blocks,
            a.requests,
            a.free_order,
            a.prefix_share,
            a.leak_every,
            not a.no_prefix_cache,
        )
    except ValueError as exc:
        ap.error(str(exc))
    print(run_demo(cfg).summary())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
