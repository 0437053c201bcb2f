"""A run of train.py or distill.py (or one member of a packed grid): Accelerate, its run folder and its W&B run.

A :class:`Session` wires three parts that each own one concern:

* the Accelerator (device, mixed precision, processes) and the seed;
* the run folder ``{out_dir}/{run_name}-{fingerprint}/`` (:class:`kd.run_folder.RunFolder`: resume rules,
  checkpoints, run id, done marker);
* the W&B run (:class:`kd.tracker.Tracker`, main process only).

It prepares a model for the loop (:meth:`member`: optimizer, Accelerate, resume), runs the loop
(:meth:`fit`, :func:`kd.engine.fit`) and publishes the result (:meth:`publish`, :meth:`finish`). A resumed run
re-logs only the checkpointed epochs W&B has not seen, so no step is logged twice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import torch

from kd import artifacts, faults, mirror, names, wandb_runs
from kd.accel import accelerator, compile_model
from kd.checkpoint import load_state_tensors, state_tensors
from kd.config import to_dict
from kd.engine import Member, fit
from kd.errors import Interrupted, KDError
from kd.io import check_folder, check_name_lengths, remove_stale_temps, save_weights, write_json
from kd.run_folder import RunFolder
from kd.tracker import Tracker

CKPT_KEYS = ("epoch", "step", "param_groups")
MIRROR_EVERY_S = 300.0  # between mirrored checkpoints (a stop and the last epoch are always mirrored)


class Session:
    def __init__(self, cfg, job: str):
        from accelerate.utils import set_seed

        self.cfg, self.job = cfg, job
        self.mode = wandb_runs.wandb_mode()
        self.accelerator = accelerator(cfg.mixed_precision, cfg.cpu)
        self.device = self.accelerator.device
        self.main = self.accelerator.is_main_process
        self.run_dir = Path(cfg.out_dir) / f"{cfg.run_name()}-{cfg.fingerprint()}"
        self.folder = RunFolder(self.run_dir, cfg.identity(), cfg.resume, required=CKPT_KEYS, main=self.main)
        self.tracker = Tracker(self.main, self.mode)
        self.extra_config: dict = {}
        self.extra_state: dict = {}
        self._published: dict = {}
        self._mirrored = time.monotonic()
        self.model = None
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True
        set_seed(getattr(cfg, "student_seed", cfg.seed), device_specific=False)
        self.check_outputs()  # before anything is fetched into them
        if self.mode == "online" and self.main:
            wandb_runs.check_reachable()
        self.main_first(self._fetch_checkpoint)
        self.ckpt = self.folder.open()
        if self.main:
            remove_stale_temps(self.run_dir / "final")  # a publish cut off mid-write: never read, only space
        self.accelerator.wait_for_everyone()  # --resume=False: the folder is cleared before any process reads it

    # ----------------------------------------------------------------------------------------- state
    @property
    def finished(self) -> bool:
        return self.folder.finished

    def done_info(self) -> dict:
        return self.folder.done_info()

    def already_finished(self, what: str) -> bool:
        """With ``--resume=auto``, a finished run says so (and, under a sweep agent, reports it) instead of training."""
        if not (self.finished and str(self.cfg.resume) == "auto"):
            return False
        if self.main:
            print(f"already finished: {self.run_dir} ({what} artifact {self.done_info().get('artifact')}); "
                  "pass --resume=False to train it again", flush=True)
        self.report_finished()
        return True

    @property
    def run(self):
        """The W&B run (main process, W&B not disabled), else None."""
        return self.tracker.run

    @property
    def run_id(self) -> str:
        return self.tracker.run_id

    def check_inputs(self, inputs: dict) -> None:
        self.folder.check_inputs(inputs)

    def check_outputs_for(self, model, data=None) -> None:
        """:meth:`check_outputs` with the room the run needs at its largest moment: two checkpoints side by side
        (weights and momentum each: the new one is written before the old one goes), the mirrored copy of one in
        the store, the final weights (run folder and store) and, for a student, the teacher cache it builds in
        the store (one file per member, float32 at most)."""
        from kd.models import count_params

        weights = 4 * count_params(model)
        need = 2 * 2 * weights + 2 * weights + 2 * weights
        if data is not None and getattr(self.cfg, "teacher_cache", False):
            members = len(self.cfg.teacher_names()) or self.cfg.ensemble_size
            need += members * data.n_train * data.num_views * data.spec.num_classes * 4
        self.check_outputs(need)

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
        from accelerate.utils import broadcast_object_list

        value = None
        if self.main:
            try:
                value = ("ok", fn())
            except KDError as e:
                value = ("error", str(e))
        value = broadcast_object_list([value])[0]
        if value[0] == "error":
            raise KDError(value[1])
        return value[1]

    # ----------------------------------------------------------------------------------------- W&B
    def config(self) -> dict:
        return {**to_dict(self.cfg), names.JOB: self.job, names.RUN_NAME: self.cfg.run_name(), **self.extra_config}

    def start_tracking(self, extra_config: dict | None = None) -> None:
        self.extra_config = extra_config or {}
        run_id = self.folder.run_id()  # recorded before W&B sees it: a run cut off before its first checkpoint
        if self.main:  # keeps its id
            self.tracker.announce()
            write_json(self.run_dir / "config.json", self.config())
        self._start(run_id)

    def add_config(self, extra: dict) -> None:
        """Config keys known only once the run's inputs are resolved (teachers, pool)."""
        self.extra_config = {**self.extra_config, **extra}
        if self.main:
            write_json(self.run_dir / "config.json", self.config())
        self.tracker.update_config(extra)

    def _start(self, run_id: str) -> None:
        """The W&B run, on the main process; a failure there is the same one-line error on every process."""
        self.tracker.run_id = run_id
        self.main_first(lambda: self._start_main(run_id))

    def _start_main(self, run_id: str) -> None:
        cfg = self.cfg
        self.tracker.start(project=cfg.project, run_id=run_id, name=cfg.run_name(), config=self.config(),
                           job_type=names.JOB_TYPES.get(self.job, self.job), group=cfg.study,
                           tags=[self.job, cfg.dataset, cfg.arch])

    def log(self, metrics: dict, step: int) -> None:
        self.tracker.log(metrics, step)

    def summary(self, values: dict) -> None:
        self.tracker.summary(values)

    def where(self) -> str:
        return self.tracker.where()

    def end(self, exit_code: int = 0) -> None:
        self.tracker.end(exit_code)

    @contextlib.contextmanager
    def tracked(self):
        """Around the whole run: the W&B run ends with the process's fate (:meth:`kd.tracker.Tracker.ending`). A
        SIGTERM before the W&B run started (data, teachers, pool) is a preemption too: under a sweep agent the
        run is opened only to be marked preempting, so the agent reruns it."""
        try:
            with self.tracker.ending():
                yield
        except Interrupted as e:
            if e.signum == signal.SIGTERM and not self.tracker.active and os.environ.get("WANDB_SWEEP_ID") \
                    and self.mode != "disabled":
                self._start(self.folder.run_id())
                self.end(143)
            raise

    def finish(self, summary: dict) -> None:
        """The final summary, the end of the W&B run (its artifact uploaded), then ``done.json``: a kill before
        that leaves the run unfinished locally, so the rerun publishes and reports again."""
        self.summary(summary)
        self.end()
        self.folder.mark_done({**self._published, "run_id": self.run_id, "wandb": self.where(), "summary": summary})
        self.accelerator.wait_for_everyone()

    def report_finished(self) -> None:
        """Under a W&B sweep agent, a run whose config already finished here still reports, as a short W&B run
        that copies the finished run's summary (``duplicate_of`` names it), so the sweep sees a result."""
        if not os.environ.get("WANDB_SWEEP_ID") or self.mode == "disabled":
            return
        info = self.done_info()
        self._start(os.environ.get("WANDB_RUN_ID") or wandb_runs.new_run_id())
        self.summary({**info.get("summary", {}), "duplicate_of": info.get("run_id")})
        self.end()

    # ----------------------------------------------------------------------------------------- training
    def save_checkpoint(self, model, optimizer, epoch: int, step: int, sums: dict, history: list,
                        last: bool = False) -> None:
        """Model + optimizer as safetensors; position, stats and history in the pointer JSON (atomic); mirrored
        to the store (online also to W&B) so that the run resumes on another machine (:mod:`kd.mirror`): at a
        stop, at the last epoch, and otherwise at most every ``MIRROR_EVERY_S`` seconds."""
        if not self.main:
            return
        tensors, info = state_tensors(self.accelerator.unwrap_model(model), optimizer)
        self.ckpt = self.folder.save(tensors, {**info, "epoch": epoch, "step": step, "sums": sums,
                                               "history": history, "extra": self.extra_state}, self.run_id)
        if last or time.monotonic() - self._mirrored >= MIRROR_EVERY_S:
            checkpoints = self.folder.checkpoints
            mirror.publish(self.run_dir, checkpoints.folder / self.ckpt["file"], checkpoints.pointer, self.ckpt,
                           run=self.run if self.mode == "online" else None, store=self.cfg.store)
            self._mirrored = time.monotonic()

    def _fetch_checkpoint(self) -> None:
        """A run folder with no checkpoint (a run requeued onto another machine) takes the mirrored one."""
        folder = self.folder
        check_name_lengths(self.run_dir, "the run folder")
        if str(self.cfg.resume) == "False" or folder.finished or folder.checkpoints.pointer.exists():
            return
        source = mirror.fetch(self.run_dir, folder.checkpoints.pointer.name, self.mode, self.cfg.project,
                              store=self.cfg.store)
        if source is not None:
            print(f"fetched the checkpoint of {self.run_dir.name} from {source}", flush=True)

    def member(self, model, objective, compile: bool = True) -> Member:
        """The model on the device with its optimizer, through Accelerate, resumed from the run's checkpoint."""
        cfg = self.cfg
        model = model.to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(  # the paper decays every parameter, BN included
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay,
        )
        model, optimizer = self.accelerator.prepare(model, optimizer)
        m = Member(self, model, optimizer, objective, compile_model(model, cfg) if compile else model)
        if self.ckpt:
            load_state_tensors(self.folder.tensors(str(self.device)), self.ckpt,
                               self.accelerator.unwrap_model(model), optimizer)
            self.extra_state = self.ckpt.get("extra", {})
            if self.main:
                print(f"resuming {self.run_dir} at epoch {self.ckpt['epoch']} step {self.ckpt['step']}", flush=True)
            self.tracker.replay([(row["epoch"], row) for row in self.ckpt["history"]])
            m.epoch, m.step = self.ckpt["epoch"], self.ckpt["step"]
            m.sums, m.history = dict(self.ckpt["sums"]), list(self.ckpt["history"])
        return m

    def fit(self, model, objective) -> list[dict]:
        m = self.member(model, objective)
        fit([m])
        self.model = self.accelerator.unwrap_model(m.model)
        return m.history

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
