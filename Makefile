# make run   set up .venv (first time only) and rebuild the pipeline with dvc repro
# make test  set up .venv (first time only) and run the test suite
# make lint  ruff over the code

PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export GX_ANALYTICS_ENABLED := false
export PYTHONUNBUFFERED := 1

.PHONY: run test lint setup clean-venv

setup: $(STAMP)

# Reinstall only when the dependency pins change, so a second `make run` is quick.
$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src stages flows tests bench

clean-venv:
	rm -rf $(VENV)
