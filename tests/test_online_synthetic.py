"""The online synthetic protocol (--synthetic_mode=online, kd.online_synthetic): fresh SN-GAN samples every step,
the batch split int(r * B) with r = s / (1 + s), each row's own temperature, the generator's BatchNorm mode, and a
killed run resuming bitwise (the sampling RNG and the generator's statistics are in the checkpoint)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
from fractions import Fraction

import pytest
import torch
from safetensors.torch import load_file

from kd import names
from kd.config import DistillConfig
from kd.data import load_dataset, split_batch
from kd.errors import KDError
from kd.generators import sngan
from kd.generators.presets import GAN_PRESETS
from kd.generators.samplers import GanSampler
from kd.generators.sampling import to_pixels
from kd.losses import LOSSES, kd_loss
from kd.models import Ensemble, build_model
from kd.online_synthetic import FreshSamples, OnlineDistill, online_seed, online_split
from tests.conftest import TINY, float_tol, run_script


@pytest.fixture(scope="module")
def generator_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen") / "gen"
    torch.manual_seed(0)
    g = sngan.generator_of(GAN_PRESETS["digits"])
    sngan.save_generator(folder, g, GAN_PRESETS["digits"], {"step": 300})
    return folder


def _objective(folder, bn: str = "train", cache=None, **cfg_kw):
    data = load_dataset("digits")
    cfg = DistillConfig(dataset="digits", arch="preresnet8", batch_size=64, synthetic_ratio=0.5,
                        synthetic_mode="online", synthetic_generator=str(folder), synthetic_generator_bn=bn, **cfg_kw)
    torch.manual_seed(1)
    ensemble = Ensemble([build_model("preresnet8", data.spec.num_classes)])
    fresh = FreshSamples(GanSampler(folder, torch.device("cpu")), online_seed(cfg.run_seed), bn, data.spec.image_size)
    return OnlineDistill(cfg, data, ensemble, fresh, cache), cfg


# ------------------------------------------------------------------------------------------- the batch split
@pytest.mark.parametrize("s,r", [(0.25, Fraction(1, 5)), (0.5, Fraction(1, 3)), (0.75, Fraction(3, 7)),
                                 (1.0, Fraction(1, 2))])
def test_the_batch_split_is_int_r_b_synthetic_rows_the_static_split_of_the_same_amount(s, r):
    assert Fraction(s) / (1 + Fraction(s)) == r
    for b in (1, 7, 64, 100, 128, 256, 1000):
        real, syn = online_split(b, s)
        assert syn == math.floor(r * b) and real + syn == b  # exact: no float rounding at r * B integer
    assert online_split(128, s) == split_batch(128, 50_000, round(s * 50_000))  # the static pool's split
    assert online_split(128, s) == {0.25: (103, 25), 0.5: (86, 42), 0.75: (74, 54), 1.0: (64, 64)}[s]


def test_the_epoch_is_one_pass_over_the_real_data(generator_folder):
    obj, _ = _objective(generator_folder)
    assert (obj.real_b, obj.syn_b) == (43, 21)  # B 64, s 0.5: int(64 / 3) = 21
    assert obj.steps(0) == math.ceil(obj.data.n_train / 43)
    batches = list(obj.batches(0))
    assert len(batches) == obj.steps(0) and all(len(b["x"]) == len(b["target"]) == len(b["y"]) for b in batches)
    assert sum(int((b["y"] >= 0).sum()) for b in batches) == obj.data.n_train  # every real image once
    assert all(int((b["y"] < 0).sum()) == 21 for b in batches)  # a full synthetic part in every step


# ------------------------------------------------------------------------------------------- per-row temperature
def _authors(zs: torch.Tensor, zt: torch.Tensor, taus: list[float]) -> float:
    """-(1/B) sum_i tau_i^2 sum_j softmax(zt_i / tau_i)_j log softmax(zs_i / tau_i)_j, in float64 by hand."""
    total = 0.0
    for i, tau in enumerate(taus):
        pt = [math.exp(float(v) / tau) for v in zt[i]]
        ps = [math.exp(float(v) / tau) for v in zs[i]]
        total += -(tau ** 2) * sum(p / sum(pt) * math.log(q / sum(ps)) for p, q in zip(pt, ps))
    return total / len(taus)


def test_per_row_temperature_is_the_authors_formula_and_todays_loss_when_equal():
    torch.manual_seed(0)
    zs, zt = torch.randn(9, 6), torch.randn(9, 6) * 3
    taus = [1.0] * 5 + [4.0] * 4  # real rows at tau 1, synthetic rows at tau 4
    want = _authors(zs, zt, taus)
    tol = float_tol(torch.float32, 9 * 6 * 4, scale=max(1.0, abs(want)) * 16)
    batch = {"target": zt, "y": torch.tensor([0] * 5 + [-1] * 4), "tau": torch.tensor(taus)}
    assert LOSSES["kd"](zs, batch, DistillConfig()).item() == pytest.approx(want, abs=tol)
    assert kd_loss(zs, zt, torch.tensor(taus)).item() == pytest.approx(want, abs=tol)
    for tau in (1.0, 4.0):  # equal temperatures: today's scalar loss, bit for bit
        same = kd_loss(zs, zt, torch.full((9,), tau))
        assert torch.equal(same, kd_loss(zs, zt, tau))
        assert same.item() == pytest.approx(_authors(zs, zt, [tau] * 9), abs=tol)


def test_synthetic_rows_carry_their_own_temperature_only_when_it_differs(generator_folder):
    obj, _ = _objective(generator_folder, synthetic_temperature=4.0)
    batch = next(obj.batches(0))
    n_real = int((batch["y"] >= 0).sum())
    assert batch["tau"][:n_real].eq(1.0).all() and batch["tau"][n_real:].eq(4.0).all() and n_real == 43
    same, _ = _objective(generator_folder)
    assert "tau" not in next(same.batches(0))


# ------------------------------------------------------------------------------------------- fresh samples, BN
def _synthetic_rows(obj, epochs: int = 2) -> list[torch.Tensor]:
    return [b["x"][b["y"] < 0] for e in range(epochs) for b in obj.batches(e)]


def test_every_step_sees_fresh_synthetic_images(generator_folder):
    obj, _ = _objective(generator_folder)
    rows = _synthetic_rows(obj)
    assert len(rows) == 2 * obj.steps(0)
    seen = {}
    for s, part in enumerate(rows):
        for img in part:
            key = img.numpy().tobytes()
            seen.setdefault(key, set()).add(s)
    assert len({part.numpy().tobytes() for part in rows}) == len(rows)  # no two steps share a synthetic batch
    shared = [steps for steps in seen.values() if len(steps) > 1]
    assert len(shared) <= len(seen) // 100, f"{len(shared)} of {len(seen)} images come back in another step"
    again, _ = _objective(generator_folder)  # the same run seed: the same stream
    assert all(torch.equal(a, b) for a, b in zip(rows, _synthetic_rows(again)))
    other, _ = _objective(generator_folder, trial=1)  # another seed: another stream
    assert not torch.equal(rows[0], _synthetic_rows(other, 1)[0])


@pytest.mark.parametrize("bn", ["train", "eval"])
def test_the_generators_batchnorm_mode_is_honoured(generator_folder, bn):
    obj, cfg = _objective(generator_folder, bn=bn)
    g = obj.fresh.module
    before = copy.deepcopy(g)
    rng = torch.Generator().manual_seed(online_seed(cfg.run_seed))
    z = torch.randn(21, g.z_dim, generator=rng)
    with torch.no_grad():  # on copies: a forward in train mode moves the copy's running statistics too
        want_train = copy.deepcopy(before).train()(z).clamp(-1, 1)
        want_eval = copy.deepcopy(before).eval()(z).clamp(-1, 1)
    assert not torch.equal(to_pixels(want_train, 8, 8), to_pixels(want_eval, 8, 8))
    got = obj.fresh.take(21)
    assert torch.equal(got, to_pixels(want_train if bn == "train" else want_eval, 8, 8))
    moved = any(not torch.equal(a, b) for a, b in zip(g.buffers(), before.buffers()))
    assert moved == (bn == "train") and not g.training  # train mode updates the running statistics


def test_state_round_trip_continues_the_same_stream(generator_folder):
    obj, _ = _objective(generator_folder)
    obj.fresh.take(21)
    saved = {k: v.clone() for k, v in obj.state().items()}
    assert "online.rng" in saved and any(k.startswith("online.generator.") for k in saved)
    want = obj.fresh.take(21)
    fresh, _ = _objective(generator_folder)
    fresh.restore_state(saved)
    assert torch.equal(fresh.fresh.take(21), want)
    assert all(torch.equal(a, b) for a, b in zip(fresh.fresh.module.buffers(), obj.fresh.module.buffers()))


def test_the_teacher_cache_serves_the_real_rows_and_the_teacher_runs_on_the_fresh_ones(generator_folder):
    plain, _ = _objective(generator_folder)
    data = plain.data
    from kd.teacher_cache import all_view_targets

    table = all_view_targets(plain.ensemble, data)
    cached, _ = _objective(generator_folder, cache=table)
    for a, b in zip(plain.batches(0), cached.batches(0)):
        assert torch.equal(a["x"], b["x"])
        tol = float_tol(torch.float32, 8 * 9 * 64 * 3, scale=float(a["target"].abs().max()))
        assert float((a["target"] - b["target"]).abs().max()) <= tol
        break


# ------------------------------------------------------------------------------------------- config
def test_static_runs_keep_their_identity_and_online_settings_need_online():
    static = DistillConfig(dataset="digits", synthetic_ratio=0.5, synthetic_pool="p")
    assert not {"synthetic_mode", "synthetic_generator_bn", "synthetic_temperature"} & set(static.identity())
    assert "-P" not in static.run_name()
    online = DistillConfig(dataset="digits", synthetic_ratio=0.5, synthetic_generator="g", synthetic_mode="online")
    assert {"synthetic_mode", "synthetic_generator_bn", "synthetic_temperature"} <= set(online.identity())
    assert online.run_name().endswith("-Ponline") and online.fingerprint() != static.fingerprint()
    with pytest.raises(KDError, match="in place of --synthetic_pool"):
        dataclasses.replace(static, synthetic_mode="online").validate()
    for key, value in (("synthetic_temperature", 4.0), ("synthetic_generator_bn", "eval")):
        with pytest.raises(KDError, match=f"--{key} is a setting of --synthetic_mode=online"):
            dataclasses.replace(static, **{key: value}).validate()


# ------------------------------------------------------------------------------------------- the program
ONLINE = ["--epochs=3", "--synthetic_ratio=0.5", "--synthetic_mode=online"]


def _distill(cwd, teachers_dir, generator_folder, env=None, check=True):
    """distill.py online in ``cwd``, with a store of its own (the teachers copied in): runs of the same name in two
    folders must not find each other's mirrored checkpoints."""
    if not (cwd / "artifacts").exists():
        shutil.copytree(teachers_dir / "artifacts", cwd / "artifacts")
    return run_script("distill.py", *TINY, *ONLINE, f"--synthetic_generator={generator_folder}", cwd=cwd,
                      check=check, env={"KD_STORE": str(cwd / "artifacts"), "OMP_NUM_THREADS": "1", **(env or {})})


def _final(cwd):
    (folder,) = (cwd / "runs").glob("student-*")
    return load_file(str(folder / "final" / "model.safetensors")), folder


@pytest.mark.slow  # several seconds to half a minute: make chaos runs it
def test_an_online_run_killed_mid_epoch_resumes_bitwise(tmp_path, teachers_dir, generator_folder):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    straight.mkdir()
    cut.mkdir()
    out = _distill(straight, teachers_dir, generator_folder)
    assert "online, 42 fresh images" in out.stdout and "Ponline" in out.stdout
    # 17 steps an epoch: a kill in epoch 2 (back to its start), then a stop in the middle of epoch 3 (step 5)
    for fault, code in (("train-step@25:KILL", -9), ("train-step@22:TERM", 143)):
        died = _distill(cut, teachers_dir, generator_folder, env={"KD_FAULT": fault}, check=False)
        assert died.returncode == code, died.stderr[-2000:]
    (ckpt,) = (cut / "runs").glob("student-*/**/ckpt-*.safetensors")
    saved = load_file(str(ckpt))
    assert "online.rng" in saved and any(k.startswith("online.generator.") and "running_mean" in k for k in saved)
    resumed = _distill(cut, teachers_dir, generator_folder)
    assert "at epoch 2 step 5" in resumed.stdout + resumed.stderr
    a, folder = _final(straight)
    b, _ = _final(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the resumed online run differs"
    done = json.loads((folder / "done.json").read_text())
    meta = json.loads((straight / "artifacts" / done["artifact"] / "v0" / "meta.json").read_text())
    draw = meta["config"][names.SYNTHETIC_DRAW]
    assert meta["config"]["synthetic_mode"] == "online" and draw["kind"] == "online" and draw["per_step"] == 42
    assert meta["config"]["n_synthetic"] == round(0.5 * meta["config"]["n_real"])
