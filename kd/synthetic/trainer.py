"""The one training skeleton of every generator (the DDPM and the SN-GAN differ in their step, not machinery).

Accelerate; the output folder is a :class:`kd.run_folder.RunFolder` (the resume rules of every trainer; a
checkpoint every ``save_every`` steps, ``OUT/checkpoints/state.json`` naming ``step-%08d.safetensors``, and on
SIGTERM/SIGINT, then :class:`~kd.errors.Interrupted`: exit 143 / 130; the W&B run id in ``OUT/run.json`` from
the start); one W&B run per output folder (:class:`kd.tracker.Tracker`) whose logged rows are kept in every
checkpoint, so a killed run continues the same W&B run and logs no step twice; sample grids
(``OUT/samples.png``); at the end an export published as artifact ``generator-{dataset}`` (DDPM) or
``generator-{dataset}-{generator}``. The randomness of step ``s`` depends on (seed, s) only,
so a resumed run ends bitwise where an uninterrupted one does (CPU, same threads).

A *job* (:mod:`kd.synthetic.train_ddpm`, :mod:`kd.synthetic.train_gan`) supplies the models and the step:
``channels``, ``batches_per_step``, ``auto_precision(cuda)``, ``total_steps(batches_per_epoch)``, ``build()``,
``n_params()``, ``state() -> (tensors, info)``, ``load(tensors, info)``, ``prepare(accelerator)``,
``step(step, batches, generator, accelerator, total) -> {metric: float}``, ``extras() -> {metric: value}``,
``grid(n, device) -> uint8 images``, ``export(out) -> (files, meta)`` (``files[0]``: the weights) into
``OUT/{export_dir}``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from kd import faults, names
from kd.data import epoch_generator, load_dataset
from kd.errors import Interrupted, KDError, stop_requests
from kd.generators.sampling import derived_seed, save_grid
from kd.run_folder import Layout
from kd.session import Session
from kd.synthetic.config import GeneratorTrainConfig
from kd.synthetic.families import family

LAYOUT = Layout(ckpt_dir="checkpoints", pointer="state.json", stem="step", required=("step",))
LOG_EVERY = 10  # steps per logged row
PRECISION_NAMES = {"no": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}


class RealBatches:
    """Batch ``k`` of the training images as floats in [-1, 1]: epoch k // per_epoch's permutation, which
    depends on (seed, epoch) only; rank ``rank`` of ``world`` takes every world-th image of it."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int, rank: int, world: int, dataset: str):
        self.images, self.batch_size, self.seed, self.rank, self.world = images, batch_size, seed, rank, world
        self.per_epoch = images.shape[0] // batch_size
        if self.per_epoch < 1:
            raise KDError(f"--batch_size={batch_size} exceeds the {images.shape[0]} training images of {dataset}")
        self._epoch, self._perm = -1, None

    def __call__(self, k: int) -> torch.Tensor:
        epoch, within = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            n = self.images.shape[0]
            self._perm, self._epoch = torch.randperm(n, generator=epoch_generator(self.seed, epoch, "cpu")), epoch
        b = self.batch_size
        idx = self._perm[within * b:(within + 1) * b][self.rank::self.world].to(self.images.device)
        return self.images[idx].float().div(127.5).sub(1.0)


def train(cfg: GeneratorTrainConfig) -> Path:
    """Fit (or continue fitting) the generator ``cfg`` describes; returns the exported folder."""
    from dataclasses import replace

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    job = family(cfg.generator).job(cfg)
    if cfg.mixed_precision == "auto":
        cuda = torch.cuda.is_available() and not cfg.cpu
        cfg = replace(cfg, mixed_precision=job.auto_precision(cuda))
    return Trainer(cfg, job).run()


class Trainer:
    """The generator's loop inside the one run lifecycle (:class:`kd.session.Session`): its run folder keeps the
    checkpoints in ``checkpoints/`` (``state.json`` naming ``step-%08d.safetensors``)."""

    def __init__(self, cfg: GeneratorTrainConfig, job):
        self.cfg, self.job, self.out = cfg, job, cfg.run_dir()

    def run(self) -> Path:
        session = self.session = Session(self.cfg, job="generator", layout=LAYOUT)
        self.acc, self.main = session.accelerator, session.main
        if session.already_finished():
            return self.out / self.job.export_dir
        data = load_dataset(self.cfg.dataset, self.cfg.data_dir, device=self.acc.device)  # before any W&B run
        self.state = session.ckpt
        self.history = list(self.state["history"]) if self.state else []  # the logged rows, in every checkpoint
        self.last = dict(self.state.get("last", {})) if self.state else {}
        with session.tracked():
            session.start_tracking({"recipe": session.folder.identity}, tags=["generator", self.cfg.dataset])
            session.tracker.replay([(row["step"], {k: v for k, v in row.items() if k != "step"})
                                    for row in self.history])
            return self._run(self.acc, data)

    # ------------------------------------------------------------------------------------------- set-up
    def _build(self) -> int:
        """The job's models (seeded), restored from the checkpoint; returns the step to continue from."""
        torch.manual_seed(self.cfg.seed)
        self.job.build()
        step = 0
        if self.state:
            self.job.load(self.session.folder.tensors(), self.state)
            step = self.state["step"]
            if self.main:
                print(f"resuming {self.session.folder.checkpoints.folder} at step {step}/{self.total}",
                      file=sys.stderr)
        self.job.prepare(self.acc)
        return step

    # ------------------------------------------------------------------------------------------- the run
    def _run(self, acc, data) -> Path:
        cfg, job = self.cfg, self.job
        self.batches = RealBatches(data.train_x[:, :job.channels], job.recipe.batch_size, cfg.seed,
                                   acc.process_index, acc.num_processes, cfg.dataset)
        self.total = job.total_steps(self.batches.per_epoch)
        stop = min(self.total, cfg.max_steps) if cfg.max_steps else self.total
        step = start = self._build()
        if self.main:
            print(f"generator {cfg.generator} {cfg.preset_name()}: {job.n_params() / 1e6:.2f}M parameters, "
                  f"{data.n_train} images, {self.batches.per_epoch} batches/epoch, {self.total} steps in all; "
                  f"on {acc.device} ({PRECISION_NAMES.get(cfg.mixed_precision, cfg.mixed_precision)})",
                  file=sys.stderr)
        t0 = time.perf_counter()
        step = self._loop(step, stop)
        seconds = time.perf_counter() - t0
        acc.wait_for_everyone()
        if self.main and step > start:
            if step != self.total and step % job.recipe.sample_every:
                self._samples(step)
            print(f"trained to step {step}/{self.total} in {seconds:.1f} s ({(step - start) / seconds:.1f} "
                  "steps/s)", file=sys.stderr)
        self._publish(step)
        summary = {**self.last, "generator/step": step, names.FINAL: step == self.total}
        self.session.finish(summary, done=step == self.total)
        if step < self.total and self.main:
            print(f"stopped at step {step} of {self.total} (--max_steps): the generator so far is published; "
                  "run again with a larger --max_steps (or none) to go on", file=sys.stderr)
        return self.out / job.export_dir

    def _loop(self, step: int, stop: int) -> int:
        from tqdm.auto import tqdm

        cfg, job, acc, recipe = self.cfg, self.job, self.acc, self.job.recipe
        bar = tqdm(total=stop, initial=step, unit="step", desc=f"generator {cfg.dataset}", disable=not self.main,
                   dynamic_ncols=True)
        sums: dict[str, float] = {}
        count = 0  # steps summed since the last logged row
        with stop_requests() as stops:
            try:
                while step < stop:
                    g = torch.Generator(acc.device).manual_seed(derived_seed(cfg.seed, step, acc.process_index))
                    for k, v in job.step(step, self.batches, g, acc, self.total).items():
                        sums[k] = sums.get(k, 0.0) + v
                    step, count = step + 1, count + 1
                    bar.update(1)
                    if step % LOG_EVERY == 0 or step == stop:
                        self._log_row(step, {k: v / count for k, v in sums.items()}, bar)
                        sums, count = {}, 0
                    if step % recipe.save_every == 0 or step == stop:
                        self._checkpoint(step, last=step == stop)
                    if step % recipe.sample_every == 0 or step == self.total:
                        self._samples(step)
                    faults.point("generator-step")
                    if stops and step < stop:
                        self._checkpoint(step, last=True)
                        raise Interrupted(stops[0])
            finally:
                bar.close()
        return step

    def _log_row(self, step: int, means: dict, bar) -> None:
        self.last = means
        bar.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in self.last.items()})
        epoch = step * self.job.batches_per_step / self.batches.per_epoch
        row = {**self.last, **self.job.extras(), "epoch": epoch}
        self.history.append({"step": step, **row})
        if step > self.session.tracker.seen:
            self.session.tracker.log(row, step=step)

    def _checkpoint(self, step: int, last: bool = False) -> None:
        self.acc.wait_for_everyone()
        if self.main:
            tensors, info = self.job.state()
            self.session.save_checkpoint(tensors, {**info, "step": step, "total": self.total, "last": self.last,
                                                   "history": self.history}, last=last,
                                         name=f"step-{step:08d}.safetensors")

    def _samples(self, step: int) -> None:
        if not self.main:
            return
        grid = save_grid(self.job.grid(64, self.acc.device), self.out / "samples.png")
        self.session.tracker.image("generator/samples", grid, step)

    def _publish(self, step: int) -> None:
        cfg, name = self.cfg, self.cfg.artifact_name()
        if not self.main:
            return
        files, extra = self.job.export(self.out)
        meta = {"generator": cfg.generator, "preset": cfg.preset_name(), "dataset": cfg.dataset, "step": step,
                "total_steps": self.total, **{k.split("/")[-1]: v for k, v in self.last.items()},
                "params": self.job.n_params(), **extra}
        print(f"exported: {files[0].parent}", file=sys.stderr)
        where = self.session.publish(name, "model", files, meta)
        print(f"artifact {name} ({where.name}) in {where.parent}: generate with --model={name}", file=sys.stderr)
