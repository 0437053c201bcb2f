"""Bad input to every command line: one line on stderr that names the problem and the fix, exit code 2, and
nothing written (no runs/, wandb/ or artifacts/ change). Called in-process (a subprocess costs seconds here).

What tests/test_train.py, test_distill.py, test_sweep.py, test_report.py and test_synthetic.py already try
is not repeated here; this file covers the rest of the matrix.
"""

from __future__ import annotations

import sys

import pytest
import torch
import yaml

from kd import report, sweep
from kd.artifacts import publish
from kd.config import TrainConfig
from kd.flags import parse_flags
from kd.io import save_weights
from kd.models import build_model
from tests.conftest import ROOT, TINY, merged, refused

sys.path.insert(0, str(ROOT))
import distill  # noqa: E402
import train  # noqa: E402


# ------------------------------------------------------------------------------------------------ train.py
@pytest.mark.parametrize("args,needle", [
    (["--epochs=0"], "--epochs must be >= 1"),
    (["--seed=-1"], "--seed must be >= 0"),
    (["--seed=1.5"], "--seed expects an integer"),
    (["--batch_size=ten"], "--batch_size expects an integer"),
    (["--batch_size=-64"], "--batch_size must be >= 1"),
    (["--lr=inf"], "--lr must be a finite number > 0"),
    (["--lr=0"], "--lr must be a finite number > 0"),
    (["--lr="], "--lr expects a number, got ''"),
    (["--momentum=-0.9"], "--momentum must be a finite number >= 0"),
    (["--weight_decay=nan"], "--weight_decay must be a finite number >= 0"),
    (["--lr=0.1", "--eta_min=0.5"], "--eta_min (0.5) must not exceed --lr (0.1)"),
    (["--mixed_precision=fp8"], "--mixed_precision must be no, bf16 or fp16"),
    (["--eval_every=0"], "--eval_every must be >= 1"),
    (["--resume=maybe"], "--resume must be auto, True or False"),
    (["--channels_last=sometimes"], "--channels_last expects True or False"),
    (["--project=team/x"], "invalid project 'team/x'"),
    (["--study=/tmp/elsewhere"], "invalid study '/tmp/elsewhere'"),
    (["--arch=preresnet9"], "invalid depth in 'preresnet9'"),
    (["--arch=timm:no_such_net"], "unknown timm model 'no_such_net'"),
    (["cifar10"], "unexpected argument 'cifar10'"),
    (["--dataset"], "--dataset needs a value: write --dataset=VALUE"),
    (["--epoch=3"], "unknown flag --epoch (did you mean --epochs?)"),
    # values outside their meaningful range (they used to be accepted, or to hang with no output)
    (["--momentum=1.0"], "--momentum must be a finite number >= 0 and < 1"),
    (["--momentum=7"], "--momentum must be a finite number >= 0 and < 1"),
    (["--epochs=1000000000"], "--epochs must be >= 1 and <= 10000"),
    (["--arch=preresnet100001"], "invalid depth in 'preresnet100001'"),
    (["--seed=10000000000000"], "--seed must be >= 0 and <= 999999"),
    (["--weight_decay=5"], "--weight_decay must be a finite number >= 0 and < 1"),
    (["--batch_size=100000000"], "--batch_size must be >= 1 and <= 65536"),
    (["--dataset=imagenet"], "unknown dataset"),
    (["--arch=resnet9000"], "unknown arch"),
    (["--lr=abc"], "--lr expects a number"),
    (["--lr=nan"], "--lr must be"),
    (["--lr=-0.1"], "--lr must be"),
    (["--batch_size=0"], "--batch_size must be >= 1"),
    (["--epochs=2.5"], "--epochs expects an integer"),
    (["--nesterov=maybe"], "--nesterov expects True or False"),
    (["--study=../escape"], "invalid study"),
])
def test_train_refuses(args, needle, workdir, capsys):
    refused(capsys, workdir, train.main, merged(TINY, args), needle)


@pytest.mark.parametrize("where", ["out_dir", "store", "total"])
def test_train_refuses_output_paths_before_anything_is_fetched_or_written(where, workdir, monkeypatch, capsys):
    """A file in the way of --out_dir while the store holds a mirrored checkpoint of the run (which would be fetched
    into it), a store path with a name over the file system's limit, an over-long whole path: one line each."""
    (workdir / "notes.txt").write_text("a file, not a folder")
    run_dir = "teacher-digits-preresnet8-s0-" + parse_flags(TrainConfig, TINY).fingerprint()
    made = workdir / "made"
    made.mkdir()
    (made / "checkpoint.json").write_text("{}")
    publish(f"checkpoint-{run_dir}", "checkpoint", [made / "checkpoint.json"], {}, store=workdir / "artifacts")
    if where == "out_dir":
        refused(capsys, workdir, train.main, [*TINY, "--out_dir=notes.txt"], "cannot be a folder")
    elif where == "store":
        monkeypatch.setenv("KD_STORE", str(workdir / ("s" * 300)))
        refused(capsys, workdir, train.main, [*TINY, "--out_dir=fresh"], "over the file system's limit of")
    else:
        deep = "/".join(["d" * 200] * 21)
        refused(capsys, workdir, train.main, [*TINY, f"--out_dir={deep}"], "for a whole path: pass a shorter path")


def test_generator_training_checks_the_data_before_wandb(workdir, monkeypatch, capsys):
    """No CIFAR and no network: one line naming where to put the archive, and no W&B run, folder or lock file."""
    from torchvision.datasets import CIFAR10

    from kd import synthetic as syn

    def offline(self):
        raise OSError("no network")

    monkeypatch.setattr(CIFAR10, "download", offline)
    monkeypatch.setenv("WANDB_MODE", "offline")
    refused(capsys, workdir, syn.main, ["train", "--dataset=cifar10", "--generator=sngan"],
            "place cifar-10-python.tar.gz")
    assert not (workdir / "wandb").exists()


# ------------------------------------------------------------------------------------------------ distill.py
@pytest.fixture
def store(workdir):
    """Two random digits teachers (and one of another class count) in the store, made in-process."""
    root = workdir / "artifacts"
    for name, classes in (("teacher-digits-preresnet8-s0", 10), ("teacher-digits-preresnet8-s1", 10),
                          ("teacher-digits-preresnet14-s0", 100), ("teacher-cifar10-preresnet8-s0", 10)):
        folder = workdir / "made" / name
        meta = save_weights(folder, build_model(name.split("-")[2], classes).state_dict(),
                            {"arch": name.split("-")[2], "dataset": name.split("-")[1], "num_classes": classes,
                             "seed": 0})
        publish(name, "model", [folder / "model.safetensors", folder / "meta.json"], meta, store=root)
    return root


@pytest.mark.parametrize("args,needle", [
    (["--temperature=-1"], "--temperature must be a finite number >= 0.01"),
    (["--temperature=nan"], "--temperature must be a finite number >= 0.01"),
    (["--temperature=inf"], "--temperature must be a finite number >= 0.01"),
    # values outside their meaningful range (they used to be accepted, or to hang)
    (["--temperature=1e-9"], "--temperature must be a finite number >= 0.01 and <= 100"),
    (["--temperature=1e9"], "--temperature must be a finite number >= 0.01 and <= 100"),
    (["--teachers=teacher-digits-preresnet8-s0,teacher-digits-preresnet8-s0"], "more than once"),
    (["--teachers=teacher-digits-preresnet8-s0,,teacher-digits-preresnet8-s1"], "holds an empty name"),
    (["--ensemble_size=100000"], "--ensemble_size must be >= 1 and <= 1000"),
    (["--synthetic_ratio=nan"], "--synthetic_ratio must be a finite number >= 0"),
    (["--synthetic_ratio=inf"], "--synthetic_ratio must be a finite number >= 0"),
    (["--trial=-1"], "--trial must be >= 0"),
    (["--ensemble_size=two"], "--ensemble_size expects an integer"),
    (["--ensemble_size=-2"], "--ensemble_size must be >= 1"),
    (["--cache_dtype=int8"], "--cache_dtype must be float32, float16 or bfloat16"),
    (["--teacher_arch=vgg"], "unknown arch 'vgg'"),
    (["--teachers=/etc/passwd"], "invalid teacher name '/etc/passwd'"),
    (["--teachers=teacher-digits-preresnet8-s0,../s1"], "invalid teacher name '../s1'"),
    (["--dataset=svhn"], "unknown dataset 'svhn'"),
    (["--arch=resnet9000"], "unknown arch 'resnet9000'"),
    (["--lr=-0.05"], "--lr must be"),
    (["--batch_size=0"], "--batch_size must be >= 1"),
    (["--teacher_cache=maybe"], "--teacher_cache expects True or False"),
    (["--temprature=4"], "unknown flag --temprature (did you mean --temperature?)"),
    # past the flags: the store and the pool
    (["--teacher_arch=preresnet20"], "needs 1 teachers for digits/preresnet20 but 0 exist"),
    (["--ensemble_size=3"], "but 2 exist (teacher-digits-preresnet8-s0, teacher-digits-preresnet8-s1)"),
    (["--teachers=teacher-digits-preresnet14-s0", "--arch=preresnet14"], "with 100 classes"),
    (["--synthetic_ratio=0.5", "--synthetic_pool=synthetic-digits-nothing"],
     "no synthetic pool 'synthetic-digits-nothing'"),
    (["--synthetic_ratio=0.5", "--synthetic_pool=../elsewhere/pool"], "synthetic pool '../elsewhere/pool' not found"),
    (["--synthetic_ratio=0.5", "--synthetic_pool=missing.safetensors"], "pool file missing.safetensors is missing"),
    (["--ensemble_size=4"], "needs 4 teachers"),
    (["--ensemble_size=0"], "--ensemble_size must be >= 1"),
    (["--synthetic_ratio=-0.5"], "--synthetic_ratio must be"),
    (["--synthetic_ratio=lots"], "--synthetic_ratio expects a number"),
    (["--synthetic_ratio=0.5"], "needs one source of synthetic images, got neither"),
    (["--temperature=0"], "--temperature must be"),
    (["--teachers=teacher-digits-preresnet8-s9"], "no teacher 'teacher-digits-preresnet8-s9'"),
    (["--teachers=../../etc/passwd"], "invalid teacher name"),
    (["--teachers=teacher-cifar10-preresnet8-s0"], "trained on cifar10"),
])
def test_distill_refuses(args, needle, store, workdir, capsys):
    refused(capsys, workdir, distill.main, merged(TINY, args), needle)


def test_distill_refuses_a_pool_of_the_wrong_shape_or_too_small(store, workdir, capsys):
    from kd.io import save_tensors, write_json

    for folder, images, needle in (("p16", torch.zeros(900, 3, 16, 16, dtype=torch.uint8), "needs uint8 (3, 8, 8)"),
                                   ("p8", torch.zeros(10, 3, 8, 8, dtype=torch.uint8), "a pool of 718 images or more")):
        pool = workdir / folder
        pool.mkdir()
        digest = save_tensors(pool / "pool.safetensors", {"images": images})
        write_json(pool / "pool.json", {"sha256": digest, "count": len(images), "model": "test", "dataset": "digits"})
        refused(capsys, workdir, distill.main,
                [*TINY, "--synthetic_ratio=0.5", f"--synthetic_pool={pool / 'pool.safetensors'}"], needle)


# ------------------------------------------------------------------------------------------------ kd.sweep
SPECS = {
    "list.yaml": ("- program: train.py\n- method: grid\n", "holds a list, not a sweep spec"),
    "noprogram.yaml": (yaml.safe_dump({"method": "grid", "parameters": {"seed": {"values": [0]}}}),
                       "has no program: add e.g. `program: train.py`"),
    "bayes.yaml": (yaml.safe_dump({"program": "train.py", "method": "bayes", "metric": {"name": "test/acc"},
                                   "parameters": {"seed": {"values": [0, 1]}}}), "use method grid or random"),
    "badvalue.yaml": (yaml.safe_dump({"program": "train.py", "method": "grid",
                                      "parameters": {"lr": {"values": [0.1, -1.0]}}}),
                      "the run --lr=-1.0 would fail: --lr must be a finite number"),
    "student.yaml": (yaml.safe_dump({"program": "distill.py", "method": "grid",
                                     "parameters": {"temprature": {"values": [1.0, 4.0]}}}),
                     "distill.py has no flag --temprature: rename it to --temperature"),
    "command.yaml": (yaml.safe_dump({"program": "train.py", "method": "grid", "command": ["${env}", {"a": 1}],
                                     "parameters": {"seed": {"values": [0]}}}), "every command item must be one word"),
    "nowhere.yaml": (yaml.safe_dump({"program": "nowhere.py", "method": "grid",
                                     "parameters": {"x": {"values": [0]}}}), "program nowhere.py is not in"),
    # only the repository's entry points, and only through an interpreter (optionally the launcher)
    "script.yaml": (yaml.safe_dump({"program": "../bin/evil.py", "method": "grid",
                                    "parameters": {"seed": {"values": [0]}}}),
                    "program ../bin/evil.py is not in this repository's entry points: a sweep runs distill.py or "
                    "train.py"),
    "shell.yaml": (yaml.safe_dump({"program": "train.py", "method": "grid", "command": ["/bin/sh", "-c", "rm -rf ~"],
                                   "parameters": {"seed": {"values": [0]}}}),
                   "does not run the program the way a sweep here may: write `command: [${env}, ${interpreter}, -m, "
                   "kd.sweep.launch, ${program}, ${args}]`"),
    # billion laughs: 9 levels of 10 aliases inside `values`, refused before W&B's sweep engine expands it
    "bomb.yaml": ("l0: &l0 [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\n"
                  + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 9))
                  + "program: train.py\nmethod: grid\nparameters:\n  seed:\n    values: *l8\n",
                  "its YAML aliases expand to over 100,000 values (an alias bomb?)"),
}


@pytest.mark.parametrize("argv,needle", [
    (["missing.yaml"], "no sweep spec at missing.yaml"),
    (["."], "is a folder: pass one spec file"),
    *[([name], needle) for name, (_, needle) in SPECS.items()],
    (["list.yaml", "--count=-1"], "--count must be >= 0"),
    (["list.yaml", "--count=two"], "--count expects an integer, got 'two'"),
    (["list.yaml", "--count=3", "--count=4"], "--count is given twice ('3' and '4'): give it once"),
    (["list.yaml", "--bogus"], "unknown flag --bogus"),
    (["list.yaml", "other.yaml"], "unexpected argument 'other.yaml'"),
    ([], "SPEC is required"),
])
def test_sweep_refuses(argv, needle, workdir, capsys):
    for name, (text, _) in SPECS.items():
        (workdir / name).write_text(text)
    refused(capsys, workdir, sweep.main, argv, needle)


# ------------------------------------------------------------------------------------------------ kd.report
@pytest.mark.parametrize("argv,needle", [
    (["--study=demo"], "no finished runs for study demo in"),  # a study with no runs at all: no wandb/ here
    (["--study="], "invalid study ''"),
    ([], "--study=... is required"),
    (["--study=demo", "--figures=x"], "unknown flag --figures"),
    (["--study=demo", "--online", "--offline"], "--mode is given twice ('online' and 'offline')"),
    (["--study=demo", "--refresh=often"], "--refresh expects True or False, got 'often'"),
    (["--study=demo", "--expect-paper"], "unknown flag --expect_paper"),  # no abbreviations
    (["--study=demo", "--expect=nowhere"], "--expect=nowhere: no sweep specs (*.yaml) there"),
])
def test_report_refuses(argv, needle, workdir, capsys):
    refused(capsys, workdir, report.main, [*argv, f"--cache_dir={workdir / 'cache'}"] if argv else argv, needle)


# ------------------------------------------------------------------------------------------------ kd.synthetic
@pytest.mark.parametrize("argv,needle", [
    (["generate", "--dataset=digits", "--num=abc"], "--num expects an integer"),
    (["generate", "--dataset=digits", "--num=-5"], "--num must be >= 1"),
    (["generate", "--dataset=digits", "--batch_size=0"], "--batch_size must be >= 1"),
    (["generate", "--dataset=digits", "--shard_size=0"], "--shard_size must be >= 1"),
    (["generate", "--dataset=digits", "--seed=-1"], "--seed must be >= 0"),
    (["generate", "--dataset=digits", "--steps=many"], "--steps expects a positive integer or auto"),
    (["generate", "--dataset=digits", "--device=tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["generate", "--dataset=digits", "--source=../x"], "invalid source '../x'"),
    (["generate", "--dataset=digits", "--project=a/b"], "invalid project 'a/b'"),
    (["generate", "--dataset=digits", "--modle=x"], "unknown flag --modle (did you mean --model?)"),
    (["train", "--dataset=digits", "--epochs=-1"], "--epochs must be >= 0"),
    (["train", "--dataset=digits", "--lr=nan"], "--lr must be a finite number >= 0"),
    (["train", "--dataset=digits", "--mixed_precision=fp8"], "--mixed_precision must be auto, no, bf16 or fp16"),
    (["train", "--dataset=digits", "--resume=maybe"], "--resume must be auto, True or False"),
    # a model that cannot be loaded: refused before W&B starts (it used to leave an offline run and a second line)
    (["generate", "--dataset=digits", "--model=not-a-pipeline"], "not-a-pipeline is not a loadable diffusers"),
    (["generate", "--dataset=digits", "--model=generator-nothing"], "no generator 'generator-nothing'"),
    (["generate", "--dataset=digits", "--model=../../nowhere/model"], "cannot load model '../../nowhere/model'"),
    (["generate", "--dataset=digits", "--fid=maybe"], "--fid must be auto, True or False"),
    (["train", "--generator=gan"], "--generator must be ddpm or sngan"),
    (["train", "--generator=sngan", "--preset=huge"], "unknown preset 'huge'"),
    (["train", "--generator=sngan", "--epochs=3"], "--epochs does not apply to --generator=sngan"),
    (["train", "--n_dis=3"], "--n_dis does not apply to --generator=ddpm"),
    (["train", "--generator=sngan", "--ema_decay=1"], "--ema_decay must be a finite number >= -1 and < 1"),
])
def test_synthetic_refuses(argv, needle, workdir, capsys):
    from kd import synthetic as syn

    (workdir / "not-a-pipeline").mkdir()
    refused(capsys, workdir, syn.main, argv, needle)
