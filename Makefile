# make demo: the whole pipeline on bundled sample data and a tiny model, CPU, offline (~40 s after install)
# make test: the test suite (what CI runs)
# make train / make repro: the recipe in params.yaml (the seed card's: needs a CUDA GPU and the Hub)
# make remote URL=...: the DVC remote every clone and experiment uses; make pull; make compare; make release VERSION=v1.0.0

PYTHON ?= python3.11
VENV ?= .venv
DEMO_DIR ?= build/demo
DEMO_BASE := data/sources/demo-base
# The one-machine default remote when none is set: this clone's dvc-remote/ folder, written as an absolute path.
DEFAULT_REMOTE := $(CURDIR)/dvc-remote
STAMP := $(VENV)/.installed
GIT_IDENTITY := git config user.email >/dev/null || git config user.email demo@localhost; git config user.name >/dev/null || git config user.name demo
# make compare: dvc exp show with the columns people compare (it has one per count of every stage's report):
# the params that differ, and these metrics.
COMPARE_METRICS := best_eval_loss|validation\.adapter_loss|steady_tokens_per_s|friction\.adapter\.(answer_pushback_rate|answer_questions_to_user|answer_hedges_per_100_words|think_closed_rate)
PARAM_COLUMNS := seed|recipe|(model|data|mix|pack|lora|train|evaluate|card)\.

export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONHASHSEED := 0

.PHONY: setup demo test bench repro train recipe cuda unsloth flash-attention-4 clean remote pull compare release

setup: $(STAMP)
	@friction remote --local --if-unset $(DEFAULT_REMOTE)

# torch first and alone: anything that pulls it in as a dependency would take the multi-GB CUDA build.
# The test extra's llama-cpp-python is a source distribution: its first install compiles llama.cpp (gcc, cmake; about
# 5 min on 2 idle cores); pip keeps the wheel in its cache (~/.cache/pip/wheels), so later installs (CI's included, on
# the same machine) take seconds.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.13.0
	@echo "make setup: installing the project and its test extra (llama-cpp-python compiles once, minutes; then cached)"
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

# A scratch copy of this working tree whose params.yaml is recipes/demo.yaml; the workspace itself is untouched.
# The tiny base is tracked by DVC (dvc add) so that queued experiments, which run in a temporary copy of the last
# commit, find it; the run is committed with its dvc.lock and metrics: the baseline `dvc exp show` compares with.
demo: $(STAMP)
	rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(DEMO_DIR)
	cp recipes/demo.yaml $(DEMO_DIR)/params.yaml
	cd $(DEMO_DIR) && git init -q && { $(GIT_IDENTITY); }
	cd $(DEMO_DIR) && friction remote --local --if-unset $(DEFAULT_REMOTE)
	cd $(DEMO_DIR) && friction demo-base --out $(DEMO_BASE) && dvc add -q $(DEMO_BASE)
	cd $(DEMO_DIR) && git add -A && git commit -qm "demo: recipes/demo.yaml as params.yaml, the tiny base model"
	cd $(DEMO_DIR) && HF_HUB_OFFLINE=1 dvc repro && git add -A && git commit -qm "demo: baseline run (dvc repro)"
	@echo
	@echo "Demo done, in $(DEMO_DIR)/ (a git + DVC repository; the run is its last commit):"
	@echo "  model:       $(DEMO_DIR)/models/friction-adapter/ (adapter, tokenizer, README.md card, loss_curves.png)"
	@echo "  elsewhere:   $(DEMO_DIR)/models/friction-gguf/ (GGUF LoRA, Ollama Modelfile, README.md: llama.cpp, vLLM)"
	@echo "  metrics:     $(DEMO_DIR)/metrics/ (cd $(DEMO_DIR) && dvc metrics show)"
	@echo "  samples:     $(DEMO_DIR)/data/eval/samples.jsonl"
	@echo "  try it:      cd $(DEMO_DIR) && friction chat 'Should I quit my job?'"
	@echo "  experiment:  cd $(DEMO_DIR) && dvc exp run -S lora.rank=4 && make compare   (with .venv/bin on PATH)"

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

# make bench: the CPU benchmarks (bench/run.py, mix and pack up to a million examples; within 15 min on 2 quiet cores);
# rewrites BENCHMARKS.md's CPU section and adds the raw results to bench/results/.
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

# FlashAttention 4 for model.attn_implementation auto or flash_attention_4: a pure-Python wheel, Hopper GPUs and newer.
flash-attention-4: $(STAMP)
	@$(VENV)/bin/python -c "import torch, sys; torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9 or sys.exit('make flash-attention-4: needs a Hopper or newer CUDA GPU (auto uses torch varlen attention elsewhere)')"
	$(VENV)/bin/pip install --quiet -e '.[flash-attention-4]'

# make remote URL=s3://bucket/friction (or a folder, gs://, ssh://...): the DVC remote in .dvc/config; commit it.
# Without URL: show the remote in use.
remote:
	friction remote $(URL)

# dvc pull that names the remote it looked in when something is missing there (TARGETS=models/friction-adapter).
pull:
	friction pull $(TARGETS)

# The experiments side by side: the params that differ, validation loss, the main friction metrics, tokens/s.
compare:
	dvc exp show --only-changed --keep '($(COMPARE_METRICS))$$' --drop '(?!(Experiment|Created|State|$(PARAM_COLUMNS)|($(COMPARE_METRICS))$$))' $(ARGS)

# make release VERSION=v1.0.0: gto's annotated tag friction-adapter@v1.0.0 on HEAD (refused if dirty or unpushed).
release:
	@test -n "$(VERSION)" || { echo "usage: make release VERSION=v1.0.0"; exit 2; }
	friction release $(VERSION)

clean:
	rm -rf build
