"""Distil a student from one teacher or an ensemble, optionally with extra synthetic images.

    python distill.py --dataset=cifar100 --ensemble_size=3 --trial=0                     # the paper's student
    python distill.py --dataset=cifar10 --synthetic_ratio=0.5 \\
        --synthetic_pool=synthetic-cifar10-ddpm-cifar10-32                              # + 25k synthetic images
    accelerate launch distill.py --teachers=teacher-cifar10-preresnet56-s0,teacher-cifar10-preresnet56-s1

Logs test accuracy (generalization) and test agreement / predictive KL (fidelity) to W&B and publishes the
student as the artifact student-.... Every setting is a --key=value flag (python distill.py --help).
Killed, the same command resumes.
"""

from kd import names
from kd.config import DistillConfig, parse_flags
from kd.engine import Session
from kd.errors import KDError, cli


def load_synthetic(cfg, data, run=None):
    """The first round(r * n_real) images of the pool, checked against the dataset's image shape."""
    import torch

    if cfg.synthetic_ratio == 0:
        return None, {}
    if not cfg.synthetic_pool:
        raise KDError(
            f"--synthetic_ratio={cfg.synthetic_ratio} needs --synthetic_pool=FILE_OR_ARTIFACT: make one with "
            f"`python -m kd.synthetic generate --dataset={cfg.dataset} --num=N` (see README, synthetic data)"
        )
    from kd.synthetic import load_pool

    images, meta = load_pool(cfg.synthetic_pool, store=cfg.store, run=run)
    want = (3, data.spec.image_size, data.spec.image_size)
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != want:
        raise KDError(f"pool {cfg.synthetic_pool} holds {images.dtype} images of shape {tuple(images.shape[1:])}, "
                      f"but {cfg.dataset} needs uint8 {want}: generate a pool with --dataset={cfg.dataset}")
    n = round(cfg.synthetic_ratio * data.n_train)
    if n > images.shape[0]:
        raise KDError(f"--synthetic_ratio={cfg.synthetic_ratio} needs {n} synthetic images but the pool "
                      f"{cfg.synthetic_pool} has {images.shape[0]}: generate a larger pool (--num={n} or more)")
    return images[:n], {names.SYNTHETIC_POOL_SHA: meta.get("sha256", ""), names.SYNTHETIC_SOURCE: meta.get("model", "")}


def main(argv=None) -> None:
    with cli():
        cfg = parse_flags(DistillConfig, argv)
        session = Session(cfg, job="student")
        if session.finished and str(cfg.resume) == "auto":
            print(f"already finished: {session.run_dir} (student artifact {session.done_info()['artifact']}); "
                  "pass --resume=False to distil again")
            return
        import torch

        from kd.artifacts import store_root
        from kd.data import load_dataset
        from kd.models import Ensemble, build_model, count_params
        from kd.objectives import Distill
        from kd.teacher_cache import cached_targets
        from kd.teachers import choose_teachers, load_teachers

        acc = session.accelerator
        data = load_dataset(cfg.dataset, cfg.data_dir, session.device)
        online = session.mode == "online"
        if online:  # resolve teachers through the run, so W&B records the lineage
            session.start_tracking()
        teachers = choose_teachers(cfg, online_project=cfg.project if online else None)
        members, metas = load_teachers(teachers, data, run=session.run, store=cfg.store, device=session.device)
        synthetic, syn_info = load_synthetic(cfg, data, run=session.run)
        model = build_model(cfg.arch, data.spec.num_classes)
        extra = {names.TEACHER_NAMES: teachers, names.TEACHER_HASHES: [m["sha256"] for m in metas],
                 "n_real": data.n_train, "n_synthetic": 0 if synthetic is None else len(synthetic),
                 "n_params": count_params(model), **syn_info}
        if online:
            session.extra_config = extra
            session.run.config.update(extra, allow_val_change=True)
        else:
            session.start_tracking(extra)

        ensemble = Ensemble(members).to(session.device)
        cache = None
        if cfg.teacher_cache:
            dtype = getattr(torch, cfg.cache_dtype)
            cache, path, built = cached_targets(ensemble, data, extra[names.TEACHER_HASHES],
                                                store_root(cfg.store) / "_cache", dtype, acc.autocast,
                                                main=session.main)
            if session.main:
                print(f"teacher cache ({'built' if built else 'reused'}, {cfg.cache_dtype}, "
                      f"{cache.numel() * cache.element_size() / 2**20:.1f} MiB): {path}", flush=True)
        objective = Distill(data, ensemble, cfg.batch_size, cfg.temperature, cfg.student_seed, synthetic,
                            cache, acc.autocast, acc.process_index, acc.num_processes)
        if session.ckpt:
            objective._logged_teacher = any("teacher/test_acc" in r for r in session.ckpt["history"])
        try:
            history = session.fit(model, objective)
            final = {k: v for row in history for k, v in row.items()}  # last value of every key
            name = cfg.run_name()
            meta = {"kind": "student", "arch": cfg.arch, "dataset": cfg.dataset, "seed": cfg.student_seed,
                    "num_classes": data.spec.num_classes, "test_acc": final[names.TEST_ACC],
                    "test_agreement": final[names.TEST_AGREEMENT], "teachers": teachers, "run_id": session.run_id,
                    "config": session.config()}
            path = session.publish(session.model, name, "model", meta)
            session.summary({**final, names.TEACHER_ACC: objective.teacher_acc, names.N_REAL: extra["n_real"],
                             names.N_SYNTHETIC: extra["n_synthetic"], names.FINAL: True})
        finally:
            session.end()
        if session.main:
            print(f"student test acc {final[names.TEST_ACC]:.4f}, agreement {final[names.TEST_AGREEMENT]:.4f}, "
                  f"KL {final[names.TEST_KL]:.4f} (teacher acc {objective.teacher_acc:.4f})")
            print(session.where())
            print(f"student artifact {name}: {path}")


if __name__ == "__main__":
    main()
