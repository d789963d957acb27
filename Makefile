# Two commands: `make run` (install + run on the embedded SQLite default) and
# `make test` (install + the whole suite, lint and types included). CI runs `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install run demo test lint bench system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

run: install
	$(VENV)/bin/collector serve $(if $(CONFIG),--config $(CONFIG))

# The demo store with banner and pixels on http://127.0.0.1:8000/demo/ (plain http, so the
# cookies drop their Secure attribute).
demo: install
	COLLECTOR_VISITOR_SECURE=false $(VENV)/bin/collector serve --demo $(if $(CONFIG),--config $(CONFIG))

lint: install
	$(PY) -m ruff check collector tests bench
	$(PY) -m ruff format --check collector tests bench
	$(PY) -m mypy

test: install system-deps lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install system-deps
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m bench.run $(BENCH_ARGS)

# Debian packages the tests and benchmarks use (installed only when missing, as root).
system-deps:
	@bash .ci/system-deps

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
