# Two commands do everything on a fresh machine: `make run` and `make test`.
# Install order matters: torch==2.13.0 first (CPU wheel), then the pinned lock, so no CUDA build is pulled.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# a failing pip fails the install (pipefail); only grep's "no line left" is forgiven
QUIET := { grep -v -e '^WARNING: Location' -e 'BuildBackendWarning' || true; }
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock constraints.txt pyproject.toml | sha256sum | cut -c1-16)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export DVC_SITE_CACHE_DIR := $(CURDIR)/.cache/dvc-site
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export PYTHONWARNINGS := ignore

STACK := infra/stack.sh
PARAMS ?= params.yaml

.PHONY: install run run-local test browser up down status clean-outputs

install: $(STAMP)

$(STAMP): requirements.lock constraints.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | $(QUIET)
	$(BIN)/python -m pip install -q torch==2.13.0 2>&1 | $(QUIET)
	$(BIN)/python -m pip install -q --no-deps -r requirements.lock -c constraints.txt 2>&1 | $(QUIET)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | $(QUIET)
	$(BIN)/python -c "import torch, transformers, peft, deepspeed, sklearn; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	$(BIN)/python -m compileall -q $(VENV)/lib > /dev/null 2>&1 || true
	rm -f $(VENV)/.installed-*
	touch $@

# The main job: the stack up (if down), the full pipeline as the Prefect deployment, then the results.
run: install up
	@eval "$$($(STACK) env)"; set -o pipefail; \
	  $(BIN)/prefect deployment run fedlease/full --param params=$(PARAMS) --watch --watch-interval 5 | grep --line-buffered -v -e '^$$' || { echo "flow run failed; see infra/state/logs/serve.log"; exit 1; }
	@echo; $(BIN)/fedlease results --params $(PARAMS); echo
	@eval "$$($(STACK) env)"; echo "Prefect UI: $${PREFECT_API_URL%/api}   MLflow UI: $$MLFLOW_TRACKING_URI   (make down stops them)"

# The same pipeline in this process, without the stack (tracking to the stack's store, infra/state/mlflow.db).
run-local: install
	$(BIN)/fedlease run --params $(PARAMS)

up: install
	@$(STACK) up

down:
	@$(STACK) down

status:
	@$(STACK) status

# One pytest process per usable CPU (affinity, not the host's cores; at most 4: each starts servers and several
# tests wait on timeouts), whole files to each, so a file's servers and heads start once: serially the suite keeps
# about one core busy. DeepSpeed's CPU comm op is JIT-built once first, not by two workers at a time.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
test: install browser
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load(verbose=False)"
# the slowest 15 listed (the suite has a 20-minute budget); files in tests/conftest.py's order, longest first;
# one torch thread per worker (and per process it starts): two workers with torch's default two threads each
# oversubscribe 2 cores: 89-91 s against 65-73 s on test_pipeline.py + test_benchmark_cli.py, the whole suite
# 20 min 07 s against 17 min 07 s (2026-12-03, alone on the machine)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 tests

# Debian's Chromium for the MLflow UI browser test (installed when missing and run as root).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "chromium missing: the browser test will be skipped"; }

clean-outputs:
	rm -rf outputs
