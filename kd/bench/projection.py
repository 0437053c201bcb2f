"""The study's GPU-hours, from this run's measured rates only: every grid spec in the named spec's folder.

A run's hours are its steps (``epochs x ceil(n_train x (1 + synthetic_ratio) / batch)``) at the measured
seconds per step of its kind (train.py: the teacher step, distill.py: the student step), plus its evaluations
(``epochs / eval_every``, the last always) and one checkpoint an epoch at the epoch section's seconds, plus one
cache build per teacher of the study. Each row names the configuration whose rate it uses; a row whose rate
was not measured is left out with the reason, never filled in.
"""

from __future__ import annotations

import math
from pathlib import Path


def run_steps(cfg, n_train: int) -> int:
    ratio = getattr(cfg, "synthetic_ratio", 0.0)
    return cfg.epochs * math.ceil(n_train * (1 + ratio) / cfg.batch_size)


def overhead_s(cfg, epoch: dict | None) -> float:
    if not epoch:
        return 0.0
    evals = math.ceil(cfg.epochs / max(getattr(cfg, "eval_every", 1), 1))
    return evals * epoch["eval_s"] + cfg.epochs * epoch["checkpoint_s"]


def rates(sections: dict) -> dict:
    """configuration name -> (kind, seconds per step of one run, its description)."""
    out = {}
    for kind in ("teacher", "student"):
        r = sections.get(kind) or {}
        if r.get("best"):
            v = r["variants"][r["best"]]
            out[kind] = (v["s_per_step"], f"{kind} step, {r['best']}, {r['arch']} batch {r['batch']}")
    packs = (sections.get("packs") or {}).get("k") or {}
    if packs:
        k = min(packs, key=lambda key: packs[key]["fused_s_per_student_step"])
        out["pack"] = (packs[k]["fused_s_per_student_step"],
                       f"student step in a fused pack of k={k}, {sections['packs']['precision']}")
    return out


def project(spec_path: Path, sections: dict, n_train: int) -> dict:
    from kd.bench.settings import spec_configs
    from kd.config import DistillConfig

    measured = rates(sections)
    epoch, cache = sections.get("epoch"), sections.get("cache")
    rows, left, teachers = [], {}, 0
    for path in sorted(spec_path.parent.glob("*.yaml")):
        spec, configs = spec_configs(path)
        kinds = ("student", "pack") if spec.flags_cls is DistillConfig else ("teacher",)
        if spec.flags_cls is DistillConfig:
            teachers = max([teachers, *(c.teacher_pool for c in configs)])
        for kind in kinds:
            if kind not in measured:
                left[f"{path.name} ({kind})"] = f"the {kind} rate was not measured"
                continue
            s, what = measured[kind]
            hours = sum(run_steps(c, n_train) * s + overhead_s(c, epoch) for c in configs) / 3600
            rows.append({"spec": path.name, "kind": kind, "runs": len(configs), "configuration": what,
                         "gpu_hours": hours, "with_eval_and_checkpoints": bool(epoch)})
    if cache and teachers:
        rows.append({"spec": "teacher cache", "kind": "cache", "runs": teachers, "gpu_hours": teachers * cache[
            "projected_full_build_s"] / 3600, "configuration": f"one cache build per teacher ({cache['projection']})"})
    plain = sum(r["gpu_hours"] for r in rows if r["kind"] != "pack")
    packed = sum(r["gpu_hours"] for r in rows if r["kind"] != "student")
    return {"rows": rows, "left_out": left, "total_gpu_hours_plain": plain,
            "total_gpu_hours_with_packs": packed if "pack" in measured else None,
            "basis": "measured seconds per step x the steps of every run of the study's grid specs"}


def table(proj: dict) -> str:
    lines = [f"{'spec':<24} {'runs':>5} {'GPU-h':>9}  configuration"]
    for r in proj["rows"]:
        lines.append(f"{r['spec']:<24} {r['runs']:>5} {r['gpu_hours']:>9.1f}  {r['configuration']}")
    lines.append(f"total, plain steps: {proj['total_gpu_hours_plain']:.1f} GPU-h"
                 + (f"; with packs: {proj['total_gpu_hours_with_packs']:.1f} GPU-h"
                    if proj["total_gpu_hours_with_packs"] is not None else ""))
    return "\n".join(lines)
