"""The experiment's declaration (kd.config): the student grid's axes, each field's identity, and the loss registry.

The run name, the fingerprint, the report's grid points, groups, table and CSV columns and the pack planner all
derive from :data:`kd.config.STUDENT_AXES` and the fields' declarations; the loss ``kd_nll`` (Eq. 1 plus a
label term weighted by ``--alpha``) was added as one function in kd/losses.py and one field and one axis in
kd/config.py, and shows up in each of those places.
"""

from __future__ import annotations

import csv
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from kd import report
from kd.config import GROUP_AXES, STUDENT_AXES, DistillConfig, TrainConfig
from kd.errors import KDError
from kd.flags import pack_key, pack_keys, parse_flags
from kd.losses import LOSSES, kd_loss
from tests.conftest import TINY, float_tol, run_main


def test_the_papers_run_names_and_fingerprints_are_unchanged_by_later_axes():
    cfg = DistillConfig(dataset="cifar100", ensemble_size=3, trial=2, synthetic_ratio=0.25, temperature=4.0)
    assert cfg.run_name() == "student-cifar100-preresnet56-m3-t2-r0.25-T4" and cfg.student_seed == 1_000_002
    assert dataclasses.replace(cfg, seed=7).run_name() == "student-cifar100-preresnet56-m3-t2-r0.25-T4-s7"
    assert "loss" not in cfg.identity() and "alpha" not in cfg.identity()  # at their defaults: left out
    named = DistillConfig(teachers="teacher-a-s0,teacher-a-s1")
    assert named.run_name() == "student-cifar10-preresnet56-n2-t0-r0-T1"
    assert TrainConfig(arch="timm:resnet18", seed=3).run_name() == "teacher-cifar10-timm-resnet18-s3"  # no ':'


def test_an_added_axis_enters_the_name_the_identity_and_the_pack_rule():
    base = DistillConfig(ensemble_size=3)
    mixed = dataclasses.replace(base, loss="kd_nll", alpha=0.5)
    assert mixed.run_name() == "student-cifar10-preresnet56-m3-t0-r0-T1-Lkd_nll-a0.5"
    assert mixed.fingerprint() != base.fingerprint() and mixed.run_dir() != base.run_dir()
    assert {"loss", "alpha", "temperature", "seed", "trial"}.isdisjoint(pack_keys(DistillConfig))
    assert {"synthetic_ratio", "batch_size", "arch", "lr", "cpu"} <= set(pack_keys(DistillConfig))
    assert pack_key(mixed) == pack_key(base)  # one pack may hold both


def test_a_setting_of_a_loss_not_chosen_is_refused():
    with pytest.raises(KDError, match="--alpha is a setting of another loss than --loss=kd"):
        parse_flags(DistillConfig, [*TINY, "--alpha=0.3"])
    assert parse_flags(DistillConfig, [*TINY, "--loss=kd_nll", "--alpha=0.3"]).alpha == 0.3
    with pytest.raises(KDError, match="--loss must be kd or kd_nll"):
        parse_flags(DistillConfig, [*TINY, "--loss=mse"])


def test_kd_nll_is_eq1_at_alpha_0_and_adds_the_label_term_of_the_real_rows_only(threads):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) * 3
    y = torch.tensor([0, 3, 1, 4, -1, -1])  # the last two rows are synthetic: no label
    batch = {"target": teacher, "y": y}
    for tau in (1.0, 4.0):
        cfg = DistillConfig(temperature=tau, loss="kd_nll", alpha=0.0)
        assert torch.equal(LOSSES["kd_nll"](student, batch, cfg), LOSSES["kd"](student, batch, cfg))
        cfg = dataclasses.replace(cfg, alpha=0.3)
        want = 0.7 * kd_loss(student, teacher, tau).double() + 0.3 * F.cross_entropy(student[:4].double(), y[:4])
        got = LOSSES["kd_nll"](student, batch, cfg)
        assert math.isclose(got.item(), want.item(), abs_tol=float_tol(torch.float32, 6 * 5 * 4, abs(want.item())))


def test_per_row_temperatures_are_each_rows_own():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    taus = torch.tensor([1.0, 4.0, 4.0, 1.0])
    rows = [kd_loss(student[i:i + 1], teacher[i:i + 1], float(taus[i])) for i in range(4)]
    got = kd_loss(student, teacher, taus)
    assert math.isclose(got.item(), sum(r.item() for r in rows) / 4, abs_tol=float_tol(torch.float32, 4 * 7 * 4, 16))
    assert torch.equal(kd_loss(student, teacher, torch.full((4,), 4.0)), kd_loss(student, teacher, 4.0))


def _run(rid: str, trial: int, loss: str | None, alpha: float | None, acc: float) -> report.Run:
    config = {"job": "student", "study": "axes", "dataset": "digits", "arch": "preresnet8", "ensemble_size": 1,
              "synthetic_ratio": 0.0, "temperature": 1.0, "trial": trial}
    if loss is not None:
        config.update(loss=loss, alpha=alpha)
    summary = {"final": True, "test/acc": acc, "test/agreement": acc + 0.1, "test/kl": 0.2, "test/ece": 0.01,
               "teacher/test_acc": 0.9, "data/n_real": 1437, "data/n_synthetic": 0}
    return report.Run(id=rid, name=f"student-{rid}", config=config, summary=summary, time=float(trial))


def test_the_report_groups_by_every_axis_and_writes_its_columns(tmp_path):
    runs = [_run("old0", 0, None, None, 0.50), _run("old1", 1, None, None, 0.52),  # before the axis existed
            _run("kd0", 2, "kd", 0.0, 0.54),  # the default, recorded: the same group as the old runs
            _run("nll0", 0, "kd_nll", 0.5, 0.60), _run("nll1", 1, "kd_nll", 0.5, 0.64)]
    warnings: list[str] = []
    kept, dropped = report.dedupe(runs, warnings)
    assert not dropped, "a second loss is another grid point, never a duplicate"
    groups = report.group_students(kept, warnings)
    assert [(g.get("loss"), g.get("alpha"), len(g.runs)) for g in groups] == [("kd", 0.0, 3), ("kd_nll", 0.5, 2)]
    assert groups[1].stats["test/acc"]["mean"] == pytest.approx(0.62)
    text = report.table(groups, [])
    assert "loss" in text.splitlines()[0] and "kd_nll" in text
    paths = report.write_outputs(groups, "axes", "digits", "preresnet8", tmp_path)
    assert {"fig1", "fig2", "fig1-loss-kd_nll-alpha-0.5", "fig2-loss-kd_nll-alpha-0.5", "csv"} == set(paths)
    with open(paths["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [a.key for a in GROUP_AXES] == [c for c in rows[0] if c in {a.key for a in STUDENT_AXES}]
    assert [(r["loss"], r["alpha"], r["n_runs"]) for r in rows] == [("kd", "0.0", "3"), ("kd_nll", "0.5", "2")]


def test_a_student_with_the_new_loss_trains_under_its_own_name(teachers_dir, tmp_path):
    env = {"KD_STORE": str(teachers_dir / "artifacts"), "WANDB_MODE": "disabled"}
    args = [*TINY, "--epochs=1", "--teachers=teacher-digits-preresnet8-s0", "--loss=kd_nll", "--alpha=0.5"]
    assert run_main("distill.py", *args, cwd=tmp_path, env=env) == 0
    (run_dir,) = (tmp_path / "runs").glob("student-digits-preresnet8-n1-t0-r0-T1-Lkd_nll-a0.5-*")
    assert (run_dir / "done.json").exists()
