"""The finding for re-admissions that recompute what the prefix cache had just evicted
(block_findings on hand-made PoolAnalysis values: fires on a low preempted hit rate with
evictions, and only then)."""

import dataclasses

import pytest

from kvprof.analysis.blocks import Distribution, PoolAnalysis
from kvprof.analysis.findings import READMISSION_HITS, block_findings


def analysis(**kw) -> PoolAnalysis:
    base = {}
    for f in dataclasses.fields(PoolAnalysis):
        if f.type in ("int", int):
            base[f.name] = 0
        elif "Distribution" in str(f.type):
            base[f.name] = Distribution.of(__import__("numpy").zeros(0))
        elif "list" in str(f.type):
            base[f.name] = []
        elif "dict" in str(f.type):
            base[f.name] = {}
        else:
            base[f.name] = None
    base.update(label="all", capacity=40, block_size=256)
    base.update(kw)
    return PoolAnalysis(**base)


def titled(findings, words):
    return [f for f in findings if words in f.title]


def test_low_readmission_hits_with_evictions_is_a_warning():
    a = analysis(
        preemptions=25,
        query_tokens=60000,
        hit_tokens=33280,
        hit_rate=33280 / 60000,
        preempted_query_tokens=40000,
        preempted_hit_tokens=8000,
        preempted_hit_rate=0.2,
        evictions=120,
        evicted_before_reuse=90,
    )
    (f,) = titled(block_findings(a, []), "recomputed")
    assert f.severity == "warning" and f.title == "Preempted requests recomputed 80.0% of their tokens on re-admission"
    assert f.evidence == {
        "preempted_query_tokens": 40000,
        "preempted_hit_tokens": 8000,
        "preempted_hit_rate": 0.2,
        "recomputed_tokens": 32000,
        "evictions": 120,
        "evicted_before_reuse": 90,
        "preemptions": 25,
    }
    assert "32,000 tokens were computed again" in f.detail and "120 cached blocks were evicted" in f.detail


@pytest.mark.parametrize(
    "change",
    [
        {"evictions": 0, "evicted_before_reuse": 0},  # nothing was evicted: the cache did not drop their blocks
        {"preempted_hit_tokens": 30000, "preempted_hit_rate": 0.75},  # re-admissions found most of their tokens
        {"preempted_query_tokens": 0, "preempted_hit_tokens": 0, "preempted_hit_rate": None},  # no re-admission lookups
    ],
)
def test_no_finding_otherwise(change):
    kw = dict(
        preemptions=25,
        preempted_query_tokens=40000,
        preempted_hit_tokens=8000,
        preempted_hit_rate=0.2,
        evictions=120,
        evicted_before_reuse=90,
    )
    kw.update(change)
    assert not titled(block_findings(analysis(**kw), []), "recomputed")


def test_threshold_is_strict():
    at = analysis(
        preemptions=1,
        preempted_query_tokens=1000,
        preempted_hit_tokens=int(1000 * READMISSION_HITS),
        preempted_hit_rate=READMISSION_HITS,
        evictions=3,
    )
    assert not titled(block_findings(at, []), "recomputed")
