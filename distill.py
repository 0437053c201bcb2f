"""Distil a student from one teacher or an ensemble, optionally with extra synthetic images.

    python distill.py --dataset=cifar100 --ensemble_size=3 --trial=0                     # the paper's student
    python distill.py --dataset=cifar10 --synthetic_ratio=0.5 \\
        --synthetic_pool=synthetic-cifar10-ddpm-cifar10-32                              # + 25k synthetic images
    accelerate launch distill.py --teachers=teacher-cifar10-preresnet56-s0,teacher-cifar10-preresnet56-s1

Logs test accuracy (generalization) and test agreement / predictive KL (fidelity) to W&B and publishes the
student as the artifact student-.... Every setting is a --key=value flag (python distill.py --help).
Killed, the same command resumes, and refuses to if its teachers or pool changed in between. A student of a
--study uses that study's teachers (artifact alias = the study), whatever was published later. What a student
needs (teachers, pool, cache, objective, publishing) is kd.student, which packed runs share.
"""

from kd import names, student
from kd.config import DistillConfig
from kd.errors import cli
from kd.flags import parse_flags
from kd.session import Session


def main(argv=None) -> None:
    with cli():
        cfg = parse_flags(DistillConfig, argv)
        session = Session(cfg, job=names.STUDENT)
        if session.already_finished():
            return
        with session.tracked():
            from kd.data import load_dataset
            from kd.models import build_model, to_device
            from kd.optim import optimizer

            data = load_dataset(cfg.dataset, cfg.data_dir, session.device)
            model = to_device(build_model(cfg.arch, data.spec.num_classes), session.device, cfg.channels_last)
            session.check_outputs(student.room(cfg, data, model))
            objective, extra = student.prepare(cfg, session, data, model)
            history = session.fit(model, optimizer(model.parameters(), cfg), objective)
            final, path = student.publish(cfg, session, session.model, objective, history, extra)
        student.report(cfg, session, objective, final, path)


if __name__ == "__main__":
    main()
