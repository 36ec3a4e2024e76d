# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Each creates .venv once (pip takes torch/torchvision from local disk where it can) and reuses it.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?= --durations=15

.PHONY: venv system-tools demo test faults lint bench pillow-simd clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[test]'
	touch $@

venv: $(STAMP)

## demo: generate a small dataset, build and serve shards, train two peers on it (CPU, a few minutes)
demo: $(STAMP)
	$(BIN)/python -m hivetrain.demo --dir demo

## system-tools: the Debian tools some tests use (aria2, opentracker, mktorrent, curl, chromium,
## iproute2), installed with apt-get when root; a no-op when present (tests/system_tools.py)
system-tools:
	$(PYTHON) tests/system_tools.py --install

## test: the suite CI runs (everything but the full fault suite)
test: $(STAMP) system-tools
	$(BIN)/pytest $(PYTEST_ARGS)

## faults: the full fault-injection suite (20 runs of each repeated case; tens of minutes), then its
## outcome table written into RELIABILITY.md. `make test` runs the same cases 3 times each.
FAULT_RUNS ?= 20
faults: $(STAMP)
	mkdir -p bench/out
	$(BIN)/pytest tests/faults --fault-runs $(FAULT_RUNS) --fault-report bench/out/faults.json $(PYTEST_ARGS); \
	  status=$$?; $(BIN)/python -m tests.faults.report bench/out/faults.json RELIABILITY.md; exit $$status

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

## bench: every comparison table under bench/ (minutes; see BENCHMARKS.md)
## (bench/gpu.py is not in this list: it needs a CUDA GPU; bench/gpu.sh runs it on a bare one)
bench: $(STAMP)
	for b in bench/build.py bench/fetch.py bench/loader.py bench/assign.py bench/train.py; do \
	  test -f $$b && $(BIN)/python $$b || exit 1; done

## pillow-simd: swap in the SIMD build of Pillow (compiles from source; optional fast path)
pillow-simd: $(STAMP)
	$(BIN)/pip uninstall -y pillow
	CC="cc -mavx2" $(BIN)/pip install --no-binary pillow-simd pillow-simd

clean:
	rm -rf $(VENV) demo bench/out .pytest_cache
