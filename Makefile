# Quick start: `make demo` and `make test`. Both set up everything they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-vm test-boot lint pytest bench venv system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,varlink]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the tests use as independent oracles and real peers.
system-deps:
	@./scripts/system-deps.sh

demo: venv
	@./scripts/system-deps.sh demo
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./scripts/demo.sh

lint: venv
	$(PY) -m ruff check src tests bench examples
	$(PY) -m mypy

pytest: venv system-deps
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

test: lint pytest

test-vm: venv system-deps
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) tests/vm/run.py tests/vm tests/repository tests/cli/test_cfsctl.py

# Build examples/bls and examples/uki (cached) and boot them under QEMU.
test-boot: venv system-deps
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) tests/boot/vm_boot.py

bench: venv system-deps
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m bench

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
