"""Packed runs (kd.stacking, kd.steppers, python -m kd.sweep.pack) compute what separate runs compute.

* One stacked model of m PreResNet-8s takes the steps m separate models take (forward, backward, BatchNorm
  running statistics, SGD with Nesterov momentum and weight decay), within the rounding bound of the dtype
  (:func:`tests.conftest.float_tol`: 8 layers each summing over at most 16 images x 8 x 8 pixels, once per
  step), with one and with two torch threads.
* A digits grid packed into one process gives each run its own run folder, offline W&B run and artifact;
  stacked, its weights are the plain ``distill.py`` runs' to float rounding, one after another, bitwise.
* Killed mid-way (``KD_FAULT=train-step@N:KILL``), a plain ``distill.py`` resumes one member from the pack's
  checkpoint, the pack resumes the others: the same weights as uninterrupted runs, no W&B step twice.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

from kd import engine
from kd.config import DistillConfig
from kd.errors import KDError
from kd.io import load_tensors, load_weights, save_tensors, write_json
from kd.models import build_model
from kd.stacking import StackedModel
from kd.steppers import LoopedStep, StackedStep
from kd.sweep.pack import plan
from kd.teachers import select_block
from kd.wandb_runs import clean, inspect_summary, leet_records
from tests.conftest import assert_close_as, run_script

# synthetic data (a pool of 720 random images; ratio 0.25: 359 of them, a 103/25-like split of each batch) and
# mixed ensemble sizes (1 and 2 of the session's 3 teachers), as the study's Figure 1 packs hold
RECIPE = {"dataset": "digits", "arch": "preresnet8", "batch_size": 256, "epochs": 2, "temperature": 3.0,
          "synthetic_ratio": 0.25, "synthetic_pool": "pool.safetensors"}
GRID = {"trial": [0, 1], "ensemble_size": [1, 2]}
COMPARED = [{"trial": 0, "ensemble_size": 1}, {"trial": 0, "ensemble_size": 2}]  # also run plainly
POOL_IMAGES = 720


def flags(run: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in {**RECIPE, **run}.items()]


def config_of(run: dict) -> DistillConfig:
    return DistillConfig(**{**RECIPE, **run})


# ------------------------------------------------------------------------------------ kd.stacking, kd.steppers


def tiny_models(m: int, dtype: torch.dtype) -> list:
    out = []
    for seed in range(m):
        torch.manual_seed(seed)
        out.append(build_model("preresnet8", 10).to(dtype))
    return out


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)


def soft_ce(logits, target_logits):
    return F.cross_entropy(logits, target_logits.softmax(-1))  # a distillation loss, in the input's dtype


@pytest.mark.parametrize("dtype,steps", [(torch.float32, 2), (torch.float64, 8)])
def test_stacked_steps_equal_separate_models(threads, dtype, steps):
    m, terms = 3, 8 * 16 * 8 * 8  # 8 layers; a weight gradient sums over the batch's 16 images x 8 x 8 positions
    plain = tiny_models(m, dtype)
    packed = copy.deepcopy(plain)
    plain_opts, packed_opts = [sgd(p) for p in plain], [sgd(p) for p in packed]
    g = torch.Generator().manual_seed(0)
    pack = None
    for step in range(steps):
        if step in (0, steps // 2):  # a second pack, built from the members' stepped weights and momenta
            if pack is not None:
                pack.close()
            pack = StackedStep(packed, packed_opts)
        xs = [torch.randn(16, 3, 8, 8, generator=g, dtype=dtype) for _ in range(m)]  # each member its batch
        ts = [torch.randn(16, 10, generator=g, dtype=dtype) * 3 for _ in range(m)]
        sum(soft_ce(z, t) for z, t in zip(pack(xs), ts)).backward()
        pack.step()
        for model, opt, x, t in zip(plain, plain_opts, xs, ts):
            soft_ce(model(x), t).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    pack.close()
    for a, b in zip(packed, plain):
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        for k in sb:  # weights and BatchNorm's running mean, variance and count
            assert_close_as(sa[k], sb[k], dtype, terms, chained=steps, msg=k)
        assert any("running_var" in k and not torch.equal(sb[k], torch.ones_like(sb[k])) for k in sb)
        assert all(int(sa[k]) == steps for k in sa if k.endswith("num_batches_tracked"))
    for oa, ob in zip(packed_opts, plain_opts):
        ma, mb = oa.state_dict()["state"], ob.state_dict()["state"]
        assert ma.keys() == mb.keys() and len(ma) == len(list(plain[0].parameters()))
        for i in mb:
            assert_close_as(ma[i]["momentum_buffer"], mb[i]["momentum_buffer"], dtype, terms, chained=steps,
                            msg=f"momentum {i}")


def test_looped_pack_is_the_plain_loop_and_stacks_need_one_architecture(one_thread):
    plain, packed = tiny_models(2, torch.float32), tiny_models(2, torch.float32)
    opts, plain_opts = [sgd(p) for p in packed], [sgd(p) for p in plain]
    pack = LoopedStep(packed, opts)
    xs, ts = [torch.randn(8, 3, 8, 8) for _ in range(2)], [torch.randn(8, 10) for _ in range(2)]
    sum(soft_ce(z, t) for z, t in zip(pack(xs), ts)).backward()
    pack.step()
    for model, opt, x, t in zip(plain, plain_opts, xs, ts):
        soft_ce(model(x), t).backward()
        opt.step()
    for a, b in zip(packed, plain):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(ValueError, match="one architecture"):
        StackedModel([build_model("preresnet8", 10), build_model("preresnet8", 5)])
    with pytest.raises(ValueError, match="expected inputs"):
        StackedModel(plain)(torch.zeros(3, 4, 3, 8, 8))


def test_members_at_different_positions_catch_up_then_train_together(monkeypatch):
    """A pack killed while saving its members one by one: the ones behind train alone until they reach the
    next member's position, then together."""
    calls = []

    def segment(group, epoch, start, stop, stepper, stops, bar):
        calls.append(([m.cfg.run_name() for m in group], epoch, start, stop))
        for m in group:
            m.epoch, m.step = (epoch + 1, 0) if stop == 4 else (epoch, stop)

    monkeypatch.setattr(engine, "train_segment", segment)

    def member(name, epoch, step):
        session = SimpleNamespace(cfg=SimpleNamespace(epochs=3, run_name=lambda: name), main=False)
        return engine.Member(session, None, None, SimpleNamespace(steps=lambda e: 4), None, epoch, step)

    engine.fit([member("a", 1, 0), member("b", 0, 2), member("c", 0, 0), member("d", 3, 0)], lambda group: None)
    assert calls == [(["c"], 0, 0, 2), (["b", "c"], 0, 2, 4), (["a", "b", "c"], 1, 0, 4),
                     (["a", "b", "c"], 2, 0, 4)]


def test_plan_packs_only_runs_of_one_recipe():
    runs = [config_of({"trial": t, "temperature": tau}) for t in range(3) for tau in (1.0, 4.0)]
    runs.append(config_of({"trial": 0, "lr": 0.1}))  # another learning rate: a pack of its own
    packs = plan(runs, 4)
    assert [len(p) for p in packs] == [4, 2, 1]
    assert packs[2][0].lr == 0.1 and {c.lr for p in packs[:2] for c in p} == {0.05}


# ------------------------------------------------------------------------------------------- the runner


def folder_with_teachers(root: Path, teachers_dir: Path, grid: dict = GRID) -> Path:
    """A working folder whose own store (./artifacts) holds the session's teachers, and a grid spec."""
    root.mkdir(parents=True)
    for t in (teachers_dir / "artifacts").glob("teacher-*"):
        shutil.copytree(t, root / "artifacts" / t.name)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (POOL_IMAGES, 3, 8, 8), dtype=torch.uint8, generator=g)
    digest = save_tensors(root / "pool.safetensors", {"images": images})
    write_json(root / "pool.json", {"sha256": digest, "count": POOL_IMAGES, "model": "test", "dataset": "digits"})
    params = {**{k: {"value": v} for k, v in RECIPE.items()}, **{k: {"values": v} for k, v in grid.items()}}
    spec = {"program": "distill.py", "method": "grid", "parameters": params}
    (root / "grid.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return root


def weights(folder: Path, run: dict) -> dict:
    return load_weights(folder / "artifacts" / config_of(run).run_name() / "v0")[0]


def rel_diff(a: dict, b: dict) -> float:
    keys = [k for k in b if b[k].is_floating_point()]
    fa, fb = (torch.cat([w[k].flatten() for k in keys]) for w in (a, b))
    return float((fa - fb).norm() / fb.norm())


def wandb_by_run(folder: Path) -> dict[str, dict]:
    """Per W&B run id: the history steps of all its offline folders, its config, its last summary."""
    runs: dict[str, dict] = {}
    for wb in sorted((folder / "wandb").glob("offline-run-*")):
        entry = runs.setdefault(wb.name.rsplit("-", 1)[1], {"steps": [], "config": {}})
        for rec in leet_records(wb):
            if rec.get("type") == "history":
                entry["steps"].append(int(rec["history"]["item"]["_step"]))
        try:
            info = inspect_summary(wb)
        except KDError:  # the folder of a process SIGKILLed before it ended its run: no summary
            continue
        entry["config"].update(clean(info["config"]))
        entry["summary"] = clean(info["summary"])
    return runs


@pytest.fixture(scope="module")
def plain(tmp_path_factory, teachers_dir) -> Path:
    """The compared configs, each run by plain distill.py."""
    folder = folder_with_teachers(tmp_path_factory.mktemp("pack") / "plain", teachers_dir)
    for run in COMPARED:
        run_script("distill.py", *flags(run), cwd=folder)
    return folder


@pytest.fixture(scope="module")
def packed(tmp_path_factory, teachers_dir) -> tuple[Path, str]:
    folder = folder_with_teachers(tmp_path_factory.mktemp("pack") / "packed", teachers_dir)
    out = run_script("-m kd.sweep.pack", "grid.yaml", "--pack=4", "--stacked=True", cwd=folder)
    return folder, out.stdout


def final_metrics(folder: Path) -> dict[str, dict]:
    return {r["config"]["run_name"]: {k: v for k, v in r["summary"].items() if k.startswith("test/")}
            for r in wandb_by_run(folder).values()}


def test_a_looped_pack_is_bitwise_the_plain_runs(tmp_path, teachers_dir, plain):
    """One after another (the CPU's default): every weight and every final metric exactly distill.py's."""
    folder = folder_with_teachers(tmp_path / "looped", teachers_dir, {"trial": [0], "ensemble_size": [1, 2]})
    out = run_script("-m kd.sweep.pack", "grid.yaml", "--pack=4", "--stacked=False", cwd=folder)  # = COMPARED
    assert "pack of 2 on cpu (one after another)" in out.stdout
    metrics, want = final_metrics(folder), final_metrics(plain)
    for run in COMPARED:
        w, p = weights(folder, run), weights(plain, run)
        assert w.keys() == p.keys() and all(torch.equal(w[k], p[k]) for k in p), run
        name = config_of(run).run_name()
        assert metrics[name] == want[name] and "test/agreement" in want[name]


def test_packed_grid_keeps_each_run_and_equals_plain_runs(packed, plain):
    """Stacked (vmapped, the accelerators' default): each run its own, its numbers the plain run's to float
    rounding (a grouped convolution sums in another order): weights within 1e-3 relative L2 after the run,
    final test metrics within one test image."""
    folder, stdout = packed
    assert "pack of 4 on cpu (stacked)" in stdout
    metrics, want = final_metrics(folder), final_metrics(plain)
    runs = [dict(zip(GRID, values)) for values in [(t, m) for t in GRID["trial"] for m in GRID["ensemble_size"]]]
    wandb_runs = wandb_by_run(folder)
    assert len(wandb_runs) == len(runs)
    plain_wandb = {r["config"]["run_name"]: r for r in wandb_by_run(plain).values()}
    for run in runs:
        cfg = config_of(run)
        run_dir = folder / "runs" / f"{cfg.run_name()}-{cfg.fingerprint()}"  # distill.py's own folder
        done = json.loads((run_dir / "done.json").read_text())  # so distill.py says "already finished"
        assert done["artifact"] == cfg.run_name() and done["summary"]["final"] is True
        ckpt = json.loads((run_dir / "checkpoint.json").read_text())
        assert ckpt["epoch"] == 2 and ckpt["fingerprint"] == cfg.fingerprint()
        wb = wandb_runs[done["run_id"]]
        assert sorted(wb["steps"]) == [1, 2]
        assert wb["config"]["ensemble_size"] == run["ensemble_size"] and wb["config"]["trial"] == run["trial"]
        block = select_block([f"teacher-digits-preresnet8-s{i}" for i in range(3)], run["ensemble_size"], run["trial"])
        assert wb["config"]["teacher_names"] == block and wb["config"]["n_synthetic"] == round(0.25 * 1437)
        assert wb["summary"]["final"] is True and "test/agreement" in wb["summary"]
        manifest = json.loads((folder / "artifacts" / cfg.run_name() / "v0" / "manifest.json").read_text())
        assert manifest["run_id"] == done["run_id"] and manifest["metadata"]["config"]["run_name"] == cfg.run_name()
        if run in COMPARED:  # what plain distill.py logs and publishes, and (to float rounding) its weights
            twin = plain_wandb[cfg.run_name()]
            assert wb["config"] == twin["config"]
            assert set(wb["summary"]) == set(twin["summary"])
            assert rel_diff(weights(folder, run), weights(plain, run)) < 1e-3
            for key, value in want[cfg.run_name()].items():
                tolerance = 1.5 / 360 if key in ("test/acc", "test/agreement") else 1e-2  # one image; KL, ECE
                assert abs(metrics[cfg.run_name()][key] - value) <= tolerance, (key, run)
    other = rel_diff(weights(folder, {"trial": 1, "ensemble_size": 1}), weights(plain, COMPARED[0]))
    assert other > 0.1, "another run's weights must not pass as equal"


@pytest.mark.slow  # a long end-to-end test: make chaos runs it
def test_pack_killed_mid_way_resumes_plainly_or_packed_to_the_plain_weights(tmp_path, teachers_dir, plain):
    folder = folder_with_teachers(tmp_path / "killed", teachers_dir)
    args = ("grid.yaml", "--stacked=False")  # one after another: bitwise what distill.py computes
    out = run_script("-m kd.sweep.pack", *args, cwd=folder, check=False, env={"KD_FAULT": "train-step@10:KILL"})
    assert out.returncode == -9, out.stderr[-3000:]  # SIGKILL in epoch 2 (8 steps an epoch), after epoch 1 saved
    pointers = sorted((folder / "runs").glob("*/checkpoint.json"))
    assert len(pointers) == 4 and all(json.loads(p.read_text())["epoch"] == 1 for p in pointers)
    for p in pointers:  # the engine's checkpoint format
        keys = load_tensors(p.parent / json.loads(p.read_text())["file"]).keys()
        assert any(k.startswith("model.") for k in keys) and any(k.startswith("optim.") for k in keys)
    first = run_script("distill.py", *flags(COMPARED[0]), cwd=folder)  # plain distill.py resumes a member
    assert "resuming" in first.stdout
    rest = run_script("-m kd.sweep.pack", *args, cwd=folder)
    assert "already finished" in rest.stdout and rest.stdout.count("resuming") == 3
    for run in COMPARED:
        w, want = weights(folder, run), weights(plain, run)
        assert w.keys() == want.keys() and all(torch.equal(w[k], want[k]) for k in want), run
    runs = wandb_by_run(folder)
    assert len(runs) == 4
    for run_id, wb in runs.items():
        assert sorted(wb["steps"]) == [1, 2], f"{run_id}: every epoch logged once, got {wb['steps']}"
        assert wb["summary"].get("final") is True
    assert len(list((folder / "runs").glob("*/done.json"))) == 4
