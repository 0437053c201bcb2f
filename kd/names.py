"""Names the whole repository shares: W&B metric and config keys, artifact names, the project, the datasets.

The programs write these keys and the report reads them; keep them stable (W&B runs already logged hold them).
Plain Python, no torch: every layer may import it.
"""

from __future__ import annotations

import re

from kd.errors import KDError

PROJECT = "kd-fidelity"  # the default W&B project of every command

# ---- jobs (config key "job"; W&B job_type is JOB_TYPES[job])
TEACHER, STUDENT = "teacher", "student"
JOB_TYPES = {TEACHER: "train", STUDENT: "distill"}

# ---- metric keys (history rows and run summary)
EPOCH = "epoch"
LR = "lr"
TRAIN_LOSS = "train/loss"
TRAIN_AGREEMENT = "train/agreement"
TEST_ACC = "test/acc"
TEST_AGREEMENT = "test/agreement"
TEST_KL = "test/kl"
TEST_ECE = "test/ece"
TEACHER_ACC = "teacher/test_acc"
THROUGHPUT = "throughput/img_per_s"
N_REAL = "data/n_real"  # summary: real images per epoch
N_SYNTHETIC = "data/n_synthetic"  # summary: synthetic images in the pool used
FINAL = "final"  # summary: True once the run finished and published its weights

# ---- config keys a student run adds to its flags
JOB = "job"
RUN_NAME = "run_name"
SEED_USED = "seed_used"  # the seed a run drew its weights and data order from (a student's default: its trial's)
INIT_SHA = "init_sha256"  # the sha256 of a classifier run's initial weights (students never share a teacher's)
STUDY = "study"
TEACHER_NAMES = "teacher_names"
TEACHER_HASHES = "teacher_hashes"
TEACHER_VERSIONS = "teacher_versions"  # name:version of each teacher, as resolved
SYNTHETIC_POOL_SHA = "synthetic_pool_sha256"
SYNTHETIC_SOURCE = "synthetic_source"
SYNTHETIC_FID = "synthetic_fid"  # the pool's FID (a float; absent or None when unknown)
SYNTHETIC_FID_AUTHORS = "synthetic_fid_authors"  # an imported generator's FID by the authors' own measure
STEP_MARK = "@step"  # a pool or draw of an SN-GAN at G step N names its model "{model}@stepN" (one family)
SYNTHETIC_DRAW = "synthetic_draw"  # the run's own draw of synthetic images: how, from what, its sha256 (kd.draws)


# ---- artifact names
def arch_slug(arch: str) -> str:
    """An architecture as a name part: ``timm:resnet18`` -> ``timm-resnet18`` (no ':' in artifact names)."""
    return arch.replace(":", "-")


def teacher_artifact(dataset: str, arch: str, seed: int) -> str:
    return f"teacher-{dataset}-{arch_slug(arch)}-s{seed}"


def teacher_prefix(dataset: str, arch: str) -> str:
    return f"teacher-{dataset}-{arch_slug(arch)}-s"


TEACHER_SEED = re.compile(r"-s(\d+)$")


def pool_artifact(dataset: str, source: str) -> str:
    return f"synthetic-{dataset}-{source}"


def generator_artifact(dataset: str, generator: str = "ddpm") -> str:
    """``generator-{dataset}`` for the diffusion model (the name published before SN-GANs existed here),
    ``generator-{dataset}-{generator}`` for any other generator."""
    return f"generator-{dataset}" if generator == "ddpm" else f"generator-{dataset}-{generator}"


# ---- architectures: preresnet{depth} (the authors' PreResNet) or timm:{name}
PRERESNET = re.compile(r"^preresnet(\d+)$")


def check_depth(depth: int) -> None:
    """The one depth rule: bottleneck blocks from depth 44 ((depth - 2) % 9 == 0, up to 1001), basic blocks
    below ((depth - 2) % 6 == 0, from 8)."""
    ok = depth <= 1001 and (depth - 2) % 9 == 0 if depth >= 44 else depth >= 8 and (depth - 2) % 6 == 0
    if not ok:
        raise KDError(f"invalid PreResNet depth {depth}: use depth = 6n+2 below 44 (8, 14, 20, 26, 32, 38) "
                      "or 9n+2 from 44 to 1001 (47, 56, 65, ..., 110)")


def check_arch(arch: str) -> None:
    """``preresnet{depth}`` with a valid depth, or ``timm:{name}`` of a model timm knows."""
    m = PRERESNET.match(arch)
    if m:
        try:
            check_depth(int(m.group(1)))
        except KDError as e:
            raise KDError(f"invalid depth in {arch!r}: {str(e).split(': ', 1)[1]}") from None
        return
    if arch.startswith("timm:"):
        import timm

        if arch[5:] not in timm.list_models():
            raise KDError(f"unknown timm model {arch[5:]!r}: see timm.list_models() for the names")
        return
    raise KDError(f"unknown arch {arch!r}: use preresnet{{depth}} (e.g. preresnet56) or timm:{{name}}")
