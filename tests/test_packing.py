"""Packed runs (kd.steppers.FusedStep, python -m kd.sweep.pack) compute what separate distill.py runs compute.

* A fused pack of students distilling from teacher ensembles (sizes 1 and 2, on real and synthetic images)
  takes the steps its members take alone: float64 over 24 free-running steps (Nesterov SGD, weight decay, a
  cosine lr, the pack closed and fused again every 8 steps) to 1e-9; float32 and bf16 autocast step by step,
  within rounding bounds from the dtype and the size of each sum (:func:`tests.test_fused.bounds`); with one
  and with two torch threads.
* A pack that cannot fuse, or whose steps would not fit in memory, is refused with one line naming the fix;
  the members read each teacher's cache once and share one cache per teacher set.
* A digits grid (a synthetic pool, ensembles of 1 and 2) packed into one process gives each run its own run
  folder, offline W&B run and artifact; fused, its weights are the plain ``distill.py`` runs' to float
  rounding, one after another, bitwise.
* Killed mid-way (``KD_FAULT=train-step@N:KILL``), a plain ``distill.py`` resumes one member from the pack's
  checkpoint, the pack resumes the others: bitwise the weights of uninterrupted runs, no W&B step twice.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from kd import teacher_cache as kt
from kd.config import DistillConfig
from kd.data import Data, load_dataset
from kd.datasets import dataset_spec
from kd.errors import KDError
from kd.io import load_tensors, load_weights, save_tensors, write_json
from kd.models import Ensemble, build_model
from kd.steppers import FusedStep, LoopedStep
from kd.sweep.pack import check_pack_fits, fuses, member_step_bytes, plan
from kd.teachers import select_block
from kd.wandb_runs import clean, inspect_summary, leet_records
from tests.conftest import refused, run_script
from tests.test_fused import bounds

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


# ---------------------------------------------------------------------------------- kd.steppers, kd.sweep.pack


def tiny_models(m: int, dtype: torch.dtype, seed0: int = 0) -> list:
    out = []
    for seed in range(seed0, seed0 + m):
        torch.manual_seed(seed)
        out.append(build_model("preresnet8", 10).to(dtype))
    return out


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


def soft_ce(logits, target_logits, tau: float = 3.0):  # the paper's loss: the teacher's softened distribution
    return F.cross_entropy(logits / tau, (target_logits / tau).softmax(-1))


class Members:
    """m students distilling from teacher ensembles (sizes 1, 2, 1, ...) of three fused-ensemble teachers, on
    batches of real and synthetic images (random ones, 12 + 4 a batch), each student its own batches."""

    def __init__(self, m: int, dtype: torch.dtype, seed: int = 0):
        teachers = tiny_models(3, dtype, seed0=100)
        for t in teachers:  # each teacher its own BatchNorm statistics, then frozen
            t.train()
            t(torch.randn(32, 3, 8, 8, dtype=dtype) * 2)
        self.ensembles = [Ensemble(teachers[i % 3:i % 3 + 1 + i % 2], stacked=True) for i in range(m)]
        self.g, self.dtype = torch.Generator().manual_seed(seed), dtype

    def batches(self) -> tuple[list, list]:
        xs = [torch.cat([torch.randn(12, 3, 8, 8, generator=self.g, dtype=self.dtype),  # "real", then synthetic
                         torch.rand(4, 3, 8, 8, generator=self.g, dtype=self.dtype) * 4 - 2]) for _ in self.ensembles]
        return xs, [e.member_logits(x).double().softmax(-1).mean(0).log().to(self.dtype)
                    for e, x in zip(self.ensembles, xs)]


def test_fused_pack_equals_separate_runs_float64(threads):
    """24 free-running steps of 3 students (a cosine lr, the pack closed and fused again every 8 steps, as
    the engine does at an epoch's end or a checkpoint): logits, weights, BatchNorm statistics and counts,
    momentum and lr equal separate runs to 1e-9."""
    steps, m = 24, 3
    plain = tiny_models(m, torch.float64)
    packed = copy.deepcopy(plain)
    plain_opts, packed_opts = [sgd(p) for p in plain], [sgd(p) for p in packed]
    data, pack = Members(m, torch.float64), None
    for step in range(steps):
        if step % 8 == 0:
            if pack is not None:
                pack.close()
            pack = FusedStep(packed, packed_opts)
            pack.train()
        lr = 0.005 + 0.045 * (1 + math.cos(math.pi * step / steps)) / 2
        pack.set_lr(lr)
        xs, ts = data.batches()
        logits = pack(xs)
        sum(soft_ce(z, t) for z, t in zip(logits, ts)).backward()
        pack.step()
        for i, (model, opt, x, t) in enumerate(zip(plain, plain_opts, xs, ts)):
            opt.param_groups[0]["lr"] = lr
            z = model(x)
            assert torch.allclose(logits[i], z, rtol=0, atol=1e-9), (step, i, float((logits[i] - z).abs().max()))
            soft_ce(z, t).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    pack.close()
    for a, b, oa, ob in zip(packed, plain, packed_opts, plain_opts):
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        for k in sb:  # weights and BatchNorm's running mean, variance and count
            assert torch.allclose(sa[k], sb[k], rtol=0, atol=1e-9), (k, float((sa[k] - sb[k]).abs().max()))
        assert all(int(sa[k]) == steps for k in sa if k.endswith("num_batches_tracked"))
        ma, mb = oa.state_dict(), ob.state_dict()
        assert ma["param_groups"] == mb["param_groups"] and ma["state"].keys() == mb["state"].keys()
        for i in mb["state"]:
            assert torch.allclose(ma["state"][i]["momentum_buffer"], mb["state"][i]["momentum_buffer"], rtol=0,
                                  atol=1e-9), f"momentum {i}"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_fused_pack_steps_within_the_dtype_rounding(threads, bf16):
    """float32 and bf16 autocast, 6 steps each from the separate runs' state (a float32 trajectory is chaotic:
    tests/test_fused.py says why): logits within the forward rounding bound, gradients and the stepped weights
    within the backward bound (:func:`tests.test_fused.bounds`, from the dtype and the size of each sum)."""
    m = 3
    plain = tiny_models(m, torch.float32)
    plain_opts = [sgd(p) for p in plain]
    data = Members(m, torch.float32)
    forward_tol, backward_tol = bounds(plain[0], torch.zeros(16, 3, 8, 8), bf16)
    for step in range(6):
        packed = copy.deepcopy(plain)
        packed_opts = [sgd(p) for p in packed]
        for po, qo in zip(plain_opts, packed_opts):
            qo.load_state_dict(po.state_dict())
        pack = FusedStep(packed, packed_opts)
        pack.train()
        xs, ts = data.batches()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits = pack(xs)
            want = [model(x) for model, x in zip(plain, xs)]
        assert all(rel(z, w) <= forward_tol for z, w in zip(logits, want)), step
        sum(soft_ce(z.float(), t) for z, t in zip(logits, ts)).backward()
        sum(soft_ce(w.float(), t) for w, t in zip(want, ts)).backward()
        for name, p in pack.fused.named_parameters():
            for i, model in enumerate(plain):
                got = pack.fused.member_view(name, p.grad)[i]
                assert rel(got, model.get_parameter(name).grad) <= backward_tol, (step, name, i)
        pack.step()
        pack.close()
        for opt in plain_opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for a, b in zip(packed, plain):
            sa, sb = a.state_dict(), b.state_dict()
            assert all(rel(sa[k], sb[k]) <= backward_tol for k in sb if sb[k].is_floating_point() and sb[k].any())


def test_looped_pack_is_the_plain_loop_and_only_preresnets_fuse(one_thread):
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
    with pytest.raises(ValueError, match="one depth and class count"):
        FusedStep([build_model("preresnet8", 10), build_model("preresnet8", 5)], plain_opts)
    with pytest.raises(KDError, match="cannot be fused"):
        fuses("True", "timm:resnet18", torch.device("cpu"))
    gpu = torch.device("cuda")  # only its type is read
    assert not fuses("auto", "timm:resnet18", gpu) and fuses("auto", "preresnet8", gpu)
    assert not fuses("auto", "preresnet8", torch.device("cpu"))


def test_a_pack_that_cannot_fuse_is_refused_before_anything_is_written(workdir, capsys):
    from kd.sweep.pack import main

    params = {**{k: {"value": v} for k, v in {**RECIPE, "arch": "timm:resnet18"}.items()},
              **{k: {"values": v} for k, v in GRID.items()}}
    (workdir / "grid.yaml").write_text(yaml.safe_dump({"program": "distill.py", "method": "grid",
                                                       "parameters": params}, sort_keys=False))
    refused(capsys, workdir, main, ["grid.yaml", "--stacked=True"], "'timm:resnet18' runs cannot be fused")


def test_a_pack_that_does_not_fit_names_the_pack_that_does(monkeypatch):
    cfgs = [config_of({"trial": t, "arch": "preresnet56", "batch_size": 128}) for t in range(8)]
    spec = dataset_spec("cifar100")
    each = member_step_bytes(cfgs[0], spec)
    assert 2**29 < each < 2**31  # preresnet56 at batch 128 on CIFAR: about 1 GiB of saved activations
    monkeypatch.setattr(kt, "free_bytes", lambda device: 7 * each)  # room for 3 members in half of it
    with pytest.raises(KDError, match=r"a pack of 8 preresnet56 runs at batch 128 .* pass --pack=3$"):
        check_pack_fits(cfgs, spec, torch.device("cuda"))
    check_pack_fits(cfgs[:3], spec, torch.device("cuda"))
    monkeypatch.setattr(kt, "free_bytes", lambda device: each)
    with pytest.raises(KDError, match="lower --batch_size"):
        check_pack_fits(cfgs[:1], spec, torch.device("cuda"))


def test_members_read_one_resident_cache_per_teacher(tmp_path, monkeypatch, one_thread):
    """Ensembles {a}, {a, b}, {b, c} and {a, b} again: each teacher's file loaded or built once, the two {a, b}
    students read one tensor, and every set's targets are bitwise the plain run's, in float32 and float16."""
    full = load_dataset("digits")
    data = Data(full.spec, full.train_x[:6], full.train_y[:6], full.test_x[:4], full.test_y[:4])
    a, b, c = tiny_models(3, torch.float32, seed0=50)
    sets = [([a], ["ha"]), ([a, b], ["ha", "hb"]), ([b, c], ["hb", "hc"]), ([a, b], ["ha", "hb"])]
    read = []
    real = kt.member_targets
    monkeypatch.setattr(kt, "member_targets",
                        lambda member, h, *args, **kw: read.append(h) or real(member, h, *args, **kw))
    for dtype in (torch.float32, torch.float16):
        resident, got = kt.ResidentTeachers(), []
        read.clear()
        for members, hashes in sets:
            targets, path, _ = resident.targets(Ensemble(members), data, hashes, tmp_path, dtype)
            assert path == kt.member_path(tmp_path, hashes[0], data, dtype)
            got.append(targets)
        assert read == ["ha", "hb", "hc"]  # each teacher once, whatever the sets
        assert got[3] is got[1] and got[0] is resident.files["ha", dtype]  # one tensor per teacher set
        plain = []
        for members, hashes in sets:
            plain.append(kt.cached_targets(Ensemble(members), data, hashes, tmp_path, dtype)[0])
        assert all(t.dtype == dtype and torch.equal(t, p) for t, p in zip(got, plain))
        assert torch.equal(resident.files["ha", dtype], plain[0])  # combining never changed a teacher's tensor
        resident.release_files()
        assert not resident.files and torch.equal(resident.sets[("ha",), dtype][0], plain[0])


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


@pytest.mark.slow  # several seconds to half a minute: make chaos runs it
def test_packed_grid_keeps_each_run_and_equals_plain_runs(packed, plain):
    """Fused (the accelerators' default): each run its own, its numbers the plain run's to float
    rounding (a grouped convolution sums in another order): weights within 1e-3 relative L2 after the run,
    final test metrics within one test image."""
    folder, stdout = packed
    assert "pack of 4 on cpu (fused)" in stdout
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
