# The README's two commands. `make demo`: set up and train on the embedded default. `make test`: set up and test.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench clean

$(BIN)/convnext: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/convnext

demo: setup
	$(BIN)/convnext train --preset demo --data digits --output runs/demo --overwrite

test: setup
	$(BIN)/ruff check convnext tests benchmarks
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/compare.py

clean:
	rm -rf $(VENV) runs
