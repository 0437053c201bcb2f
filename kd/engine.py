"""One Accelerate training loop for teachers and students: they differ in targets and loss, not machinery.

A :class:`Session` owns the Accelerator, the W&B run (through Accelerate's tracker), the run folder and its
checkpoints. An *objective* owns the data and the loss:

    objective.steps(epoch) -> int                       steps in that epoch
    objective.batches(epoch, start) -> iterator[dict]   batches from step ``start`` on; ``batch["x"]`` is the input
    objective.loss(logits, batch) -> (loss, sums)       sums: additive epoch statistics (e.g. {"n": B, ...})
    objective.epoch_metrics(sums) -> dict               e.g. {"train/loss": ...}
    objective.evaluate(model) -> dict                   clean test-set metrics

Run folder ``{out_dir}/{run_name}-{fingerprint}/``: ``checkpoint.json`` points at the newest
``ckpt-K.safetensors`` (model, optimizer and its sha256); ``done.json`` marks a finished run; ``run.json`` holds
the W&B run id from the start (a run killed before its first checkpoint continues the same W&B run). A damaged
checkpoint is refused (exit 2), never silently replaced by a fresh start. The per-epoch
randomness depends on (seed, epoch) only, so a resumed run continues exactly (bitwise on CPU). W&B steps
are epochs; a resumed run re-logs only the checkpointed epochs W&B has not seen, so no step is logged twice.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kd import faults, tracking
from kd.config import KDError, to_dict
from kd.io import load_tensors, read_json, remove_stale_temps, save_tensors, sha256_file, write_json


def cosine_lr(epoch: int, epochs: int, lr: float, eta_min: float) -> float:
    """Cosine annealing stepped once per epoch (epoch is 0-based): lr at epoch 0, eta_min after the last."""
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


class Interrupted(Exception):
    """SIGTERM arrived: a checkpoint was written; the process should exit 143."""


class Session:
    def __init__(self, cfg, job: str):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.job = job
        self.mode = tracking.wandb_mode()
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            cpu=cfg.cpu,
            log_with=None if self.mode == "disabled" else "wandb",
        )
        self.device = self.accelerator.device
        self.main = self.accelerator.is_main_process
        self.run_dir = Path(cfg.out_dir) / f"{cfg.run_name()}-{cfg.fingerprint()}"
        self.ckpt = None
        self.run = None
        self.extra_config: dict = {}
        self.extra_state: dict = {}
        self.run_id = ""
        self._stop = False
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
        pointer = self.run_dir / "checkpoint.json"
        resume = str(self.cfg.resume)
        if self.main:  # temps of writes that were killed (checkpoints, final weights): never read, only space
            for folder in (self.run_dir, self.run_dir / "final"):
                remove_stale_temps(folder)
        if resume == "False":
            if self.main:
                for p in [pointer, self.run_dir / "done.json", self.run_dir / "run.json",
                          *self.run_dir.glob("ckpt-*.safetensors")]:
                    p.unlink(missing_ok=True)
            self.accelerator.wait_for_everyone()
            return
        if self.finished and resume == "auto":
            return  # the entry points report the finished run; its last checkpoint is not needed
        if pointer.exists():
            self.ckpt = self._verified_checkpoint(pointer)
            if self.ckpt.get("fingerprint") != self.cfg.fingerprint():
                raise KDError(f"{pointer} belongs to another configuration: remove {self.run_dir} or pass "
                              "--resume=False to start over")
        elif resume == "True":
            raise KDError(f"--resume=True but there is no checkpoint in {self.run_dir}: run without --resume "
                          "to start (the default --resume=auto continues a checkpoint when one exists)")

    def _verified_checkpoint(self, pointer: Path) -> dict:
        """The pointer and the tensors it names, checked before anything else runs (W&B included).

        A damaged checkpoint is refused, never silently replaced by a fresh start: the user chooses between
        restoring the file and ``--resume=False``.
        """
        fix = f"pass --resume=False to train this run from scratch (or restore the file); run folder {self.run_dir}"
        try:
            ckpt = json.loads(pointer.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise KDError(f"the checkpoint pointer {pointer} is corrupt ({type(e).__name__}): {fix}") from None
        keys = ("file", "sha256", "epoch", "step", "run_id", "fingerprint", "history", "param_groups")
        if not isinstance(ckpt, dict) or any(k not in ckpt for k in keys):
            raise KDError(f"the checkpoint pointer {pointer} is incomplete (expected keys {', '.join(keys)}): {fix}")
        tensors = self.run_dir / str(ckpt["file"])
        if tensors.parent != self.run_dir or not tensors.is_file():
            raise KDError(f"the checkpoint {tensors} named by {pointer.name} is missing: {fix}")
        if sha256_file(tensors) != ckpt["sha256"]:
            raise KDError(f"the checkpoint {tensors} is corrupt (its sha256 does not match {pointer.name}): {fix}")
        return ckpt

    def save_checkpoint(self, model, optimizer, epoch: int, step: int, sums: dict, history: list) -> None:
        """Model + optimizer as safetensors; position, stats and history in the pointer JSON (atomic)."""
        if not self.main:
            return
        tensors = {f"model.{k}": v for k, v in self.accelerator.unwrap_model(model).state_dict().items()}
        opt = optimizer.state_dict()
        for idx, st in opt["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"optim.{idx}.{k}"] = v
        prev = self.ckpt["file"] if self.ckpt else None
        counter = (self.ckpt or {}).get("counter", 0) + 1
        fname = f"ckpt-{counter}.safetensors"
        digest = save_tensors(self.run_dir / fname, tensors)
        faults.point("ckpt-write")
        self.ckpt = {
            "file": fname, "sha256": digest, "counter": counter, "epoch": epoch, "step": step,
            "sums": sums, "history": history, "run_id": self.run_id, "fingerprint": self.cfg.fingerprint(),
            "param_groups": opt["param_groups"], "extra": self.extra_state,
            "optim_scalars": {str(i): {k: v for k, v in st.items() if not torch.is_tensor(v)}
                              for i, st in opt["state"].items()},
        }
        write_json(self.run_dir / "checkpoint.json", self.ckpt)
        if prev and prev != fname:
            (self.run_dir / prev).unlink(missing_ok=True)

    def restore(self, model, optimizer) -> None:
        tensors = load_tensors(self.run_dir / self.ckpt["file"], self.ckpt["sha256"], device=str(self.device))
        model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.accelerator.unwrap_model(model).load_state_dict(model_sd)
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        for idx, scalars in self.ckpt.get("optim_scalars", {}).items():
            state.setdefault(int(idx), {}).update(scalars)
        optimizer.load_state_dict({"state": state, "param_groups": self.ckpt["param_groups"]})

    # ----------------------------------------------------------------------------------------- W&B
    def start_tracking(self, extra_config: dict | None = None) -> None:
        self.extra_config = extra_config or {}
        self.run_id = self._run_id()
        if self.main:
            print(tracking.announce_mode(self.mode), flush=True)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / "run.json", {"run_id": self.run_id})  # before W&B sees it: a run cut off
            write_json(self.run_dir / "config.json", self.config())  # before its first checkpoint keeps its id
        if self.mode == "disabled":
            return
        self.accelerator.init_trackers(
            self.cfg.project,
            config=self.config(),
            init_kwargs={"wandb": {
                "id": self.run_id, "resume": "allow", "name": self.cfg.run_name(), "group": self.cfg.study,
                "job_type": "train" if self.job == "teacher" else "distill", "mode": self.mode,
                "tags": [self.job, self.cfg.dataset, self.cfg.arch], "reinit": "finish_previous",
            }},
        )
        if self.main:
            self.run = self.accelerator.get_tracker("wandb", unwrap=True)

    def _run_id(self) -> str:
        """The checkpoint's run id, else the one this run folder already started W&B with, else a new one."""
        if self.ckpt:
            return self.ckpt["run_id"]
        if (self.run_dir / "run.json").exists():
            return read_json(self.run_dir / "run.json")["run_id"]
        return os.environ.get("WANDB_RUN_ID") or _new_run_id()

    def config(self) -> dict:
        return {**to_dict(self.cfg), "job": self.job, "run_name": self.cfg.run_name(), **self.extra_config}

    def last_logged_step(self) -> int:
        """The highest W&B step this run already holds (0 if none), asked of W&B itself."""
        if self.run is None:
            return 0
        if self.mode == "online":
            return max(int(getattr(self.run, "step", 0)) - 1, 0) if self.run.resumed else 0
        return offline_last_step(Path(self.run.dir).parent.parent, self.run_id, exclude=Path(self.run.dir).parent)

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

    def end(self) -> None:
        if self.mode != "disabled":
            self.accelerator.end_training()

    # ----------------------------------------------------------------------------------------- training
    def fit(self, model, objective) -> list[dict]:
        cfg, acc = self.cfg, self.accelerator
        model = model.to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(  # the paper decays every parameter, BN included
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay,
        )
        model, optimizer = acc.prepare(model, optimizer)
        start_epoch, start_step, sums, history = 0, 0, {}, []
        if self.ckpt:
            self.restore(model, optimizer)
            start_epoch, start_step = self.ckpt["epoch"], self.ckpt["step"]
            sums, history = self.ckpt["sums"], self.ckpt["history"]
            self.extra_state = self.ckpt.get("extra", {})
            if self.main:
                print(f"resuming {self.run_dir} at epoch {start_epoch} step {start_step}", flush=True)
            seen = self.last_logged_step()
            for row in history:
                if row["epoch"] > seen:
                    self.log(row, step=row["epoch"])
        fwd = torch.compile(model) if cfg.compile else model

        total = sum(objective.steps(e) for e in range(cfg.epochs))
        done = sum(objective.steps(e) for e in range(start_epoch)) + start_step
        bar = tqdm(total=total, initial=done, disable=not self.main, desc=self.cfg.run_name(),
                   dynamic_ncols=True, mininterval=1.0)
        old = signal.signal(signal.SIGTERM, self._on_sigterm) if _in_main_thread() else None
        try:
            for epoch in range(start_epoch, cfg.epochs):
                lr = cosine_lr(epoch, cfg.epochs, cfg.lr, cfg.eta_min)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                model.train()
                t0, n_img = time.perf_counter(), 0
                step = start_step if epoch == start_epoch else 0
                sums = sums if epoch == start_epoch else {}
                for batch in objective.batches(epoch, step):
                    x = batch["x"]
                    if cfg.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with acc.autocast():
                        logits = fwd(x)
                        loss, stats = objective.loss(logits, batch)
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
                    if self._stop:
                        self.save_checkpoint(model, optimizer, epoch, step, _floats(sums), history)
                        raise Interrupted()
                sums = _floats(sums)
                dt = time.perf_counter() - t0
                _check_finite(sums["loss"], epoch, step)
                row = {"epoch": epoch + 1, "lr": lr, **objective.epoch_metrics(sums)}
                row["throughput/img_per_s"] = n_img * acc.num_processes / max(dt, 1e-9)
                if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                    row.update(objective.evaluate(model))
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
            if old is not None:
                signal.signal(signal.SIGTERM, old)
        self.model = acc.unwrap_model(model)
        return history

    def _on_sigterm(self, signum, frame):
        self._stop = True

    # ----------------------------------------------------------------------------------------- outputs
    def publish(self, model, name: str, type: str, meta: dict) -> Path:
        """Final weights (safetensors + meta.json) into the run folder, the local store and W&B."""
        from kd.io import save_weights

        path = None
        if self.main:
            state = {k: v for k, v in self.accelerator.unwrap_model(model).state_dict().items()}
            full = save_weights(self.run_dir / "final", state, meta)
            files = [self.run_dir / "final" / "model.safetensors", self.run_dir / "final" / "meta.json"]
            path = tracking.publish(name, type, files, full, run=self.run, store=self.cfg.store)
            faults.point("published")  # in the store, not yet marked done
            write_json(self.run_dir / "done.json", {"artifact": name, "store_path": str(path),
                                                    "run_id": self.run_id, "wandb": self.where()})
        self.accelerator.wait_for_everyone()
        return path


def _floats(sums: dict) -> dict:
    return {k: float(v) for k, v in sums.items()}


def _check_finite(loss: float, epoch: int, step: int) -> None:
    if not math.isfinite(loss):
        raise KDError(f"the training loss became {loss} in epoch {epoch + 1} (step {step}): lower --lr, or use "
                      "--mixed_precision=no if fp16 overflowed")


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _new_run_id() -> str:
    from wandb.sdk.lib.runid import generate_id

    return generate_id()


def offline_last_step(wandb_dir: Path, run_id: str, exclude: Path | None = None) -> int:
    """Highest history step in earlier offline folders of ``run_id``, read with `wandb leet inspect`."""
    from kd.report import inspect_history

    best = 0
    for folder in sorted(wandb_dir.glob(f"offline-run-*-{run_id}")):
        if exclude is None or folder.resolve() != exclude.resolve():
            best = max([best, *(row["_step"] for row in inspect_history(folder))])
    return best


def leet_records(folder: Path) -> list[dict]:
    """Every record of an offline run's transaction log, through W&B's own reader (used by the tests)."""
    from kd.report import leet_inspect

    return [json.loads(line) for line in leet_inspect(folder, summary=False).splitlines() if line.strip()]


@contextlib.contextmanager
def user_errors():
    """Entry points: a KDError is one line on stderr and exit code 2; SIGTERM is a clean exit 143."""
    try:
        yield
    except KDError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted:
        print("interrupted: checkpoint saved; run the same command again to resume", file=sys.stderr)
        raise SystemExit(143) from None
