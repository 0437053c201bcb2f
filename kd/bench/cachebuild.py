"""The teacher-cache build, old design vs new: one stacked pass per ensemble (a file per ensemble) against one
pass per member (a file per teacher, shared by every ensemble that holds it) combined on the fly; and the
rate at which a cache file is written and read back verified (what every student pays on start-up)."""

from __future__ import annotations

import math

import torch

from kd.bench.common import Bench, amp, interleave_warm, medians, random_data, ratio, teachers, timed
from kd.bench.table import note


def build_rates(b: Bench, data, members: list) -> dict[str, list[float]]:
    """Member-forwards/s of: one member alone, and for every k in cache_sizes the k-ensemble built the old way
    (one stacked pass) and the new way (k single-member passes folded by kd.teacher_cache.combine)."""
    from kd.models import Ensemble
    from kd.teacher_cache import all_view_targets, combine

    pairs = data.n_train * data.num_views

    def views(ens):
        return all_view_targets(ens, data, autocast=lambda: amp(b.device), progress=False)

    def per_member(k: int):
        def run() -> None:
            acc = None
            for t in members[:k]:
                lp = views(Ensemble([t], stacked=False))
                acc = lp if acc is None else combine(acc, lp)
            acc.sub_(math.log(k))
        return lambda: pairs * k / timed(run, b.device)[1]

    def per_ensemble(k: int):
        return lambda: pairs * k / timed(lambda: views(Ensemble(members[:k])), b.device)[1]

    variants = {"member": per_member(1)}
    for k in b.sizes.cache_sizes:
        variants[f"members-m{k}"], variants[f"ensemble-m{k}"] = per_member(k), per_ensemble(k)
    return interleave_warm(variants, b.sizes.rounds)


def file_rates(b: Bench) -> dict:
    """GB/s of writing a cache file (atomic, hashed) and of loading it verified onto the device."""
    from kd.io import load_tensors, save_tensors

    n = b.sizes.load_mib * 2**20 // 4
    t = torch.randn(n, generator=torch.Generator().manual_seed(0))
    path = b.root / "load-rate.safetensors"
    digest, save_s = timed(lambda: save_tensors(path, {"log_probs": t}), b.device)
    _, load_s = timed(lambda: load_tensors(path, digest, device=str(b.device)), b.device)
    path.unlink()
    gb = n * 4 / 1e9
    return {"bytes": n * 4, "save_gb_s": gb / save_s, "load_verify_gb_s": gb / load_s}


def bench_cache_build(b: Bench) -> dict:
    sizes = b.sizes
    data = random_data(sizes.cache_images, b.device, seed=3)
    members = teachers(max(sizes.cache_sizes), sizes.arch, b.device)
    s = build_rates(b, data, members)
    med = medians(s)
    pairs = data.n_train * data.num_views
    for k in sizes.cache_sizes:
        b.add(note(f"cache build m={k}: per member vs stacked ensemble", f"{med[f'members-m{k}']:.0f} fwd/s",
                   f"{med[f'ensemble-m{k}']:.0f} fwd/s", f"{ratio(s, f'members-m{k}', f'ensemble-m{k}'):.2f}x",
                   f"alone: {med['member']:.0f}/s"))
    files = file_rates(b)
    b.add(note("cache file: load + verify (sha256) / save", f"{files['load_verify_gb_s']:.2f} GB/s",
               f"{files['save_gb_s']:.2f} GB/s save", "", f"{files['bytes'] / 2**20:.0f} MiB file"))
    return {"samples_member_forwards_s": s, "pairs": pairs, "files": files}
