"""Names the whole repository shares: W&B metric and config keys, artifact names, the project, the datasets.

The programs write these keys and the report reads them; keep them stable (W&B runs already logged hold them).
Plain Python, no torch: every layer may import it.
"""

from __future__ import annotations

import re

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
STUDY = "study"
TEACHER_NAMES = "teacher_names"
TEACHER_HASHES = "teacher_hashes"
TEACHER_VERSIONS = "teacher_versions"  # name:version of each teacher, as resolved
SYNTHETIC_POOL_SHA = "synthetic_pool_sha256"
SYNTHETIC_SOURCE = "synthetic_source"
SYNTHETIC_FID = "synthetic_fid"  # the pool's FID (a float; absent or None when unknown)


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

