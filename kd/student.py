"""One student: its teachers, pool, teacher cache, objective and published result.

``distill.py`` runs one student; ``python -m kd.sweep.pack`` runs several in one process. Both call the same
functions here, between the start of the student's W&B run and its training (:func:`prepare`) and after it
(:func:`publish`), so a packed student is the plain one in every number, file and W&B key.

Teachers and pool are resolved on the main process (online through its W&B run, so W&B records the lineage:
which student used which teacher and pool versions) and loaded on every process. Every program prints the
exact teacher versions (``name:version``) and the pool it uses.
"""

from __future__ import annotations

import torch

from kd import names
from kd.errors import KDError
from kd.pools import load_pool, pool_file


def synthetic_images(cfg, data, session):
    """The run's own draw of round(r * n_real) synthetic images (:mod:`kd.draws`): sampled from
    ``--synthetic_generator`` by its seed, or its trial's block of ``--synthetic_pool``; checked against the
    dataset. (None, {}) for a real-data-only run; else (uint8 images, the config keys they add)."""
    from kd.draws import draw_seed, from_generator, from_pool

    if not cfg.synthetic_ratio:
        return None, {}
    n = round(cfg.synthetic_ratio * data.n_train)
    if cfg.synthetic_mode == "online":
        return None, online_source(cfg, data, session)
    if cfg.synthetic_generator:
        sampler, label, fids = _generator(cfg, data, session)
        images, draw = from_generator(sampler, n, draw_seed(cfg.run_seed, n), data.spec.image_size,
                                      cfg.synthetic_generator, progress=session.main)
        info = {names.SYNTHETIC_SOURCE: label, **fids}
    else:
        pool, meta = _pool(cfg, data, session)
        images, draw = from_pool(pool, meta["sha256"], n, cfg.trial, cfg.synthetic_pool)
        info = {names.SYNTHETIC_POOL_SHA: meta["sha256"], names.SYNTHETIC_SOURCE: meta.get("model", ""),
                names.SYNTHETIC_FID: meta.get("fid")}
    if session.main:
        print(f"synthetic: {n} images, {draw['kind']} of {draw['source']}, sha256 {draw['sha256'][:12]}", flush=True)
    return images, {**info, names.SYNTHETIC_DRAW: draw}


def online_source(cfg, data, session) -> dict:
    """The config keys of an online run's sampling (:mod:`kd.online_synthetic`), the sampler under ``"_fresh"``:
    n_synthetic is the static amount round(s * n_real) with the same batch split (the report's x axis)."""
    import hashlib
    import json

    from kd.online_synthetic import FreshSamples, online_seed, online_split

    sampler, label, fids = _generator(cfg, data, session)
    seed, (_, per_step) = online_seed(cfg.run_seed), online_split(cfg.batch_size, cfg.synthetic_ratio)
    bn = cfg.synthetic_generator_bn if sampler.kind == "sngan" else "none"
    draw = {"kind": "online", "source": cfg.synthetic_generator, "seed": seed, "per_step": per_step,
            "generator_bn": bn, "sampler": sampler.identity()}
    draw["sha256"] = hashlib.sha256(json.dumps(draw, sort_keys=True).encode()).hexdigest()
    if session.main:
        print(f"synthetic: online, {per_step} fresh images of {label} per step of {cfg.batch_size} (BatchNorm {bn})",
              flush=True)
    fresh = FreshSamples(sampler, seed, bn, data.spec.image_size)
    return {names.SYNTHETIC_SOURCE: label, **fids, names.SYNTHETIC_DRAW: draw,
            "_n": round(cfg.synthetic_ratio * data.n_train), "_fresh": fresh}


def _pool(cfg, data, session):
    file = session.main_first(lambda: str(pool_file(cfg.synthetic_pool, cfg.store, session.tracker.run)))
    images, meta = load_pool(file, store=cfg.store)
    classes = meta.get("num_classes", data.spec.num_classes)
    if meta.get("dataset") != cfg.dataset or classes != data.spec.num_classes:
        made = f"{meta['dataset']} ({classes} classes)" if meta.get("dataset") else "no recorded dataset"
        raise KDError(f"pool {cfg.synthetic_pool} was generated for {made}, not {cfg.dataset} "
                      f"({data.spec.num_classes} classes): generate a pool with --dataset={cfg.dataset}")
    want = (3, data.spec.image_size, data.spec.image_size)
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != want:
        raise KDError(f"pool {cfg.synthetic_pool} holds {images.dtype} images of shape {tuple(images.shape[1:])}, "
                      f"but {cfg.dataset} needs uint8 {want}: generate a pool with --dataset={cfg.dataset}")
    return images, meta


def _generator(cfg, data, session):
    """The sampler of ``--synthetic_generator`` (``NAME@stepN``: an SN-GAN's snapshot at G step N), resolved on the
    main process (online through the W&B run: lineage), its label and FID for the report."""
    from types import SimpleNamespace

    from kd.generators import load_sampler
    from kd.generators.sampling import model_path

    ref, mark, step = cfg.synthetic_generator.partition(names.STEP_MARK)
    if mark and not step.isdigit():
        raise KDError(f"--synthetic_generator={cfg.synthetic_generator}: write NAME{names.STEP_MARK}N with N a G step")
    folder = session.main_first(lambda: str(model_path(ref, cfg.store, session.tracker.run, cfg.dataset)))
    settings = SimpleNamespace(dataset=cfg.dataset, scheduler="ddim", steps="auto", step=int(step or 0),
                               model_ref=lambda: ref)
    sampler = load_sampler(folder, settings, session.device, store=cfg.store)
    if sampler.kind != "sngan" and session.main and cfg.synthetic_mode == "online":
        print(f"note: {ref} is a {sampler.kind} generator: online, every step runs its whole reverse process (slow; "
              "an SN-GAN is one forward pass)", flush=True)
    elif sampler.kind != "sngan" and session.main:
        print(f"note: {ref} is a {sampler.kind} generator: every run samples its own images from it (slow for a "
              "diffusion model); a pool (--synthetic_pool) is made once", flush=True)
    meta = getattr(sampler, "info", {}) or {}
    return sampler, cfg.synthetic_generator, {names.SYNTHETIC_FID: meta.get("fid"),
                                              names.SYNTHETIC_FID_AUTHORS: meta.get("authors_fid")}


def room(cfg, data, model) -> int:
    """The disk a student needs at its largest moment (:func:`kd.session.room_needed`), its teachers' cache files
    (float32 at most, one per member) included."""
    from kd.models import count_params
    from kd.session import room_needed
    from kd.teacher_cache import cache_bytes

    members = len(cfg.teacher_names()) or cfg.ensemble_size
    cache = members * cache_bytes(data, data.spec.num_classes, torch.float32) if cfg.teacher_cache else 0
    return room_needed(count_params(model), cache)


def inputs(cfg, session, data):
    """Teachers and pool (checked against a resumed run's), and the config keys they add."""
    from kd.teachers import choose_teachers, load_teachers, resolve_teachers, study_alias

    run, alias = session.tracker.run, study_alias(cfg)
    teachers = session.main_first(lambda: choose_teachers(cfg, run))
    folders = session.main_first(lambda: resolve_teachers(teachers, alias, run, cfg.store))
    members, metas = load_teachers(teachers, folders, data, device=session.device)
    versions = [f"{t}:{_version(f)}" for t, f in zip(teachers, folders)]
    if session.main:
        print("teachers: " + ", ".join(versions), flush=True)
    synthetic, syn_info = synthetic_images(cfg, data, session)
    fresh, n_online = syn_info.pop("_fresh", None), syn_info.pop("_n", 0)
    hashes = [m["sha256"] for m in metas]
    session.folder.check_inputs({"teacher_hashes": hashes,
                                 "synthetic_pool_sha256": syn_info.get(names.SYNTHETIC_POOL_SHA),
                                 "synthetic_draw_sha256": syn_info.get(names.SYNTHETIC_DRAW, {}).get("sha256")})
    extra = {names.TEACHER_NAMES: teachers, names.TEACHER_HASHES: hashes, names.TEACHER_VERSIONS: versions,
             "n_real": data.n_train, "n_synthetic": n_online if synthetic is None else len(synthetic), **syn_info}
    return members, fresh if fresh is not None else synthetic, extra


def _version(folder) -> str:
    """``v3`` of a store folder ``.../teacher-.../v3`` (online: ``wandb-v3``)."""
    from pathlib import Path

    return Path(folder).name.removeprefix("wandb-")


def teacher_targets(cfg, session, ensemble, data, hashes, resident=None):
    """The exact cache of teacher outputs over every view (None with --teacher_cache=False); given ``resident``
    (a :class:`kd.teacher_cache.ResidentTeachers` shared by a pack's students), read from its teachers' tensors."""
    from kd.artifacts import store_root
    from kd.teacher_cache import cached_targets, member_targets

    if not cfg.teacher_cache:
        return None
    root, dtype, acc = store_root(cfg.store) / "_cache", getattr(torch, cfg.cache_dtype), session.accelerator
    built = False
    if acc.num_processes > 1 and resident is None:  # the main process builds each member's file (one at a time, so
        for member, h in zip(ensemble.members, hashes):  # that no process waits long at a barrier); then all load them
            built |= session.main_first(lambda m=member, h=h: member_targets(m, h, data, root, dtype, acc.autocast)[2])
    read = cached_targets if resident is None else resident.targets
    cache, path, made = read(ensemble, data, hashes, root, dtype, acc.autocast, main=session.main)
    built = built or made
    if session.main:
        print(f"teacher cache ({'built' if built else 'reused'}, {cfg.cache_dtype}, "
              f"{cache.numel() * cache.element_size() / 2**20:.1f} MiB): {path}", flush=True)
    return cache


def prepare(cfg, session, data, model, resident=None):
    """Teachers, pool, W&B config, cache and objective of one student, its W&B run started (online it starts
    first: teachers and pool are resolved through it); ``resident``: the pack's shared teacher caches
    (:func:`teacher_targets`). Returns (objective, extra config)."""
    from kd.models import Ensemble, count_params, weights_sha256
    from kd.objectives import Distill

    if session.mode == "online":
        from kd.teachers import check_online, study_alias

        if cfg.teacher_names() or cfg.teacher_pool:  # known without listing: checked before anything is written
            from kd.teachers import choose_teachers

            named = choose_teachers(cfg)
            session.main_first(lambda: check_online(named, study_alias(cfg), cfg.project))
        session.start_tracking()
    members, synthetic, extra = inputs(cfg, session, data)
    extra["n_params"] = count_params(model)
    extra[names.INIT_SHA] = weights_sha256(model)  # before any step: the weights its seed drew
    if session.mode == "online":
        session.add_config(extra)
    else:
        session.start_tracking(extra)
    ensemble = Ensemble(members).to(session.device)
    cache = teacher_targets(cfg, session, ensemble, data, extra[names.TEACHER_HASHES], resident)
    if cfg.synthetic_mode == "online" and synthetic is not None:
        from kd.online_synthetic import OnlineDistill

        objective = OnlineDistill(cfg, data, ensemble, synthetic, cache, session.accelerator)
    else:
        objective = Distill(cfg, data, ensemble, synthetic, cache, session.accelerator)
    if session.ckpt:  # the teacher's accuracy is logged once, with the first evaluation
        objective.teacher_acc_logged = any(names.TEACHER_ACC in r for r in session.ckpt["history"])
    return objective, extra


def publish(cfg, session, model, objective, history, extra):
    """The student artifact and the final summary (then done.json). Returns (final metrics, artifact path)."""
    final = {k: v for row in history for k, v in row.items()}  # last value of every key
    meta = {"kind": names.STUDENT, "arch": cfg.arch, "dataset": cfg.dataset, "seed": cfg.student_seed,
            "num_classes": objective.data.spec.num_classes, "test_acc": final[names.TEST_ACC],
            "test_agreement": final[names.TEST_AGREEMENT], "teachers": extra[names.TEACHER_NAMES],
            "run_id": session.tracker.run_id, "study": cfg.study, "config": session.config()}
    path = session.publish_weights(model, cfg.run_name(), "model", meta)
    session.finish({**final, names.TEACHER_ACC: objective.teacher_acc, names.N_REAL: extra["n_real"],
                    names.N_SYNTHETIC: extra["n_synthetic"], names.FINAL: True})
    return final, path


def report(cfg, session, objective, final, path) -> None:
    if session.main:
        print(f"{cfg.run_name()}: student test acc {final[names.TEST_ACC]:.4f}, agreement "
              f"{final[names.TEST_AGREEMENT]:.4f}, KL {final[names.TEST_KL]:.4f} (teacher acc "
              f"{objective.teacher_acc:.4f})", flush=True)
        print(session.tracker.where(), flush=True)
        print(f"student artifact {cfg.run_name()}: {path}", flush=True)
