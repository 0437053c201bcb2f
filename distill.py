"""Distil a student from one teacher or an ensemble, optionally with extra synthetic images.

    python distill.py --dataset=cifar100 --ensemble_size=3 --trial=0                     # the paper's student
    python distill.py --dataset=cifar10 --synthetic_ratio=0.5 \\
        --synthetic_pool=synthetic-cifar10-ddpm-cifar10-32                              # + 25k synthetic images
    accelerate launch distill.py --teachers=teacher-cifar10-preresnet56-s0,teacher-cifar10-preresnet56-s1

Logs test accuracy (generalization) and test agreement / predictive KL (fidelity) to W&B and publishes the
student as the artifact student-.... Every setting is a --key=value flag (python distill.py --help).
Killed, the same command resumes, and refuses to if its teachers or pool changed in between. A student of a
--study uses that study's teachers (artifact alias = the study), whatever was published later.
"""

from kd import names
from kd.config import DistillConfig, parse_flags
from kd.engine import Session
from kd.errors import NAME_RE, KDError, cli


def pool_location(cfg, run=None) -> str:
    """The pool file or folder of --synthetic_pool (an artifact name is resolved: online, downloaded)."""
    from pathlib import Path

    from kd.artifacts import resolve

    ref = cfg.synthetic_pool
    if Path(ref).expanduser().exists() or not NAME_RE.match(ref) or ".." in ref or ref.endswith(".safetensors"):
        return ref
    hint = (": create it with `python -m kd.synthetic generate --dataset=... --model=...`, "
            "or pass a pool file or folder")
    return str(resolve(ref, run=run, store=cfg.store, kind="synthetic pool", hint=hint))


def load_synthetic(cfg, data, location: str | None):
    """The first round(r * n_real) images of the pool, checked against the dataset's image shape."""
    import torch

    if location is None:
        return None, {}
    from kd.synthetic import load_pool

    images, meta = load_pool(location, store=cfg.store)
    want = (3, data.spec.image_size, data.spec.image_size)
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != want:
        raise KDError(f"pool {cfg.synthetic_pool} holds {images.dtype} images of shape {tuple(images.shape[1:])}, "
                      f"but {cfg.dataset} needs uint8 {want}: generate a pool with --dataset={cfg.dataset}")
    n = round(cfg.synthetic_ratio * data.n_train)
    if n > images.shape[0]:
        raise KDError(f"--synthetic_ratio={cfg.synthetic_ratio} needs {n} synthetic images but the pool "
                      f"{cfg.synthetic_pool} has {images.shape[0]}: generate a larger pool (--num={n} or more)")
    return images[:n], {names.SYNTHETIC_POOL_SHA: meta.get("sha256", ""),
                        names.SYNTHETIC_SOURCE: meta.get("model", ""), names.SYNTHETIC_FID: meta.get("fid")}


def inputs(cfg, session, data):
    """Teachers and pool, resolved on the main process (online: through its W&B run) and loaded everywhere."""
    from kd.teachers import choose_teachers, load_teachers, resolve_teachers, study_alias

    if cfg.synthetic_ratio and not cfg.synthetic_pool:
        raise KDError(
            f"--synthetic_ratio={cfg.synthetic_ratio} needs --synthetic_pool=FILE_OR_ARTIFACT: make one with "
            f"`python -m kd.synthetic generate --dataset={cfg.dataset} --num=N` (see README, synthetic data)"
        )
    run, alias = session.run, study_alias(cfg)
    teachers = session.main_first(lambda: choose_teachers(cfg, run))
    folders = session.main_first(lambda: resolve_teachers(teachers, alias, run, cfg.store))
    members, metas = load_teachers(teachers, folders, data, device=session.device)
    location = session.main_first(lambda: pool_location(cfg, run)) if cfg.synthetic_ratio else None
    synthetic, syn_info = load_synthetic(cfg, data, location)
    hashes = [m["sha256"] for m in metas]
    session.check_inputs({"teacher_hashes": hashes, "synthetic_pool_sha256": syn_info.get(names.SYNTHETIC_POOL_SHA)})
    extra = {names.TEACHER_NAMES: teachers, names.TEACHER_HASHES: hashes, "n_real": data.n_train,
             "n_synthetic": 0 if synthetic is None else len(synthetic), **syn_info}
    return members, synthetic, extra


def teacher_targets(cfg, session, ensemble, data, hashes):
    """The exact cache of teacher outputs over every view (None with --teacher_cache=False)."""
    import torch

    from kd.artifacts import store_root
    from kd.teacher_cache import cached_targets

    if not cfg.teacher_cache:
        return None
    cache, path, built = cached_targets(ensemble, data, hashes, store_root(cfg.store) / "_cache",
                                        getattr(torch, cfg.cache_dtype), session.accelerator.autocast,
                                        main=session.main)
    if session.main:
        print(f"teacher cache ({'built' if built else 'reused'}, {cfg.cache_dtype}, "
              f"{cache.numel() * cache.element_size() / 2**20:.1f} MiB): {path}", flush=True)
    return cache


def student_objective(cfg, session, data, model):
    """Teachers, pool, W&B config and the objective of one student: the steps between its W&B run's start
    and training (``python -m kd.sweep.pack`` runs the same for each member of a pack). Returns (objective, extra)."""
    from kd.models import Ensemble, count_params
    from kd.objectives import Distill

    members, synthetic, extra = inputs(cfg, session, data)
    extra["n_params"] = count_params(model)
    if session.mode == "online":
        session.extra_config = extra
        session.run.config.update(extra, allow_val_change=True)
    else:
        session.start_tracking(extra)
    ensemble = Ensemble(members).to(session.device)
    cache = teacher_targets(cfg, session, ensemble, data, extra[names.TEACHER_HASHES])
    acc = session.accelerator
    objective = Distill(data, ensemble, cfg.batch_size, cfg.temperature, cfg.student_seed, synthetic,
                        cache, acc.autocast, acc.process_index, acc.num_processes)
    if session.ckpt:
        objective._logged_teacher = any(names.TEACHER_ACC in r for r in session.ckpt["history"])
    return objective, extra


def publish_student(cfg, session, model, objective, history, extra):
    """The student artifact and the final summary (then done.json). Returns (final metrics, artifact path)."""
    final = {k: v for row in history for k, v in row.items()}  # last value of every key
    meta = {"kind": names.STUDENT, "arch": cfg.arch, "dataset": cfg.dataset, "seed": cfg.student_seed,
            "num_classes": objective.data.spec.num_classes, "test_acc": final[names.TEST_ACC],
            "test_agreement": final[names.TEST_AGREEMENT], "teachers": extra[names.TEACHER_NAMES],
            "run_id": session.run_id, "study": cfg.study, "config": session.config()}
    path = session.publish(model, cfg.run_name(), "model", meta)
    session.finish({**final, names.TEACHER_ACC: objective.teacher_acc, names.N_REAL: extra["n_real"],
                    names.N_SYNTHETIC: extra["n_synthetic"], names.FINAL: True})
    return final, path


def main(argv=None) -> None:
    with cli():
        cfg = parse_flags(DistillConfig, argv)
        session = Session(cfg, job=names.STUDENT)
        if session.finished and str(cfg.resume) == "auto":
            print(f"already finished: {session.run_dir} (student artifact {session.done_info()['artifact']}); "
                  "pass --resume=False to distil again")
            session.report_finished()
            return
        from kd.data import load_dataset
        from kd.models import build_model, count_params

        data = load_dataset(cfg.dataset, cfg.data_dir, session.device)
        model = build_model(cfg.arch, data.spec.num_classes)
        session.check_outputs(need_bytes=3 * 4 * count_params(model))
        if session.mode == "online":  # teachers and pool are resolved through the run, so W&B records the lineage
            session.start_tracking()
        with session.tracked():
            objective, extra = student_objective(cfg, session, data, model)
            history = session.fit(model, objective)
            final, path = publish_student(cfg, session, session.model, objective, history, extra)
        if session.main:
            print(f"student test acc {final[names.TEST_ACC]:.4f}, agreement {final[names.TEST_AGREEMENT]:.4f}, "
                  f"KL {final[names.TEST_KL]:.4f} (teacher acc {objective.teacher_acc:.4f})")
            print(session.where())
            print(f"student artifact {cfg.run_name()}: {path}")


if __name__ == "__main__":
    main()
