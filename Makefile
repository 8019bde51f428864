# Two entry points (see README): `make quickstart` and `make test`.
# Both create .venv on first use. Override the torch build with e.g.
#   make test TORCH_SPEC="torch==2.13.0+cu128 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.tscale-installed

.PHONY: install quickstart test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/tscale train configs/quickstart.yaml --overwrite

lint: $(STAMP)
	$(BIN)/ruff check tscale tests benchmarks docs/examples

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --timeout=300

bench: $(STAMP)
	$(BIN)/python benchmarks/step_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
