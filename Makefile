# make lock: rewrite requirements/lock*.txt from pyproject.toml (uv); make setup installs exactly the lock
# make demo: the whole pipeline on bundled sample data and a tiny model, CPU, offline (~75 s after install)
# make test: the test suite (what CI runs)
# make test-unsloth: the test suite again under the unsloth set's pins, in .venv-unsloth (CI runs it after make test)
# make train / make repro: the recipe in params.yaml (the seed card's: needs a CUDA GPU and the Hub)
# make remote URL=...: the DVC remote every clone and experiment uses; make pull; make compare; make release VERSION=v1.0.0

PYTHON ?= python3.11
VENV ?= .venv
DEMO_DIR ?= build/demo
# The one-machine default remote when none is set: this clone's dvc-remote/ folder, written as an absolute path.
DEFAULT_REMOTE := $(CURDIR)/dvc-remote
# The lock the venv was made from stays its lock (a CUDA machine's after make setup LOCK=requirements/lock-cuda.txt).
LOCK ?= $(shell cat $(VENV)/lock 2>/dev/null || echo requirements/lock.txt)
STAMP := $(VENV)/.installed-$(basename $(notdir $(LOCK)))
TORCH_CPU_WHEELS ?= /opt/wheels
# A second virtualenv with the pins of requirements/unsloth.txt that install on any machine (the four that replace the
# project's); its CUDA-only packages (unsloth, triton, xformers, bitsandbytes' kernels) stay out. The suite runs in it
# too, so the pipeline's code is checked on both sets (make test-unsloth).
UNSLOTH_VENV ?= .venv-unsloth
UNSLOTH_STAMP := $(UNSLOTH_VENV)/.installed
UNSLOTH_PINNED := transformers trl datasets huggingface-hub
UNSLOTH_CPU_PINS = $(shell grep -E '^($(subst $(eval) ,|,$(UNSLOTH_PINNED)))==' requirements/unsloth.txt)
# Written by make unsloth: this venv holds the unsloth set, which a reinstall of the project's pins would undo.
UNSLOTH_MARK := $(VENV)/.unsloth
# make compare: dvc exp show with the columns people compare (it has one per count of every stage's report):
# the params that differ, and these metrics: for the main friction metrics, over-friction on the control prompts
# (lower is better) and validation loss, the adapter's difference from the base with its 95 % interval.
COMPARED := validation_loss|answer_pushback_rate|answer_questions_to_user|answer_hedges_per_100_words|think_closed_rate|control_overfriction_rate
COMPARE_METRICS := best_eval_loss|steady_tokens_per_s|comparison\.($(COMPARED))\.(diff|ci95_low|ci95_high|p_holm)
PARAM_COLUMNS := seed|recipe|(model|data|mix|pack|lora|train|evaluate|judge|card)\.

export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONHASHSEED := 0

.PHONY: setup lock unsloth-env test-unsloth demo test bench repro train recipe cuda unsloth flash-attention-4 clean remote pull \
	compare release

setup: $(STAMP)
	@friction remote --local --if-unset $(DEFAULT_REMOTE)

# A fresh venv with exactly the lock (every package pinned, with hashes), then this project on top without its
# dependencies. On a CUDA machine: make setup LOCK=requirements/lock-cuda.txt
# The test extra's llama-cpp-python is a source distribution: its first install compiles llama.cpp (gcc, cmake; about
# 5 min on 2 idle cores); pip keeps the wheel in its cache, so later installs on the same machine take seconds.
$(STAMP): pyproject.toml $(LOCK)
	@! test -f $(UNSLOTH_MARK) || { echo "make: $(VENV) holds the unsloth set (make unsloth) and pyproject.toml or the lock changed; \
	reinstalling the project would replace those pins. Rebuild both in order: rm -rf $(VENV) && make setup unsloth"; exit 2; }
	$(PYTHON) -m venv --clear $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(VENV)/bin/pip install --quiet --no-deps -e .
	echo $(LOCK) > $(VENV)/lock
	touch $@

# make lock: rewrite both lock files from pyproject.toml's pins (uv). The CPU lock takes torch's CPU build from
# TORCH_CPU_WHEELS (a folder or index holding it); the CUDA lock takes PyPI's (CUDA) torch and the cuda extra.
lock:
	@test -x $(VENV)/bin/uv || { $(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install --quiet uv==0.13.10; }
	$(VENV)/bin/uv pip compile pyproject.toml --quiet --extra test --generate-hashes --python-version 3.11 \
		--find-links $(TORCH_CPU_WHEELS) --output-file requirements/lock.txt
	$(VENV)/bin/uv pip compile pyproject.toml --quiet --extra test --extra cuda --generate-hashes --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --output-file requirements/lock-cuda.txt

# A scratch git + DVC repository of this working tree whose params.yaml is recipes/demo.yaml (friction/demo.py); the
# workspace itself is untouched. The tiny base is tracked by DVC (dvc add) so that queued experiments, which run in a
# temporary copy of the last commit, find it; the run is committed with its dvc.lock and metrics: the baseline
# `dvc exp show` compares with.
demo: $(STAMP)
	friction demo-workspace $(DEMO_DIR)
	cd $(DEMO_DIR) && friction remote --local --if-unset $(DEFAULT_REMOTE)
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
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

# The CPU lock as make setup installs it, then the unsloth set's four pins over the project's; pip's warning that
# friction asks for the newer ones is expected there.
unsloth-env: $(UNSLOTH_STAMP)

$(UNSLOTH_STAMP): pyproject.toml requirements/lock.txt requirements/unsloth.txt
	@test "$(words $(UNSLOTH_CPU_PINS))" = "$(words $(UNSLOTH_PINNED))" || { echo "make: requirements/unsloth.txt \
	should pin each of $(UNSLOTH_PINNED) with ==; found: $(UNSLOTH_CPU_PINS)"; exit 2; }
	$(PYTHON) -m venv --clear $(UNSLOTH_VENV)
	$(UNSLOTH_VENV)/bin/pip install --quiet --upgrade pip
	$(UNSLOTH_VENV)/bin/pip install --quiet --require-hashes --no-deps -r requirements/lock.txt
	$(UNSLOTH_VENV)/bin/pip install --quiet --no-deps -e .
	$(UNSLOTH_VENV)/bin/pip install --quiet $(UNSLOTH_CPU_PINS)
	$(UNSLOTH_VENV)/bin/python -c "import sys, importlib.metadata as m; \
	wanted = dict(pin.split('==') for pin in sys.argv[1:]); found = {name: m.version(name) for name in wanted}; \
	found == wanted or sys.exit(f'make unsloth-env: installed {found}, wanted {wanted}')" $(UNSLOTH_CPU_PINS)
	touch $@

# Tests that need triton or CUDA are marked (needs_triton, needs_cuda) and skipped there with the reason.
test-unsloth: $(UNSLOTH_STAMP)
	PATH=$(abspath $(UNSLOTH_VENV))/bin:$$PATH HF_HUB_OFFLINE=1 $(UNSLOTH_VENV)/bin/python -m pytest -q $(ARGS)

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

# An extra of pyproject.toml beside what is installed, never in place of it: every installed version is a constraint,
# so pip adds the extra's packages or stops, and no pin changes. (pip install -e '.[extra]' would put the project's
# transformers, trl, datasets and huggingface-hub back over the unsloth set's, and unsloth checks no versions.)
define install_extra
	@echo "make $@: installing the extra '$(1)' beside the installed packages, which stay as they are"
	$(VENV)/bin/pip list --format=freeze --exclude-editable > $(VENV)/installed-constraints.txt
	$(VENV)/bin/pip install --quiet -c $(VENV)/installed-constraints.txt $$($(VENV)/bin/python -c "import sys, tomllib; \
	print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies'][sys.argv[1]])" $(1)) \
	|| { echo "make $@: the extra '$(1)' needs other versions of installed packages (pip says which above)"; exit 1; }
endef

# The CUDA path's extras (bitsandbytes for 4-bit loading and 8-bit AdamW).
cuda: $(STAMP)
	$(call install_extra,cuda)

# The unsloth training backend, CUDA only: its own pins, which lower transformers, trl, datasets and huggingface-hub
# (requirements/unsloth.txt says why; pip's warning that friction wants the newer ones is expected).
unsloth: $(STAMP)
	@$(VENV)/bin/python -c "import torch, sys; torch.cuda.is_available() or sys.exit('make unsloth: no CUDA GPU visible to torch; unsloth trains on NVIDIA GPUs only (train.backend: hf works anywhere)')"
	$(VENV)/bin/pip install --quiet -r requirements/unsloth.txt
	touch $(UNSLOTH_MARK)
	$(VENV)/bin/python -c "import unsloth; print('unsloth', unsloth.__version__, 'ready: train.backend auto or unsloth uses it')"

# FlashAttention 4 for model.attn_implementation auto or flash_attention_4: a pure-Python wheel, Hopper GPUs and newer.
flash-attention-4: $(STAMP)
	@$(VENV)/bin/python -c "import torch, sys; torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9 or sys.exit('make flash-attention-4: needs a Hopper or newer CUDA GPU (auto uses torch varlen attention elsewhere)')"
	$(call install_extra,flash-attention-4)

# make remote URL=s3://bucket/friction (or a folder, gs://, ssh://...): the DVC remote in .dvc/config; commit it.
# Without URL: show the remote in use.
remote:
	friction remote $(URL)

# dvc pull that names the remote it looked in when something is missing there (TARGETS=models/friction-adapter).
pull:
	friction pull $(TARGETS)

# The experiments side by side: the params that differ, validation loss, the main friction metrics, tokens/s. ARGS=--md prints it whole, however wide.
compare:
	dvc exp show --only-changed --keep '($(COMPARE_METRICS))$$' --drop '(?!(Experiment|Created|State|$(PARAM_COLUMNS)|($(COMPARE_METRICS))$$))' $(ARGS)

# make release VERSION=v1.0.0: gto's annotated tag friction-adapter@v1.0.0 on HEAD (refused if dirty or unpushed).
release:
	@test -n "$(VERSION)" || { echo "usage: make release VERSION=v1.0.0"; exit 2; }
	friction release $(VERSION)

clean:
	rm -rf build
