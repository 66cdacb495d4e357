# The two commands of the quick start are `make serve` and `make test`; both install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml clients/python/pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install serve test lint typecheck test-sqlite test-postgresql test-client bench bench-smoke clean wheel-check test-lowest lock

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "vidgate needs Python 3.11 or newer")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]" -e clients/python
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/vidgate serve --sandbox

lint: $(STAMP)
	$(BIN)/ruff check app tests bench
	$(BIN)/ruff format --check app tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

test-sqlite: $(STAMP)
	VIDGATE_TEST_DB=sqlite $(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

test-postgresql: $(STAMP)
	VIDGATE_TEST_DB=postgresql $(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

# The Python client (clients/python): its own lint and strict types, then its tests against a real gateway.
test-client: $(STAMP)
	cd clients/python && $(abspath $(BIN))/ruff check . && $(abspath $(BIN))/ruff format --check . && $(abspath $(BIN))/mypy
	cd clients/python && $(abspath $(BIN))/python -m pytest $(PYTEST_ARGS)

# Lint, types, then the whole suite on SQLite (the default) and on PostgreSQL (production), then the client.
test: lint typecheck test-sqlite test-postgresql test-client

bench: $(STAMP)
	$(BIN)/python -m bench
	$(BIN)/python -m bench.hardening
	$(BIN)/python -m bench.burst

bench-smoke: $(STAMP)
	$(BIN)/python -m bench --smoke
	$(BIN)/python -m bench.hardening --smoke
	$(BIN)/python -m bench.burst --smoke

# The wheel deploys with no checkout: built, installed from the lock outside the checkout, migrated
# (SQLite and PostgreSQL), served until /readyz answers.
wheel-check: $(STAMP)
	UV=$(BIN)/uv scripts/check-wheel.sh

# The suite on the lowest versions pyproject.toml allows, so the declared floors are tested: all of it on
# SQLite, and on PostgreSQL the files that run statements on the driver (app/core/prebuilt.py leans on
# SQLAlchemy's compiled-statement internals, which only PostgreSQL reaches).
test-lowest: $(STAMP)
	rm -rf .venv-lowest
	$(BIN)/uv venv --quiet --python $(BIN)/python .venv-lowest
	VIRTUAL_ENV=.venv-lowest $(BIN)/uv pip install --quiet --resolution lowest-direct -e ".[dev]" -e clients/python
	VIDGATE_TEST_DB=sqlite .venv-lowest/bin/python -m pytest -n 2 $(PYTEST_ARGS)
	VIDGATE_TEST_DB=postgresql .venv-lowest/bin/python -m pytest -n 2 $(PYTEST_ARGS) tests/test_prebuilt.py \
		tests/test_money_batches.py tests/test_get_statements.py tests/test_lock_order.py tests/test_ledger_writer.py

# What the Docker image installs, with hashes, for every platform and Python >= 3.11; run after
# changing the dependencies in pyproject.toml.
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --quiet --universal --python-version 3.11 --generate-hashes \
		--custom-compile-command "make lock" --output-file requirements.lock

clean:
	rm -rf $(VENV) .venv-lowest data .mypy_cache .ruff_cache .hypothesis
