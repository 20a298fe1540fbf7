# One-line targets; `make test` and `make demo` each set up a fresh machine on their own.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
TORCH  ?= torch==2.13.0
STORE_TESTS := tests/test_bank.py tests/test_dispatch.py tests/test_snapshot.py tests/test_server.py \
	tests/test_dedup.py tests/test_hostile.py tests/test_chaos.py tests/test_concurrency.py tests/test_client.py

.PHONY: install test demo bench bench-quick gpu-check gpu-wheels lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The whole suite, then the bank's store-agnostic tests again on the torch store (on the CPU).
test: install
	$(PY) -m pytest -q
	FGC_BANK_ENGINE=torch $(PY) -m pytest -q $(STORE_TESTS)

demo: install
	$(PY) -m trainer.demo

bench: install
	$(VENV)/bin/fgc-bank bench --out benchmarks

bench-quick: install
	$(VENV)/bin/fgc-bank bench --quick --out benchmarks/results-quick

# On a GPU machine with torch built for CUDA (no venv, no internet): GPU tests + GPU benchmark.
gpu-check:
	bash scripts/gpu_check.sh

# Here, before a GPU run: the wheels a GPU machine lacks (pyzmq), for python 3.12 x86-64.
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl pyzmq

lint: install
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
