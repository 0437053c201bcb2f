# Two commands for a fresh machine: `make demo` (the whole pipeline, offline, on digits-hard) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
STUDY  ?= demo
SWEEPS ?= sweeps/$(STUDY)

.PHONY: setup test lint chaos demo figures report synthetic bench agent agents clean

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

# The whole pipeline offline on digits-hard (digits with noise, occlusion and 360 training images, so teachers
# err): teachers, generator + pool, Figure 1 and ensemble-size sweeps (2 trials each), figures. Started again,
# every step reuses what is done. One torch thread per process: tiny models run fastest so, and another job on
# the machine slows the demo down less. (360 pool images = synthetic ratio 1.0 of the 360 training images)
DEMO_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
define step
	@echo "== demo step $(1): $(2)"; t0=$$(date +%s); $(DEMO_ENV) $(3) && echo "== demo step $(1) done in $$(( $$(date +%s) - t0 )) s"
endef

demo: setup
	$(call step,1/7,4 teachers,$(PY) -m kd.sweep sweeps/demo/teachers.yaml)
	$(call step,2/7,a small DDPM on digits-hard,$(PY) -m kd.synthetic train --dataset=digits-hard --threads=1)
	$(call step,3/7,a pool of 360 synthetic images,$(PY) -m kd.synthetic generate --model=generator-digits-hard --dataset=digits-hard --num=360 --scheduler=dpm --steps=25 --threads=1)
	$(call step,4/7,Figure 1a students (10),$(PY) -m kd.sweep sweeps/demo/self_distill.yaml)
	$(call step,5/7,Figure 1b students (10),$(PY) -m kd.sweep sweeps/demo/ensemble_distill.yaml)
	$(call step,6/7,ensemble-size students (4 more),$(PY) -m kd.sweep sweeps/demo/ensemble_size.yaml)
	$(call step,7/7,figures,$(PY) -m kd.report --study=demo --expect=sweeps/demo)

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

# W&B sweep agents from this environment (its python and accelerate first on PATH), each as
# `wandb agent --forward-signals` in a session of its own (setsid): the terminal's Ctrl-C reaches make and this
# shell only, which send every agent one SIGTERM; the agent passes it on to its run, which checkpoints, marks its
# W&B run preempting (W&B hands it out again) and exits 143; then the agent ends. Waits for every agent.
# $(1): one word per agent, a GPU index (its CUDA_VISIBLE_DEVICES) or - (the environment's CUDA_VISIBLE_DEVICES).
define agents_loop
	@pids=; code=; stop() { code=$$1; kill -TERM $$pids 2>/dev/null; }; \
	trap 'stop 130' INT; trap 'stop 143' TERM; trap 'stop 129' HUP; \
	$(foreach gpu,$(1),$(if $(filter -,$(gpu)),,CUDA_VISIBLE_DEVICES=$(gpu) )PATH="$(abspath $(VENV))/bin:$$PATH" \
	setsid $(VENV)/bin/wandb agent --forward-signals $(ARGS) $(SWEEP) & pids="$$pids $$!"; \
	) rc=0; for p in $$pids; do wait $$p; s=$$?; while kill -0 $$p 2>/dev/null; do wait $$p; s=$$?; done; \
	[ $$s -eq 0 ] || rc=$$s; done; exit $${code:-$$rc}
endef
need_sweep = @test -n "$(SWEEP)" || { echo "error: pass SWEEP=entity/project/sweep_id (printed by wandb sweep)" >&2; exit 2; }

# One agent:  CUDA_VISIBLE_DEVICES=0 make agent SWEEP=entity/kd-fidelity/abc123 [ARGS=--count=5]
agent: setup
	$(need_sweep)
	$(call agents_loop,-)

# One agent per GPU of this machine, each seeing only its own (CUDA_VISIBLE_DEVICES), in the background:
#   make agents SWEEP=entity/kd-fidelity/abc123 GPUS=0,1,2,3 [ARGS=--count=5]
comma := ,
agents: setup
	$(need_sweep)
	@test -n "$(GPUS)" || { echo "error: pass GPUS=0,1,... (one agent per GPU, e.g. GPUS=0,1,2,3)" >&2; exit 2; }
	$(call agents_loop,$(subst $(comma), ,$(GPUS)))

clean:
	rm -rf runs figures wandb .cache bench
