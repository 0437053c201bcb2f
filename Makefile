# Two commands for a fresh machine: `make demo` (the whole pipeline, offline, on digits) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
STUDY  ?= demo
SWEEPS ?= sweeps/$(STUDY)

.PHONY: setup test lint chaos demo figures report synthetic bench agent clean

setup: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

# two workers (the machine's two cores), one test file per worker at a time: a file's fixtures are built once
XDIST := -n 2 --dist loadfile

test: setup
	$(PY) -m pytest -m "not chaos and not slow" $(XDIST)

# ruff, and the layering contract in pyproject.toml (import-linter: a lower layer never imports a higher one)
lint: setup
	$(VENV)/bin/ruff check kd tests train.py distill.py
	$(VENV)/bin/lint-imports

chaos: setup
	$(PY) -m pytest -m "chaos or slow" $(XDIST)

# The whole pipeline offline on digits: teachers, generator + pool, Figure 1 and ensemble-size sweeps, figures.
# Started again, every step reuses what is done.
# (1,437 pool images = synthetic ratio 1.0 of the 1,437 digits training images)
demo: setup
	$(PY) -m kd.sweep sweeps/demo/teachers.yaml
	$(PY) -m kd.synthetic train --dataset=digits
	$(PY) -m kd.synthetic generate --model=generator-digits --dataset=digits --num=1437 --scheduler=dpm --steps=25
	$(PY) -m kd.sweep sweeps/demo/self_distill.yaml
	$(PY) -m kd.sweep sweeps/demo/ensemble_distill.yaml
	$(PY) -m kd.sweep sweeps/demo/ensemble_size.yaml
	$(PY) -m kd.report --study=demo --expect=sweeps/demo

# 50k CIFAR-10 images from the pretrained DDPM (covers every Figure 1 point: smaller pools are prefixes)
synthetic: setup
	$(PY) -m kd.synthetic generate --model=google/ddpm-cifar10-32 --dataset=cifar10 --num=50000 --scheduler=ddim --steps=100

bench: setup
	$(PY) -m kd.bench $(ARGS)

# ARGS reach the report, e.g. make figures STUDY=cifar10-paper SWEEPS=sweeps/cifar10 ARGS=--refresh
figures: setup
	$(PY) -m kd.report --study=$(STUDY) $(if $(wildcard $(SWEEPS)),--expect=$(SWEEPS)) $(ARGS)

report: setup
	$(PY) -m kd.report --study=$(STUDY) $(if $(wildcard $(SWEEPS)),--expect=$(SWEEPS)) --publish $(ARGS)

# One W&B sweep agent from this environment (its python and accelerate first on PATH); one per GPU:
#   CUDA_VISIBLE_DEVICES=0 make agent SWEEP=entity/kd-fidelity/abc123 [ARGS=--count=5]
agent: setup
	@test -n "$(SWEEP)" || { echo "error: pass SWEEP=entity/project/sweep_id (printed by wandb sweep)" >&2; exit 2; }
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/wandb agent $(ARGS) $(SWEEP)

clean:
	rm -rf runs figures wandb .cache bench
