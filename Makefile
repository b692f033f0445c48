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

CMAKE_ARGS_cpu :=
CMAKE_ARGS_cuda := -DGGML_CUDA=on
CMAKE_ARGS_metal := -DGGML_METAL=on
ifeq ($(filter $(BACKEND),cpu cuda metal),)
$(error BACKEND must be cpu, cuda or metal, not '$(BACKEND)')
endif
export CMAKE_ARGS ?= $(CMAKE_ARGS_$(BACKEND))

STAMP_RUN := $(VENV)/.installed-$(BACKEND)
STAMP_TEST := $(VENV)/.installed-test-$(BACKEND)

.PHONY: install serve test lint bench bench-convert clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# pip caches the wheel it builds from llama-cpp-python's sdist; a GPU backend must not
# reuse a cached CPU wheel, so it is rebuilt without the cache.
$(STAMP_RUN): pyproject.toml | $(BIN)/python
	rm -f $(VENV)/.installed-*
ifneq ($(BACKEND),cpu)
	$(BIN)/pip install --no-cache-dir --force-reinstall --no-deps "$(LLAMA_CPP_PYTHON)"
endif
	$(BIN)/pip install -e .
	touch $@

# dashscope is installed only for the Qwen BPE ranks file it ships (qwen.tiktoken), which
# the Qwen3-VL test checkpoints use; its own dependencies are not needed.
DASHSCOPE := dashscope==2.0.2

$(STAMP_TEST): $(STAMP_RUN)
	$(BIN)/pip install -e '.[test,dev]'
	$(BIN)/pip install --no-deps "$(DASHSCOPE)"
	touch $@

install: $(STAMP_RUN)

serve: $(STAMP_RUN)
	$(BIN)/ggufserve serve $(SERVE_ARGS)

test: $(STAMP_TEST)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP_TEST)
	$(BIN)/ruff check server converters tests
	$(BIN)/ruff format --check server converters tests
	$(BIN)/mypy server converters

# The peer server (llama-cpp-python[server]) pins its own FastAPI/Starlette: it gets a
# separate environment so it cannot change ours. Same sdist, so pip's wheel cache is reused.
$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q "llama-cpp-python[server]==$(LLAMA_CPP_PYTHON_VERSION)"
	touch $@

bench: $(STAMP_TEST) $(BENCH_VENV)/.installed
	$(BIN)/python -m tests.bench.run --peer-python $(BENCH_VENV)/bin/python $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .mypy_cache .ruff_cache

# Peak RSS and speed of converting a 2 GB (Gemma 3 1B-shaped, bf16) checkpoint.
bench-convert: $(STAMP_TEST)
	$(BIN)/python -m tests.bench.convert_memory
