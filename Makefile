# `make demo` and `make test` work on a fresh machine with only python3 and pip:
# the first run creates .venv and installs convforge with its dev extras into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[all,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/convforge pipeline recipes/default.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check convforge tests benchmarks docs/generate.py
	$(BIN)/ruff format --check convforge tests benchmarks docs/generate.py

clean:
	rm -rf $(VENV) runs .pytest_cache
