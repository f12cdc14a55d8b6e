from __future__ import annotations

import typer


def _list(text: str | None, what: str, cast=str):
    if text is None:
        return ()
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"{what}: empty list")
    try:
        return tuple(cast(x) for x in items)
    except ValueError:
        raise ValueError(f"{what}: not a list of numbers: {text!r}") from None


def run(
    bundle: str = typer.Argument(..., metavar="BUNDLE", help="A .kvprof bundle recorded with the blocks probe."),
    block_size: str = typer.Option(None, "--block-size", metavar="B[,B...]", help="Block sizes to replay (default 8,16,32,64,128 and the recorded one)."),
    num_blocks: str = typer.Option(None, "--num-blocks", metavar="N|unlimited", help="Pool size for every block size (default: the recorded KV memory, blocks × block size kept)."),
    kv_memory: str = typer.Option(None, "--kv-memory", metavar="SIZE", help="KV memory, e.g. 40GiB: blocks = SIZE / (block size × bytes per token)."),
    policy: str = typer.Option("free-queue", "--policy", metavar="P[,P...]", help="Allocators: free-queue (the engine's own), first-fit, best-fit, buddy."),
    recovery: str = typer.Option(None, "--recovery", metavar="R[,R...]", help="Out-of-blocks recovery for the run allocators: preempt (newest, recompute) and/or seeds (drop cached, compact, preempt); default both."),
    prefix_cache: str = typer.Option("on", "--prefix-cache", metavar="on|off", help="Replay with the prefix cache on (as recorded) or off."),
    pool: str = typer.Option(None, "--pool", metavar="LABEL", help="The pool to replay (default: the busiest)."),
    bytes_per_token: float = typer.Option(None, "--bytes-per-token", help="KV bytes per token (layers × KV heads × head size × dtype bytes × 2), when the bundle does not say."),
    metadata_bytes: int = typer.Option(64, "--metadata-bytes", help="Bookkeeping bytes per block for the block-size advice."),
    jobs: int = typer.Option(None, "--jobs", "-j", help="Configurations replayed at once, in threads (default: all cores)."),
    json_out: str = typer.Option(None, "--json", metavar="FILE", help="Write the result (sections.whatif of schema kvprof.analysis/1) to FILE ('-': stdout)."),
    width: int = typer.Option(None, "--width", metavar="COLUMNS", min=40, help="Report width."),
):
    """Replay a recorded run under other block sizes, pool sizes and allocators.

    Exit status: 0; 2 bad input.
    """
    import math
    import os

    from kvprof.analysis import AnalysisResult
    from kvprof.analysis import whatif as W
    from kvprof.errors import BundleError, UsageError

    try:
        sizes = _list(block_size, "--block-size", int)
        if any(b < 1 or b > 65536 for b in sizes):
            raise ValueError("--block-size: sizes must be between 1 and 65536")
        policies = _list(policy, "--policy")
        bad = [p for p in policies if p not in W.allocators.POLICIES]
        if bad:
            raise ValueError(f"--policy: unknown {', '.join(bad)} (one of: {', '.join(W.allocators.POLICIES)})")
        recoveries = _list(recovery, "--recovery") if recovery is not None else W.RECOVERIES
        bad = [r for r in recoveries if r not in W.RECOVERIES]
        if bad:
            raise ValueError(f"--recovery: unknown {', '.join(bad)} (one of: {', '.join(W.RECOVERIES)})")
        if recovery is not None and not any(p in W.allocators.CONTIGUOUS for p in policies):
            raise ValueError("--recovery applies to the run allocators (first-fit, best-fit, buddy): the free queue always preempts")
        if prefix_cache not in ("on", "off"):
            raise ValueError(f"--prefix-cache must be on or off, not {prefix_cache!r}")
        unlimited, nblocks = False, None
        if num_blocks is not None:
            if num_blocks == "unlimited":
                unlimited = True
            else:
                try:
                    nblocks = int(num_blocks)
                except ValueError:
                    raise ValueError(f"--num-blocks must be a number or 'unlimited', not {num_blocks!r}") from None
                if nblocks < 2:
                    raise ValueError("--num-blocks must be at least 2")
        if unlimited and (policies != ("free-queue",) or recovery is not None):
            raise ValueError("--num-blocks unlimited replays the engine's free queue only (no allocation can fail there): "
                             "--policy and --recovery need a pool size")
        if nblocks is not None and nblocks > W.MAX_BLOCKS:
            raise ValueError(f"--num-blocks: at most {W.MAX_BLOCKS:,} (the replay keeps per-block state in memory)")
        if num_blocks is not None and kv_memory is not None:
            raise ValueError("give --num-blocks or --kv-memory, not both")
        mem = W.parse_bytes(kv_memory) if kv_memory is not None else None
        if bytes_per_token is not None and not (math.isfinite(bytes_per_token) and bytes_per_token > 0):
            raise ValueError("--bytes-per-token must be a positive number")
        if metadata_bytes < 1:
            raise ValueError("--metadata-bytes must be 1 or more")
        if json_out is not None and not json_out.strip():
            raise ValueError("--json needs a file name ('-' for stdout)")
        if jobs is not None and jobs < 1:
            raise ValueError("--jobs must be at least 1")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not os.path.isdir(bundle):
        raise BundleError(f"no such bundle: {bundle}" if not os.path.exists(bundle) else f"not a kvprof bundle (whatif replays a bundle's block events): {bundle}")
    from kvprof.analysis import whatif_bundle
    from kvprof.trace.reader import Bundle

    opened = Bundle(bundle)
    opts = W.WhatifOptions(block_sizes=sizes, num_blocks=nblocks, unlimited=unlimited, kv_memory=mem, policies=policies,
                           recoveries=recoveries, prefix_cache=prefix_cache == "on", pool=pool, metadata_bytes=metadata_bytes,
                           bytes_per_token=bytes_per_token, jobs=jobs)
    try:
        from kvprof.report.progress import PassProgress

        with PassProgress("reading the schedule") as progress:
            section = whatif_bundle(opened, opts, progress=progress)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if json_out:
        from kvprof.report import json_report

        result = AnalysisResult(source={"bundle": os.path.abspath(bundle), "window": "whole run"}, metrics={}, sections={"whatif": section}, findings=[])
        json_report.write(result, json_out)
    if json_out != "-":
        from kvprof.report import whatif_terminal

        whatif_terminal.render(section, width=width)
