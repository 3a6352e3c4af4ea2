# make run   set up .venv (first time only), print the time estimate, rebuild with dvc repro
# make test  set up .venv (first time only) and run the test suite
# make lint  ruff check, ruff format --check and mypy: what CI enforces before the tests
# make bench install the bench extra and run the benchmarks (bench/README.md), ~20 min
# make chaos stop the training stages (kill -9 or SIGTERM) at 20 random moments; survived/total
# make screenshots  the MLflow and Prefect UIs after two tiny flow runs, into docs/img (~10 min)

PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export GX_ANALYTICS_ENABLED := false
export PYTHONUNBUFFERED := 1

.PHONY: run test lint bench chaos screenshots setup clean-venv

setup: $(STAMP)

# Reinstall only when the dependency pins change, so a second `make run` is quick.
$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The estimate measures this machine for a few seconds first; it never stops the run.
run: $(STAMP)
	-$(BIN)/lmops estimate
	$(BIN)/dvc repro

# One worker per CPU, each taking whole test files (a file's fixtures, such as the tiny
# pipeline run that test_pipeline.py shares, are built once): the end-to-end files spend
# much of their time waiting on servers and subprocesses.
test: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src stages flows tests bench
	$(BIN)/ruff format --check src stages flows tests bench
	$(BIN)/mypy

# Scripts, not tests: each prints its figures and writes bench/results/<name>.{json,md}.
bench: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[bench]'
	TQDM_DISABLE=1 $(BIN)/python bench/train_throughput.py
	TQDM_DISABLE=1 $(BIN)/python bench/decode.py
	TQDM_DISABLE=1 $(BIN)/python bench/quantise.py
	TQDM_DISABLE=1 $(BIN)/python bench/op_profile.py
	TQDM_DISABLE=1 $(BIN)/python bench/data_stages.py
	TQDM_DISABLE=1 $(BIN)/python bench/pipeline_overhead.py
	TQDM_DISABLE=1 $(BIN)/python bench/serve.py
	TQDM_DISABLE=1 $(BIN)/python bench/estimate.py --profile params.fast.yaml

# Each kill is followed by `dvc repro`, which must resume to the uninterrupted run's weights.
chaos: $(STAMP)
	$(BIN)/python -m tests.support.chaos --kills 20

# Two tiny pipeline flow runs, one param apart, against real MLflow and Prefect servers;
# headless Chromium (apt-get install -y chromium) saves their pages for the docs.
screenshots: $(STAMP)
	$(BIN)/python -m tests.support.screenshots --out docs/img

clean-venv:
	rm -rf $(VENV)
