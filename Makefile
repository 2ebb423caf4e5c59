# Two commands on a fresh machine: `make run` (the main job) and `make test` (the test suite).
# Each sets up its own virtual environment in .venv first (once; again when pyproject.toml changes).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
EXTRAS ?= dev,plot,ray,wandb,docs
SHARED_DATA := $(abspath ../shared/data)
# Read the datasets from ../shared/data when it is there (no download needed).
ifneq ($(wildcard $(SHARED_DATA)/README.md),)
export LIGHTNING_ETAP_DATA ?= $(SHARED_DATA)
endif
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: install run test lint docs clean

$(VENV)/.installed: pyproject.toml constraints-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints-dev.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints-dev.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/lightning-etap run $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check lightning_etap tests benchmarks examples

docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build site *.egg-info
