"""The whole CIFAR-100 study's device-hours, projected from rates measured in the same run, old design vs new.

The study (sweeps/cifar100): 12 PreResNet-56 teachers x 200 epochs at batch 256; Figure 1's 30 students (m = 1 and m
= 3 teachers, tau 1, 3 trials: the real-only run and synthetic ratios 0.25, 0.5, 0.75, 1 from the paper's generator,
the authors' SN-GAN) and the ensemble-size figure's 54 (m = 1, 2, 3, 4, 5, 6, 8, 10, 12, tau 1 and 4, 3 trials,
ratio 0; its m = 1 and 3 runs at tau 1 are Figure 1's real-only runs, so 48 more run): 78 student runs of 300 epochs
at batch 128 (the optional sample-quality sweep is not counted). An epoch is one pass over the 50k real images; a
batch of B holds ceil(B * n_real / (n_real + N)) real images, so an epoch has ceil(50000 / real) steps of B images,
each costing what a ratio-0 step costs (a synthetic image's targets are computed once, when the run starts).
Teacher caches: 50k images x 162 views per teacher; a 50k DDIM-100 pool (the SN-GAN pool is one generator
forward an image: not counted, nor is training either generator).

* old design: the rates of the code paths before the speed work: eager steps, one run at a time, one cache
  file per ensemble built by one stacked pass (123 member passes for the study), one file loaded per student;
* new design: per-member cache files (12 member passes) combined on the fly (each student loads its m
  members' files); the students at the fastest of: plain and compiled (where the compile section measured a
  gain), or in packs (``python -m kd.sweep.pack``) of the measured pack size that makes the study's students
  cheapest (:func:`best_pack`), compiled where the compile section measured a gain for that pack; compiled
  teacher steps where the student step's compile gain was measured (applied to the teachers' step too); the
  pool at the larger sampling batch.

Packs hold runs that agree in everything but seed, teachers and temperature (kd.sweep.pack's ``PACK_KEYS``):
here the synthetic ratio and, above ratio 0, the pool; so the 54 real-only runs pack together and each of
the 4 (ratio, pool) groups of 6 packs apart. A pack of j runs where the measured sizes are k = 1, 2, 4, ... is
costed as the smallest measured pack that holds j (a pack's step costs no less with more members).

Every rate is measured in this run (at the bench's sizes, which on the CPU are not the study's); the counts
are the study's; all the rest (epochs, runs, file sizes, the pack plan) is arithmetic on the two, named
per part in ``basis``. With ``flops`` (:func:`kd.bench.flops.study_flops`) the work of every part is counted too.
"""

from __future__ import annotations

import math
from collections import namedtuple

from kd.data import split_batch
from kd.teachers import select_block

POOLS = ("synthetic-cifar100-generator-cifar100-sngan",)
STUDY = {"teachers": 12, "teacher_epochs": 200, "teacher_batch": 256, "student_epochs": 300, "student_batch": 128,
         "n_real": 50_000, "views": 162, "classes": 100, "trials": 3, "fig1_m": (1, 3),
         "fig1_ratios": (0.0, 0.25, 0.5, 0.75, 1.0), "fig1_pools": POOLS, "fig1_tau": 1.0,
         "size_m": (1, 2, 3, 4, 5, 6, 8, 10, 12), "size_taus": (1.0, 4.0), "pool": 50_000, "pool_steps": 100,
         "arch": "preresnet56", "unet": "cifar100"}
PEAK_TFLOPS = 989.0  # dense bf16 of an H100 / H200 SXM (the datasheet's; 1979 is with 2:4 sparsity)
PACK_MARGIN = 1.03  # packs are the new design's students only when they save more than this (noise)

Run = namedtuple("Run", "m ratio tau trial pool")  # pool: "" for real-only runs (any pool: the same run)


def fig1_runs(study: dict = STUDY) -> set[Run]:
    return {Run(m, r, study["fig1_tau"], t, pool if r else "") for m in study["fig1_m"]
            for r in study["fig1_ratios"] for pool in study["fig1_pools"] for t in range(study["trials"])}


def size_runs(study: dict = STUDY) -> set[Run]:
    return {Run(m, 0.0, tau, t, "") for m in study["size_m"] for tau in study["size_taus"]
            for t in range(study["trials"])}


def student_runs(study: dict = STUDY) -> list[Run]:
    """Distinct student runs: same configuration = the same run, run once (a real-only run names no pool)."""
    return sorted(fig1_runs(study) | size_runs(study))


def teacher_sets(study: dict = STUDY) -> set[tuple]:
    """The distinct ensembles (teacher blocks) the students distil from: one cache file each, old design."""
    names = list(range(study["teachers"]))
    return {tuple(select_block(names, r.m, r.trial)) for r in student_runs(study)}


def steps_per_epoch(ratio: float, batch: int, n_real: int) -> int:
    real, _ = split_batch(batch, n_real, round(ratio * n_real))
    return math.ceil(n_real / real)


def pack_groups(study: dict = STUDY) -> dict[tuple, list[Run]]:
    """The runs that may share a pack: the same synthetic ratio and pool (the rest of PACK_KEYS is the study's)."""
    groups: dict[tuple, list[Run]] = {}
    for r in student_runs(study):
        groups.setdefault((r.ratio, r.pool), []).append(r)
    return groups


def pack_plan(k: int, study: dict = STUDY) -> list[tuple[int, float]]:
    """(runs in the pack, synthetic ratio) of every pack when each group is cut into packs of k."""
    return [(min(k, len(runs) - i), ratio) for (ratio, _), runs in pack_groups(study).items()
            for i in range(0, len(runs), k)]


def _counts(study: dict) -> dict:
    runs = student_runs(study)
    sets = teacher_sets(study)
    epoch_images = {r: steps_per_epoch(r, study["student_batch"], study["n_real"]) * study["student_batch"]
                    for r in study["fig1_ratios"]}
    return {"students": len(runs), "fig1_students": len(fig1_runs(study)), "size_students": len(size_runs(study)),
            "student_images": sum(study["student_epochs"] * epoch_images[r.ratio] for r in runs),
            "ensembles": len(sets),
            "member_passes_old": sum(len(s) for s in sets), "member_passes_new": len({t for s in sets for t in s}),
            "member_loads_new": sum(r.m for r in runs), "pairs": study["n_real"] * study["views"],
            "teacher_images": study["teachers"] * study["teacher_epochs"] * study["n_real"],
            "file_bytes": study["n_real"] * study["views"] * study["classes"] * 4}


def pack_seconds(k: int, gains: dict, rate: float, study: dict = STUDY) -> float:
    """Seconds of every student run in packs of k: a pack of j costs a step of the smallest measured pack
    s >= j, s x batch images at ``rate`` (one plain student's img/s) x the measured gain of s."""
    sizes = sorted(int(s) for s in gains)
    total = 0.0
    for j, ratio in pack_plan(k, study):
        s = next(s for s in sizes if s >= j)
        steps = study["student_epochs"] * steps_per_epoch(ratio, study["student_batch"], study["n_real"])
        total += steps * s * study["student_batch"] / (rate * gains[str(s)])
    return total


def best_pack(gains: dict, study: dict = STUDY) -> int | None:
    """The measured pack size that makes the study's students cheapest (None: none saves > PACK_MARGIN over
    plain runs). ``gains``: {str(k): the pack of k's images/s over k plain students'}."""
    if not gains:
        return None
    plain = pack_seconds(1, {"1": 1.0}, 1.0, study)
    k = min((int(k) for k in gains), key=lambda k: pack_seconds(k, gains, 1.0, study))
    return k if pack_seconds(k, gains, 1.0, study) * PACK_MARGIN < plain else None


def _students(c: dict, rates: dict, study: dict) -> tuple[float, dict]:
    """The new design's student seconds, and how: plain (compiled where it pays) or packs (compiled where
    that was measured to pay)."""
    eager, plain_new = rates["student_img_s_old"], rates["student_img_s_new"]
    gains = rates.get("pack_gain") or {}
    options = {"plain" + (", compiled" if plain_new > eager else ""): (c["student_images"] / plain_new, None)}
    k = best_pack(gains, study)
    if k:
        options[f"packs of {k}"] = (pack_seconds(k, gains, eager, study), k)
        compiled = rates.get("pack_compile_gain")
        if compiled and compiled > 1 and rates.get("pack_compile_k") == k:
            options[f"packs of {k}, compiled"] = (pack_seconds(k, gains, eager, study) / compiled, k)
    how = min(options, key=lambda name: options[name][0])
    return options[how][0], {"how": how, "k": options[how][1], "options_h": {n: s / 3600 for n, (s, _) in
                                                                             options.items()}}


def project(rates: dict, study: dict = STUDY, flops: dict | None = None) -> dict:
    """Hours per part of the study, old and new design, from ``rates`` (see :func:`kd.bench.summary.rates`):
    teacher_img_s_old/new, student_img_s_old/new (eager / compiled where it pays), member_fwd_s, stacked_fwd_s
    {m: rate}, load_gb_s, pool_img_s_old, pool_img_s_new; optionally pack_gain {str(k): gain}, and
    pack_compile_gain with the pack_compile_k it was measured at. ``flops``: see :func:`work`."""
    c = _counts(study)
    h = 3600.0

    def stacked(m: int) -> float:  # the old build of an m-ensemble: the measured stacked rate nearest m
        if m == 1 or not rates["stacked_fwd_s"]:
            return rates["member_fwd_s"]
        return rates["stacked_fwd_s"][min(rates["stacked_fwd_s"], key=lambda k: abs(int(k) - m))]

    old_build = sum(len(s) * c["pairs"] / stacked(len(s)) for s in teacher_sets(study))
    gb = c["file_bytes"] / 1e9
    student_s, students = _students(c, rates, study)
    parts = {
        "teachers": (c["teacher_images"] / rates["teacher_img_s_old"],
                     c["teacher_images"] / rates["teacher_img_s_new"]),
        "students": (c["student_images"] / rates["student_img_s_old"], student_s),
        "cache builds": (old_build, c["member_passes_new"] * c["pairs"] / rates["member_fwd_s"]),
        "cache loads": (c["students"] * gb / rates["load_gb_s"], c["member_loads_new"] * gb / rates["load_gb_s"]),
        "pool (50k DDIM-100)": (study["pool"] / rates["pool_img_s_old"], study["pool"] / rates["pool_img_s_new"]),
    }
    out = {k: {"old_h": a / h, "new_h": b / h} for k, (a, b) in parts.items()}
    out["total"] = {"old_h": sum(v["old_h"] for v in out.values()), "new_h": sum(v["new_h"] for v in out.values())}
    return {"hours": out, "counts": c, "rates": rates, "study": study, "students": students,
            "basis": basis(c, students, rates, study), "work": work(c, study, flops) if flops else None}


def basis(c: dict, students: dict, rates: dict, study: dict) -> dict[str, dict[str, str]]:
    """Per part: what this run measured (``rates["measured"]``, filled in by the summary) and what is
    extrapolated from it (counts, lengths, the pack plan)."""
    k = students["k"]
    plan = ""
    if k:
        sizes = [n for n, _ in pack_plan(k, study)]
        counts = ", ".join(f"{sizes.count(n)} of {n}" for n in sorted(set(sizes), reverse=True))
        plan = f"; in packs of {k} ({counts}; a pack of j costed as the smallest measured pack holding j)"
    compiled = (" x the student step's compile gain (measured on the student step, applied to the teachers')"
                if rates["teacher_img_s_new"] > rates["teacher_img_s_old"] else "")
    extra = {
        "teachers": f"{study['teachers']} x {study['teacher_epochs']} epochs x 50k images at that rate{compiled}",
        "students": f"{c['students']} runs x {study['student_epochs']} epochs, {c['student_images'] / 1e9:.2f}G "
                    f"images (extra steps per synthetic ratio){plan}",
        "cache builds": f"{c['member_passes_old']} member passes ({c['ensembles']} ensembles, each at the stacked "
                        f"rate of the nearest measured m) -> {c['member_passes_new']} x 50k x 162 views",
        "cache loads": f"{c['students']} files -> {c['member_loads_new']} member files of "
                       f"{c['file_bytes'] / 2**30:.1f} GiB at the measured GB/s",
        "pool (50k DDIM-100)": f"50k images x {study['pool_steps']} steps, linear in steps",
    }
    measured = rates.get("measured", {})
    return {part: {"measured": measured.get(part, ""), "extrapolated": text} for part, text in extra.items()}


def work(c: dict, study: dict, flops: dict) -> dict[str, dict[str, float]]:
    """PFLOP per part, old and new design, from per-image FLOPs counted for the study's models: ``flops`` =
    {"step": a training step of ``study["arch"]``, "forward": its forward, "unet": a forward of the pool's
    UNet (None: not counted)}."""
    p = 1e15
    pool = study["pool"] * study["pool_steps"] * flops["unet"] / p if flops.get("unet") else float("nan")
    out = {"teachers": (c["teacher_images"] * flops["step"] / p,) * 2,
           "students": (c["student_images"] * flops["step"] / p,) * 2,
           "cache builds": (c["member_passes_old"] * c["pairs"] * flops["forward"] / p,
                            c["member_passes_new"] * c["pairs"] * flops["forward"] / p),
           "cache loads": (0.0, 0.0), "pool (50k DDIM-100)": (pool, pool)}
    res = {k: {"old_pflop": a, "new_pflop": b} for k, (a, b) in out.items()}
    res["total"] = {"old_pflop": sum(v["old_pflop"] for v in res.values()),
                    "new_pflop": sum(v["new_pflop"] for v in res.values())}
    res["flops_per_image"] = dict(flops)
    return res


def unit(p: dict) -> str:
    return "GPU-h" if p["rates"].get("device") == "cuda" else "CPU-h"


def projection_title(p: dict) -> str:
    if p["rates"].get("device") == "cuda":
        return "The CIFAR-100 study, projected from this run's rates"
    return ("The CIFAR-100 study, projected from this run's rates (this CPU at the bench's sizes: CPU-hours, "
            "indicative only; a GPU's hours come from `python -m kd.bench --device=cuda`)")


def projection_table(p: dict) -> str:
    from kd.bench.table import markdown

    u, w = unit(p), p.get("work")
    head = ("part of the CIFAR-100 study", f"old design {u}", f"new design {u}",
            *(("PFLOP (old -> new)",) if w else ()), "measured in this run", "extrapolated")
    rows = []
    for part, v in p["hours"].items():
        b = p["basis"].get(part, {"measured": "", "extrapolated": ""})
        flop = ()
        if w:
            f = w[part]
            flop = (f"{f['old_pflop']:.0f}" if f["old_pflop"] == f["new_pflop"] else
                    f"{f['old_pflop']:.0f} -> {f['new_pflop']:.0f}",)
        rows.append((part, f"{v['old_h']:.2f}", f"{v['new_h']:.2f}", *flop, b["measured"], b["extrapolated"]))
    return markdown(head, rows)


def projection_notes(p: dict) -> str:
    """What the students' new hours assume, what is not counted, and the work at a GPU's peak."""
    s, h = p["students"], p["hours"]
    lines = [f"students, new design: {s['how']} (" + ", ".join(f"{n}: {v:.1f} {unit(p)}" for n, v in
                                                              s["options_h"].items()) + ")"]
    lines.append("not counted: training the two generators, the SN-GAN pool, evaluation, W&B")
    w = p.get("work")
    if w:
        t, f = w["total"], w["flops_per_image"]
        peak = t["new_pflop"] * 1e15 / (PEAK_TFLOPS * 1e12) / 3600
        line = (f"work: {t['old_pflop']:.0f} -> {t['new_pflop']:.0f} PFLOP (counted: {STUDY['arch']} "
                f"{f['step'] / 1e6:.0f} MFLOP an image a training step, {f['forward'] / 1e6:.0f} a forward"
                + (f"; the pool's UNet {f['unet'] / 1e9:.1f} GFLOP a step" if f.get("unet") else "")
                + f") = {peak:.2f} h at a dense bf16 peak of {PEAK_TFLOPS:.0f} TFLOP/s (H100 / H200)")
        if p["rates"].get("device") == "cuda":
            line += f"; the new design's {h['total']['new_h']:.1f} GPU-h are {peak / h['total']['new_h']:.0%} of it"
        lines.append(line)
    return "\n".join(lines)
