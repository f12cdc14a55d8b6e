from __future__ import annotations

import typer


def run(
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same block events."),
    block_size: int = typer.Option(16, "--block-size", help="Token slots per block."),
    num_blocks: int = typer.Option(512, "--num-blocks", help="Blocks in the pool."),
    requests: int = typer.Option(400, "--requests", help="Requests to serve."),
    free_order: str = typer.Option(
        "lru",
        "--free-order",
        help="Which free block an allocation takes: lru (the one freed longest ago, as vLLM's free queue), lifo, lowest-id.",
    ),
    prefix_share: float = typer.Option(
        0.5, "--prefix-share", help="Share of requests that start with a shared system prompt."
    ),
    leak_every: int = typer.Option(
        0, "--leak-every", help="Planted bug: never free the last block of every K-th request (0: off)."
    ),
    prefix_cache: bool = typer.Option(True, "--prefix-cache/--no-prefix-cache", help="Reuse cached full blocks."),
):
    """Run the built-in paged-KV serving simulation (no GPU, no model)."""
    from kvprof.commands._checks import usage_errors
    from kvprof.demo import DemoConfig, run_demo

    with usage_errors():  # DemoConfig checks its fields (kvprof.demo's own command line shares them)
        cfg = DemoConfig(
            seed=seed,
            block_size=block_size,
            num_blocks=num_blocks,
            requests=requests,
            free_order=free_order,
            prefix_share=prefix_share,
            leak_every=leak_every,
            prefix_cache=prefix_cache,
        )
    stats = run_demo(cfg)
    typer.echo(stats.summary())
