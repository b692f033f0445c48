# ggufserve — `make serve` and `make test` each work as the first command on a fresh clone.
#   BACKEND=cpu|cuda|metal   llama.cpp build for llama-cpp-python (default cpu)
#   PYTHON=python3           interpreter used to create the virtual environment
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BENCH_VENV ?= .venv-bench
BACKEND ?= cpu
BIN := $(VENV)/bin
LLAMA_CPP_PYTHON_VERSION := 0.3.36
LLAMA_CPP_PYTHON := llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)

ifeq ($(filter $(BACKEND),cpu cuda metal),)
$(error BACKEND must be cpu, cuda or metal, not '$(BACKEND)')
endif
# AMX=auto|on|off: Intel AMX in a -march=native CPU build (see README, "Build backends").
AMX ?= auto
# FORCE_REBUILD=1 rebuilds llama-cpp-python even when a wheel with the same key is cached.
FORCE_REBUILD ?=
ifdef CMAKE_ARGS
export CMAKE_ARGS
endif
# The llama.cpp build steps run before the package is installed: ggufserve (the server/
# folder) is reached through a link on PYTHONPATH; they need only the standard library.
BOOTSTRAP := $(CURDIR)/build/bootstrap
NATIVE_IN = PYTHONPATH=$(BOOTSTRAP) $(1) -m ggufserve.native.build
NATIVE := $(call NATIVE_IN,$(BIN)/python)

STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: install llama serve test lint bench bench-convert bench-structured clean chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# llama-cpp-python comes from our own wheel cache, keyed by the build flags, the compilers
# and this CPU's native instruction set (pip's cache keys only by the sdist); it is in the
# venv before `pip install -e .`, so pip never builds it itself. Always checked: seconds.
$(BOOTSTRAP)/ggufserve:
	mkdir -p $(BOOTSTRAP) && ln -sfn $(CURDIR)/server $@

llama: | $(BIN)/python $(BOOTSTRAP)/ggufserve
	$(NATIVE) ensure --backend $(BACKEND) --amx $(AMX) $(if $(FORCE_REBUILD),--force)

$(STAMP_RUN): pyproject.toml | llama
	rm -f $(VENV)/.installed-*
	$(BIN)/pip install -e .
	touch $@

# dashscope is installed only for the Qwen BPE ranks file it ships (qwen.tiktoken), which
# the Qwen3-VL test checkpoints use; its own dependencies are not needed.
DASHSCOPE := dashscope==2.0.2

$(STAMP_TEST): $(STAMP_RUN)
	$(BIN)/pip install -e '.[test,dev]'
	$(BIN)/pip install --no-deps "$(DASHSCOPE)"
	touch $@

# A tiny generation in a child process, once per build: a build that crashes here (SIGILL)
# is rebuilt without AMX when AMX was in it, else the step fails with the fix.
install: $(STAMP_RUN) | $(BOOTSTRAP)/ggufserve
	$(NATIVE) verify --backend $(BACKEND) --amx $(AMX)

serve: install
	$(BIN)/ggufserve serve $(SERVE_ARGS)

# The chat page's browser tests (tests/web) drive Debian's chromium through Playwright
# (Playwright's own browser download is not used). Installed with apt-get when missing (sudo
# unless root); when that fails the build goes on and those tests skip, saying why.
CHROMIUM ?= /usr/bin/chromium
chromium:
	@if [ ! -x "$(CHROMIUM)" ]; then \
	  sudo=; [ "$$(id -u)" = 0 ] || sudo="sudo -n"; \
	  echo "installing chromium for the browser tests: $$sudo apt-get install -y chromium"; \
	  { command -v apt-get >/dev/null && \
	    { DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y chromium || \
	      { $$sudo apt-get update && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y chromium; }; }; } || \
	  echo "warning: could not install chromium; the browser tests (tests/web) will be skipped"; \
	fi

test: install $(STAMP_TEST) chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The tier that loads no model and starts no server (under 2 min on 2 cores): tests/conftest.py
# marks each test with its folder and, by the fixtures it uses, `model`.
FAST_TESTS := not model and not docker and not gpu
.PHONY: test-fast
test-fast: $(STAMP_TEST)
	$(BIN)/python -m pytest -m "$(FAST_TESTS)" $(PYTEST_ARGS)

# The schemathesis fuzz run of `make test` (tests/e2e/test_fuzz.py) with a longer budget:
# FUZZ_EXAMPLES per operation and mode (1000: ~8 min on 2 cores), FUZZ_SEED to vary the cases.
FUZZ_EXAMPLES ?= 1000
FUZZ_SEED ?= 20240624
.PHONY: fuzz
fuzz: install $(STAMP_TEST)
	GGUFSERVE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) GGUFSERVE_FUZZ_SEED=$(FUZZ_SEED) \
	  $(BIN)/python -m pytest tests/e2e/test_fuzz.py $(PYTEST_ARGS)

lint: $(STAMP_TEST)
	$(BIN)/ruff check server converters tests
	$(BIN)/ruff format --check server converters tests
	$(MAKE) --no-print-directory typecheck

# mypy reads the package as it is installed (ggufserve = server/, ggufserve.converters =
# converters/) through a tree of links, as it cannot follow the editable install's finder.
TYPECHECK := $(CURDIR)/build/typecheck
.PHONY: typecheck
typecheck: $(STAMP_TEST)
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/ggufserve
	ln -s $(CURDIR)/server/* $(TYPECHECK)/ggufserve/
	ln -s $(CURDIR)/converters $(TYPECHECK)/ggufserve/converters
	cd $(TYPECHECK) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p ggufserve

# The peer server (llama-cpp-python[server]) pins its own FastAPI/Starlette: it gets a
# separate environment so it cannot change ours, with the same llama.cpp build as ours.
# examples/server/server.py (llama-cpp-python's batching server) also needs the packages
# its script header lists.
$(BENCH_VENV)/.installed: pyproject.toml | $(BOOTSTRAP)/ggufserve
	$(PYTHON) -m venv $(BENCH_VENV)
	$(call NATIVE_IN,$(BENCH_VENV)/bin/python) ensure --backend $(BACKEND) --amx $(AMX)
	$(BENCH_VENV)/bin/pip install -q "llama-cpp-python[server]==$(LLAMA_CPP_PYTHON_VERSION)" \
	  openai safetensors websockets jinja2 numpy
	touch $@

STAMP_BENCH := $(VENV)/.installed-bench
$(STAMP_BENCH): $(STAMP_TEST)
	$(BIN)/pip install -e '.[test,dev,bench]'
	touch $@

# Side by side with llama-server / llama-bench (built once from the same sdist and flags,
# ~10 min on 2 cores), llama-cpp-python's example and stock servers; then the speculation
# tables (as make bench-spec; SPEC_ARGS are its flags). Never run in CI.
bench: install $(STAMP_BENCH) $(BENCH_VENV)/.installed
	$(BIN)/python -m tests.bench.run --peer-python $(BENCH_VENV)/bin/python $(BENCH_ARGS)
	$(BIN)/python -m tests.bench.speculation --peer-python $(BENCH_VENV)/bin/python $(SPEC_ARGS)

# Prompt lookup on and off: a copy-heavy rewrite and sampled free text, c = 1 and 4, with
# llama-server (--spec-type ngram-simple and without) as the peer.
.PHONY: bench-spec
bench-spec: install $(STAMP_BENCH) $(BENCH_VENV)/.installed
	$(BIN)/python -m tests.bench.speculation --peer-python $(BENCH_VENV)/bin/python $(SPEC_ARGS)

# One stream sampled with py-spy: ms per generated token by thread and function.
.PHONY: profile
profile: install $(STAMP_BENCH)
	$(BIN)/python -m tests.bench.profile_stream $(BENCH_ARGS)

# KV cache types f16 / q8_0 / q4_0: llama.cpp's KV memory, decode tok/s, KL vs f16.
.PHONY: bench-kv
bench-kv: $(STAMP_TEST)
	$(BIN)/python -m tests.bench.kv_types $(BENCH_ARGS)

# Decode tok/s with and without a grammar (json_schema, forced tool call).
bench-structured: $(STAMP_TEST)
	$(BIN)/python -m tests.bench.structured $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .mypy_cache .ruff_cache

# Peak RSS and speed of converting a 2 GB (Gemma 3 1B-shaped, bf16) checkpoint.
bench-convert: $(STAMP_TEST)
	$(BIN)/python -m tests.bench.convert_memory

# What a GPU machine with no package registry needs for tests/gpu/run_gpu_checks.sh, in
# build/gpu-kit (~20 MiB, one carry path): CPython 3.12 wheels it lacks, llama-cpp-python's
# sdist trimmed to what the CPU/CUDA build, mtmd, llama-bench and llama-server read, and the
# Gemma 3 vocabulary (docs/gpu.md).
.PHONY: gpu-kit
gpu-kit: $(STAMP_TEST)
	$(BIN)/python -m tests.gpu.kit --out build/gpu-kit

# The CPU image (docker/Dockerfile.cpu) with docker, or podman where no Docker daemon
# answers; a local Debian base where python:3.11-slim cannot be pulled (docs/builds-and-platforms.md).
.PHONY: image image-test
image:
	LLAMA_CPP_PYTHON_VERSION=$(LLAMA_CPP_PYTHON_VERSION) docker/build-image.sh

# Builds the image if needed (seconds from its cache), then tests it: /health, chat, image
# chat, doctor, convert --help, SIGTERM drain, 2 replicas behind HAProxy (tests/docker).
image-test: $(STAMP_TEST)
	GGUFSERVE_IMAGE_TESTS=1 $(BIN)/python -m pytest tests/docker $(PYTEST_ARGS)

# 50 mixed clients for 30 min (bundled model + tiny vision model): only 200/429, RSS growth
# under 5 % after warm-up, healthy after. Never in CI nor `make test`. Shorter:
# SOAK_ARGS="--duration-s 120"; see tests/bench/soak.py for every flag.
.PHONY: soak
soak: install $(STAMP_TEST)
	$(BIN)/python -m tests.bench.soak $(SOAK_ARGS)

# Real agent clients, one turn each with a tool call against a local server on the bundled
# model: OpenAI's Codex CLI (Responses API) and Claude Code (Messages API), pinned npm
# packages (they ship their binaries) installed under build/agents. Needs npm; not in CI
# (the agents' prompts are ~10k tokens: minutes on 2 cores). AGENTS_ARGS="--only codex".
AGENTS_DIR := build/agents
CODEX_NPM := @openai/codex@0.171.0
CLAUDE_CODE_NPM := @anthropic-ai/claude-code@2.1.197
$(AGENTS_DIR)/.installed:
	mkdir -p $(AGENTS_DIR)
	npm install --no-audit --no-fund --prefix $(AGENTS_DIR) $(CODEX_NPM) $(CLAUDE_CODE_NPM)
	touch $@

.PHONY: agents
agents: install $(STAMP_TEST) $(AGENTS_DIR)/.installed
	$(BIN)/python -m tests.agents.run_agents --agents-dir $(AGENTS_DIR) $(AGENTS_ARGS)
