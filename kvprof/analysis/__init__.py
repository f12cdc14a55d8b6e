"""Analysis: bundle -> typed results -> metrics map and findings.

``results`` holds the result types, ``sources`` decides what a path is, ``run``
orchestrates (one pass over the block events in ``engine``, then every section);
the analyzers are ``blocks``, ``heap``, ``gc``, ``cpu``, ``gpu``, ``torch_memory``,
``whatif``.  The names below are re-exported lazily (importing an analyzer does not
import the orchestration).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "SCHEMA": "results", "Finding": "results", "SectionResult": "results", "AnalysisResult": "results", "metric_entry": "results",
    "Window": "results",
    "is_recording": "sources", "looks_like_memray": "sources", "file_hint": "sources", "kind_of": "sources",
    "SECTION_ANALYZERS": "run", "analyze_path": "run", "analyze_bundle": "run", "analyze_snapshot_file": "run", "whatif_bundle": "run",
    "blocks_section": "run", "block_metrics": "run", "pool_metrics": "run",
    "snapshot_section": "torch_memory",
}


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value
