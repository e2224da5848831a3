# The team's vocabulary. `make test` is what CI runs (see .ci/run).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: run install build-dev lint test test-rust test-python bench fmt

## run: install the package and run the quick-start example on this machine
run: install
	$(PYTHON) examples/quickstart.py

## install: build the release extension and install the package
install:
	$(PIP) install --quiet .

## build-dev: editable install with test dependencies (rebuilds the extension)
build-dev:
	$(PIP) install --quiet -e '.[test]'

## lint: formatting and static checks, Rust and Python
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(PIP) install --quiet 'ruff>=0.6'
	$(PYTHON) -m ruff check python tests bench examples
	$(PYTHON) -m ruff format --check python tests bench examples

fmt:
	cargo fmt --all
	$(PYTHON) -m ruff format python tests bench examples

## test: build everything and run every test, Rust and Python
test: build-dev test-rust test-python

test-rust:
	cargo test --workspace --exclude distripool-python

test-python:
	$(PYTHON) -m pytest -q

## bench: distripool against multiprocessing.Pool, in one run
bench: install
	$(PYTHON) bench/bench.py
