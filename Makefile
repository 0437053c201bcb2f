# Two commands for a fresh machine: `make demo` (the whole pipeline, offline, on digits) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup test lint chaos demo figures report synthetic bench clean

setup: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -m "not chaos" -q

lint: setup
	$(VENV)/bin/ruff check kd tests train.py distill.py

chaos: setup
	$(PY) -m pytest -m chaos -q

clean:
	rm -rf runs figures wandb .cache bench
