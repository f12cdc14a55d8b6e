"""The analysis's result types: findings, sections, the whole result and its JSON, and the
one way a metric value becomes an entry (unit, direction, window from the registry)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from kvprof import metrics as registry
from kvprof._version import __version__

SCHEMA = "kvprof.analysis/1"


@dataclass
class Finding:
    severity: str  # "error", "warning", "info"
    title: str
    detail: str
    evidence: dict = field(default_factory=dict)
    source: str = "blocks"


@dataclass
class SectionResult:
    name: str  # key under "sections"
    metrics: dict  # name -> metric_entry(...)
    section: dict  # JSON-ready details
    findings: list  # [Finding]


@dataclass
class AnalysisResult:
    source: dict
    metrics: dict  # name -> {"value", "unit", "better", "window", "source"}
    sections: dict
    findings: list[Finding]
    series: dict = field(default_factory=dict)  # what the HTML report and the Perfetto export draw (not in the JSON)

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "kvprof_version": __version__,
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": self.source,
            "metrics": self.metrics,
            "sections": self.sections,
            "findings": [dataclasses.asdict(f) for f in self.findings],
        }


def metric_entry(name: str, value, source: str, window: str | None = None) -> dict:
    m = registry.get(name)
    if m is None:
        raise KeyError(f"metric {name!r} is not in the registry")
    if value is not None and not isinstance(value, (int, bool)):
        value = float(value)
    return {"value": value, "unit": m.unit, "better": m.better, "window": window or m.window, "source": source, "noisy": m.noisy}


class Window(tuple):
    """(t0, t1) of an analysis window, carrying its label for the sections' metrics."""

    label: str

    def __new__(cls, bounds, label: str):
        self = super().__new__(cls, bounds)
        self.label = label
        return self
