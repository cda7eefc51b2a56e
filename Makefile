# encdec-attn. `make test` and `make report` set the environment up first when needed.
# On a machine without network (the GPU machine): make test PY=python3 SETUP=0
PY ?= .venv/bin/python
SETUP ?= 1
TIER ?= smoke
OUT ?= reports/out
DEVICE ?= $(shell $(PY) -c "import torch;print('h100' if torch.cuda.is_available() else 'cpu')" 2>/dev/null)
RESULTS ?= $(OUT)/results.csv
BASELINE ?= conformance/baselines/$(TIER)-$(DEVICE).csv
PYTEST_ARGS ?=
WORKERS ?= 2

ifeq ($(SETUP),1)
SETUP_DEP := .venv/.stamp
else
SETUP_DEP :=
endif

.PHONY: setup test test-fast report bench limits gate baseline lint format clean coverage

setup: $(SETUP_DEP)

# Re-runs only when pyproject.toml changes.
.venv/.stamp: pyproject.toml tools/install_deps.py
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/python tools/install_deps.py
	touch $@

# Unit tests of every folder, then the conformance matrix of $(TIER) (smoke on the CPU).
test: $(SETUP_DEP)
	$(PY) -m pytest -q -n $(WORKERS) reference optimized conformance/tests reports bench examples $(PYTEST_ARGS)
	$(PY) -m conformance run --tier $(TIER) --out $(OUT) -n $(WORKERS)

report: $(SETUP_DEP)
	-$(PY) -m conformance run --tier $(TIER) --out $(OUT) -n $(WORKERS)
	$(PY) -m reports render $(OUT)/results.csv --bench $(wildcard $(OUT)/bench.csv) --out $(OUT)/index.html

# Line and branch coverage of optimized/ under the smoke tier (the interpreter runs the Triton
# kernels as Python, so kernel lines count too). Writes $(OUT)/coverage/ (HTML) and a summary.
coverage: $(SETUP_DEP)
	$(PY) -m pytest conformance/test_matrix.py --tier $(TIER) --out $(OUT)/coverage-run \
		-n $(WORKERS) -q -o addopts= -p no:cacheprovider --cov=optimized --cov-branch \
		--cov-report=term-missing:skip-covered --cov-report=html:$(OUT)/coverage

bench: $(SETUP_DEP)
	$(PY) -m bench --out $(OUT)/bench.csv

# The bench rows that miss a target, each profiled under ncu (GPU + Nsight Compute): limits.csv
# beside bench.csv, which `make report` then shows.
limits: $(SETUP_DEP)
	$(PY) -m bench limits --bench $(OUT)/bench.csv --out $(OUT)/limits.csv

gate: $(SETUP_DEP)
	$(PY) -m reports.gate --results $(RESULTS) --baseline $(BASELINE) --summary $(OUT)/gate.md

baseline: $(SETUP_DEP)
	$(PY) -m reports.gate --results $(RESULTS) --baseline $(BASELINE) --write-baseline

lint: $(SETUP_DEP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(SETUP_DEP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf .venv $(OUT) .pytest_cache .hypothesis .benchmarks
	find . -name __pycache__ -prune -exec rm -rf {} +
