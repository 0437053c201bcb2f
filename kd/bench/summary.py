"""The repository's speed table (what | measured | what it means), old design beside new, and the rates the
study projection (:mod:`kd.bench.projection`) is computed from, all read off one run's results."""

from __future__ import annotations

import statistics

from kd.bench.common import Sizes, ratio
from kd.bench.projection import STUDY, best_pack, project, unit

MIN = 60.0
TITLE = "Speed of this repository, old design beside new"


def _med(samples: dict, key: str) -> float | None:
    v = samples.get(key) if samples else None
    return statistics.median(v) if v else None


def compile_gain(res: dict) -> tuple[str | None, float]:
    """The compile mode that pays most (no graph compiled after a round's first epoch), and its speed-up."""
    s, best = res.get("samples_img_s", {}), (None, 1.0)
    for mode, per in res.get("per_round", {}).items():
        if mode == "eager" or not s.get(mode) or not s.get("eager"):
            continue
        recompiled = any(r["graphs_at_end"] > r["graphs_after_epoch_1"] for r in per)
        r = ratio(s, mode, "eager")
        if not recompiled and r > best[1]:
            best = (mode, r)
    return best


def rates(results: dict, sizes: Sizes, device: str = "cpu") -> dict | None:
    """What the projection needs, or None where a section it needs was skipped. With ``--compile`` the train
    and distill sections ran compiled: their eager rates are then estimated with the compile section's gain."""
    try:
        train = results["training"]["samples_img_s"]
        student = results["distillation"]["m1"]["samples_img_s"]
        cache = results["cache"]["samples_member_forwards_s"]
        syn = results["synthetic"]["samples_img_s"]
        load = results["cache"]["files"]["load_verify_gb_s"]
    except KeyError:
        return None
    gain = compile_gain(results.get("compile", {}))[1]
    eager = 1 / gain if results["training"].get("compile") else 1.0  # measured rate -> eager rate
    compiled = 1.0 if results["training"].get("compile") else gain  # measured rate -> new design's rate
    per_step = sizes.pool_steps / STUDY["pool_steps"]  # a sampler's cost is linear in its steps
    pool = _med(syn, f"ddim-{sizes.pool_steps}-{sizes.gen_batch}")
    big = _med(syn, f"ddim-{sizes.pool_steps}-{sizes.gen_big_batch}") or 0.0
    teacher, distill = _med(train, "engine"), _med(student, "cache")
    packs = results.get("packs", {})
    pack_compiled = results.get("compile", {}).get("pack", {})
    out = {"teacher_img_s_old": teacher * eager, "teacher_img_s_new": teacher * compiled,
           "student_img_s_old": distill * eager, "student_img_s_new": distill * compiled, "compile_gain": gain,
           "member_fwd_s": _med(cache, "member"),
           "stacked_fwd_s": {k.split("-m")[1]: _med(cache, k) for k in cache if k.startswith("ensemble-m")},
           "load_gb_s": load, "pool_img_s_old": pool * per_step, "pool_img_s_new": max(pool, big) * per_step,
           # a looped pack (the CPU) is its members' steps one after another: what it "gains" is noise
           "pack_gain": {k: v["gain"] for k, v in packs.get("k", {}).items()} if packs.get("stacked") else {},
           "pack_compile_gain": pack_compiled.get("gain"), "pack_compile_k": pack_compiled.get("k"),
           "device": device}
    out["measured"] = measured(results, sizes, out)
    return out


def measured(results: dict, sizes: Sizes, r: dict) -> dict[str, str]:
    """Per part of the projection, the rates this run measured it from (and at which sizes)."""
    ran = " compiled" if results["training"].get("compile") else ""
    student = (f"engine distill step{ran} (m = 1, cache), {sizes.arch}, batch {sizes.distill_batch}: "
               f"{_med(results['distillation']['m1']['samples_img_s'], 'cache'):.0f} img/s")
    packs = results.get("packs", {})
    if packs.get("k"):
        student += (f"; packs ({packs['how']}, {packs['arch']}, batch {packs['batch']}) vs as many plain students: "
                    + ", ".join(f"k = {k}: {v['gain']:.2f}x" for k, v in packs["k"].items()))
    if r["pack_compile_gain"]:
        student += f"; pack of {r['pack_compile_k']} compiled vs eager {r['pack_compile_gain']:.2f}x"
    if r["compile_gain"] > 1:
        student += f"; student step compiled vs eager {r['compile_gain']:.2f}x"
    stacked = ", ".join(f"m = {k}: {v:.0f}" for k, v in r["stacked_fwd_s"].items())
    syn = results["synthetic"]["samples_img_s"]
    return {"teachers": f"engine teacher step{ran}, {sizes.arch}, batch {sizes.teacher_batch}: "
                        f"{_med(results['training']['samples_img_s'], 'engine'):.0f} img/s",
            "students": student,
            "cache builds": f"member forwards/s, {sizes.arch}: {r['member_fwd_s']:.0f} one member alone"
                            + (f", stacked ensembles {stacked}" if stacked else ""),
            "cache loads": f"load + verify of a {sizes.load_mib} MiB file: {r['load_gb_s']:.2f} GB/s",
            "pool (50k DDIM-100)": f"DDIM, {sizes.pool_steps} steps, {sizes.unet} UNet: " + ", ".join(
                f"{_med(syn, f'ddim-{sizes.pool_steps}-{n}'):.1f} img/s at batch {n}"
                for n in (sizes.gen_batch, sizes.gen_big_batch) if _med(syn, f"ddim-{sizes.pool_steps}-{n}"))}


def _row(what: str, measured: str, means: str) -> dict:
    return {"what": what, "measured": measured, "means": means}


def _steps_row(what: str, old: float, new: float, images: float, unit: str, ran_compiled: bool) -> dict:
    """A training step's row: eager (old) and compiled (new) rates, and the minutes ``images`` take. With
    ``--compile`` the rate measured is the compiled one and the eager one an estimate (or unknown)."""
    faster = new > old * 1.005
    if ran_compiled:
        return _row(what, f"{new:.0f} img/s compiled (--compile)" + (f", {old:.0f} eager (est.)" if faster else ""),
                    f"{images / new / MIN:.0f} min per {unit} compiled")
    return _row(what, f"{old:.0f} img/s eager" + (f", {new:.0f} compiled" if faster else ""),
                f"{images / old / MIN:.0f} min per {unit}" + (f", {images / new / MIN:.0f} compiled" if faster
                                                             else ""))


def _train_rows(results: dict, sizes: Sizes, r: dict | None) -> list[dict]:
    out, ran = [], bool(results.get("training", {}).get("compile"))
    s = results.get("training", {}).get("samples_img_s")
    if s:
        eng, bare, k = _med(s, "engine"), _med(s, "bare"), ratio(s, "engine", "bare")
        old, new = (r["teacher_img_s_old"], r["teacher_img_s_new"]) if r else (eng, eng)
        out.append(_steps_row(f"teacher step (engine = train.py), {sizes.arch}, batch {sizes.teacher_batch}",
                              old, new, STUDY["teacher_epochs"] * STUDY["n_real"], "teacher (200 epochs)", ran))
        out.append(_row("`kd.bench`: engine vs bare step", f"{eng:.0f} vs {bare:.0f} img/s = {k:.2f}x",
                        f"the loop costs {max(0.0, 1 - k):.0%}" + (" (both compiled)" if ran else "")))
    d = results.get("distillation", {}).get("m1")
    if d:
        rate = _med(d["samples_img_s"], "cache")
        old, new = (r["student_img_s_old"], r["student_img_s_new"]) if r else (rate, rate)
        out.append(_steps_row(f"distill m = 1, cache, batch {sizes.distill_batch}", old, new,
                              STUDY["student_epochs"] * STUDY["n_real"], "student at ratio 0 (300 epochs)", ran))
    return out


def _cache_rows(results: dict, proj: dict | None) -> list[dict]:
    out = []
    c = results.get("cache", {}).get("samples_member_forwards_s")
    if c:
        ks = [k.split("-m")[1] for k in c if k.startswith("ensemble-m")]
        old = " / ".join(f"{_med(c, 'ensemble-m' + k) / 1e3:.1f}k" for k in ks)
        new = " / ".join(f"{_med(c, 'members-m' + k) / 1e3:.1f}k" for k in ks)
        means = ""
        if proj:
            h, n = proj["hours"]["cache builds"], proj["counts"]
            means = (f"study: {n['member_passes_old']} member passes = {h['old_h']:.2f} h (per ensemble) -> "
                     f"{n['member_passes_new']} = {h['new_h']:.2f} h (per member)")
        out.append(_row(f"cache build m = 1 / m = {' / '.join(ks)}", f"{_med(c, 'member') / 1e3:.1f}k / {old} "
                        f"member-forwards/s stacked (old), {_med(c, 'member') / 1e3:.1f}k / {new} per member (new)",
                        means))
    e = results.get("ensemble")
    if e:
        parts = [f"m = {k[1:]}: {ratio(s, 'stacked', 'loop'):.2f}x" for k, s in e.items()]
        out.append(_row("ensemble forward stacked vs loop", ", ".join(parts), "new caches run members alone"))
    return out


def _compile_row(res: dict) -> list[dict]:
    if not res:
        return []
    mode, gain = compile_gain(res)
    s, sig = res.get("samples_img_s", {}), res.get("sigterm", {})
    bits = []
    for m, rounds in res.get("per_round", {}).items():
        if m != "eager" and rounds and s.get(m) and s.get("eager"):
            more = max(r["graphs_at_end"] - r["graphs_after_epoch_1"] for r in rounds)
            bits.append(f"{m}: compiles in {res.get('compile_s', {}).get(m, float('nan')):.0f} s, "
                        f"{ratio(s, m, 'eager'):.2f}x eager, +{more} graphs after epoch 1")
    if sig:
        bits.append(f"SIGTERM while compiling: stopped {sig['seconds_after_signal']:.0f} s later at step "
                    f"{sig.get('stopped_at_step')}" if sig.get("honoured") else "SIGTERM while compiling: NOT honoured")
    means = f"pays: {mode} mode, {gain:.2f}x" if mode else "does not pay here: eager stays the default"
    rows = [_row("`--compile=True` (student step)", "; ".join(bits) or res.get("ended", ""),
                 f"{means} ({res.get('ended', '')})")]
    pack = res.get("pack")
    if pack:
        k = pack["k"]
        if pack.get("gain"):
            rows.append(_row(f"compiled pack of {k} ({pack['arch']}, batch {pack['batch']})",
                             f"compiles in {pack['compile_s']:.0f} s, {pack['gain']:.2f}x the eager pack",
                             "pays" if pack["gain"] > 1 else "does not pay: packs stay eager"))
        else:
            rows.append(_row(f"compiled pack of {k}", "not measured",
                             pack.get("skipped") or pack.get("failed") or res.get("ended", "")))
    return rows


def _pool_row(results: dict, sizes: Sizes, r: dict | None) -> list[dict]:
    syn = results.get("synthetic", {}).get("samples_img_s")
    if not syn or not r:
        return []
    old = _med(syn, f"ddim-{sizes.pool_steps}-{sizes.gen_batch}")
    big = _med(syn, f"ddim-{sizes.pool_steps}-{sizes.gen_big_batch}")
    measured = f"{old:.0f} img/s" + (f", {big:.0f} at batch {sizes.gen_big_batch}" if big else "")
    means = f"a 50k DDIM-100 pool = {STUDY['pool'] / r['pool_img_s_old'] / MIN:.1f} min"
    if big:
        means += f", {STUDY['pool'] / r['pool_img_s_new'] / MIN:.1f} at batch {sizes.gen_big_batch}"
    return [_row(f"DDIM, {sizes.pool_steps} steps, batch {sizes.gen_batch}, {sizes.unet} UNet shape", measured,
                 means)]


def summarise(results: dict, sizes: Sizes, info: dict) -> tuple[list[dict], dict | None]:
    """(the speed table's rows, the study projection or None)."""
    from kd.bench.flops import study_flops

    r = rates(results, sizes, info["device"])
    proj = project(r, flops=study_flops(STUDY)) if r else None
    rows = [*_train_rows(results, sizes, r), *_pack_rows(results.get("packs"), proj), *_cache_rows(results, proj),
            *_compile_row(results.get("compile")), *_pool_row(results, sizes, r)]
    wall = info.get("process_seconds", info["seconds"])
    budget = (f"sections {info['seconds']:.0f} s of a {sizes.budget_s:.0f} s budget; at most 240 s: "
              + ("yes" if wall <= 240 else "NO")) if sizes.budget_s else "no budget on this device"
    if info.get("skipped"):
        budget += "; skipped to fit: " + ", ".join(info["skipped"])
    rows.append(_row(f"`python -m kd.bench --device={info['device']}`", f"{wall:.0f} s (the whole process)", budget))
    if proj:
        t, u = proj["hours"]["total"], unit(proj)
        rows.append(_row("the CIFAR-100 study, projected", f"{t['old_h']:.1f} -> {t['new_h']:.1f} {u}",
                         "old design -> new, from this run's rates (table below)"))
    return rows, proj


def _pack_rows(packs: dict | None, proj: dict | None) -> list[dict]:
    if not packs or not packs.get("k"):
        return []
    ks = list(packs["k"])
    per = packs["k"]

    def each(key: str, fmt: str) -> str:
        return " / ".join(fmt.format(per[k]["pack"][key]) for k in ks)

    measured = (f"in all {each('img_s_all', '{:.0f}')} img/s = {each('student_steps_s_all', '{:.2f}')} "
                f"student-steps/s; per member {each('img_s_member', '{:.0f}')} img/s; vs as many plain students "
                + " / ".join(f"{per[k]['gain']:.2f}x" for k in ks))
    means = f"best: k = {best_k_of(packs)}"
    if proj:
        s = proj["students"]
        means += (f"; the study's students: {s['how']}, {proj['hours']['students']['old_h']:.1f} -> "
                  f"{proj['hours']['students']['new_h']:.1f} {unit(proj)}")
        if not packs.get("stacked"):
            means += " (packs loop here: the same steps one after another, so the projection keeps runs plain)"
        elif best_pack(proj["rates"]["pack_gain"]) is None:
            means += " (no pack saves more than 3% here)"
    skipped = packs.get("skipped")
    if skipped:
        means += f"; skipped, over budget: {', '.join(skipped)}"
    return [_row(f"packs of k = {' / '.join(ks)} ({packs['how']}), {packs['arch']}, batch {packs['batch']}",
                 measured, means)]


def best_k_of(packs: dict) -> int | None:
    from kd.bench.packs import best_k

    return best_k(packs)
