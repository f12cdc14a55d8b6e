import os

from kvprof import metrics
from tests.conftest import ROOT


def test_metric_reference_is_generated_from_the_registry():
    with open(os.path.join(ROOT, "docs", "metrics-reference.md")) as fh:
        assert fh.read() == metrics.reference_markdown(), "run `make docs`"


def test_every_registered_metric_is_documented_in_metrics_md():
    text = open(os.path.join(ROOT, "docs", "metrics.md")).read().lower()
    for m in metrics.REGISTRY.values():
        assert m.better in ("lower", "higher", None)
        assert m.definition.endswith(".")
    for word in (
        "internal fragmentation",
        "external fragmentation",
        "fragmentation that hurts",
        "hit rate",
        "evicted before reuse",
        "leaked",
        "what-if",
    ):
        assert word in text
