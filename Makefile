# voicegate: `make serve` runs the service, `make test` runs every test and quality gate.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Development speech (LibriSpeech, CC BY 4.0) lives beside the project, never inside it.
export VOICEGATE_DATA_DIR ?= $(abspath ../shared/data/librispeech-train-clean-100)
# numpy's OpenBLAS spins threads that fight ONNX Runtime for the cores (measured 6x slower).
export OPENBLAS_NUM_THREADS ?= 1
export OMP_NUM_THREADS ?= 1

INSTALLED := $(VENV)/.installed
STUBS := server/api/voicegate/v1/speaker_pb2_grpc.py
ENCODERS := model_repository/ge2e_int8/1/model.onnx model_repository/ge2e_fp32/1/model.onnx
VAD := model_repository/silero_vad/1/model.onnx
MODELS := $(ENCODERS) $(VAD)
PROTOS := $(wildcard proto/voicegate/v1/*.proto)
# Any Python with grpcio-tools generates the stubs (the container build passes its own).
PROTOC_PYTHON ?= $(BIN)/python
# The buf CLI and the Node example's packages, pinned by one lockfile, in one node_modules.
NODE_DIR := examples/node
NODE_INSTALLED := $(NODE_DIR)/node_modules/.installed
BUF := $(NODE_DIR)/node_modules/.bin/buf
# The API as last released: `buf breaking` compares proto/ with it (proto/released/README.md).
RELEASED_API := proto/released/voicegate-v1.binpb

.PHONY: help setup proto stubs export serve test lint typecheck api-check api-release clean

help:
	@echo "make serve   set up, export if needed, start Triton and the gRPC front server"
	@echo "make test    set up and run every test and quality gate"
	@echo "make api-check    buf lint and breaking-change check of proto/ (part of make test)"

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,export,triton]'
	# resemblyzer ships the GE2E weights; its own requirements would pull another torch.
	$(BIN)/python -m pip install --quiet --no-deps resemblyzer==0.1.4
	touch $@

setup: $(INSTALLED) $(STUBS)

# Stubs are generated from proto/ into their own subpackage and never edited by hand.
# protoc writes absolute imports (`from voicegate.v1 import ...`); they become relative so
# the stubs live inside the server package.
$(STUBS): $(PROTOS) $(INSTALLED)
	$(MAKE) --no-print-directory stubs

# The generation alone, without setting up .venv: `make stubs PROTOC_PYTHON=...`.
stubs:
	rm -rf server/api && mkdir -p server/api
	$(PROTOC_PYTHON) -m grpc_tools.protoc -Iproto --python_out=server/api --pyi_out=server/api \
		--grpc_python_out=server/api $(PROTOS)
	sed -i -E 's/^from voicegate\.v1 import/from . import/' server/api/voicegate/v1/*.py*
	touch server/api/__init__.py server/api/voicegate/__init__.py server/api/voicegate/v1/__init__.py

proto: $(STUBS)

# npm ci: exactly the locked versions; install scripts are not needed (buf's launcher finds
# its platform binary itself) and are not run.
$(NODE_INSTALLED): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	cd $(NODE_DIR) && npm ci --ignore-scripts --no-audit --no-fund
	touch $@

# API conventions: buf lint (STANDARD + COMMENTS) and no breaking change against the release.
api-check: $(NODE_INSTALLED)
	$(BUF) lint
	$(BUF) breaking --against $(RELEASED_API)

# Record proto/ as the released API; run only when releasing a new API version.
api-release: $(NODE_INSTALLED)
	$(BUF) lint
	$(BUF) build --exclude-source-info -o $(RELEASED_API)

# One export writes both encoders (a grouped target: `make -j` runs it once), and the VAD too.
$(ENCODERS) &: | setup
	$(BIN)/voicegate export --target cpu

# The VAD alone takes seconds (the full export, which also writes it, about a minute). After
# the encoders' rule, never beside it; make decided before that rule ran that the VAD was
# missing, so the recipe checks again.
$(VAD): | setup $(ENCODERS)
	test -f $@ || $(BIN)/voicegate export --target cpu --vad-only

export: setup
	$(BIN)/voicegate export --target cpu

serve: setup $(MODELS)
	exec $(BIN)/voicegate serve

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy server export benchmarks

test: setup $(MODELS) lint typecheck $(NODE_INSTALLED)
	$(BIN)/python -m pytest --cov --cov-report=term $(PYTEST_ARGS)

clean:
	rm -rf server/api .voicegate .pytest_cache .mypy_cache .ruff_cache .coverage
