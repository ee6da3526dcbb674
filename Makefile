# The two commands of the README:  make quickstart  and  make test.
# Each creates .venv if missing and installs the project (and plugins/*) into it.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test lint install clean bench-peers docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml $(wildcard plugins/*/pyproject.toml)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,lm]" $(foreach p,$(wildcard plugins/*/pyproject.toml),-e $(dir $(p)))
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

# Side-by-side benchmark against EleutherAI sparsify (PyPI: eai-sparsify; PyPI's plain `sparsify`
# is an unrelated, deprecated Neural Magic package) and SAELens, in a separate venv. torch is
# installed first and then pinned, so the peers' requirements cannot replace it.
PEERS_VENV ?= .venv-peers
PEERS_SPEC ?= eai-sparsify sae-lens
BENCH_ARGS ?= --d-in 768 --n-latents 16384 --k 32 --batch 4096 --threads 2
PEERS_STAMP := $(PEERS_VENV)/.installed

$(PEERS_VENV)/bin/python:
	$(PYTHON) -m venv $(PEERS_VENV)

$(PEERS_STAMP): $(PEERS_VENV)/bin/python pyproject.toml
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(PEERS_VENV)/bin/python -c "import torch; print('torch==' + torch.__version__)" \
		> $(PEERS_VENV)/constraints.txt
	$(PEERS_VENV)/bin/python -m pip install --quiet -c $(PEERS_VENV)/constraints.txt \
		$(PEERS_SPEC) -e .
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
	$(PEERS_VENV)/bin/python benchmarks/peers.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(PEERS_VENV) runs .pytest_cache
