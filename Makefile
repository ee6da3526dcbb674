# The two commands of the README:  make quickstart  and  make test.
# Each creates .venv if missing and installs the project (and plugins/*) into it.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test lint install clean docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml $(wildcard plugins/*/pyproject.toml)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]" $(foreach p,$(wildcard plugins/*/pyproject.toml),-e $(dir $(p)))
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/sae-lightning fit --config recipes/quickstart.yaml

lint: $(STAMP)
	$(BIN)/ruff check sae_lightning plugins tests $(wildcard benchmarks)
	$(BIN)/ruff format --check sae_lightning plugins tests $(wildcard benchmarks)

test: lint
	$(BIN)/python -m pytest -q

# The documentation site (mkdocs + material + mkdocstrings) into build/site; warnings are errors.
DOCS_STAMP := $(VENV)/.docs-installed

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs .pytest_cache
