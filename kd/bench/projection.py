"""The whole CIFAR-100 study's GPU-hours, projected from rates measured in the same run, old design vs new.

The study (sweeps/cifar100): 12 PreResNet-56 teachers x 200 epochs at batch 256; Figure 1's 30 students (m =
1 and m = 3 teachers, synthetic ratios 0, 0.25, 0.5, 0.75, 1, 3 trials, tau 1) and the ensemble-size
figure's 54 (m = 1, 2, 3, 4, 5, 6, 8, 10, 12, tau 1 and 4, 3 trials, ratio 0; its m = 1 and 3 runs at tau 1
are Figure 1's ratio-0 runs, so 48 more run), 300 epochs at batch 128. An epoch is one pass over the 50k
real images; a batch of B holds ceil(B * n_real / (n_real + N)) real images, so an epoch has
ceil(50000 / real) steps of B images, each costing what a ratio-0 step costs (a synthetic image's targets are
computed once, when the run starts). Teacher caches: 50k images x 162 views per teacher; a 50k DDIM-100 pool.

* old design: the rates of the code paths before the GPU-speed work: eager steps, one cache file per
  ensemble built by one stacked pass (about 120 member passes for the study), one file loaded per student;
* new design: per-member cache files (12 member passes) combined on the fly (each student loads its m
  members' files), compiled steps where the compile section measured a gain (its speed-up, measured on the
  student step, is applied to the teachers' step too), the pool at the larger sampling batch.
"""

from __future__ import annotations

import math

from kd.data import split_batch
from kd.teachers import select_block

STUDY = {"teachers": 12, "teacher_epochs": 200, "teacher_batch": 256, "student_epochs": 300, "student_batch": 128,
         "n_real": 50_000, "views": 162, "classes": 100, "trials": 3, "fig1_m": (1, 3),
         "fig1_ratios": (0.0, 0.25, 0.5, 0.75, 1.0), "fig1_tau": 1.0, "size_m": (1, 2, 3, 4, 5, 6, 8, 10, 12),
         "size_taus": (1.0, 4.0), "pool": 50_000, "pool_steps": 100}


def student_runs(study: dict = STUDY) -> list[tuple]:
    """Distinct student runs (m, synthetic ratio, tau, trial): same configuration = the same run, run once."""
    runs = {(m, r, study["fig1_tau"], t) for m in study["fig1_m"] for r in study["fig1_ratios"]
            for t in range(study["trials"])}
    runs |= {(m, 0.0, tau, t) for m in study["size_m"] for tau in study["size_taus"] for t in range(study["trials"])}
    return sorted(runs)


def teacher_sets(study: dict = STUDY) -> set[tuple]:
    """The distinct ensembles (teacher blocks) the students distil from: one cache file each, old design."""
    names = list(range(study["teachers"]))
    return {tuple(select_block(names, m, t)) for m, _, _, t in student_runs(study)}


def steps_per_epoch(ratio: float, batch: int, n_real: int) -> int:
    real, _ = split_batch(batch, n_real, round(ratio * n_real))
    return math.ceil(n_real / real)


def _counts(study: dict) -> dict:
    runs = student_runs(study)
    sets = teacher_sets(study)
    student_images = sum(study["student_epochs"] * steps_per_epoch(r, study["student_batch"], study["n_real"])
                         * study["student_batch"] for _, r, _, _ in runs)
    return {"students": len(runs), "fig1_students": len(study["fig1_m"]) * len(study["fig1_ratios"]) * study["trials"],
            "size_students": len(study["size_m"]) * len(study["size_taus"]) * study["trials"],
            "student_images": student_images, "ensembles": len(sets),
            "member_passes_old": sum(len(s) for s in sets), "member_passes_new": len({t for s in sets for t in s}),
            "member_loads_new": sum(m for m, _, _, _ in runs), "pairs": study["n_real"] * study["views"],
            "teacher_images": study["teachers"] * study["teacher_epochs"] * study["n_real"],
            "file_bytes": study["n_real"] * study["views"] * study["classes"] * 4}


def project(rates: dict, study: dict = STUDY) -> dict:
    """GPU-hours per part of the study, old and new design, from ``rates`` (see :func:`kd.bench.summary.rates`):
    teacher_img_s_old/new, student_img_s_old/new (eager / compiled where it pays), member_fwd_s, stacked_fwd_s
    {m: rate}, load_gb_s, pool_img_s_old, pool_img_s_new."""
    c = _counts(study)
    h = 3600.0

    def stacked(m: int) -> float:  # the old build of an m-ensemble: the measured stacked rate nearest m
        if m == 1 or not rates["stacked_fwd_s"]:
            return rates["member_fwd_s"]
        return rates["stacked_fwd_s"][min(rates["stacked_fwd_s"], key=lambda k: abs(int(k) - m))]

    old_build = sum(len(s) * c["pairs"] / stacked(len(s)) for s in teacher_sets(study))
    gb = c["file_bytes"] / 1e9
    parts = {
        "teachers": (c["teacher_images"] / rates["teacher_img_s_old"],
                     c["teacher_images"] / rates["teacher_img_s_new"]),
        "students": (c["student_images"] / rates["student_img_s_old"],
                     c["student_images"] / rates["student_img_s_new"]),
        "cache builds": (old_build, c["member_passes_new"] * c["pairs"] / rates["member_fwd_s"]),
        "cache loads": (c["students"] * gb / rates["load_gb_s"], c["member_loads_new"] * gb / rates["load_gb_s"]),
        "pool (50k DDIM-100)": (study["pool"] / rates["pool_img_s_old"], study["pool"] / rates["pool_img_s_new"]),
    }
    out = {k: {"old_h": a / h, "new_h": b / h} for k, (a, b) in parts.items()}
    out["total"] = {"old_h": sum(v["old_h"] for v in out.values()), "new_h": sum(v["new_h"] for v in out.values())}
    return {"hours": out, "counts": c, "rates": rates, "study": study}


def projection_rows(p: dict) -> list[tuple]:
    c = p["counts"]
    how = {"teachers": f"{STUDY['teachers']} x {STUDY['teacher_epochs']} epochs x 50k images",
           "students": f"{c['students']} runs ({c['fig1_students']} Figure 1 + {c['size_students']} ensemble-size, "
                       f"{c['fig1_students'] + c['size_students'] - c['students']} shared) x 300 epochs, "
                       f"{c['student_images'] / 1e9:.2f}G images",
           "cache builds": f"{c['member_passes_old']} member passes ({c['ensembles']} ensembles) -> "
                           f"{c['member_passes_new']} (per member) x 50k x 162 views",
           "cache loads": f"{c['students']} files -> {c['member_loads_new']} member files of "
                          f"{c['file_bytes'] / 2**30:.1f} GiB, verified",
           "pool (50k DDIM-100)": "the sampling batch of the old / new row", "total": ""}
    return [(k, f"{v['old_h']:.2f}", f"{v['new_h']:.2f}", how[k]) for k, v in p["hours"].items()]
