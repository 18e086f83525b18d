# Two commands do all the setup: `make demo` and `make test` (each creates .venv and installs what it needs).
PYTHON ?= python3
# A pinned CPU build by default (it is on disk here and small); use e.g. `make demo TORCH=torch` for your own.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

$(BIN)/fisherkd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first: an unpinned torch can pull a multi-GB CUDA build
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/fisherkd

demo: $(BIN)/fisherkd
	$(BIN)/fisherkd demo

test: $(BIN)/fisherkd
	$(BIN)/python -m pytest tests

lint: $(BIN)/fisherkd
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
