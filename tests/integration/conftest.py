"""The `sglang` marker: SGLang's real scheduler-side code in its own environment (make test-sglang).
Registered here, and left out unless `-m` names it, as pyproject's addopts does for `vllm`."""

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "sglang: runs SGLang's real memory code (its own environment; make test-sglang)")


def pytest_collection_modifyitems(config, items):
    if "sglang" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="SGLang test: make test-sglang (or -m sglang)")
    for item in items:
        if item.get_closest_marker("sglang") is not None:
            item.add_marker(skip)
