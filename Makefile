# Set-up and test entry points. Override TORCH_SPEC for a GPU build, e.g.
#   make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" venv
# then --device cuda|auto (README, "On a GPU": that path has not run on a GPU).
PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: venv run test test-all lint system-deps clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed
	# the native decoder (engine/native.py) is built once per machine; here, not at first start-up
	-$(PY) -m engine.native

run: venv
	bash scripts/run_daemon.sh $(ARGS)

# Real servers for the jack/mqtt tests; skipped (tests then skip) where apt is unavailable.
system-deps:
	@bash scripts/install_system_deps.sh

test: venv system-deps
	bash scripts/run_tests.sh

test-all: venv system-deps
	bash scripts/run_tests.sh -m ""

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
