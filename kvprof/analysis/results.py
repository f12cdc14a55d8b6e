"""The analysis's result types: findings, sections, the whole result and its JSON, and the
one way a metric value becomes an entry (unit, direction, window from the registry)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from kvprof import metrics as registry
from kvprof._version import __version__

SCHEMA = "kvprof.analysis/1"


@dataclass
class Finding:
    severity: str  # "error", "warning", "info"
    title: str
    detail: str
    evidence: dict[str, Any] = field(default_factory=dict)
    source: str = "blocks"


@dataclass
class SectionResult:
    name: str  # key under "sections"
    metrics: dict[str, Any]  # name -> metric_entry(...)
    section: dict[str, Any]  # JSON-ready details
    findings: list[Any]  # [Finding]


@dataclass
class AnalysisResult:
    source: dict[str, Any]
    metrics: dict[str, Any]  # name -> {"value", "unit", "better", "window", "source"}
    sections: dict[str, Any]
    findings: list[Finding]
    series: dict[str, Any] = field(
        default_factory=dict
    )  # what the HTML report and the Perfetto export draw (not in the JSON)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "kvprof_version": __version__,
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": self.source,
            "metrics": self.metrics,
            "sections": self.sections,
            "findings": [dataclasses.asdict(f) for f in self.findings],
        }


def metric_entry(name: str, value: Any, source: str, window: str | None = None) -> dict[str, Any]:
    m = registry.get(name)
    if m is None:
        raise KeyError(f"metric {name!r} is not in the registry")
    if value is not None and not isinstance(value, (int, bool)):
        value = float(value)
    return {
        "value": value,
        "unit": m.unit,
        "better": m.better,
        "window": window or m.window,
        "source": source,
        "noisy": m.noisy,
    }


class Window(tuple[int, int]):
    """(t0, t1) of an analysis window, carrying its label for the sections' metrics."""

    label: str

    def __new__(cls, bounds: tuple[int, int], label: str) -> Window:
        self = super().__new__(cls, bounds)
        self.label = label
        return self
