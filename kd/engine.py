"""One Accelerate training loop for teachers and students: they differ in targets and loss, not machinery.

A :class:`Session` owns the Accelerator, the W&B run (through Accelerate's tracker), the run folder and its
checkpoints. An *objective* (:mod:`kd.objectives`) owns the data and the loss:

    objective.steps(epoch) -> int                       steps in that epoch
    objective.batches(epoch, start) -> iterator[dict]   batches from step ``start`` on; ``batch["x"]`` is the input
    objective.loss(logits, batch) -> (loss, sums)       sums: additive epoch statistics (e.g. {"n": B, ...})
    objective.epoch_metrics(sums) -> dict               e.g. {"train/loss": ...}
    objective.evaluate(model) -> dict                   clean test-set metrics

Run folder ``{out_dir}/{run_name}-{fingerprint}/``: ``checkpoint.json`` points at the newest
``ckpt-K.safetensors`` (:mod:`kd.checkpoint`); ``done.json`` marks a finished run; ``run.json`` holds the W&B
run id from the start (a run killed before its first checkpoint continues the same W&B run). The per-epoch
randomness depends on (seed, epoch) only, so a resumed run continues exactly (bitwise on CPU). W&B steps
are epochs; a resumed run re-logs only the checkpointed epochs W&B has not seen, so no step is logged twice.
SIGTERM or SIGINT: a checkpoint at the next step, then :class:`~kd.errors.Interrupted` (exit 143 / 130).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kd import artifacts, faults, names, wandb_runs
from kd.accel import compile_model
from kd.checkpoint import Checkpoints, pack, unpack
from kd.config import to_dict
from kd.errors import Interrupted, KDError, stop_requests
from kd.io import check_folder, read_json, save_weights, write_json

CKPT_KEYS = ("file", "sha256", "epoch", "step", "run_id", "fingerprint", "history", "param_groups")


def cosine_lr(epoch: int, epochs: int, lr: float, eta_min: float) -> float:
    """Cosine annealing stepped once per epoch (epoch is 0-based): lr at epoch 0, eta_min after the last."""
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


class Session:
    def __init__(self, cfg, job: str):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg, self.job = cfg, job
        self.mode = wandb_runs.wandb_mode()
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu,
                                       log_with=None if self.mode == "disabled" else "wandb")
        self.device = self.accelerator.device
        self.main = self.accelerator.is_main_process
        self.run_dir = Path(cfg.out_dir) / f"{cfg.run_name()}-{cfg.fingerprint()}"
        self.checkpoints = Checkpoints(self.run_dir, required=CKPT_KEYS)
        self.ckpt: dict | None = None
        self.run = None
        self.extra_config: dict = {}
        self.extra_state: dict = {}
        self.inputs: dict = {}
        self.run_id = ""
        self._ended = False
        self._published: dict = {}
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True
        set_seed(getattr(cfg, "student_seed", cfg.seed), device_specific=False)
        self._load_resume_state()

    # ----------------------------------------------------------------------------------------- state
    @property
    def finished(self) -> bool:
        return (self.run_dir / "done.json").exists()

    def done_info(self) -> dict:
        return read_json(self.run_dir / "done.json")

    def _load_resume_state(self) -> None:
        resume = str(self.cfg.resume)
        if self.main:
            self.checkpoints.clean()
            Checkpoints(self.run_dir / "final").clean()
        if resume == "False":
            if self.main:
                self.checkpoints.clear()
                for p in (self.run_dir / "done.json", self.run_dir / "run.json"):
                    p.unlink(missing_ok=True)
            self.accelerator.wait_for_everyone()
            return
        if self.finished and resume == "auto":
            return  # the entry points report the finished run; its last checkpoint is not needed
        fix = f"pass --resume=False to train this run from scratch (or restore the file); run folder {self.run_dir}"
        self.ckpt = self.checkpoints.load(fix)
        if self.ckpt and self.ckpt.get("fingerprint") != self.cfg.fingerprint():
            raise KDError(f"{self.checkpoints.pointer} belongs to another configuration: remove {self.run_dir} "
                          "or pass --resume=False to start over")
        if self.ckpt is None and resume == "True":
            raise KDError(f"--resume=True but there is no checkpoint in {self.run_dir}: run without --resume "
                          "to start (the default --resume=auto continues a checkpoint when one exists)")

    def save_checkpoint(self, model, optimizer, epoch: int, step: int, sums: dict, history: list) -> None:
        """Model + optimizer as safetensors; position, stats and history in the pointer JSON (atomic)."""
        if not self.main:
            return
        tensors, info = pack(self.accelerator.unwrap_model(model), optimizer)
        self.ckpt = self.checkpoints.save(tensors, {
            **info, "epoch": epoch, "step": step, "sums": sums, "history": history, "run_id": self.run_id,
            "fingerprint": self.cfg.fingerprint(), "extra": self.extra_state, "inputs": self.inputs})

    def check_inputs(self, inputs: dict) -> None:
        """A resumed run must see the inputs it was checkpointed with (e.g. the teachers' and the pool's sha256):
        a teacher republished between a stop and the rerun would switch the targets mid-run."""
        self.inputs = inputs
        before = (self.ckpt or {}).get("inputs")
        if before is not None and before != inputs:
            changed = ", ".join(sorted(k for k in {**before, **inputs} if before.get(k) != inputs.get(k)))
            raise KDError(f"the inputs of {self.run_dir} changed since its checkpoint ({changed}: a teacher or pool "
                          "was republished?): restore them, or pass --resume=False to start over")

    def check_outputs(self, need_bytes: int = 0) -> None:
        """Every folder this run will write is a writable folder with room, checked before any work or W&B run."""
        check_folder(self.cfg.out_dir, "--out_dir", need_bytes)
        check_folder(artifacts.store_root(self.cfg.store), "the artifact store (--store or $KD_STORE)", need_bytes)
        if self.mode != "disabled":
            check_folder(wandb_runs.wandb_dir() or ".", "the W&B folder ($WANDB_DIR, else the current folder)")

    def main_first(self, fn):
        """``fn()`` on the main process only (it may download through the W&B run there), its result handed to
        every process; an error there is raised on every process."""
        if self.accelerator.num_processes == 1:
            return fn()
        value = None
        if self.main:
            try:
                value = ("ok", fn())
            except KDError as e:
                value = ("error", str(e))
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            value = broadcast_object_list([value])[0]
        if value[0] == "error":
            raise KDError(value[1])
        return value[1]

    def restore(self, model, optimizer) -> None:
        unpack(self.checkpoints.tensors(str(self.device)), self.ckpt, self.accelerator.unwrap_model(model),
               optimizer)

    # ----------------------------------------------------------------------------------------- W&B
    def start_tracking(self, extra_config: dict | None = None) -> None:
        self.extra_config = extra_config or {}
        self.run_id = self._run_id()
        if self.main:
            print(wandb_runs.announce_mode(self.mode), flush=True)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / "run.json", {"run_id": self.run_id})  # before W&B sees it: a run cut off
            write_json(self.run_dir / "config.json", self.config())  # before its first checkpoint keeps its id
        self._init_run()

    def _init_run(self) -> None:
        if self.mode == "disabled":
            return
        import wandb

        try:
            self.accelerator.init_trackers(
                self.cfg.project,
                config=unlocked(self.config()),
                init_kwargs={"wandb": {
                    "id": self.run_id, "resume": "allow", "name": self.cfg.run_name(), "group": self.cfg.study,
                    "job_type": names.JOB_TYPES.get(self.job, self.job), "mode": self.mode,
                    "tags": [self.job, self.cfg.dataset, self.cfg.arch], "reinit": "finish_previous",
                }},
            )
        except (wandb.errors.Error, ValueError, OSError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise KDError(f"cannot start the W&B run in project {self.cfg.project} ({why}): check `wandb login`, "
                          "the project name and the network, or run offline with WANDB_MODE=offline") from None
        if self.main:
            self.run = self.accelerator.get_tracker("wandb", unwrap=True)

    def _run_id(self) -> str:
        """The checkpoint's run id, else the one this run folder already started W&B with, else a new one."""
        if self.ckpt:
            return self.ckpt["run_id"]
        if (self.run_dir / "run.json").exists():
            return read_json(self.run_dir / "run.json")["run_id"]
        return os.environ.get("WANDB_RUN_ID") or wandb_runs.new_run_id()

    def config(self) -> dict:
        return {**to_dict(self.cfg), names.JOB: self.job, names.RUN_NAME: self.cfg.run_name(), **self.extra_config}

    def last_logged_step(self) -> int:
        """The highest W&B step this run already holds (0 if none), asked of W&B itself."""
        return wandb_runs.last_logged_step(self.run, self.mode)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.accelerator.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def where(self) -> str:
        if self.run is None:
            return "W&B: disabled"
        return f"W&B run {self.run_id} ({self.mode}): {Path(self.run.dir).parent}"

    def end(self, exit_code: int = 0) -> None:
        """Finish the W&B run (waits for its uploads); idempotent. A stopped run is marked preempting first, so
        W&B's agent (and ``python -m kd.sweep``) reruns it and it resumes."""
        if self._ended:
            return
        self._ended = True
        if self.run is not None and exit_code:
            if exit_code in (130, 143):
                self.run.mark_preempting()
            self.run.finish(exit_code=exit_code)
        if self.mode != "disabled":
            self.accelerator.end_training()

    @contextlib.contextmanager
    def tracked(self):
        """Around everything after ``start_tracking``: the W&B run ends with the process's fate (stopped: marked
        preempting, exit 143/130; failed: exit 1; else finished)."""
        try:
            yield
        except Interrupted as e:
            self.end(128 + e.signum)
            raise
        except BaseException:
            self.end(1)
            raise
        finally:
            self.end()

    def finish(self, summary: dict) -> None:
        """The final summary, the end of the W&B run (its artifact uploaded), then ``done.json``: a kill before
        that leaves the run unfinished locally, so the rerun publishes and reports again."""
        self.summary(summary)
        self.end()
        if self.main:
            write_json(self.run_dir / "done.json", {**self._published, "run_id": self.run_id, "wandb": self.where(),
                                                    "summary": summary})
        self.accelerator.wait_for_everyone()

    def report_finished(self) -> None:
        """Under a W&B sweep agent, a run whose config already finished here still reports, as a short W&B run
        that copies the finished run's summary (``duplicate_of`` names it), so the sweep sees a result."""
        if not os.environ.get("WANDB_SWEEP_ID") or self.mode == "disabled":
            return
        info = self.done_info()
        self.run_id = os.environ.get("WANDB_RUN_ID") or wandb_runs.new_run_id()
        self._init_run()
        self.summary({**info.get("summary", {}), "duplicate_of": info.get("run_id")})
        self.end()

    # ----------------------------------------------------------------------------------------- training
    def _prepare(self, model):
        cfg = self.cfg
        model = model.to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(  # the paper decays every parameter, BN included
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay,
        )
        return self.accelerator.prepare(model, optimizer)

    def _resume(self, model, optimizer) -> tuple[int, int, dict, list]:
        if not self.ckpt:
            return 0, 0, {}, []
        self.restore(model, optimizer)
        self.extra_state = self.ckpt.get("extra", {})
        if self.main:
            print(f"resuming {self.run_dir} at epoch {self.ckpt['epoch']} step {self.ckpt['step']}", flush=True)
        seen = self.last_logged_step()
        for row in self.ckpt["history"]:
            if row["epoch"] > seen:
                self.log(row, step=row["epoch"])
        return self.ckpt["epoch"], self.ckpt["step"], self.ckpt["sums"], self.ckpt["history"]

    def fit(self, model, objective) -> list[dict]:
        cfg = self.cfg
        model, optimizer = self._prepare(model)
        start_epoch, start_step, sums, history = self._resume(model, optimizer)
        fwd = compile_model(model, cfg)  # --compile=True: static shapes, compiled once (kd.accel)
        total = sum(objective.steps(e) for e in range(cfg.epochs))
        done = sum(objective.steps(e) for e in range(start_epoch)) + start_step
        bar = tqdm(total=total, initial=done, disable=not self.main, desc=cfg.run_name(), dynamic_ncols=True,
                   mininterval=1.0)
        with stop_requests() as stops:
            try:
                for epoch in range(start_epoch, cfg.epochs):
                    first = epoch == start_epoch
                    row = self._epoch(model, fwd, optimizer, objective, epoch, start_step if first else 0,
                                      sums if first else {}, history, bar, stops)
                    history.append(row)
                    self.save_checkpoint(model, optimizer, epoch + 1, 0, {}, history)
                    faults.point("epoch-saved")
                    self.log(row, step=epoch + 1)
                    faults.point("epoch-logged")
                    if self.main:
                        shown = {k: round(v, 4) for k, v in row.items() if k.startswith("test/")}
                        bar.write(f"epoch {epoch + 1}/{cfg.epochs} " + json.dumps(shown))
            finally:
                bar.close()
        self.model = self.accelerator.unwrap_model(model)
        return history

    def _epoch(self, model, fwd, optimizer, objective, epoch: int, step: int, sums: dict, history: list, bar,
               stops: list) -> dict:
        cfg, acc = self.cfg, self.accelerator
        lr = cosine_lr(epoch, cfg.epochs, cfg.lr, cfg.eta_min)
        for g in optimizer.param_groups:
            g["lr"] = lr
        model.train()
        t0, n_img = time.perf_counter(), 0
        for batch in objective.batches(epoch, step):
            x = batch["x"]
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with acc.autocast():
                loss, stats = objective.loss(fwd(x), batch)
            acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for k, v in stats.items():  # tensors stay on the device: no sync per step
                sums[k] = sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v)
            step += 1
            faults.point("train-step")
            n_img += x.shape[0]
            bar.update(1)
            if step % 25 == 0:
                mean_loss = float(sums["loss"]) / max(float(sums["n"]), 1)
                _check_finite(mean_loss, epoch, step)
                bar.set_postfix(epoch=epoch + 1, loss=f"{mean_loss:.3f}",
                                img_s=f"{n_img / (time.perf_counter() - t0):.0f}")
            if stops:
                self.save_checkpoint(model, optimizer, epoch, step, _floats(sums), history)
                raise Interrupted(stops[0])
        sums = _floats(sums)
        dt = time.perf_counter() - t0
        _check_finite(sums["loss"], epoch, step)
        row = {names.EPOCH: epoch + 1, names.LR: lr, **objective.epoch_metrics(sums)}
        row[names.THROUGHPUT] = n_img * acc.num_processes / max(dt, 1e-9)
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            row.update(objective.evaluate(model))
        return row

    # ----------------------------------------------------------------------------------------- outputs
    def publish(self, model, name: str, type: str, meta: dict) -> Path:
        """Final weights (safetensors + meta.json) into the run folder, the local store and W&B."""
        path = None
        if self.main:
            state = dict(self.accelerator.unwrap_model(model).state_dict())
            full = save_weights(self.run_dir / "final", state, meta)
            files = [self.run_dir / "final" / "model.safetensors", self.run_dir / "final" / "meta.json"]
            path = artifacts.publish(name, type, files, full, run=self.run, store=self.cfg.store,
                                     aliases=self.aliases())
            faults.point("published")  # in the store, not yet marked done
            self._published = {"artifact": name, "store_path": str(path)}
        self.accelerator.wait_for_everyone()
        return path

    def aliases(self) -> list[str]:
        """Aliases of what this run publishes: its study (students of the study resolve ``name:{study}``) and its
        recipe fingerprint; none for runs outside a study."""
        if self.cfg.study == "default":
            return []
        return [self.cfg.study, f"recipe-{self.cfg.fingerprint()}"]


def _floats(sums: dict) -> dict:
    return {k: float(v) for k, v in sums.items()}


def _check_finite(loss: float, epoch: int, step: int) -> None:
    if not math.isfinite(loss):
        raise KDError(f"the training loss became {loss} in epoch {epoch + 1} (step {step}): lower --lr, or use "
                      "--mixed_precision=no if fp16 overflowed")


def unlocked(config: dict) -> dict:
    """The config without the keys a W&B sweep sets (they are locked: wandb warns once per key otherwise, and
    the values are the same, parsed from the same command line)."""
    path = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not os.environ.get("WANDB_SWEEP_ID") or not path or not os.path.exists(path):
        return config
    import yaml

    with open(path) as fh:
        locked = set((yaml.safe_load(fh) or {}).keys())
    return {k: v for k, v in config.items() if k not in locked}
