# Two commands for a fresh machine: `make demo` (the whole pipeline, offline, on digits-hard) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
STUDY  ?= demo
SWEEPS ?= sweeps/$(STUDY)

.PHONY: setup test lint chaos test-slurm demo figures report synthetic docs bench agent agents slurm slurm-requeue \
	slurm-stop clean

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

# the SLURM tests (marked slow too) need slurmctld and slurmd: deselected where they are not installed
SLURM_TESTS := $(if $(shell command -v slurmctld 2>/dev/null),,and not slurm)
chaos: setup
	$(PY) -m pytest -m "(chaos or slow) $(SLURM_TESTS)" $(XDIST)

# The SLURM tests on a one-node cluster of this machine (slurm/local-cluster.sh, in a temporary folder, stopped
# afterwards whatever happens); installs Debian's slurm-wlm and munge first where they are absent.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
test-slurm: setup
	@command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null || { \
	  echo "== installing slurm-wlm and munge"; t0=$$(date +%s); \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null || { \
	    $(SUDO) apt-get update -q >/dev/null && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null; } || exit 2; \
	  echo "== installed in $$(( $$(date +%s) - t0 )) s"; }
	@dir=$$(mktemp -d /tmp/kd-slurm-XXXXXX); trap 'slurm/local-cluster.sh stop "$$dir"; rm -rf "$$dir"' EXIT; \
	trap 'exit 130' INT; trap 'exit 143' TERM; \
	slurm/local-cluster.sh start "$$dir" && \
	KD_TEST_SLURM_CONF="$$dir/slurm.conf" $(PY) -m pytest -m slurm tests/test_slurm.py $(ARGS)

# The whole pipeline offline on digits-hard (digits with noise, occlusion and 360 training images, so teachers
# err): teachers, generator + pool, Figure 1 and ensemble-size sweeps (2 trials each), figures. Started again,
# every step reuses what is done. One torch thread per process: tiny models run fastest so, and another job on
# the machine slows the demo down less. (720 pool images: each of the 2 trials draws its own block, up to synthetic
# ratio 1.0 of the 360 training images)
DEMO_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
define step
	@echo "== demo step $(1): $(2)"; t0=$$(date +%s); $(DEMO_ENV) $(3) && echo "== demo step $(1) done in $$(( $$(date +%s) - t0 )) s"
endef

demo: setup
	$(call step,1/7,4 teachers,$(PY) -m kd.sweep sweeps/demo/teachers.yaml)
	$(call step,2/7,a small DDPM on digits-hard,$(PY) -m kd.synthetic train --dataset=digits-hard --threads=1)
	$(call step,3/7,a pool of 720 synthetic images,$(PY) -m kd.synthetic generate --model=generator-digits-hard --dataset=digits-hard --num=720 --scheduler=dpm --steps=25 --threads=1)
	$(call step,4/7,Figure 1a students (10),$(PY) -m kd.sweep sweeps/demo/self_distill.yaml)
	$(call step,5/7,Figure 1b students (10),$(PY) -m kd.sweep sweeps/demo/ensemble_distill.yaml)
	$(call step,6/7,ensemble-size students (4 more),$(PY) -m kd.sweep sweeps/demo/ensemble_size.yaml)
	$(call step,7/7,figures,$(PY) -m kd.report --study=demo --expect=sweeps/demo)

# The CIFAR generators: the authors' SN-GAN checkpoints (epochs 100-500, both datasets; Figure 1 samples epoch
# 500 per run) and 150k CIFAR-10 images of the pretrained DDPM (sweeps/cifar10/generator_quality_ddpm.yaml: a
# block of 50k per trial)
synthetic: setup
	for d in cifar10 cifar100; do for e in 100 200 300 400 500; do \
	  $(PY) -m kd.synthetic import --source=gnosis --dataset=$$d --epoch=$$e || exit $$?; done; done
	$(PY) -m kd.synthetic generate --model=google/ddpm-cifar10-32 --dataset=cifar10 --num=150000 --scheduler=ddim --steps=100

# The runs and needs of every study (python -m kd.sweep.plan), written into the <!-- plan --> blocks of the docs
docs: setup
	$(PY) -m kd.sweep.plan --write README.md docs/reference.md

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

# Many machines through SLURM (slurm/agents.sbatch; README "Many machines: SLURM"): one task per GPU on each
# node, each a W&B agent of SWEEP or an offline runner of SPEC (run folders on the shared file system); GRACE
# seconds before TIME runs out every run checkpoints and the job requeues itself.
#   make slurm SWEEP=entity/kd-fidelity/abc123 NODES=2 GPUS_PER_NODE=4 [TIME=24:00:00] [GRACE=300] [ARGS=...]
#   make slurm SPEC=sweeps/cifar10/teachers.yaml NODES=2 GPUS_PER_NODE=4 [SBATCH_ARGS=--partition=gpu]
#   make slurm-requeue JOB=1234   every run checkpoints now, then the job requeues itself
#   make slurm-stop JOB=1234      every run checkpoints now, then the job ends
# GPUS_PER_NODE=0 TASKS_PER_NODE=n: n tasks per node and no GPUs (a CPU cluster).
NODES ?= 1
GPUS_PER_NODE ?= 1
TASKS_PER_NODE ?= $(GPUS_PER_NODE)
TIME ?= 24:00:00
GRACE ?= 300
SLURM_DIR ?= runs/slurm
SBATCH_ARGS ?=
slurm: setup
	@test -n "$(SWEEP)$(SPEC)" && test -z "$(and $(SWEEP),$(SPEC))" || { echo "error: pass SWEEP=entity/project/sweep_id \
	(W&B agents) or SPEC=sweeps/STUDY/NAME.yaml (offline runners), one of them" >&2; exit 2; }
	@command -v sbatch >/dev/null || { echo "error: sbatch is not on PATH: run make slurm where SLURM jobs are submitted" >&2; exit 2; }
	@mkdir -p $(SLURM_DIR)
	sbatch --job-name=kd-$(notdir $(basename $(or $(SPEC),$(SWEEP)))) --nodes=$(NODES) \
	  --ntasks-per-node=$(TASKS_PER_NODE) $(if $(filter-out 0,$(GPUS_PER_NODE)),--gres=gpu:$(GPUS_PER_NODE)) \
	  --time=$(TIME) --requeue --signal=B:USR1@$(GRACE) --open-mode=append --output=$(SLURM_DIR)/%x-%j.out \
	  --chdir=$(CURDIR) --export=ALL,KD_SLURM_DIR=$(abspath $(SLURM_DIR)),KD_VENV=$(abspath $(VENV)),KD_GPUS_PER_NODE=$(GPUS_PER_NODE) \
	  $(SBATCH_ARGS) slurm/agents.sbatch $(if $(SWEEP),sweep $(SWEEP),spec $(SPEC)) $(ARGS)

slurm-requeue slurm-stop:
	@test -n "$(JOB)" || { echo "error: pass JOB=<SLURM job id> (printed by make slurm)" >&2; exit 2; }
	scancel --batch --signal=$(if $(filter slurm-stop,$@),USR2,USR1) $(JOB)

clean:
	rm -rf runs figures wandb .cache bench
