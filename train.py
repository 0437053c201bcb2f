"""Train one teacher with the paper's recipe and publish it as the artifact teacher-{dataset}-{arch}-s{seed}.

    python train.py --dataset=cifar100 --arch=preresnet56 --seed=0            # the paper's teacher
    accelerate launch train.py --dataset=cifar10 --seed=3 --mixed_precision=bf16
    python train.py --dataset=digits --arch=preresnet8 --epochs=3             # offline demo size

Every setting is a --key=value flag (python train.py --help). Killed, the same command resumes. A run with a
--study publishes its teacher with the study as an alias: that study's students use exactly this version.
"""

from kd import names
from kd.config import TrainConfig, parse_flags
from kd.errors import cli
from kd.session import Session


def main(argv=None) -> None:
    with cli():
        cfg = parse_flags(TrainConfig, argv)
        session = Session(cfg, job=names.TEACHER)
        if session.already_finished("teacher"):
            return
        with session.tracked():
            from kd.data import load_dataset
            from kd.models import build_model, count_params
            from kd.objectives import Supervised

            data = load_dataset(cfg.dataset, cfg.data_dir, session.device)
            model = build_model(cfg.arch, data.spec.num_classes)
            session.check_outputs_for(model)
            acc = session.accelerator
            objective = Supervised(data, cfg.batch_size, cfg.seed, acc.process_index, acc.num_processes)
            session.start_tracking({"n_params": count_params(model), "n_train": data.n_train})
            history = session.fit(model, objective)
            final = history[-1]
            name = cfg.run_name()
            meta = {"kind": names.TEACHER, "arch": cfg.arch, "dataset": cfg.dataset, "seed": cfg.seed,
                    "num_classes": data.spec.num_classes, "test_acc": final[names.TEST_ACC],
                    "epochs": cfg.epochs, "run_id": session.run_id, "study": cfg.study, "config": session.config()}
            path = session.publish(session.model, name, "model", meta)
            session.finish({**final, names.FINAL: True})
        if session.main:
            print(f"teacher test accuracy {final[names.TEST_ACC]:.4f}")
            print(session.where())
            print(f"teacher artifact {name}: {path}")


if __name__ == "__main__":
    main()
