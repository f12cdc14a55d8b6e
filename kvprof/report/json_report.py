"""JSON renderer: the analysis as schema kvprof.analysis/1 (docs/analysis-schema.md)."""

from __future__ import annotations

import json
import math


def _clean(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item"):  # numpy scalar
        return _clean(obj.item())
    return obj


def dumps(result) -> str:
    return json.dumps(_clean(result.to_json()), indent=1)


def write(result, path: str) -> None:
    from kvprof.trace.atomic import write_output

    write_output(path, dumps(result) + "\n")
