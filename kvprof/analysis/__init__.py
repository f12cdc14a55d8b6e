"""Analysis: bundle -> typed results -> metrics map and findings.

``results`` holds the result types, ``sources`` decides what a path is, ``run``
orchestrates (one pass over the block events in ``engine``, then every section);
the analyzers are ``blocks``, ``heap`` (with ``heap_suspects`` and ``memray_reader``),
``gc``, ``cpu``, ``gpu``, ``torch_memory``, ``whatif``.  The names below are re-exported lazily (importing an analyzer does not
import the orchestration).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what __getattr__ below imports on first use, for the type checker
    from kvprof.analysis.results import SCHEMA as SCHEMA
    from kvprof.analysis.results import AnalysisResult as AnalysisResult
    from kvprof.analysis.results import Finding as Finding
    from kvprof.analysis.results import SectionResult as SectionResult
    from kvprof.analysis.results import Window as Window
    from kvprof.analysis.results import metric_entry as metric_entry
    from kvprof.analysis.run import SECTION_ANALYZERS as SECTION_ANALYZERS
    from kvprof.analysis.run import analyze_bundle as analyze_bundle
    from kvprof.analysis.run import analyze_path as analyze_path
    from kvprof.analysis.run import analyze_snapshot_file as analyze_snapshot_file
    from kvprof.analysis.run import block_metrics as block_metrics
    from kvprof.analysis.run import blocks_section as blocks_section
    from kvprof.analysis.run import pool_metrics as pool_metrics
    from kvprof.analysis.run import whatif_bundle as whatif_bundle
    from kvprof.analysis.sources import file_hint as file_hint
    from kvprof.analysis.sources import is_recording as is_recording
    from kvprof.analysis.sources import kind_of as kind_of
    from kvprof.analysis.sources import looks_like_memray as looks_like_memray
    from kvprof.analysis.torch_memory import snapshot_section as snapshot_section

_EXPORTS = {
    "SCHEMA": "results",
    "Finding": "results",
    "SectionResult": "results",
    "AnalysisResult": "results",
    "metric_entry": "results",
    "Window": "results",
    "is_recording": "sources",
    "looks_like_memray": "sources",
    "file_hint": "sources",
    "kind_of": "sources",
    "kind_of_existing": "sources",
    "require_bundle": "sources",
    "SECTION_ANALYZERS": "run",
    "analyze_path": "run",
    "analyze_bundle": "run",
    "analyze_snapshot_file": "run",
    "whatif_bundle": "run",
    "blocks_section": "run",
    "block_metrics": "run",
    "pool_metrics": "run",
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
