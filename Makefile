# vitlab: `make quickstart` sets up .venv and runs the offline PlantCLEF quickstart;
# `make test` sets up .venv and runs the test suite. Override VENV to use another venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vitlab-installed

.PHONY: setup quickstart quickstart-fungiclef quickstart-groupvit test test-all lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

quickstart: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python train.py

quickstart-fungiclef: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python train.py experiment=quickstart_fungiclef

quickstart-groupvit: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python train.py experiment=quickstart_groupvit \
		hydra.run.dir=outputs/quickstart_groupvit
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python infer.py experiment=segment_synthetic_voc \
		ckpt_path=outputs/quickstart_groupvit/groupvit.pt \
		hydra.run.dir=outputs/quickstart_groupvit_segmentation
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python infer.py experiment=segment_synthetic_voc \
		ckpt_path=outputs/quickstart_groupvit/groupvit_untrained.pt segmentation.overlays=0 \
		hydra.run.dir=outputs/quickstart_groupvit_segmentation_untrained
	PYTHONPATH=src $(BIN)/python benchmarks/groupvit_quickstart_miou.py --table \
		outputs/quickstart_groupvit_segmentation outputs/quickstart_groupvit_segmentation_untrained

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/embed_efficiency.py
	$(BIN)/python benchmarks/grid_batching.py
	$(BIN)/python benchmarks/plantclef_strategies.py

clean:
	rm -rf outputs multirun .cache/vitlab
