"""Train one teacher with the paper's recipe and publish it as the artifact teacher-{dataset}-{arch}-s{seed}.

    python train.py --dataset=cifar100 --arch=preresnet56 --seed=0            # the paper's teacher
    accelerate launch train.py --dataset=cifar10 --seed=3 --mixed_precision=bf16
    python train.py --dataset=digits --arch=preresnet8 --epochs=3             # offline demo size

Every setting is a --key=value flag (python train.py --help). Killed, the same command resumes. A run with a
--study publishes its teacher with the study as an alias: that study's students use exactly this version.
"""

from kd import names
from kd.config import TrainConfig
from kd.errors import cli
from kd.flags import parse_flags
from kd.session import Session, room_needed


def main(argv=None) -> None:
    with cli():
        cfg = parse_flags(TrainConfig, argv)
        session = Session(cfg, job=names.TEACHER)
        if session.already_finished():
            return
        with session.tracked():
            from kd.data import load_dataset
            from kd.models import build_model, count_params, to_device, weights_sha256
            from kd.objectives import Supervised
            from kd.optim import optimizer

            data = load_dataset(cfg.dataset, cfg.data_dir, session.device)
            model = to_device(build_model(cfg.arch, data.spec.num_classes), session.device, cfg.channels_last)
            session.check_outputs(room_needed(count_params(model)))
            objective = Supervised.from_config(cfg, data, session.accelerator)
            session.start_tracking({"n_params": count_params(model), "n_train": data.n_train,
                                    names.INIT_SHA: weights_sha256(model)})
            history = session.fit(model, optimizer(model.parameters(), cfg), objective)
            final = history[-1]
            meta = {"kind": names.TEACHER, "arch": cfg.arch, "dataset": cfg.dataset, "seed": cfg.seed,
                    "num_classes": data.spec.num_classes, "test_acc": final[names.TEST_ACC],
                    "epochs": cfg.epochs, "run_id": session.tracker.run_id, "study": cfg.study,
                    "config": session.config()}
            path = session.publish_weights(session.model, cfg.run_name(), "model", meta)
            session.finish({**final, names.FINAL: True})
        if session.main:
            print(f"teacher test accuracy {final[names.TEST_ACC]:.4f}")
            print(session.tracker.where())
            print(f"teacher artifact {cfg.run_name()}: {path}")


if __name__ == "__main__":
    main()
