import json

import pytest
import torch

from kd.io import load_weights, sha256_file
from kd.optim import cosine_lr
from kd.wandb_runs import leet_records
from tests.conftest import TINY, run_script, tiny


def history_steps(wandb_dir):
    """Every history step logged by every offline run folder (a resumed run has several)."""
    steps = {}
    for folder in sorted((wandb_dir / "wandb").glob("offline-run-*")):
        run_id = folder.name.rsplit("-", 1)[1]
        for rec in leet_records(folder):
            if rec.get("type") == "history":
                steps.setdefault(run_id, []).append(int(rec["history"]["item"]["_step"]))
    return steps


def test_cosine_schedule_per_epoch():
    assert cosine_lr(0, 200, 0.1, 0.0) == 0.1
    assert abs(cosine_lr(100, 200, 0.1, 0.0) - 0.05) < 1e-12
    assert cosine_lr(199, 200, 0.1, 0.0) > 0 and abs(cosine_lr(200, 200, 0.1, 1e-6) - 1e-6) < 1e-12


def test_train_publishes_verified_teacher_and_offline_run(tmp_path):
    out = run_script("train.py", *TINY, "--epochs=2", "--seed=5", cwd=tmp_path)
    assert "offline" in out.stdout and "teacher artifact teacher-digits-preresnet8-s5" in out.stdout
    folder = tmp_path / "artifacts" / "teacher-digits-preresnet8-s5" / "v0"
    state, meta = load_weights(folder)
    assert meta["sha256"] == sha256_file(folder / "model.safetensors")
    assert meta["arch"] == "preresnet8" and meta["num_classes"] == 10 and meta["seed"] == 5
    assert 0.0 <= meta["test_acc"] <= 1.0 and meta["config"]["epochs"] == 2
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "meta.json"} and "latest" in manifest["aliases"]
    assert history_steps(tmp_path) and list(history_steps(tmp_path).values())[0] == [1, 2]
    again = run_script("train.py", *TINY, "--epochs=2", "--seed=5", cwd=tmp_path)
    assert "already finished" in again.stdout


ARGS = [*tiny(batch_size=64), "--epochs=4", "--seed=1"]  # 23 steps an epoch


def test_sigkill_then_resume_same_run_no_duplicate_steps_bitwise_identical(tmp_path):
    killed = tmp_path / "killed"
    killed.mkdir()
    out = run_script("train.py", *ARGS, cwd=killed, check=False, env={"KD_FAULT": "train-step@55:KILL"})
    assert out.returncode == -9
    ckpt = json.loads(next(killed.glob("runs/*/checkpoint.json")).read_text())
    assert ckpt["epoch"] == 2 and ckpt["step"] == 0
    out = run_script("train.py", *ARGS, cwd=killed)
    assert "resuming" in out.stdout
    done = json.loads(next(killed.glob("runs/*/done.json")).read_text())
    assert done["run_id"] == ckpt["run_id"]
    steps = history_steps(killed)
    assert list(steps) == [ckpt["run_id"]]  # one W&B run id across both processes
    assert sorted(steps[ckpt["run_id"]]) == [1, 2, 3, 4], steps  # every epoch once: nothing lost or twice
    # the same seed, uninterrupted, gives bitwise the same teacher on the CPU
    straight = tmp_path / "straight"
    straight.mkdir()
    run_script("train.py", *ARGS, cwd=straight)
    a, _ = load_weights(next(killed.glob("artifacts/teacher-*/v0")))
    b, _ = load_weights(next(straight.glob("artifacts/teacher-*/v0")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # several seconds to half a minute: make chaos runs it
def test_sigterm_saves_mid_epoch_checkpoint_and_exits_cleanly(tmp_path):
    out = run_script("train.py", *ARGS, cwd=tmp_path, check=False, env={"KD_FAULT": "train-step@30:TERM"})
    assert out.returncode == 143, out.stderr[-2000:]
    assert "checkpoint saved" in out.stderr and "Traceback" not in out.stderr
    ckpt = json.loads(next(tmp_path.glob("runs/*/checkpoint.json")).read_text())
    assert (ckpt["epoch"], ckpt["step"]) == (1, 7)  # 30 = 23 + 7: mid-epoch, exactly where it stopped
    records = leet_records(next((tmp_path / "wandb").glob("offline-run-*")))
    assert any(r.get("type") == "preempting" or "preempting" in r for r in records)  # to be rerun
    out = run_script("train.py", *ARGS, cwd=tmp_path)
    assert "resuming" in out.stdout and "at epoch 1 step 7" in out.stdout
    assert next(tmp_path.glob("runs/*/done.json")).exists()


@pytest.mark.parametrize("args,needle", [
    (["--no_such_flag=1"], "unknown flag --no_such_flag"),
    (["--resume=True"], "no checkpoint"),
])
def test_bad_flags_one_line_exit_2_nothing_written(tmp_path, args, needle):
    """At the process boundary: exit code 2, one line on stderr (the rest of the matrix runs in-process, in
    tests/test_bad_inputs.py)."""
    out = run_script("train.py", *TINY, *args, cwd=tmp_path, check=False)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert not any(p.name in ("runs", "wandb", "artifacts") for p in tmp_path.iterdir())


@pytest.mark.slow  # several seconds to half a minute: make chaos runs it
def test_a_run_stopped_on_one_machine_resumes_on_another_from_its_mirrored_checkpoint(tmp_path):
    """Two clones share only the artifact store (as machines share a network store; online, W&B): the run
    requeued onto the second machine starts from the first one's checkpoint, in the same W&B run."""
    store, first, second = tmp_path / "store", tmp_path / "machine-a", tmp_path / "machine-b"
    first.mkdir(), second.mkdir()
    env = {"KD_STORE": str(store), "KD_FAULT": "train-step@30:TERM"}
    out = run_script("train.py", *ARGS, cwd=first, check=False, env=env)
    assert out.returncode == 143, out.stderr[-2000:]
    (mirrored,) = store.glob("checkpoint-teacher-digits-preresnet8-s1-*/v*")  # only the newest version is kept
    run_id = json.loads(next(first.glob("runs/*/run.json")).read_text())["run_id"]
    out = run_script("train.py", *ARGS, cwd=second, env={"KD_STORE": str(store)})
    assert "fetched the checkpoint" in out.stdout and "at epoch 1 step 7" in out.stdout
    assert json.loads(next(second.glob("runs/*/done.json")).read_text())["run_id"] == run_id
    # offline, the second machine cannot see the first one's W&B folder: it logs every epoch once, from the
    # checkpoint's history (online, W&B's resumed run says epoch 1 is there, and only 2..4 are logged)
    assert history_steps(second)[run_id] == [1, 2, 3, 4]
    # the fetched checkpoint made the run this folder's: run.json names it, and the run is finished here
    assert json.loads(next(second.glob("runs/*/run.json")).read_text())["run_id"] == run_id
    again = run_script("train.py", *ARGS, cwd=second, env={"KD_STORE": str(store)})
    assert "already finished" in again.stdout + again.stderr


@pytest.mark.chaos
def test_a_stop_in_the_last_epoch_with_a_full_store_is_a_preemption(tmp_path):
    """SIGTERM after the last epoch's checkpoint while the store is full: one warning, the local checkpoint
    kept, exit 143 (not a silent exit 0); the same command then finishes the run from that checkpoint."""
    store = tmp_path / "store"
    args = [*tiny(batch_size=64), "--epochs=2", "--seed=3"]
    env = {"KD_STORE": str(store), "KD_FAULT": "epoch-saved@2:TERM,mirror-publish@1:ENOSPC"}
    out = run_script("train.py", *args, cwd=tmp_path, check=False, env=env)
    assert out.returncode == 143, out.stderr[-2000:]
    assert "the checkpoint was not mirrored to the store" in out.stderr
    assert not list(tmp_path.glob("runs/*/done.json")) and list(tmp_path.glob("runs/*/checkpoint.json"))
    run_id = json.loads(next(tmp_path.glob("runs/*/run.json")).read_text())["run_id"]
    run_script("train.py", *args, cwd=tmp_path, env={"KD_STORE": str(store)})
    assert json.loads(next(tmp_path.glob("runs/*/done.json")).read_text())["run_id"] == run_id
