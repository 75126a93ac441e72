# One entry point for people and CI: `make demo`, `make test`, `make bench`, `make wheel`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint imports typecheck pytest bench wheel clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cleanroom-agent demo

test: $(STAMP) lint imports typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

imports: $(STAMP)
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy

# Two workers (the gateway-class CI machine has two cores); a test module stays on one worker, so
# its module-scoped fixtures (a built bundle, a spawned server) are made once.
pytest: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/python -m bench

# The distributable: dist/cleanroom_edge-<version>-py3-none-any.whl (deploy/install.sh installs it).
wheel: $(STAMP)
	$(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation -w dist .

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache

# The offline install bundle: dist/cleanroom-edge-<version>-bundle/ and its .tar.gz, with the
# wheels of every locked dependency for linux x86_64 + aarch64, CPython 3.11-3.13
# (docs/operations.md). `make bundle HOST_ONLY=1`: this machine's platform and Python only.
.PHONY: bundle
bundle: $(STAMP)
	$(BIN)/python deploy/bundle/build.py $(if $(HOST_ONLY),--host-only)
