# ssl_mt — run `make help` for the targets.
# ARGS="..." passes Hydra overrides, e.g. make pretrain ARGS="experiment=quick trainer=ddp trainer.devices=4"

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= data/synthetic
N ?= 2000
SIZE ?= 256
ARGS ?=
RUNS ?=
REPORT ?= reports/compare

.DEFAULT_GOAL := help
.PHONY: help install data check preview pretrain finetune compare demo bench test test-all lint format clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install ssl_mt (editable, with dev tools); no-op when up to date

$(DATA)/labels.csv: | $(STAMP)
	$(PY) -m ssl_mt.data generate --out $(DATA) --n $(N) --size $(SIZE)

data: $(DATA)/labels.csv ## Generate the synthetic dataset (DATA=data/synthetic N=2000 SIZE=256)

check: $(STAMP) ## Validate a dataset: make check DATA=/path/to/root
	$(PY) -m ssl_mt.data check $(DATA)

preview: $(STAMP) ## Draw a grid of samples with masks and labels: make preview DATA=...
	$(PY) -m ssl_mt.data preview $(DATA) --out $(DATA)/preview.png

pretrain: $(STAMP) ## SimCLR pretraining: make pretrain ARGS="experiment=quick"
	$(PY) -m ssl_mt.pretrain $(ARGS)

finetune: $(STAMP) ## Multi-task fine-tuning: make finetune ARGS="experiment=quick backbone.weights=..."
	$(PY) -m ssl_mt.finetune $(ARGS)

test: $(STAMP) ## Run the test suite (installs first when needed)
	$(PY) -m pytest -q

lint: $(STAMP) ## ruff check + format check
	$(VENV)/bin/ruff check ssl_mt tests
	$(VENV)/bin/ruff format --check ssl_mt tests

format: $(STAMP) ## ruff fix + format
	$(VENV)/bin/ruff check --fix ssl_mt tests
	$(VENV)/bin/ruff format ssl_mt tests

clean: ## Remove caches and build leftovers (keeps .venv, data/ and runs/)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +
