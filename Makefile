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
DEMO_DATA ?= data/demo
DEMO_RUNS ?= runs/demo
# The demo data: many images, few of them labeled (an honest SSL setting). Pretraining
# reads every train image, fine-tuning only the labeled ones.
DEMO_N ?= 2000
DEMO_SIZE ?= 96
DEMO_UNLABELED ?= 0.7
# Loader workers of the demo runs: on a 2-core CPU, worker processes take the cores the
# training threads need (measured: a fine-tune 107 s in-process, 115 s with 1 or 2 workers).
DEMO_WORKERS ?= 0
# Seeds per arm: a verdict about the method needs >= 2 (one seed: 'these runs differ').
# Each seed of an arm is a numbered run folder, so RUN/mt is the arm of all its seeds.
DEMO_SEEDS ?= 0 1
QUICK := experiment=quick data.num_workers=$(DEMO_WORKERS)
# The test split is evaluated once, into the per-image records compare reads (no
# separate trainer.test pass).
DEMO_FT := $(QUICK) schedule=demo test_after_fit=false
DEMO_SSL := $(QUICK) schedule=demo_ssl
# make study: arms x label fractions x seeds on the demo data (GPU-sized studies set
# STUDY_DATA, STUDY_FT="", STUDY_SSL="experiment=seed_b4" ...).
STUDY_DATA ?= $(DEMO_DATA)
STUDY_DIR ?= runs/study
STUDY_PRETRAIN ?= runs/study_pretrain
STUDY_ARMS ?= mt mt_ssl
STUDY_FRACTIONS ?= 0.05 0.25 1.0
STUDY_SEEDS ?= 0 1 2
STUDY_FT ?= $(DEMO_FT)
STUDY_SSL ?= $(DEMO_SSL)

.DEFAULT_GOAL := help
.PHONY: help install data check preview pretrain finetune predict compare demo study probe bench gpu-check test test-all mutants lint format clean

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

# The default dataset is generated first unless ARGS points data.root elsewhere.
DEFAULT_DATA := $(if $(findstring data.root=,$(ARGS)),,$(DATA)/labels.csv)

pretrain: $(STAMP) $(DEFAULT_DATA) ## SimCLR pretraining: make pretrain ARGS="experiment=quick"
	$(PY) -m ssl_mt.pretrain $(ARGS)

finetune: $(STAMP) $(DEFAULT_DATA) ## Multi-task fine-tuning: make finetune ARGS="experiment=quick backbone.weights=..."
	$(PY) -m ssl_mt.finetune $(ARGS)

predict: $(STAMP) ## Masks + labels of new photos: make predict CKPT=RUN/checkpoints/last.ckpt INPUT=photos/ OUT=preds [ARGS="--overlays"]
	@test -n "$(CKPT)" -a -n "$(INPUT)" -a -n "$(OUT)" || (echo 'usage: make predict CKPT=... INPUT=folder-or-labels.csv OUT=dir [ARGS="--overlays --metrics"]' >&2; exit 2)
	$(PY) -m ssl_mt.predict $(CKPT) $(INPUT) --out $(OUT) $(ARGS)

compare: $(STAMP) ## Compare runs: make compare RUNS="runs/finetune/mt/X runs/finetune/mt_ssl/Y" [REPORT=dir]
	@test -n "$(RUNS)" || (echo 'usage: make compare RUNS="RUN_DIR RUN_DIR ..." [REPORT=dir]' >&2; exit 2)
	$(PY) -m ssl_mt.compare $(RUNS) --out $(REPORT)

$(DEMO_DATA)/labels.csv: | $(STAMP)
	$(PY) -m ssl_mt.data generate --out $(DEMO_DATA) --n $(DEMO_N) --size $(DEMO_SIZE) \
		--unlabeled-images $(DEMO_UNLABELED)

demo: $(DEMO_DATA)/labels.csv ## Whole chain on synthetic data, quick profile: SSL pretrain, MT vs MT+SSL (2 seeds each), report
	rm -rf $(DEMO_RUNS)
	$(PY) -m ssl_mt.pretrain $(DEMO_SSL) data.root=$(DEMO_DATA) hydra.run.dir=$(DEMO_RUNS)/pretrain $(ARGS)
	for seed in $(DEMO_SEEDS); do \
		$(PY) -m ssl_mt.finetune $(DEMO_FT) experiment_name=mt seed=$$seed data.root=$(DEMO_DATA) \
			hydra.run.dir=$(DEMO_RUNS)/mt/$$seed $(ARGS) || exit 1; \
		$(PY) -m ssl_mt.finetune $(DEMO_FT) experiment_name=mt_ssl seed=$$seed data.root=$(DEMO_DATA) \
			hydra.run.dir=$(DEMO_RUNS)/mt_ssl/$$seed backbone.weights=$(DEMO_RUNS)/pretrain/backbone \
			$(ARGS) || exit 1; \
	done
	$(PY) -m ssl_mt.compare $(DEMO_RUNS)/mt $(DEMO_RUNS)/mt_ssl --names MT MT+SSL --out $(DEMO_RUNS)/report
	@echo
	@echo "Demo finished. Report: $(DEMO_RUNS)/report/report.md (val_loss.png, train_loss.png);"
	@echo "notebook: notebooks/compare_loss_curves.ipynb reads $(DEMO_RUNS)/mt and $(DEMO_RUNS)/mt_ssl."

study: $(STUDY_DATA)/labels.csv ## Label efficiency: MT vs MT+SSL over label fractions x seeds, then the verdicts
	$(PY) -m ssl_mt.pretrain $(STUDY_SSL) data.root=$(STUDY_DATA) hydra.run.dir=$(STUDY_PRETRAIN) $(ARGS)
	$(PY) -m ssl_mt.study --out $(STUDY_DIR) --arms $(STUDY_ARMS) --fractions $(STUDY_FRACTIONS) \
		--seeds $(STUDY_SEEDS) --weights $(STUDY_PRETRAIN)/backbone \
		-- $(STUDY_FT) data.root=$(STUDY_DATA) $(ARGS)
	$(PY) -m ssl_mt.compare study $(STUDY_DIR) --out $(STUDY_DIR)/report

probe: $(STAMP) ## Frozen-backbone linear probe + kNN: make probe BACKBONES="RUN/backbone random:NAME" [DATA=...]
	@test -n "$(BACKBONES)" || (echo 'usage: make probe BACKBONES="RUN/backbone random:test_efficientnet" DATA=root' >&2; exit 2)
	$(PY) -m ssl_mt.probe $(BACKBONES) --data $(DATA) --out $(REPORT)/probe

bench: $(STAMP) ## Throughput against the backbone ceiling: make bench ARGS="--device cuda --sizes 224 384"
	$(PY) -m ssl_mt.bench $(ARGS)

# No install on the GPU machine: the venv's python when there is one, else $(PYTHON) with
# the other packages on its path (the project is imported from this checkout).
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))

gpu-check: ## One table of short GPU runs (<= 8 min; exits 0 on a CPU machine): make gpu-check [ARGS="--keep DIR"]
	$(GPU_PY) -m ssl_mt.bench.gpu_check $(ARGS)

test: $(STAMP) ## Run the test suite (installs first when needed)
	$(PY) -m pytest -q

mutants: $(STAMP) ## Planted bugs (tests/mutants/mutants.toml): each must make its owning tests fail
	$(PY) -m tests.mutants $(ARGS)

lint: $(STAMP) ## ruff check + format check
	$(VENV)/bin/ruff check ssl_mt tests
	$(VENV)/bin/ruff format --check ssl_mt tests

format: $(STAMP) ## ruff fix + format
	$(VENV)/bin/ruff check --fix ssl_mt tests
	$(VENV)/bin/ruff format ssl_mt tests

clean: ## Remove caches and build leftovers (keeps .venv, data/ and runs/)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +
