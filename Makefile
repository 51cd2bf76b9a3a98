# make test: lint + the fast test suite.  make demo: the whole chain on the built-in benchmark.
# make bench: every benchmark script, one table of figures (benchmarks/run_all.py).
# Each creates .venv and installs pixcli into it when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-all lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check pixcli stages tests benchmarks
	$(BIN)/ruff format --check pixcli stages tests benchmarks

test: lint
	$(BIN)/pytest -q

test-all: lint
	$(BIN)/pytest -q -m ''

demo: $(STAMP)
	$(BIN)/pixcli demo --out runs/demo

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
