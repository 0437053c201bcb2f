# Two commands for a fresh machine: `make demo` (the whole pipeline, offline, on digits) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
STUDY  ?= demo
SWEEPS ?= sweeps/$(STUDY)

.PHONY: setup test lint chaos demo figures report synthetic bench clean

setup: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -m "not chaos"

lint: setup
	$(VENV)/bin/ruff check kd tests train.py distill.py

chaos: setup
	$(PY) -m pytest -m chaos

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

figures: setup
	$(PY) -m kd.report --study=$(STUDY) $(if $(wildcard $(SWEEPS)),--expect=$(SWEEPS))

report: setup
	$(PY) -m kd.report --study=$(STUDY) $(if $(wildcard $(SWEEPS)),--expect=$(SWEEPS)) --publish

clean:
	rm -rf runs figures wandb .cache bench
