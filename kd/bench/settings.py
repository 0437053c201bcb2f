"""The benchmark's flags (:class:`BenchSettings`) and the workload it times, read from the study's sweep specs.

:func:`workload` takes the student settings (architecture, batch, temperature, dataset) from the named spec of
distill.py runs and the teacher settings from the ``train.py`` spec beside it (``teachers.yaml``), so the bench
times the steps the study takes; ``--smoke`` shrinks them to a tiny network and batch on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from kd.errors import KDError
from kd.flags import setting

ROOT = Path(__file__).resolve().parents[2]  # the repository (its sweeps/)


@dataclass
class BenchSettings:
    """python -m kd.bench: the study's steps timed on this machine, section by section, into one JSON."""

    device: str = setting("auto", "where to time: auto (cuda where torch sees a GPU), cuda or cpu",
                          choices=("auto", "cuda", "cpu"))
    spec: str = setting("sweeps/cifar100/self_distill.yaml", "a distill.py sweep spec: its runs' settings are "
                        "timed, the specs of its folder are projected")
    budget_s: float = setting(-1.0, "seconds for the whole run; later sections that no longer fit are skipped "
                              "(-1: 45 with --smoke, else 420; 0: none)", lo=-1, hi=86_400)
    out: str = setting("bench/results.json", "the JSON, rewritten after every section")
    smoke: bool = setting(False, "every section on the CPU at tiny sizes (checks the bench, measures nothing "
                          "of the study)", choices=(True, False))
    compile: str = setting("auto", "time the compiled and CUDA-graph steps (auto: on CUDA only; the CPU "
                           "compiles for minutes)", choices=("auto", "True", "False"))
    min_s: float = setting(-1.0, "seconds of timed steps per measurement (-1: 2 on CUDA, 0.05 with --smoke, "
                           "1 on the CPU)", lo=-1, hi=600)
    threads: int = setting(0, "torch intra-op threads on the CPU (0: 1 with --smoke, else torch's default)",
                           lo=0, hi=1024)


@dataclass(frozen=True)
class Workload:
    """What one step of each kind holds: the study's settings (or tiny ones with --smoke)."""

    dataset: str
    classes: int
    n_train: int  # real training images of an epoch
    n_test: int
    arch: str  # the student's
    batch: int  # the student's
    temperature: float
    teacher_arch: str
    teacher_batch: int
    packs: tuple = (1, 4, 8)
    cache_images: int = 2048  # images (x all views) the cache build is timed on

    @property
    def depth(self) -> int:
        return int(self.arch.removeprefix("preresnet"))


def find_spec(path: str) -> Path:
    """``path`` as given, else below the repository (the default spec from any folder)."""
    for p in (Path(path), ROOT / path):
        if p.is_file():
            return p
    raise KDError(f"--spec: {path} does not exist: name a sweep spec, e.g. sweeps/cifar100/self_distill.yaml")


def spec_configs(path: Path) -> tuple[object, list]:
    """(the spec, the config of every run of its grid) as the programs would parse them."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    from kd.flags import parse_flags
    from kd.sweep.spec import load_spec

    spec = load_spec(path)
    if spec.grid is None or spec.flags_cls is None:
        raise KDError(f"{path}: the bench reads grid specs of train.py or distill.py: use method grid")
    return spec, [parse_flags(spec.flags_cls, create_sweep_command_args({"args": c})["args"], notes=False)
                  for c in spec.grid]


def workload(s: BenchSettings) -> Workload:
    from kd.config import DistillConfig, TrainConfig
    from kd.datasets import DATASETS

    path = find_spec(s.spec)
    spec, configs = spec_configs(path)
    if spec.flags_cls is not DistillConfig:
        raise KDError(f"--spec: {path} runs {spec.program}; name a spec of distill.py runs (the student step)")
    student = configs[0]
    teacher = TrainConfig(dataset=student.dataset, arch=student.teacher_arch or student.arch)
    teachers = path.parent / "teachers.yaml"
    if teachers.is_file():
        teacher = spec_configs(teachers)[1][0]
    if not (student.arch.startswith("preresnet") and teacher.arch.startswith("preresnet")):
        raise KDError(f"{path}: the bench times PreResNets (kd.fused packs them); {student.arch} is not one")
    ds = DATASETS[student.dataset]
    w = Workload(student.dataset, ds.num_classes, ds.n_train, ds.n_test, student.arch, student.batch_size,
                 student.temperature, teacher.arch, teacher.batch_size)
    if s.smoke:
        w = replace(w, n_train=32, n_test=16, arch="preresnet8", batch=4, teacher_arch="preresnet8",
                    teacher_batch=8, packs=(1, 2, 4), cache_images=4)
    return w
