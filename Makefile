# encdec-attn. `make test` and `make report` set the environment up first when needed.
# On a machine without network (the GPU machine): make test PY=python3 SETUP=0
PY ?= .venv/bin/python
SETUP ?= 1
TIER ?= smoke
OUT ?= reports/out
# cpu, or the GPU model (h100, h200, ...): baselines and committed results are named after it.
DEVICE ?= $(shell $(PY) -c "import torch; from conformance.schema import device_kind; print(device_kind(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'))" 2>/dev/null)
RESULTS ?= $(OUT)/results.csv
# A baseline is plain CSV (the smoke tier's: its diff is the review) or gzipped (the GPU tiers').
BASELINE ?= $(firstword $(wildcard conformance/baselines/$(TIER)-$(DEVICE).csv.gz) conformance/baselines/$(TIER)-$(DEVICE).csv)
PYTEST_ARGS ?=
WORKERS ?= 2
BACKEND_MODULE ?=

ifeq ($(SETUP),1)
SETUP_DEP := .venv/.stamp
else
SETUP_DEP :=
endif

.PHONY: setup test report bench limits gate baseline lint format clean coverage

setup: $(SETUP_DEP)

# Re-runs only when pyproject.toml changes.
.venv/.stamp: pyproject.toml tools/install_deps.py
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/python tools/install_deps.py
	.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# Unit tests of every folder, then the conformance matrix of $(TIER) (smoke on the CPU), which
# also writes $(OUT)/results.csv and $(OUT)/index.html. A test worker computes on one thread:
# $(WORKERS) workers of several threads each on as many cores spent a fifth of their time
# waiting for each other.
test: $(SETUP_DEP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(WORKERS) reference optimized conformance/tests reports bench examples tuning $(PYTEST_ARGS)
	$(PY) -m conformance run --tier $(TIER) --out $(OUT) -n $(WORKERS)

# The report of $(TIER): the result set `make test` left is rendered again (with bench.csv where
# one exists); the tier runs only when there is none of that tier.
report: $(SETUP_DEP)
	@$(PY) -c "import json,sys; sys.exit(json.load(open('$(OUT)/run.json')).get('tier') != '$(TIER)')" 2>/dev/null \
		|| $(PY) -m conformance run --tier $(TIER) --out $(OUT) -n $(WORKERS) || true
	$(PY) -m reports render $(OUT)/results.csv $(if $(wildcard $(OUT)/bench.csv),--bench $(OUT)/bench.csv) --out $(OUT)/index.html

# Line and branch coverage of optimized/ under the smoke tier (the interpreter runs the Triton
# kernels as Python, so kernel lines count too). Writes $(OUT)/coverage/ (HTML) and a summary.
coverage: $(SETUP_DEP)
	rm -f .coverage .coverage.*
	-$(PY) -m coverage run -m conformance run --tier $(TIER) --out $(OUT)/coverage-run -n $(WORKERS)
	$(PY) -m coverage combine -q
	$(PY) -m coverage report --skip-covered --show-missing
	$(PY) -m coverage html -q -d $(OUT)/coverage

# GPU: the benchmark grid; with BACKEND_MODULE=pkg.mod:Class, your backend beside every peer
# (to reports/out/backends/<its name>/bench.csv).
bench: $(SETUP_DEP)
	$(PY) -m bench $(if $(BACKEND_MODULE),--backend-module $(BACKEND_MODULE),--out $(OUT)/bench.csv)

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
	rm -rf .venv $(OUT) .pytest_cache .hypothesis .benchmarks .coverage .coverage.*
	find . -name __pycache__ -prune -exec rm -rf {} +
