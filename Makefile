# Two commands from a fresh clone: `make run` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8004

.PHONY: run test test-fast coverage lint bench emulator container-check clean

$(VENV)/.installed: pyproject.toml client/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("Citadel needs Python 3.11 or newer" if sys.version_info < (3, 11) else 0)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# One pip call, the local client first: the server requires citadel-client==2.1.0,
	@# and pip must take ./client for it, never look the name up on the public index.
	$(BIN)/pip install --quiet -e ./client -e '.[dev]'
	@touch $@

run: $(VENV)/.installed  ## start Citadel on the local provider
	$(BIN)/citadel serve --host $(HOST) --port $(PORT)

test: $(VENV)/.installed  ## the whole test suite (installs redis-server and nginx when missing)
	@scripts/ensure-test-packages
	$(BIN)/pytest -n 2

test-fast: $(VENV)/.installed  ## unit and in-thread HTTP tests only, under a minute (no process, venv, nginx, redis)
	$(BIN)/pytest -m "not slow" -n 4

coverage: $(VENV)/.installed  ## the whole suite with line and branch coverage of citadel and citadel_client
	@scripts/ensure-test-packages
	$(BIN)/pytest -n 2 --cov=citadel --cov=citadel_client --cov-branch --cov-report=term:skip-covered

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict citadel
	$(BIN)/mypy --strict client/citadel_client

bench: $(VENV)/.installed  ## throughput and latency against a bare FastAPI endpoint
	$(BIN)/python scripts/bench.py

emulator: $(VENV)/.installed  ## an Evervault API emulator on port 3999
	$(BIN)/python -m evervault_emulator --port 3999

container-check:  ## build the image, run it and both compose stacks for real (needs root or a running Docker engine)
	scripts/check-container

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info client/*.egg-info client/build
