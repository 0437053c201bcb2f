"""Kill anything anywhere (``make chaos``): SIGKILL / SIGTERM at deterministic fault points, then the same
command again, until it finishes; the result must be the uninterrupted one.

Every scenario is a chain of runs of one command: each run dies at its fault point (``KD_FAULT``, see
kd/faults.py), the next run of the same command resumes what the last left (and is itself killed further
on), and a last run without a fault finishes. Then:

* the run finished with the same epoch count and config (config.json and every W&B folder's config);
* one W&B run id across every process, and no W&B step logged twice (read with ``kd.wandb_runs.leet_records``);
* every file verified: manifests, checkpoint pointers, weights metas and caches match their sha256, every
  safetensors file that is not a temp file reads back whole, no artifact version was published twice;
* no temp file of a killed write is left behind;
* on the CPU, the final weights (the synthetic pool) are bitwise those of an uninterrupted run of the same
  command (with the same number of threads: here one, which is also far faster on a busy machine).

32 kill points: train.py 10, distill.py 10 (3 of them in the teacher-cache build), ``python -m kd.synthetic
generate`` 5 and ``train`` 2 for each of the DDPM and the SN-GAN, ``python -m kd.sweep`` 3; 4 of them are SIGTERM
(exit 143 with a checkpoint mid-epoch); and a SIGTERM to the sweep runner, which forwards it to its run. Settings are
tiny (digits, PreResNet-8, 12 steps an epoch; a 2-block DDPM; the digits SN-GAN) so that the whole suite stays within
minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kd.artifacts import verify_folder
from kd.io import load_weights, sha256_file
from kd.wandb_runs import leet_records
from tests.conftest import ROOT, TINY, offline_env, run_script

pytestmark = pytest.mark.chaos

TRAIN = [*TINY, "--epochs=3", "--seed=3"]  # 1437 images / 128 = 12 steps an epoch, 36 in all
TEACHER = "teacher-digits-preresnet8-s3"
DISTILL = [*TINY, "--epochs=2", f"--teachers={TEACHER}", "--trial=0", "--temperature=2"]  # the teacher above
STUDENT = "student-digits-preresnet8-n1-t0-r0-T2"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models on a busy machine: far faster; the same in every process


# ------------------------------------------------------------------------------------------------ helpers
def run_chain(script: str, args: list[str], cwd: Path, faults: list[str], env: dict | None = None) -> list:
    """Run ``script args`` once per fault (each must die there), then once more to the end."""
    outs, env = [], {**ONE_THREAD, **(env or {})}
    for fault in faults:
        out = run_script(script, *args, cwd=cwd, check=False, env={**env, "KD_FAULT": fault})
        want = 143 if fault.endswith(":TERM") else -signal.SIGKILL
        assert out.returncode == want, f"{fault}: exit {out.returncode}, not {want}\n{out.stderr[-3000:]}"
        if want == 143:  # SIGTERM: a clean checkpoint and one line, no traceback
            assert "checkpoint saved" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
        outs.append(out)
    outs.append(run_script(script, *args, cwd=cwd, env=env))
    return outs


def wandb_folders(cwd: Path) -> list[Path]:
    return sorted((cwd / "wandb").glob("offline-run-*"))


def wandb_runs(cwd: Path) -> dict[str, dict]:
    """Per W&B run id: the history steps of all its offline folders, and each folder's config."""
    runs: dict[str, dict] = {}
    for folder in wandb_folders(cwd):
        run_id = folder.name.rsplit("-", 1)[1]
        entry = runs.setdefault(run_id, {"steps": [], "configs": []})
        config: dict = {}
        for rec in leet_records(folder):
            if rec.get("type") == "history":
                entry["steps"].append(int(rec["history"]["item"]["_step"]))
            elif rec.get("type") in ("config", "run"):  # wandb.init(config=...) puts it in the run record
                update = rec[rec["type"]].get("config", rec[rec["type"]]).get("update", {})
                config.update({k: v for k, v in update.items() if not k.startswith("_")})
        entry["configs"].append(config)
    return runs


def verify_tree(*roots: Path) -> int:
    """Every file under ``roots`` that records a hash matches it, and no non-temp safetensors is partial."""
    checked = 0
    for root in roots:
        for manifest in root.rglob("manifest.json"):
            verify_folder(manifest.parent)
            checked += 1
        for pointer in root.rglob("checkpoint.json"):
            ck = json.loads(pointer.read_text())
            assert sha256_file(pointer.parent / ck["file"]) == ck["sha256"], pointer
            checked += 1
        for meta in root.rglob("*.json"):
            info = json.loads(meta.read_text())
            if isinstance(info, dict) and "sha256" in info and meta.name != "checkpoint.json":
                target = meta.parent / info.get("file", meta.with_suffix(".safetensors").name)
                assert target.exists() and sha256_file(target) == info["sha256"], meta
                checked += 1
        for f in root.rglob("*.safetensors"):
            load_file(str(f))  # a truncated file does not load
            checked += 1
    return checked


def the_run_dir(cwd: Path) -> Path:
    (folder,) = [p.parent for p in (cwd / "runs").glob("*/done.json")]
    return folder


def check_finished(cwd: Path, store: Path, artifact: str, baseline: dict, epochs: int) -> str:
    """The invariants of a chain that was killed and resumed; returns the W&B run id."""
    run_dir = the_run_dir(cwd)
    done = json.loads((run_dir / "done.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert config == baseline["config"] and config["epochs"] == epochs
    ckpt = json.loads((run_dir / "checkpoint.json").read_text())
    assert ckpt["epoch"] == epochs and [r["epoch"] for r in ckpt["history"]] == list(range(1, epochs + 1))
    runs = wandb_runs(cwd)
    assert list(runs) == [done["run_id"]], f"one W&B run id across all processes, got {list(runs)}"
    steps = runs[done["run_id"]]["steps"]
    assert sorted(steps) == list(range(1, epochs + 1)), f"every epoch logged once, got {steps}"
    logged = [c for c in runs[done["run_id"]]["configs"] if c]  # a process killed early may not have sent it
    assert logged, "no W&B folder holds the run's config"
    for c in logged:
        assert {k: c[k] for k in config if k in c} == json.loads(json.dumps(config)) and c["epochs"] == epochs
    versions = sorted(p.name for p in (store / artifact).glob("v*"))
    assert versions == ["v0"], f"published once, got {versions}"
    assert json.loads((store / artifact / "latest.json").read_text()) == {"version": "v0"}
    assert verify_tree(cwd) > 0
    leftovers = [*(cwd / "runs").rglob(".*.tmp"), *store.rglob(".*.tmp"), *store.rglob(".incoming-*")]
    assert not leftovers, f"temps of killed writes were not cleaned up: {leftovers}"
    weights, meta = load_weights(store / artifact / "v0")
    assert weights.keys() == baseline["weights"].keys()
    for k, v in weights.items():
        assert torch.equal(v, baseline["weights"][k]), f"{k} differs from the uninterrupted run"
    assert meta["run_id"] == done["run_id"]
    return done["run_id"]


def baseline_of(folder: Path, artifact: str) -> dict:
    weights, _ = load_weights(folder / "artifacts" / artifact / "v0")
    return {"weights": weights, "config": json.loads((the_run_dir(folder) / "config.json").read_text()),
            "store": folder / "artifacts"}


def teacher_store(source: Path, dest: Path) -> Path:
    """A private store holding the teacher of ``source`` (each chain builds its own teacher cache in it)."""
    store = dest / "artifacts"
    shutil.copytree(source / TEACHER, store / TEACHER)
    return store


@pytest.fixture(scope="module")
def train_baseline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-baseline")
    run_script("train.py", *TRAIN, cwd=folder, env={**ONE_THREAD, "WANDB_MODE": "disabled"})
    return baseline_of(folder, TEACHER)


@pytest.fixture(scope="module")
def distill_baseline(tmp_path_factory, train_baseline):
    folder = tmp_path_factory.mktemp("distill-baseline")
    store = teacher_store(train_baseline["store"], folder)
    run_script("distill.py", *DISTILL, cwd=folder, env={**ONE_THREAD, "WANDB_MODE": "disabled", "KD_STORE": str(store)})
    return baseline_of(folder, STUDENT)


# ------------------------------------------------------------------------------------------------ train.py
TRAIN_CHAINS = {
    # before the first checkpoint: the rerun starts over, with the W&B run id it already opened
    "before-first-checkpoint": ["train-step@5:KILL", "tensors-write@1:KILL", "ckpt-write@1:KILL"],
    # between checkpoint and W&B log, after the log, mid-epoch SIGTERM, mid-write of the last checkpoint
    "epochs": ["epoch-saved@1:KILL", "epoch-logged@1:KILL", "train-step@2:TERM", "tensors-write@1:KILL"],
    # the final weights half-written, the store version without latest.json, published but not marked done
    "publish": ["tensors-write@4:KILL", "publish-version@1:KILL", "published@1:KILL"],
}


@pytest.mark.parametrize("chain", TRAIN_CHAINS, ids=list(TRAIN_CHAINS))
def test_train_killed_anywhere_resumes_to_the_same_teacher(chain, tmp_path, train_baseline):
    outs = run_chain("train.py", TRAIN, tmp_path, TRAIN_CHAINS[chain])
    assert f"teacher artifact {TEACHER}" in outs[-1].stdout
    check_finished(tmp_path, tmp_path / "artifacts", TEACHER, train_baseline, epochs=3)
    if chain == "epochs":  # the SIGTERM checkpoint was mid-epoch: epoch 3 (index 2), after 2 of its steps
        assert all("at epoch 2 step 2" in o.stdout for o in outs[3:]), outs[3].stdout[-2000:]


# ------------------------------------------------------------------------------------------------ distill.py
DISTILL_CHAINS = {
    # the teacher cache: mid-build, its file half-written, its file in place but not its hash
    "teacher-cache": ["cache-build@10:KILL", "tensors-write@1:KILL", "cache-saved@1:KILL"],
    # training: before any checkpoint, a checkpoint without its pointer, unlogged epoch, mid-epoch SIGTERM
    "epochs": ["train-step@5:KILL", "ckpt-write@1:KILL", "epoch-saved@1:KILL", "train-step@4:TERM"],
    # the student's weights half-written, its store version without latest.json, published but not done
    "publish": ["tensors-write@4:KILL", "publish-version@1:KILL", "published@1:KILL"],
}


@pytest.mark.parametrize("chain", DISTILL_CHAINS, ids=list(DISTILL_CHAINS))
def test_distill_killed_anywhere_resumes_to_the_same_student(chain, tmp_path, train_baseline, distill_baseline):
    store = teacher_store(train_baseline["store"], tmp_path)
    outs = run_chain("distill.py", DISTILL, tmp_path, DISTILL_CHAINS[chain], env={"KD_STORE": str(store)})
    assert f"student artifact {STUDENT}" in outs[-1].stdout
    check_finished(tmp_path, store, STUDENT, distill_baseline, epochs=2)
    verify_tree(store)
    caches = sorted(p.name for p in (store / "_cache").glob("*.safetensors"))
    assert len(caches) == 1, caches  # one cache, built (or rebuilt) whole
    if chain == "teacher-cache":
        assert all("teacher cache (built" in o.stdout for o in outs[-1:])
    if chain == "epochs":
        assert "at epoch 1 step 4" in outs[-1].stdout and "teacher cache (reused" in outs[-1].stdout


# ------------------------------------------------------------------------------------------------ kd.synthetic
GENERATE = ["generate", "--dataset=digits", "--num=10", "--batch_size=2", "--shard_size=4", "--scheduler=ddim",
            "--steps=3", "--source=tiny", "--device=cpu", "--fid=False"]  # shards of 4, 4 and 2 images, 2 a batch
# (--fid=False: tests never reach for the network, where the Inception weights of FID would come from)
POOL = "synthetic-digits-tiny"
SYNTHETIC_CHAIN = [
    "synthetic-batch@3:KILL",  # in shard 1, shard 0 written
    "tensors-write@1:KILL",  # shard 1 complete in its temp file, not in place
    "shard-saved@1:KILL",  # shard 1 in place, not yet in index.json: made again
    "pool-saved@1:KILL",  # the pool in place, pool.json (its hash) not yet
    "publish-version@1:KILL",  # the store version in place, latest.json not yet
]


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory) -> Path:
    """A tiny random DDPM pipeline folder (8 px), as `python -m kd.synthetic train` would save one."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    folder = tmp_path_factory.mktemp("generator") / "tiny8"
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=20)).save_pretrained(str(folder))
    return folder


def test_synthetic_generation_killed_anywhere_resumes_to_the_same_pool(tmp_path, tiny_generator):
    args = [*GENERATE, f"--model={tiny_generator}"]
    straight = tmp_path / "straight"
    straight.mkdir()
    run_script("-m kd.synthetic", *args, cwd=straight, env={**ONE_THREAD, "WANDB_MODE": "disabled"})
    cut = tmp_path / "cut"
    cut.mkdir()
    outs = run_chain("-m kd.synthetic", args, cut, SYNTHETIC_CHAIN)
    assert "1/3 shards already done" in outs[1].stderr and "3/3 shards already done" in outs[-1].stderr
    out = cut / "runs" / "synthetic" / "digits-tiny"
    pool, want = out / "pool.safetensors", straight / "runs" / "synthetic" / "digits-tiny" / "pool.safetensors"
    assert sha256_file(pool) == sha256_file(want), "the resumed pool differs from the uninterrupted one"
    assert json.loads((out / "pool.json").read_text())["sha256"] == sha256_file(pool)
    store = cut / "artifacts"
    assert sorted(p.name for p in (store / POOL).glob("v*")) == ["v0"]
    assert json.loads((store / POOL / "latest.json").read_text()) == {"version": "v0"}
    verify_tree(cut)
    leftovers = [*(cut / "runs").rglob(".*.tmp"), *store.rglob(".*.tmp"), *store.rglob(".incoming-*")]
    assert not leftovers, leftovers
    runs = wandb_runs(cut)
    assert len(runs) == 1, f"one W&B run id across all processes, got {list(runs)}"
    (run,) = runs.values()
    assert run["steps"] == [1], run["steps"]  # the one logged step, once
    configs = [c for c in run["configs"] if c]
    assert configs and all(c == configs[0] for c in configs) and configs[0]["num"] == 10
    assert json.loads((out / "run.json").read_text())["run_id"] in runs


GENERATOR = ["train", "--dataset=digits", "--max_steps=50", "--save_every=25", "--sample_every=1000", "--out=gen"]
GENERATOR_CHAIN = [
    "generator-step@45:KILL",  # checkpoint at 25, steps 30 and 40 logged since: not to be logged twice
    "generator-step@3:TERM",  # resumed at 25: a checkpoint at step 28, exit 143
]


@pytest.mark.parametrize("generator, weights, artifact", [
    ("ddpm", "gen/pipeline/unet/diffusion_pytorch_model.safetensors", "generator-digits"),
    ("sngan", "gen/generator/generator.safetensors", "generator-digits-sngan"),  # the paper's generator
])
def test_synthetic_generator_training_killed_and_terminated_resumes_to_the_same_weights(tmp_path, generator, weights,
                                                                                       artifact):
    args = [*GENERATOR, f"--generator={generator}"]
    straight = tmp_path / "straight"
    straight.mkdir()
    run_script("-m kd.synthetic", *args, cwd=straight, env={**ONE_THREAD, "WANDB_MODE": "disabled"})
    cut = tmp_path / "cut"
    cut.mkdir()
    outs = run_chain("-m kd.synthetic", args, cut, GENERATOR_CHAIN)
    assert "resuming" in outs[1].stderr and "at step 25/" in outs[1].stderr and "at step 28/" in outs[2].stderr
    a, b = load_file(str(cut / weights)), load_file(str(straight / weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    runs = wandb_runs(cut)
    assert len(runs) == 1, f"one W&B run id across all processes, got {list(runs)}"
    (run,) = runs.values()
    assert sorted(run["steps"]) == [10, 20, 30, 40, 50], run["steps"]  # each logged step once
    assert sorted(p.name for p in (cut / "artifacts" / artifact).glob("v*")) == ["v0"]
    verify_tree(cut)


# ------------------------------------------------------------------------------------------------ kd.sweep
def write_spec(folder: Path, seeds: list[int], epochs: int) -> Path:
    spec = {"program": str(ROOT / "train.py"), "method": "grid", "metric": {"name": "test/acc", "goal": "maximize"},
            "parameters": {"dataset": {"value": "digits"}, "arch": {"value": "preresnet8"},
                           "batch_size": {"value": 128}, "epochs": {"value": epochs},
                           "study": {"value": "chaos"}, "seed": {"values": seeds}},
            # the specs' command: train.py under kd.sweep.launch, which passes the runner's SIGTERM on to it
            "command": ["${env}", "${interpreter}", "-m", "kd.sweep.launch", "${program}", "${args}"]}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep_cmd(spec: Path, cwd: Path, fault: str | None = None):
    env = {**os.environ, **offline_env(cwd), **ONE_THREAD, "PYTHONPATH": str(ROOT)}
    env.pop("WANDB_RUN_ID", None)
    env.pop("WANDB_SERVICE", None)
    if fault:
        env["KD_FAULT"] = fault
    return [sys.executable, "-m", "kd.sweep", str(spec)], env


def sweep_state(cwd: Path) -> dict:
    (path,) = (cwd / "runs" / "sweeps").glob("*/state.json")
    return json.loads(path.read_text())


def test_sweep_runner_killed_anywhere_finishes_every_run_once(tmp_path):
    spec = write_spec(tmp_path, seeds=[0, 1], epochs=2)
    # the runner after claiming run 2; run 2's program mid-epoch; the runner after run 2 ended, before noting it
    for fault, want in (("sweep-claimed@2:KILL", -9), ("train-step@5:KILL", 1), ("sweep-exited@1:KILL", -9)):
        cmd, env = sweep_cmd(spec, tmp_path, fault)
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == want, f"{fault}: exit {out.returncode}\n{out.stdout}\n{out.stderr[-3000:]}"
    cmd, env = sweep_cmd(spec, tmp_path)
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "2/2 finished" in out.stdout, out.stderr[-3000:]
    runs = sweep_state(tmp_path)["runs"]
    assert [r["status"] for r in runs] == ["finished", "finished"]
    assert [r["attempts"] for r in runs] == [1, 4]  # claimed, killed mid-epoch, finished unnoted, noted
    wb = wandb_runs(tmp_path)
    assert sorted(wb) == sorted(r["run_id"] for r in runs)  # each config one W&B run, the same on every retry
    for r in runs:
        assert sorted(wb[r["run_id"]]["steps"]) == [1, 2], (r["key"], wb[r["run_id"]]["steps"])
        done = json.loads(next(tmp_path.glob(f"runs/teacher-digits-preresnet8-s{r['params']['seed']}-*/done.json"))
                          .read_text())
        assert done["run_id"] == r["run_id"]
    for seed in (0, 1):
        name = f"teacher-digits-preresnet8-s{seed}"
        assert sorted(p.name for p in (tmp_path / "artifacts" / name).glob("v*")) == ["v0"]
    verify_tree(tmp_path)


def test_sweep_runner_sigterm_checkpoints_its_run_and_exits_143(tmp_path):
    spec = write_spec(tmp_path, seeds=[4], epochs=3)
    cmd, env = sweep_cmd(spec, tmp_path)
    runner = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("runs/teacher-*/checkpoint.json")):  # the program finished epoch 1
        assert time.monotonic() < deadline and runner.poll() is None, runner.communicate()
        time.sleep(0.05)
    runner.send_signal(signal.SIGTERM)
    out, err = runner.communicate(timeout=300)
    assert runner.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    (run,) = sweep_state(tmp_path)["runs"]
    assert run["status"] == "interrupted" and run["returncode"] == 143
    log = next((tmp_path / "runs" / "sweeps").glob(f"*/{run['log']}")).read_text()
    assert "checkpoint saved" in log and "kd.sweep.launch: SIGTERM: passing SIGTERM" in log
    ckpt = json.loads(next(tmp_path.glob("runs/teacher-*/checkpoint.json")).read_text())
    assert ckpt["epoch"] < 3
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "1/1 finished" in out.stdout, out.stderr[-3000:]
    wb = wandb_runs(tmp_path)
    assert list(wb) == [run["run_id"]] and sorted(wb[run["run_id"]]["steps"]) == [1, 2, 3]
    verify_tree(tmp_path)
