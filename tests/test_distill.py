import json
import math

import pytest
import torch
import torch.nn.functional as F

from kd.io import save_tensors, write_json
from kd.losses import kd_loss
from kd.metrics import accuracy, agreement, ece, predictive_kl
from kd.wandb_runs import leet_records
from tests.conftest import TINY, float_tol, run_script

# ------------------------------------------------------------------------------------------- loss and metrics


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_loss_matches_formula_with_logits_and_log_probs(tau):
    torch.manual_seed(0)
    zs, zt = torch.randn(7, 5), torch.randn(7, 5) * 3
    want = 0.0
    for i in range(7):
        pt = [math.exp(zt[i, j] / tau) for j in range(5)]
        ps = [math.exp(zs[i, j] / tau) for j in range(5)]
        want += -(tau**2) * sum(pt[j] / sum(pt) * math.log(ps[j] / sum(ps)) for j in range(5))
    want /= 7
    tol = float_tol(torch.float32, 7 * 5 * 4, scale=abs(want))  # float32 sums of 7 x 5 terms, a few ops each
    assert kd_loss(zs, zt, tau).item() == pytest.approx(want, abs=tol)
    assert kd_loss(zs, F.log_softmax(zt, -1), tau).item() == pytest.approx(want, abs=tol)
    members = torch.randn(3, 7, 5)
    ens = torch.log(F.softmax(members, -1).mean(0))  # an ensemble's log-probabilities
    shifted = kd_loss(zs, ens + 11.0, tau).item()  # a shift of the teacher's logits changes nothing
    assert kd_loss(zs, ens, tau).item() == pytest.approx(shifted, abs=float_tol(torch.float32, 7 * 5 * 4, 11 * tau**2))


def test_kd_loss_minimised_by_matching_teacher():
    zt = torch.randn(4, 6)
    assert kd_loss(zt, zt) < kd_loss(zt.flip(-1), zt)


def test_agreement_kl_ece_on_hand_made_cases():
    teacher = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [3.0, 0.0, 0.0]])
    student = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert agreement(student, teacher) == 0.75
    assert predictive_kl(teacher, teacher) == pytest.approx(0.0, abs=1e-12)
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    q = torch.tensor([0.9, 0.1], dtype=torch.float64)
    kl = (p * (p / q).log()).sum().item()  # KL(teacher || student), not the reverse
    assert predictive_kl(q.log()[None], p.log()[None]) == pytest.approx(kl, rel=1e-9)
    assert predictive_kl(q.log()[None], p.log()[None]) != pytest.approx((q * (q / p).log()).sum().item())
    labels = torch.tensor([0, 0, 2, 1])
    assert accuracy(student, labels) == 0.5
    # ece: confidences 0.7, 0.9 (bins 7 and 9), one right one wrong
    logits = torch.log(torch.tensor([[0.7, 0.3], [0.9, 0.1]]))
    assert ece(logits, torch.tensor([0, 1])) == pytest.approx((abs(1 - 0.7) + abs(0 - 0.9)) / 2)
    perfect = torch.log(torch.tensor([[1.0 - 1e-9, 1e-9]] * 4))
    assert ece(perfect, torch.zeros(4, dtype=torch.long)) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------- command line


def write_pool(folder, images: torch.Tensor):
    folder.mkdir(parents=True, exist_ok=True)
    digest = save_tensors(folder / "pool.safetensors", {"images": images})
    write_json(folder / "pool.json", {"sha256": digest, "count": len(images), "model": "test", "dataset": "digits",
                                      "height": images.shape[2], "width": images.shape[3]})
    return folder / "pool.safetensors"


def run_distill(cwd, teachers_dir, *args, check=True):
    return run_script("distill.py", *TINY, *args, cwd=cwd, check=check,
                      env={"KD_STORE": str(teachers_dir / "artifacts")})


def test_distill_end_to_end_with_ensemble_and_synthetic_pool(tmp_path, teachers_dir):
    gen = torch.Generator().manual_seed(0)
    pool = write_pool(tmp_path / "pool", torch.randint(0, 256, (800, 3, 8, 8), dtype=torch.uint8, generator=gen))
    out = run_distill(tmp_path, teachers_dir, "--ensemble_size=3", "--trial=0", "--synthetic_ratio=0.5",
                      f"--synthetic_pool={pool}", "--epochs=2")
    assert "student test acc" in out.stdout
    folder = next((tmp_path / "wandb").glob("offline-run-*"))
    records = leet_records(folder)
    keys = set()
    for rec in records:
        if rec.get("type") == "history":
            keys |= set(rec["history"]["item"])
    for key in ["test/acc", "test/agreement", "test/kl", "test/ece", "teacher/test_acc", "train/agreement",
                "train/loss", "lr", "throughput/img_per_s", "epoch"]:
        assert key in keys, key
    config = next(r["config"] for r in records if r.get("type") == "config")
    text = json.dumps(config)
    for name in ("teacher-digits-preresnet8-s0", "teacher-digits-preresnet8-s1", "teacher-digits-preresnet8-s2"):
        assert name in text
    done = json.loads(next((tmp_path / "runs").glob("*/done.json")).read_text())
    assert done["artifact"].startswith("student-digits-preresnet8-m3-t0-r0.5")
    meta = json.loads((teachers_dir / "artifacts" / done["artifact"] / "v0" / "meta.json").read_text())
    assert meta["teachers"] == ["teacher-digits-preresnet8-s0", "teacher-digits-preresnet8-s1",
                                "teacher-digits-preresnet8-s2"]
    assert meta["config"]["n_synthetic"] == round(0.5 * meta["config"]["n_real"])
    # the stored W&B config (synthetic_fid, teacher names and versions among it) comes back as flags and parses
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    from kd.config import DistillConfig
    from kd.flags import parse_flags
    from kd.wandb_runs import inspect_summary

    stored = inspect_summary(folder)["config"]
    assert "synthetic_fid" in stored and stored["teacher_versions"][0] == "teacher-digits-preresnet8-s0:v0"
    flags = create_sweep_command_args({"args": {k: {"value": v} for k, v in stored.items()}})["args"]
    assert parse_flags(DistillConfig, flags).run_name() == done["artifact"]
    # the student started from weights of its own: its initial weights differ from each teacher's (as trained)
    teacher_meta = [json.loads(next((teachers_dir / "artifacts" / n).glob("v*/meta.json")).read_text())["config"]
                    for n in meta["teachers"]]
    assert len(stored["init_sha256"]) == 64 and all(len(m["init_sha256"]) == 64 for m in teacher_meta)
    assert stored["init_sha256"] not in {m["init_sha256"] for m in teacher_meta}
    assert stored["seed_used"] == 1_000_000 and stored["seed_used"] not in {m["seed_used"] for m in teacher_meta}


def test_trial_picks_contiguous_block_modulo_n():
    from kd.teachers import select_block

    names = [f"t{i}" for i in range(12)]
    assert select_block(names, 3, 0) == ["t0", "t1", "t2"]
    assert select_block(names, 3, 2) == ["t6", "t7", "t8"]
    assert select_block(names, 5, 2) == ["t10", "t11", "t0", "t1", "t2"]
    assert select_block(names, 1, 13) == ["t1"]


@pytest.mark.parametrize("args,needle", [
    (["--ensemble_size=4"], "needs 4 teachers"),
    (["--teachers=teacher-digits-preresnet8-s9"], "no teacher 'teacher-digits-preresnet8-s9'"),
])
def test_distill_errors_one_line_exit_2_nothing_written(tmp_path, teachers_dir, args, needle):
    """At the process boundary: exit code 2, one line, nothing written (the rest of the matrix runs in-process,
    in tests/test_bad_inputs.py)."""
    before = sorted(p.name for p in (teachers_dir / "artifacts").iterdir())
    out = run_distill(tmp_path, teachers_dir, *args, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "wandb").exists()
    assert sorted(p.name for p in (teachers_dir / "artifacts").iterdir()) == before
