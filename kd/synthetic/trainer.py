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
from dataclasses import asdict
from pathlib import Path

import torch

from kd import faults
from kd.data import epoch_generator, load_dataset
from kd.errors import Interrupted, KDError, stop_requests
from kd.run_folder import RunFolder
from kd.synthetic.config import GeneratorTrainConfig
from kd.synthetic.publishing import check_outputs, publish_once
from kd.synthetic.sampling import derived_seed, save_grid
from kd.tracker import Tracker

CKPT_KEYS = ("step",)  # beside the run folder's own keys
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
    from kd.synthetic.train_ddpm import DdpmJob
    from kd.synthetic.train_gan import GanJob

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    job = (GanJob if cfg.generator == "sngan" else DdpmJob)(cfg)
    return Trainer(cfg, job).run()


class Trainer:
    def __init__(self, cfg: GeneratorTrainConfig, job):
        self.cfg, self.job, self.out = cfg, job, cfg.out_dir()
        self.folder = RunFolder(self.out, cfg.identity(), cfg.resume, ckpt_dir="checkpoints", pointer="state.json",
                                stem="step", required=CKPT_KEYS)

    def _open(self) -> None:
        """The resume rules (the main process clears or cleans the folder first)."""
        self.state = self.folder.open()
        self.acc.wait_for_everyone()
        self.history = list(self.state["history"]) if self.state else []  # the logged rows, in every checkpoint
        self.last = dict(self.state.get("last", {})) if self.state else {}

    # ------------------------------------------------------------------------------------------- set-up
    def _accelerator(self):
        from kd.accel import accelerator

        cfg = self.cfg
        cuda = torch.cuda.is_available() and not cfg.cpu
        self.precision = cfg.mixed_precision if cfg.mixed_precision != "auto" else self.job.auto_precision(cuda)
        acc = accelerator(self.precision, cfg.cpu)
        self.acc, self.main = acc, acc.is_main_process
        self.folder.main = self.main
        return acc

    def _start_wandb(self) -> None:
        """One W&B run per output folder; rows a killed process logged but W&B lost are logged again."""
        cfg = self.cfg
        self.tracker = Tracker(self.main)
        self.tracker.announce(sys.stderr)
        self.tracker.start(project=cfg.project, run_id=self.folder.run_id(), name=cfg.artifact_name(),
                           config={**asdict(cfg), "recipe": self.folder.identity}, job_type="train-generator")
        self.tracker.replay([(row["step"], {k: v for k, v in row.items() if k != "step"}) for row in self.history])

    def _build(self) -> int:
        """The job's models (seeded), restored from the checkpoint; returns the step to continue from."""
        torch.manual_seed(self.cfg.seed)
        self.job.build()
        step = 0
        if self.state:
            self.job.load(self.folder.tensors(), self.state)
            step = self.state["step"]
            if self.main:
                print(f"resuming {self.folder.checkpoints.folder} at step {step}/{self.total}", file=sys.stderr)
        self.job.prepare(self.acc)
        return step

    # ------------------------------------------------------------------------------------------- the run
    def run(self) -> Path:
        check_outputs(self.out, "the output folder (--out)", self.cfg.store or None)
        acc = self._accelerator()
        data = load_dataset(self.cfg.dataset, self.cfg.data_dir, device=acc.device)  # before any file or W&B run
        self._open()
        self._start_wandb()
        with self.tracker.ending():
            return self._run(acc, data)

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
                  f"on {acc.device} ({PRECISION_NAMES.get(self.precision, self.precision)})", file=sys.stderr)
        t0 = time.perf_counter()
        step = self._loop(step, stop)
        seconds = time.perf_counter() - t0
        acc.wait_for_everyone()
        if self.main:
            if step > start and step != self.total and step % job.recipe.sample_every:
                self._samples(step)
            speed = f"{(step - start) / seconds:.1f} steps/s" if step > start else "nothing left to train"
            print(f"trained to step {step}/{self.total} in {seconds:.1f} s ({speed})", file=sys.stderr)
            self._publish(step)
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
                        self._checkpoint(step)
                    if step % recipe.sample_every == 0 or step == self.total:
                        self._samples(step)
                    faults.point("generator-step")
                    if stops and step < stop:
                        self._checkpoint(step)
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
        if step > self.tracker.seen:
            self.tracker.log(row, step=step)

    def _checkpoint(self, step: int) -> None:
        self.acc.wait_for_everyone()
        if self.main:
            tensors, info = self.job.state()
            self.folder.save(tensors, {**info, "step": step, "total": self.total, "last": self.last,
                                       "history": self.history}, self.tracker.run_id,
                             name=f"step-{step:08d}.safetensors")

    def _samples(self, step: int) -> None:
        if not self.main:
            return
        grid = save_grid(self.job.grid(64, self.acc.device), self.out / "samples.png")
        self.tracker.image("generator/samples", grid, step)

    def _publish(self, step: int) -> None:
        cfg, name = self.cfg, self.cfg.artifact_name()
        files, extra = self.job.export(self.out)
        meta = {"generator": cfg.generator, "preset": cfg.preset_name(), "dataset": cfg.dataset, "step": step,
                "total_steps": self.total, **{k.split("/")[-1]: v for k, v in self.last.items()},
                "params": self.job.n_params(), **extra}
        print(f"exported: {files[0].parent}", file=sys.stderr)
        publish_once(name, "model", files, meta, self.tracker, cfg.store or None,
                     hint=f": generate with --model={name}")
