# make demo: the whole pipeline on bundled sample data and a tiny model, CPU, offline (~3 min after install)
# make test: the test suite (what CI runs)
# make train / make repro: the recipe in params.yaml (the seed card's: needs a CUDA GPU and the Hub)

PYTHON ?= python3.11
VENV ?= .venv
DEMO_DIR ?= build/demo
STAMP := $(VENV)/.installed

export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONHASHSEED := 0

.PHONY: setup demo test bench repro train recipe cuda unsloth clean

setup: $(STAMP)

# torch first and alone: anything that pulls it in as a dependency would take the multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

# A scratch copy of this working tree whose params.yaml is recipes/demo.yaml; the workspace itself is untouched.
demo: $(STAMP)
	rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(DEMO_DIR)
	cp recipes/demo.yaml $(DEMO_DIR)/params.yaml
	cd $(DEMO_DIR) && git init -q && git add -A && git -c user.name=demo -c user.email=demo@localhost commit -qm demo
	cd $(DEMO_DIR) && HF_HUB_OFFLINE=1 friction demo-base && HF_HUB_OFFLINE=1 dvc repro
	@echo
	@echo "Demo done, in $(DEMO_DIR)/:"
	@echo "  adapter:     $(DEMO_DIR)/models/adapter/"
	@echo "  model card:  $(DEMO_DIR)/models/adapter/README.md"
	@echo "  metrics:     $(DEMO_DIR)/metrics/ (cd $(DEMO_DIR) && dvc metrics show)"
	@echo "  samples:     $(DEMO_DIR)/data/eval/samples.jsonl"

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

# make bench: the CPU benchmarks (bench/run.py; aimed at 15 min on 2 quiet cores, not yet timed there); rewrites BENCHMARKS.md's CPU section and
# adds the raw results to bench/results/. The million-example point: python bench/run.py --scaling-sizes 10000,100000,1000000
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python bench/run.py

repro: $(STAMP)
	dvc repro

train: $(STAMP)
	dvc repro train

# make recipe NAME=demo: make params.yaml one of recipes/*.yaml
recipe:
	@test -n "$(NAME)" -a -f recipes/$(NAME).yaml || { echo "usage: make recipe NAME=<$$(ls recipes | sed 's/.yaml//' | paste -sd'|')>"; exit 2; }
	cp recipes/$(NAME).yaml params.yaml

# The CUDA path's extras (bitsandbytes for 4-bit loading and 8-bit AdamW).
cuda: $(STAMP)
	$(VENV)/bin/pip install --quiet -e '.[cuda]'

# The unsloth training backend, CUDA only: its own pins, which lower transformers, trl, datasets and huggingface-hub
# (requirements/unsloth.txt says why; pip's warning that friction wants the newer ones is expected).
unsloth: $(STAMP)
	@$(VENV)/bin/python -c "import torch, sys; torch.cuda.is_available() or sys.exit('make unsloth: no CUDA GPU visible to torch; unsloth trains on NVIDIA GPUs only (train.backend: hf works anywhere)')"
	$(VENV)/bin/pip install --quiet -r requirements/unsloth.txt
	$(VENV)/bin/python -c "import unsloth; print('unsloth', unsloth.__version__, 'ready: train.backend auto or unsloth uses it')"

clean:
	rm -rf build
