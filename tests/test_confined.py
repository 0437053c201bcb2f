"""Nothing outside a study changes its numbers: store pointers stay inside their artifact, metadata files are
read with a shape, a pool is checked against the run's dataset, and one run is trained by one process.

Every planted case is refused in one line (``error: ...``), exit code 2, nothing written: called in-process,
as tests/test_bad_inputs.py does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd.artifacts import publish
from kd.io import save_tensors, save_weights, sha256_file, write_json
from kd.models import build_model
from tests.conftest import ROOT, TINY, merged, offline_env, refused

sys.path.insert(0, str(ROOT))
import distill  # noqa: E402
import train  # noqa: E402

S0, S1 = "teacher-digits-preresnet8-s0", "teacher-digits-preresnet8-s1"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def store(workdir):
    """Two random digits teachers, published with the study alias ``demo`` too."""
    root = workdir / "artifacts"
    for seed, name in enumerate((S0, S1)):
        folder = workdir / "made" / name
        torch.manual_seed(seed)
        meta = save_weights(folder, build_model("preresnet8", 10).state_dict(),
                            {"arch": "preresnet8", "dataset": "digits", "num_classes": 10, "seed": seed})
        publish(name, "model", [folder / "model.safetensors", folder / "meta.json"], meta, store=root,
                aliases=["demo"])
    return root


def replant(version: Path, fname: str, data: bytes) -> None:
    """Write ``fname`` into a store version and record its new sha256 in the manifest (a consistent plant)."""
    (version / fname).write_bytes(data)
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["files"][fname] = sha256_file(version / fname)
    (version / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------------------------------------ store pointers
@pytest.mark.parametrize("pointer", ["latest.json", "alias-demo.json"])
@pytest.mark.parametrize("version,needle", [
    (f"../{S1}/v0", f"points at '../{S1}/v0', which is not a version of {S0}"),
    ("/tmp/elsewhere/v0", "points at '/tmp/elsewhere/v0', which is not a version"),
    ("v0/../../x", "which is not a version"),
    ("v-1", "which is not a version"),
    ("v0\n", "which is not a version"),
])
def test_a_pointer_out_of_its_artifact_is_refused(pointer, version, needle, store, workdir, capsys):
    (store / S0 / pointer).write_text(json.dumps({"version": version}))
    study = ["--study=demo"] if pointer != "latest.json" else []
    refused(capsys, workdir, distill.main, merged(TINY, study), needle)


def test_a_version_folder_that_links_to_another_teacher_is_refused(store, workdir, capsys):
    (store / S0 / "v1").symlink_to(store / S1 / "v0")
    (store / S0 / "latest.json").write_text('{"version": "v1"}')
    refused(capsys, workdir, distill.main, [*TINY], f"{S0}/v1 is a link or a file, not a version folder of {S0}")


def test_an_artifact_folder_that_links_to_another_artifact_is_refused(store, workdir, capsys):
    shutil.rmtree(store / S0)
    (store / S0).symlink_to(store / S1)
    refused(capsys, workdir, distill.main, [*TINY], f"{S0} is a link to ")


def test_a_version_copied_from_another_teacher_is_refused(store, workdir, capsys):
    shutil.copytree(store / S1 / "v0", store / S0 / "v1")
    (store / S0 / "latest.json").write_text('{"version": "v1"}')
    refused(capsys, workdir, distill.main, [*TINY], f"describes {S1}:v0, not {S0}:v1")


def test_files_the_manifest_does_not_list_are_refused(store, workdir, capsys):
    version = store / S0 / "v0"
    manifest = json.loads((version / "manifest.json").read_text())
    del manifest["files"]["meta.json"]
    (version / "manifest.json").write_text(json.dumps(manifest))
    refused(capsys, workdir, distill.main, [*TINY], "holds meta.json, which its manifest does not list")
    (version / "meta.json").unlink()  # and not there at all: the manifest must still list what is read
    refused(capsys, workdir, distill.main, [*TINY], "does not list meta.json, which is read from it")


@pytest.mark.parametrize("weights,needle", [
    (f"../../{S1}/v0/model.safetensors", f"names the weights '../../{S1}/v0/model.safetensors', which its manifest "
     "does not list"),
    ("other.safetensors", "holds other.safetensors, which its manifest does not list"),
])
def test_meta_json_names_only_weights_its_manifest_lists(weights, needle, store, workdir, capsys):
    version = store / S0 / "v0"
    if "/" not in weights:  # the other teacher's weights planted beside them
        shutil.copy(store / S1 / "v0" / "model.safetensors", version / weights)
    meta = {**json.loads((version / "meta.json").read_text()), "file": weights,
            "sha256": sha256_file(store / S1 / "v0" / "model.safetensors")}
    replant(version, "meta.json", json.dumps(meta).encode())
    refused(capsys, workdir, distill.main, [*TINY], needle)


def test_meta_json_naming_listed_weights_that_it_does_not_list_is_refused(store, workdir, capsys):
    version = store / S0 / "v0"
    meta = {**json.loads((version / "meta.json").read_text()), "file": "manifest.json"}
    replant(version, "meta.json", json.dumps(meta).encode())
    refused(capsys, workdir, distill.main, [*TINY], "names the weights 'manifest.json', which its manifest does "
            "not list")


# ------------------------------------------------------------------------------------------------ metadata shapes
SHAPES = [(b"[1, 2]", "holds a list, not a JSON object"), (b"7", "holds an integer, not a JSON object"),
          (b"\x89PNG\r\n\x1a\n\x00\xff", "is not JSON text (binary bytes)"), (b'{"version": 3}', "'version' is an "
          "integer, not a string"), (b"{}", "has no 'version'"), (None, "is a folder, not a file")]


def plant(path: Path, data: bytes | None) -> None:
    if path.exists():
        path.unlink()
    path.mkdir() if data is None else path.write_bytes(data)


@pytest.mark.parametrize("data,needle", SHAPES)
@pytest.mark.parametrize("pointer", ["latest.json", "alias-demo.json"])
def test_a_store_pointer_of_the_wrong_shape_is_refused(pointer, data, needle, store, workdir, capsys):
    plant(store / S0 / pointer, data)
    study = ["--study=demo"] if pointer != "latest.json" else []
    line = refused(capsys, workdir, distill.main, merged(TINY, study), needle)
    assert pointer in line and 'it should hold a store pointer {"version": "vN"}' in line


@pytest.mark.parametrize("data,needle", [(b"[]", "holds a list"), (b"\xff\xfe\x00", "binary bytes"),
                                         (b'{"name": 1}', "'name' is an integer, not a string")])
def test_a_manifest_of_the_wrong_shape_is_refused(data, needle, store, workdir, capsys):
    (store / S0 / "v0" / "manifest.json").write_bytes(data)
    line = refused(capsys, workdir, distill.main, [*TINY], needle)
    assert "manifest.json" in line and "it should hold an artifact manifest" in line


@pytest.mark.parametrize("data,needle", [(b"[]", "holds a list"), (b'{"sha256": ["a"]}', "'sha256' is a list"),
                                         (b'{"sha256": "ab", "num_classes": "ten"}', "'num_classes' is a string")])
def test_weights_metadata_of_the_wrong_shape_is_refused(data, needle, store, workdir, capsys):
    replant(store / S0 / "v0", "meta.json", data)
    line = refused(capsys, workdir, distill.main, [*TINY], needle)
    assert "meta.json" in line and "it should hold weights metadata" in line


# ------------------------------------------------------------------------------------------------ pools
def make_pool(folder: Path, dataset: str = "digits", n: int = 800, **extra) -> Path:
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    digest = save_tensors(folder / "pool.safetensors", {"images": images})
    write_json(folder / "pool.json", {"sha256": digest, "count": n, "model": "test", "dataset": dataset, **extra})
    return folder / "pool.safetensors"


@pytest.mark.parametrize("recorded,needle", [
    ({"dataset": "cifar100"}, "was generated for cifar100 (10 classes), not digits (10 classes)"),
    ({"dataset": "digits", "num_classes": 100}, "was generated for digits (100 classes), not digits (10 classes)"),
    ({"dataset": None}, "'dataset' is null, not a string"),
])
def test_a_pool_of_another_dataset_is_refused(recorded, needle, store, workdir, capsys):
    pool = make_pool(workdir / "pool", **recorded)
    if recorded.get("dataset") is None:
        meta = json.loads(pool.with_suffix(".json").read_text())
        pool.with_suffix(".json").write_text(json.dumps({**meta, "dataset": None}))
    refused(capsys, workdir, distill.main, [*TINY, "--synthetic_ratio=0.25", f"--synthetic_pool={pool}"], needle)


def test_a_pool_without_a_recorded_dataset_is_refused(store, workdir, capsys):
    pool = make_pool(workdir / "pool")
    meta = json.loads(pool.with_suffix(".json").read_text())
    del meta["dataset"]
    pool.with_suffix(".json").write_text(json.dumps(meta))
    refused(capsys, workdir, distill.main, [*TINY, "--synthetic_ratio=0.25", f"--synthetic_pool={pool}"],
            "was generated for no recorded dataset, not digits")


@pytest.mark.parametrize("data,needle", SHAPES[:3] + [(None, "is a folder, not a file")])
def test_pool_json_of_the_wrong_shape_is_refused(data, needle, store, workdir, capsys):
    pool = make_pool(workdir / "pool")
    plant(pool.with_suffix(".json"), data)
    line = refused(capsys, workdir, distill.main, [*TINY, "--synthetic_ratio=0.25", f"--synthetic_pool={pool}"],
                   needle)
    assert "pool.json" in line and "it should hold pool metadata" in line


def test_a_pool_artifact_whose_manifest_does_not_list_pool_json_is_refused(store, workdir, capsys):
    pool = make_pool(workdir / "made-pool")
    publish("synthetic-digits-test", "dataset", [pool], {"dataset": "digits"}, store=store)
    refused(capsys, workdir, distill.main, [*TINY, "--synthetic_ratio=0.25",
                                            "--synthetic_pool=synthetic-digits-test"],
            "does not list pool.json, which is read from it")


# ------------------------------------------------------------------------------------------------ done.json
RUN = [*TINY, "--epochs=1", "--seed=5"]


def run_dir(argv) -> Path:
    from kd.config import TrainConfig
    from kd.flags import parse_flags

    cfg = parse_flags(TrainConfig, argv)
    return Path(cfg.out_dir) / f"{cfg.run_name()}-{cfg.fingerprint()}"


@pytest.mark.parametrize("done,run_json,needle", [
    ({"run_id": "planted", "artifact": S0}, None, "names run 'planted' but the run folder records no run"),
    ({"run_id": "planted", "artifact": S0}, {"run_id": "mine"}, "names run 'planted' but the run folder records mine"),
    (["planted"], None, "holds a list, not a JSON object"),
    ({"artifact": S0}, None, "has no 'run_id'"),
])
def test_a_planted_done_json_is_not_finished(done, run_json, needle, store, workdir, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    folder = run_dir(RUN)
    folder.mkdir(parents=True)
    (folder / "done.json").write_text(json.dumps(done))
    if run_json:
        (folder / "run.json").write_text(json.dumps(run_json))
    line = refused(capsys, workdir, train.main, RUN, needle)
    assert "done.json" in line


def test_a_done_json_naming_another_runs_artifact_is_not_finished(store, workdir, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    manifest = json.loads((store / S1 / "v0" / "manifest.json").read_text())
    manifest["run_id"] = "theirs"
    (store / S1 / "v0" / "manifest.json").write_text(json.dumps(manifest))
    folder = run_dir(RUN)
    folder.mkdir(parents=True)
    (folder / "run.json").write_text('{"run_id": "mine"}')
    (folder / "done.json").write_text(json.dumps({"run_id": "mine", "artifact": S1,
                                                  "store_path": str(store / S1 / "v0")}))
    refused(capsys, workdir, train.main, RUN, "which run 'theirs' published, not this run")


# ------------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("flag", ["--study=demo\n", "--study=de\tmo", "--project=kd\n", "--study=demo\x1b[2J"])
def test_names_with_control_characters_are_refused(flag, workdir, capsys):
    refused(capsys, workdir, train.main, [*TINY, flag], "invalid")


# ------------------------------------------------------------------------------------------------ one run, once
def test_the_repositorys_grid_specs_pack_each_run_once():
    from kd.sweep.pack import grid_configs, plan
    from kd.sweep.spec import load_spec

    for spec, runs in (("sweeps/cifar10/generator_quality.yaml", 42), ("sweeps/cifar100/generator_quality.yaml", 42),
                       ("sweeps/demo-generators/self_distill_sngan.yaml", 12)):
        configs = grid_configs(load_spec(str(ROOT / spec)))
        packed = [cfg.run_dir() for pack in plan(configs, 4) for cfg in pack]
        assert len(packed) == len(set(packed)) == len({cfg.run_dir() for cfg in configs}), spec
        assert runs is None or len(packed) == runs, (spec, len(packed))
        assert len(configs) > len(packed), spec  # the grid does list a real-only run twice


def test_a_second_claim_on_a_run_folder_waits_or_skips(tmp_path):
    from kd.errors import AlreadyDone
    from kd.run_folder import RunFolder

    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
                               "time.sleep(60)", str(folder / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        mine = RunFolder(folder, {"a": 1})
        assert mine.open() is None and not mine.claim(wait=False)  # another process trains it: a pack skips it
    finally:
        holder.kill()
        holder.wait()
    assert mine.claim(wait=False)
    mine.release()
    first, second = RunFolder(folder, {"a": 1}), RunFolder(folder, {"a": 1})
    first.open(), second.open()
    first.mark_done({"run_id": first.run_id()})  # finished (and released) while the second one prepared
    with pytest.raises(AlreadyDone, match="already finished"):
        second.claim()
    third = RunFolder(folder, {"a": 1})
    third.open()
    assert third.finished and third.claim(wait=False)
    third.release()


def test_two_processes_on_one_run_folder_train_it_once(store, workdir):
    env = {**os.environ, **offline_env(workdir), "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("WANDB_RUN_ID", None)
    argv = [sys.executable, str(ROOT / "distill.py"), *TINY, "--epochs=2", "--teacher_cache=False"]
    procs = [subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trained = [out for out, _ in outs if "student test acc" in out]
    assert len(trained) == 1, outs
    other = next(out + err for out, err in outs if "student test acc" not in out)
    assert "already finished" in other, other
    (student,) = [p for p in (workdir / "artifacts").iterdir() if p.name.startswith("student-")]
    assert sorted(p.name for p in student.glob("v*")) == ["v0"]  # published once


# ------------------------------------------------------------------------------------------------ inputs, outputs
def test_report_outputs_that_are_files_are_refused_before_anything_is_written(workdir, capsys):
    from kd import report

    (workdir / "afile").write_text("not a folder")
    refused(capsys, workdir, report.main, ["--study=demo", "--out=afile", f"--cache_dir={workdir / 'cache'}"],
            "afile cannot be a folder: ")
    refused(capsys, workdir, report.main, ["--study=demo", "--cache_dir=afile"], "error: --cache_dir ")
    (workdir / "cache" / "offline-inspect.json").mkdir(parents=True)
    refused(capsys, workdir, report.main, ["--study=demo", f"--cache_dir={workdir / 'cache'}"],
            "offline-inspect.json is a folder, not a file: it should hold the report's cache")


def test_a_path_component_over_the_name_limit_is_refused(workdir, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    refused(capsys, workdir, train.main, [*TINY, f"--out_dir={'x' * 300}"], "over the file system's limit of")


@pytest.mark.parametrize("value", ["²", "100000", "1e3", " 4 2"])
def test_kd_num_processes_outside_its_range_is_refused(value, monkeypatch, capsys):
    from kd.sweep import launch

    monkeypatch.setenv("KD_NUM_PROCESSES", value)
    assert launch.main(["train.py"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: KD_NUM_PROCESSES={value.strip()!r} must be a whole number >= 1 and <= 1024")


def test_a_batch_the_processes_cannot_split_evenly_is_refused_before_any_worker(monkeypatch, capsys, tmp_path):
    """--batch_size is the batch of all processes together: 2 processes and a batch of 7 is one line, exit 2,
    before the launcher starts a worker (nothing written)."""
    from kd.sweep import launch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KD_NUM_PROCESSES", "2")
    assert launch.main([str(ROOT / "train.py"), "--dataset=digits", "--batch_size=7"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: --batch_size=7 is the batch of all 2 processes together, and 2 does not divide")
    assert "pass a multiple of 2 (e.g. 6)" in line and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["generate", "--dataset=digits", "--threads=100000000"],
                                  ["train", "--dataset=digits", "--threads=100000000"]])
def test_threads_outside_their_range_are_refused(argv, workdir, capsys):
    from kd import synthetic as syn

    refused(capsys, workdir, syn.main, argv, "--threads must be >= 0 and <= 1024")


# ------------------------------------------------------------------------------------------------ the study's grid
SPEC = """program: distill.py
method: grid
parameters:
  study: {value: grid}
  dataset: {value: cifar10}
  arch: {value: preresnet56}
  lr: {value: 0.05}
  weight_decay: {value: 1.0e-4}
  nesterov: {value: true}
  ensemble_size: {value: 1}
  synthetic_pool: {values: [synthetic-cifar10-a, synthetic-cifar10-b]}
  synthetic_ratio: {values: [0.0, 0.5]}
  trial: {values: [0, 1]}
"""


def grid_run(rid: str, t: float, acc: float, **config):
    from kd import report

    config = {"job": "student", "study": "grid", "dataset": "cifar10", "arch": "preresnet56", "lr": 0.05,
              "weight_decay": 0.0001, "nesterov": True, "ensemble_size": 1, "synthetic_ratio": 0.0,
              "synthetic_pool": "synthetic-cifar10-a", "temperature": 1.0, "trial": 0, **config}
    summary = {"final": True, "test/acc": acc, "test/agreement": acc + 0.1, "test/kl": 0.1, "test/ece": 0.02,
               "teacher/test_acc": 0.9, "data/n_real": 50000, "data/n_synthetic": 0}
    return report.Run(id=rid, name=f"student-{rid}", config=config, summary=summary, time=t)


def test_only_runs_of_the_studys_grid_are_counted(tmp_path, monkeypatch):
    from kd import report
    from kd.report import cli
    from kd.report.grid import split_by_grid

    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "self_distill.yaml").write_text(SPEC)
    sweep_runs = [grid_run("a", 1.0, 0.80), grid_run("b", 2.0, 0.82, trial=1),
                  grid_run("c", 3.0, 0.70, synthetic_pool="synthetic-cifar10-b"),  # real-only: the pool is moot
                  grid_run("d", 4.0, 0.75, synthetic_ratio=0.5, synthetic_source="a"),
                  grid_run("e", 5.0, 0.76, trial=1, synthetic_ratio=0.5, synthetic_source="a",
                           mixed_precision="no")]  # the spec's auto precision as a CPU run records it
    ad_hoc = [grid_run("lr", 9.0, 0.10, lr=0.01),  # `distill.py --study=grid --lr=0.01`, newest of its point
              grid_run("pool", 9.0, 0.10, synthetic_ratio=0.5, synthetic_pool="synthetic-cifar10-z"),
              grid_run("tau", 9.0, 0.10, temperature=4.0),  # a grid key the spec leaves at its default
              grid_run("wd", 9.0, 0.10, weight_decay=0.0005), grid_run("nest", 9.0, 0.10, nesterov=False),
              grid_run("fp16", 9.0, 0.10, mixed_precision="fp16")]
    inside, outside = split_by_grid([*sweep_runs, *ad_hoc], tmp_path / "sweeps", "grid")
    assert [r.id for r in inside] == ["a", "b", "c", "d", "e"] and [r.id for r in outside] == [r.id for r in ad_hoc]

    monkeypatch.setattr(cli, "_load", lambda args, study, mode, warnings: cli.Loaded([*sweep_runs, *ad_hoc],
                                                                                      "here", []))
    res = report.run_report(report.parse_args(["--study=grid", "--offline", f"--out={tmp_path / 'figs'}",
                                               f"--cache_dir={tmp_path / 'cache'}",
                                               f"--expect={tmp_path / 'sweeps'}"]))
    assert sorted(r.id for r in res.students) == ["b", "c", "d", "e"]  # c replaces a (same point, newer): dedupe
    assert all(r.value("test/acc") != 0.10 for g in res.groups for r in g.runs)  # never averaged
    (line,) = [w for w in res.warnings if "not in the study's grid" in w]
    assert line.startswith("6 run(s) of study grid not in the study's grid") and "student-lr (lr)" in line


@pytest.mark.parametrize("data,needle", [(b"[1]", "holds a list, not a JSON object"),
                                         (b'{"kind": 7}', "'kind' is an integer, not a string"),
                                         (None, "is a folder, not a file")])
def test_generator_json_of_the_wrong_shape_is_refused(data, needle, workdir, capsys):
    from kd import synthetic as syn

    (workdir / "gen").mkdir()
    plant(workdir / "gen" / "generator.json", data)
    line = refused(capsys, workdir, syn.main, ["generate", "--dataset=digits", f"--model={workdir / 'gen'}"],
                   needle)
    assert "generator.json" in line and "it should hold generator metadata" in line


def test_an_exported_run_id_of_another_run_folder_is_refused(workdir, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    other = workdir / "runs" / "teacher-digits-preresnet8-s0-0123456789"
    other.mkdir(parents=True)
    (other / "run.json").write_text('{"run_id": "studyrun1"}')
    monkeypatch.setenv("WANDB_RUN_ID", "studyrun1")
    refused(capsys, workdir, train.main, RUN, "WANDB_RUN_ID=studyrun1 is the W&B run of another run folder")


@pytest.mark.slow  # three trainers at once on a 2-core machine: make chaos runs it
def test_two_packs_and_a_sweep_runner_on_one_spec_train_each_run_once(tmp_path, teachers_dir):
    import yaml

    from tests.test_packing import GRID, config_of, folder_with_teachers, wandb_by_run

    folder = folder_with_teachers(tmp_path / "together", teachers_dir)
    spec = yaml.safe_load((folder / "grid.yaml").read_text())  # the runner runs the repository's own program
    spec.update(program=str(ROOT / "distill.py"), command=["${env}", "${interpreter}", "-m", "kd.sweep.launch",
                                                           "${program}", "${args}"])
    (folder / "grid.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {**os.environ, **offline_env(folder), "PYTHONPATH": str(ROOT)}
    for key in ("WANDB_RUN_ID", "WANDB_SERVICE"):
        env.pop(key, None)
    commands = [[sys.executable, "-m", "kd.sweep.pack", "grid.yaml", "--pack=2", "--stacked=False"]] * 2
    commands.append([sys.executable, "-m", "kd.sweep", "grid.yaml"])
    procs = [subprocess.Popen(c, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    runs = [dict(zip(GRID, values)) for values in [(t, m) for t in GRID["trial"] for m in GRID["ensemble_size"]]]
    skipped = sum(out.count("skipped: another process is training") + out.count("already finished")
                  for out, _ in outs[:2])
    assert skipped >= len(runs), outs  # each pack leaves to the other trainers what they hold or finished
    for run in runs:
        cfg = config_of(run)
        assert (folder / "runs" / f"{cfg.run_name()}-{cfg.fingerprint()}" / "done.json").is_file()
        assert sorted(p.name for p in (folder / "artifacts" / cfg.run_name()).glob("v*")) == ["v0"]
    wandb_runs = wandb_by_run(folder)
    assert len(wandb_runs) == len(runs)  # one W&B run per run, and each step logged once
    assert all(sorted(wb["steps"]) == [1, 2] for wb in wandb_runs.values()), wandb_runs


def test_a_recipe_key_the_spec_does_not_name_must_be_its_default(tmp_path):
    """The grid's identity is the whole recipe: a key the spec leaves out (weight decay here) is DistillConfig's
    default, so a run with another value is outside the grid, and a run that does not record it took the
    default."""
    import dataclasses

    from kd.config import DistillConfig
    from kd.report.grid import split_by_grid

    default_wd = {f.name: f.default for f in dataclasses.fields(DistillConfig)}["weight_decay"]
    spec = "\n".join(line for line in SPEC.splitlines() if not line.lstrip().startswith(("weight_decay", "study")))
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "self_distill.yaml").write_text(spec + "\n")
    same = grid_run("same", 1.0, 0.8, weight_decay=default_wd)
    unrecorded = grid_run("unrecorded", 2.0, 0.8)
    del unrecorded.config["weight_decay"]
    other = grid_run("other", 3.0, 0.8, weight_decay=default_wd * 5)
    inside, outside = split_by_grid([same, unrecorded, other], tmp_path / "sweeps", "grid")
    assert [r.id for r in inside] == ["same", "unrecorded"] and [r.id for r in outside] == ["other"]
