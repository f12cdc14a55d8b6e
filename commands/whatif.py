from __future__ import annotations

import typer

from kvprof.commands._checks import require, usage_errors
from kvprof.errors import UsageError


def _list(text: str | None, what: str, cast=str):
    if text is None:
        return ()
    items = [x.strip() for x in text.split(",") if x.strip()]
    require(items, f"{what}: empty list")
    try:
        return tuple(cast(x) for x in items)
    except ValueError:
        raise UsageError(f"{what}: not a list of numbers: {text!r}") from None


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def run(
    bundle: str = typer.Argument(..., metavar="BUNDLE", help="A .kvprof bundle recorded with the blocks probe."),
    block_size: str = typer.Option(
        None,
        "--block-size",
        metavar="B[,B...]",
        help="Block sizes to replay (default 8,16,32,64,128 and the recorded one).",
    ),
    num_blocks: str = typer.Option(
        None,
        "--num-blocks",
        metavar="N|unlimited",
        help="Pool size for every block size (default: the recorded KV memory, blocks × block size kept).",
    ),
    kv_memory: str = typer.Option(
        None,
        "--kv-memory",
        metavar="SIZE",
        help="KV memory, e.g. 40GiB: blocks = SIZE / (block size × bytes per token).",
    ),
    policy: str = typer.Option(
        "free-queue",
        "--policy",
        metavar="P[,P...]",
        help="Allocators: free-queue (the engine's own), first-fit, best-fit, buddy.",
    ),
    recovery: str = typer.Option(
        None,
        "--recovery",
        metavar="R[,R...]",
        help="Out-of-blocks recovery for the run allocators: preempt (newest, recompute) and/or seeds (drop cached, compact, preempt); default both.",
    ),
    prefix_cache: str = typer.Option(
        "on", "--prefix-cache", metavar="on|off", help="Replay with the prefix cache on (as recorded) or off."
    ),
    pool: str = typer.Option(None, "--pool", metavar="LABEL", help="The pool to replay (default: the busiest)."),
    bytes_per_token: float = typer.Option(
        None,
        "--bytes-per-token",
        help="KV bytes per token (layers × KV heads × head size × dtype bytes × 2), when the bundle does not say.",
    ),
    metadata_bytes: int = typer.Option(
        64, "--metadata-bytes", help="Bookkeeping bytes per block for the block-size advice."
    ),
    jobs: int = typer.Option(
        None, "--jobs", "-j", help="Configurations replayed at once, in threads (default: all cores)."
    ),
    json_out: str = typer.Option(
        None,
        "--json",
        metavar="FILE",
        help="Write the result (sections.whatif of schema kvprof.analysis/1) to FILE ('-': stdout).",
    ),
    width: int = typer.Option(None, "--width", metavar="COLUMNS", min=40, help="Report width."),
):
    """Replay a recorded run under other block sizes, pool sizes and allocators.

    Exit status: 0; 2 bad input.
    """
    import math
    import os

    from kvprof.analysis import AnalysisResult
    from kvprof.analysis import whatif as W

    sizes = _list(block_size, "--block-size", int)
    require(all(1 <= b <= 65536 for b in sizes), "--block-size: sizes must be between 1 and 65536")
    policies = _list(policy, "--policy")
    bad = [p for p in policies if p not in W.allocators.POLICIES]
    require(not bad, f"--policy: unknown {', '.join(bad)} (one of: {', '.join(W.allocators.POLICIES)})")
    recoveries = _list(recovery, "--recovery") if recovery is not None else W.RECOVERIES
    bad = [r for r in recoveries if r not in W.RECOVERIES]
    require(not bad, f"--recovery: unknown {', '.join(bad)} (one of: {', '.join(W.RECOVERIES)})")
    require(
        recovery is None or any(p in W.allocators.CONTIGUOUS for p in policies),
        "--recovery applies to the run allocators (first-fit, best-fit, buddy): the free queue always preempts",
    )
    require(prefix_cache in ("on", "off"), f"--prefix-cache must be on or off, not {prefix_cache!r}")
    unlimited, nblocks = False, None
    if num_blocks is not None:
        if num_blocks == "unlimited":
            unlimited = True
        else:
            require(_is_int(num_blocks), f"--num-blocks must be a number or 'unlimited', not {num_blocks!r}")
            nblocks = int(num_blocks)
            require(nblocks >= 2, "--num-blocks must be at least 2")
    require(
        not (unlimited and (policies != ("free-queue",) or recovery is not None)),
        "--num-blocks unlimited replays the engine's free queue only (no allocation can fail there): "
        "--policy and --recovery need a pool size",
    )
    require(
        nblocks is None or nblocks <= W.MAX_BLOCKS,
        f"--num-blocks: at most {W.MAX_BLOCKS:,} (the replay keeps per-block state in memory)",
    )
    require(num_blocks is None or kv_memory is None, "give --num-blocks or --kv-memory, not both")
    with usage_errors():  # the size's own parser names what it cannot read
        mem = W.parse_bytes(kv_memory) if kv_memory is not None else None
    require(
        bytes_per_token is None or (math.isfinite(bytes_per_token) and bytes_per_token > 0),
        "--bytes-per-token must be a positive number",
    )
    require(metadata_bytes >= 1, "--metadata-bytes must be 1 or more")
    require(json_out is None or json_out.strip(), "--json needs a file name ('-' for stdout)")
    require(jobs is None or jobs >= 1, "--jobs must be at least 1")
    from kvprof.analysis import require_bundle, whatif_bundle

    require_bundle(bundle, f"not a kvprof bundle (whatif replays a bundle's block events): {bundle}")
    from kvprof.trace.atomic import check_output

    check_output(json_out)
    from kvprof.trace.reader import Bundle

    opened = Bundle(bundle)
    opts = W.WhatifOptions(
        block_sizes=sizes,
        num_blocks=nblocks,
        unlimited=unlimited,
        kv_memory=mem,
        policies=policies,
        recoveries=recoveries,
        prefix_cache=prefix_cache == "on",
        pool=pool,
        metadata_bytes=metadata_bytes,
        bytes_per_token=bytes_per_token,
        jobs=jobs,
    )
    from kvprof.report.progress import PassProgress

    with (
        usage_errors(),
        PassProgress("reading the schedule") as progress,
    ):  # --pool not in the bundle, no pool, no numba
        section = whatif_bundle(opened, opts, progress=progress)
    if json_out:
        from kvprof.report import json_report

        result = AnalysisResult(
            source={"bundle": os.path.abspath(bundle), "window": "whole run"},
            metrics={},
            sections={"whatif": section},
            findings=[],
        )
        json_report.write(result, json_out)
    if json_out != "-":
        from kvprof.report import whatif_terminal

        whatif_terminal.render(section, width=width)
