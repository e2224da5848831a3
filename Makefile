# The team's vocabulary. `make test` is what CI runs (see .ci/run).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: run install wheel build-dev system-deps lint stubtest test test-rust test-python test-versions bench bench-cluster fmt fuzz-smoke fuzz screenshots soak

## run: install the package and run the quick-start example on this machine
run: install
	$(PYTHON) examples/quickstart.py

## install: build the wheel (cargo shows its progress) and install it
install: wheel
	$(PIP) install --quiet --force-reinstall --no-deps target/wheels/distripool-*-abi3-*.whl
	$(PIP) install --quiet target/wheels/distripool-*-abi3-*.whl

## wheel: build the one abi3 wheel, for every Python from 3.9 on, into target/wheels
wheel:
	$(PIP) install --quiet 'maturin>=1.9.4,<2'
	rm -f target/wheels/distripool-*.whl
	@echo "building the Rust extension (a few minutes the first time)"
	$(PYTHON) -m maturin build --release --out target/wheels

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
	@# No source file of the package over 600 lines: split it by concern.
	@long=$$(find crates python -name '*.rs' -o -name '*.py' -o -name '*.pyi' | xargs wc -l \
	    | awk '$$2 != "total" && $$1 > 600 {print $$2 " (" $$1 " lines)"}'); \
	    if [ -n "$$long" ]; then echo "files over 600 lines: $$long"; exit 1; fi

fmt:
	cargo fmt --all
	$(PYTHON) -m ruff format python tests bench examples

## stubtest: check the extension's type stubs against the built module
stubtest:
	$(PYTHON) -m mypy.stubtest distripool._native

## system-deps: the system tools the network and TLS tests use (apt-get, as root)
system-deps:
	bash tools/system-deps.sh

## test: install what the tests need, build everything, run every test
test: system-deps build-dev stubtest test-rust test-python test-versions

test-rust:
	cargo test --workspace --exclude distripool-python

test-python:
	$(PYTHON) -m pytest -q

## soak: the heavy reliability runs, not in CI (docs/reliability.md): a herd of
## 1 000 agents, 10 000 connected; a million tasks under faults, 10 000 pools
## opened and closed, a map of 10 million items, imap endless for 10 minutes
soak: install
	cargo run --release --quiet -p distripool-runtime --example herd
	$(PYTHON) bench/soak.py

## screenshots: take the dashboard's screenshots in docs/images again
screenshots:
	DISTRIPOOL_SCREENSHOTS=docs/images $(PYTHON) -m pytest -q tests/test_dashboard_browser.py -k chromium

## test-versions: the wheel in a fresh venv of Python 3.9, 3.10, 3.12 and 3.13,
## without Rust on PATH: the quick-start and a smoke subset of the tests
test-versions: wheel
	bash tools/test-versions.sh

## bench: distripool against its peers in one run (loky, Ray and Dask are
## installed into target/bench-venv), then the Rust-only benchmarks
BENCH_VENV = target/bench-venv
BENCH_PY = $(BENCH_VENV)/bin/python

$(BENCH_VENV)/.installed: bench/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --quiet -r bench/requirements.txt
	touch $@

bench: $(BENCH_VENV)/.installed
	$(BENCH_PY) -m pip install --quiet .
	$(BENCH_PY) bench/bench.py
	$(BENCH_PY) bench/dashboard_cost.py
	$(BENCH_PY) bench/large_function.py
	cargo run --release --quiet -p distripool-runtime --example seal_cost
	cargo run --release --quiet -p distripool-runtime --example orchestrator_bench

## bench-cluster: distripool against Dask distributed on five network-namespace
## hosts with emulated links (as root; says why and skips where it cannot)
bench-cluster: $(BENCH_VENV)/.installed
	$(BENCH_PY) -m pip install --quiet .
	$(BENCH_PY) bench/cluster.py

## fuzz-smoke: every fuzz target for FUZZ_SECONDS (default 10) each
# cargo-fuzz wants nightly features; RUSTC_BOOTSTRAP lets the stable toolchain
# provide them. The tool is installed inside the checkout, in .ci/tools.
FUZZ_SECONDS ?= 10
FUZZ_TARGETS = frame_decoder message_decoder handshake sealed_frames
CARGO_FUZZ = .ci/tools/bin/cargo-fuzz

$(CARGO_FUZZ):
	cargo install --quiet --locked --root .ci/tools cargo-fuzz

fuzz-smoke: $(CARGO_FUZZ)
	mkdir -p target
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		RUSTC_BOOTSTRAP=1 ../$(CARGO_FUZZ) fuzz run -O $$t -- -max_total_time=$(FUZZ_SECONDS) \
			> ../target/fuzz-$$t.log 2>&1 || { tail -n 40 ../target/fuzz-$$t.log; exit 1; }; \
		echo "fuzz $$t: $$(grep -E '^Done' ../target/fuzz-$$t.log)"; \
	done

## fuzz: the same, for ten minutes each
fuzz:
	$(MAKE) fuzz-smoke FUZZ_SECONDS=600
