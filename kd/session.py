"""A run, whatever it trains (a teacher, a student, a packed student, a generator, a pool): the one lifecycle.

A :class:`Session` is what a run is:

* ``accelerator``: Accelerate (device, mixed precision, processes) and the run's seed;
* ``folder``: its run folder (:class:`kd.run_folder.RunFolder`: resume rules, checkpoints, run id, done marker),
  ``cfg.run_dir()``; a folder without a checkpoint (or with an older one of the same W&B run) first takes the
  run's mirrored one (:mod:`kd.mirror`) and records its run id, so a run requeued onto another machine continues
  as the same run; the run is claimed in the store with the folder's lock (:mod:`kd.claims`), so two machines
  never train it at once;
* ``tracker``: its W&B run (:class:`kd.tracker.Tracker`, main process only).

Every trainer goes through the same steps: ``Session(cfg, job)``; ``if session.already_finished(): return`` (one
line, exit 0, nothing republished); ``with session.tracked():`` (a stop ends the W&B run as preempted or
stopped) ``session.start_tracking(...)``, the work, checkpoints through :meth:`save_checkpoint`,
:meth:`publish`, :meth:`finish` (the summary, the end of the W&B run, then ``done.json``). The optimizer and the
model are the caller's (:mod:`kd.optim`); :meth:`member` puts them on the device and resumes them for the
engine's loop. A resumed run re-logs only the checkpointed rows W&B has not seen, so no step is logged twice.

What a config must offer (:class:`RunConfig`): ``run_dir()``, ``run_name()``, ``identity()``, ``run_seed``, and
``resume``, ``store``, ``project``, ``study``, ``mixed_precision``, ``cpu``, ``out_flag`` (the flag that names
where its run folder goes, for error lines).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Protocol

import torch

from kd import artifacts, claims, faults, mirror, names, wandb_runs
from kd.accel import accelerator, compile_model
from kd.checkpoint import load_state_tensors
from kd.engine import Member, fit
from kd.errors import Interrupted, KDError, first_line
from kd.flags import to_dict
from kd.io import check_folder, check_name_lengths, remove_stale_temps, save_weights, write_json
from kd.run_folder import Layout, RunFolder
from kd.tracker import Tracker

CLASSIFIER = Layout(required=("epoch", "step", "param_groups"))  # a teacher's or student's checkpoints
MIRROR_EVERY_S = 300.0  # between mirrored checkpoints (a stop and the last epoch are always mirrored)


def room_needed(n_params: int, cache_bytes: int = 0) -> int:
    """The disk a classifier run needs at its largest moment: two checkpoints side by side (weights and momentum
    each: the new one is written before the old one goes), the mirrored copy of one in the store, the final
    weights (run folder and store), and the teacher cache it builds in the store (``cache_bytes``)."""
    weights = 4 * n_params  # float32
    return 2 * 2 * weights + 2 * weights + 2 * weights + cache_bytes


def kept_bytes(n_params: int) -> int:
    """What a finished classifier run keeps: its last checkpoint (weights and momentum), the final weights and their
    store copy, and the mirrored checkpoint in the store."""
    weights = 4 * n_params
    return 2 * weights + 2 * weights + 2 * weights


class RunConfig(Protocol):
    resume: str
    store: str
    project: str
    study: str
    mixed_precision: str
    cpu: bool
    out_flag: str

    @property
    def run_seed(self) -> int: ...

    def run_dir(self) -> Path: ...

    def run_name(self) -> str: ...

    def identity(self) -> dict: ...


class Session:
    def __init__(self, cfg: RunConfig, job: str, layout: Layout = CLASSIFIER):
        """``layout``: how the run folder keeps its checkpoints (a classifier's by default)."""
        from accelerate.utils import set_seed

        from kd.config import resolve_device_defaults

        cfg = resolve_device_defaults(cfg)  # the "auto" settings as this machine runs them
        self.cfg, self.job = cfg, job
        self.mode = wandb_runs.wandb_mode()
        wandb_runs.exported_run_id()  # settings checked before anything is written
        faults.check()
        self.accelerator = accelerator(cfg.mixed_precision, cfg.cpu)
        self.device = self.accelerator.device
        n, batch = self.accelerator.num_processes, getattr(cfg, "batch_size", None)
        if batch is not None and batch % n:  # started by torchrun or accelerate launch, not kd.sweep.launch
            raise KDError(f"--batch_size={batch} is the batch of all {n} processes together, and {n} does not "
                          f"divide it: pass a multiple of {n}, or start fewer processes")
        self.main = self.accelerator.is_main_process
        self.run_dir = Path(cfg.run_dir())
        check_name_lengths(self.run_dir, "the run folder")
        self.claim = claims.RunClaim(self.run_dir, cfg.store) if self.main else None
        self.folder = RunFolder(self.run_dir, cfg.identity(), cfg.resume, layout, main=self.main, claim=self.claim)
        self.tracker = Tracker(self.main, self.mode)
        self.extra_config: dict = {}
        self.extra_state: dict = {}
        self._published: dict = {}
        self._mirrored = time.monotonic()
        self._mirrored_online = False  # a checkpoint went to W&B: its older versions go once the run finished
        self.model = None
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True
        set_seed(cfg.run_seed, device_specific=False)
        if str(cfg.resume) == "auto" and self.folder.finished:  # nothing will be written (a read-only folder)
            self.check_wandb_folder()
        else:
            self.check_outputs()  # before anything is fetched into them
        if self.mode == "online" and self.main:
            wandb_runs.check_reachable()
        self.main_first(self._fetch_checkpoint)
        self.ckpt = self.folder.open()
        if self.main:
            remove_stale_temps(self.run_dir / "final")  # a publish cut off mid-write: never read, only space
        self.accelerator.wait_for_everyone()  # --resume=False: the folder is cleared before any process reads it

    # ----------------------------------------------------------------------------------------- state
    def already_finished(self, what: str | None = None) -> bool:
        """With ``--resume=auto``, a finished run says so (and, under a sweep agent, reports it) instead of
        training again; nothing is written or republished."""
        if not (self.folder.finished and str(self.cfg.resume) == "auto"):
            return False
        if self.main:
            info = self.folder.done_info()
            print(f"already finished: {self.run_dir} ({what or self.job} artifact {info.get('artifact')}); "
                  "pass --resume=False to train it again", flush=True)
        self.report_finished()
        return True

    def check_outputs(self, need_bytes: int = 0) -> None:
        """Every folder this run will write is a writable folder with room, checked before any work or W&B run."""
        check_folder(self.run_dir.parent, f"the output folder ({self.cfg.out_flag})", need_bytes)
        check_folder(artifacts.store_root(self.cfg.store), "the artifact store (--store or $KD_STORE)", need_bytes)
        if self.run_dir.is_dir():
            check_folder(self.run_dir, "the run folder")
        self.check_wandb_folder()

    def check_wandb_folder(self) -> None:
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
        if value[0] == "error":  # every process has it before any exits (a launcher stops the rest at the first exit)
            self.accelerator.wait_for_everyone()
            raise KDError(value[1])
        return value[1]

    # ----------------------------------------------------------------------------------------- W&B
    def config(self) -> dict:
        return {**to_dict(self.cfg), names.JOB: self.job, names.RUN_NAME: self.cfg.run_name(),
                names.SEED_USED: self.cfg.run_seed, **self.extra_config}

    def start_tracking(self, extra_config: dict | None = None, tags: list[str] | None = None) -> None:
        self.extra_config = extra_config or {}
        run_id = self.folder.run_id()  # recorded before W&B sees it: a run cut off before its first checkpoint
        if self.main:  # keeps its id
            self.tracker.announce()
            write_json(self.run_dir / "config.json", self.config())
        self._start(run_id, tags)

    def add_config(self, extra: dict) -> None:
        """Config keys known only once the run's inputs are resolved (teachers, pool)."""
        self.extra_config = {**self.extra_config, **extra}
        if self.main:
            write_json(self.run_dir / "config.json", self.config())
        self.tracker.update_config(extra)

    def _start(self, run_id: str, tags: list[str] | None = None) -> None:
        """The W&B run, on the main process; a failure there is the same one-line error on every process."""
        self.tracker.run_id = run_id
        cfg = self.cfg
        tags = tags or [self.job, *(str(v) for v in (getattr(cfg, "dataset", None), getattr(cfg, "arch", None)) if v)]
        self.main_first(lambda: self.tracker.start(
            project=cfg.project, run_id=run_id, name=cfg.run_name(), config=self.config(),
            job_type=names.JOB_TYPES.get(self.job, self.job), group=cfg.study, tags=tags))

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
                self.tracker.end(143)
            raise
        finally:
            self.folder.release()  # a run that stopped or failed: its lock and its claim in the store

    def finish(self, summary: dict, done: bool = True) -> None:
        """The final summary, the end of the W&B run (its artifact uploaded), then ``done.json``: a kill before
        that leaves the run unfinished locally, so the rerun publishes and reports again. ``done=False``: a run
        that stopped where it was told to (a generator's ``--max_steps``) ends its W&B run and stays unfinished."""
        self.tracker.summary(summary)
        self.tracker.end()
        if done and self.main and self.mode == "online" and self._mirrored_online:
            mirror.prune_online(self.run_dir, self.cfg.project)
        if done:
            self.folder.mark_done({**self._published, "run_id": self.tracker.run_id, "wandb": self.tracker.where(),
                                   "summary": summary})
        self.accelerator.wait_for_everyone()

    def report_finished(self) -> None:
        """Under a W&B sweep agent, a run whose config already finished here still reports, as a short W&B run
        that copies the finished run's summary (``duplicate_of`` names it), so the sweep sees a result."""
        if not os.environ.get("WANDB_SWEEP_ID") or self.mode == "disabled":
            return
        info = self.folder.done_info()
        self._start(wandb_runs.exported_run_id() or wandb_runs.new_run_id())
        self.tracker.summary({**info.get("summary", {}), "duplicate_of": info.get("run_id")})
        self.tracker.end()

    # ----------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, tensors: dict, info: dict, last: bool = False, name: str | None = None) -> None:
        """``tensors`` as safetensors, ``info`` (position, statistics, history) in the pointer JSON (atomic);
        mirrored to the store (online also to W&B) so that the run resumes on another machine (:mod:`kd.mirror`):
        at a stop or the run's end (``last``), and otherwise at most every ``MIRROR_EVERY_S`` seconds."""
        if not self.main:
            return
        self.ckpt = self.folder.save(tensors, {**info, "extra": self.extra_state}, self.tracker.run_id, name=name)
        try:
            self.claim.refresh()  # the heartbeat; a run taken over meanwhile stops here, before it mirrors
        except OSError as e:
            print(f"warning: this run's claim in the store was not refreshed ({first_line(e)})", file=sys.stderr,
                  flush=True)
        if last or time.monotonic() - self._mirrored >= MIRROR_EVERY_S:
            self._mirror()

    def _mirror(self) -> None:
        """The newest checkpoint into the store (and W&B); a store that fails (full, unwritable) is one warning
        line: the checkpoint stays in the run folder, and a stop is still a preemption (exit 143)."""
        checkpoints = self.folder.checkpoints
        try:
            mirror.publish(self.run_dir, checkpoints.folder / self.ckpt["file"], checkpoints.pointer, self.ckpt,
                           run=self.tracker.run if self.mode == "online" else None, store=self.cfg.store)
        except (OSError, KDError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
            print(f"warning: the checkpoint was not mirrored to the store ({why}); it is kept in {self.run_dir}, "
                  "where this run resumes (another machine cannot)", file=sys.stderr, flush=True)
        self._mirrored = time.monotonic()
        self._mirrored_online = self._mirrored_online or self.mode == "online"

    def _fetch_checkpoint(self) -> None:
        """A run folder with no checkpoint (a run requeued onto another machine), or with an older one of the same
        W&B run than the mirror's, takes the mirrored one and records its run id as this folder's."""
        folder = self.folder
        if str(self.cfg.resume) == "False" or folder.finished:
            return
        pointer = folder.checkpoints.pointer
        if not mirror.newer(self.run_dir, pointer, folder.checkpoints.shape, store=self.cfg.store):
            return
        source = mirror.fetch(self.run_dir, pointer, self.mode, self.cfg.project, store=self.cfg.store)
        if source is not None:
            folder.record_run_id(mirror.fetched_run_id(pointer, folder.checkpoints.shape))
            print(f"fetched the checkpoint of {self.run_dir.name} from {source}", flush=True)

    # ----------------------------------------------------------------------------------------- training
    def member(self, model, optimizer, objective, compile: bool = True) -> Member:
        """``model`` (on the device, with ``optimizer`` over its parameters: :func:`kd.optim.optimizer`) through
        Accelerate for the engine's loop, resumed from the run's checkpoint."""
        if self.accelerator.num_processes > 1 and self.cfg.sync_bn:  # the global batch's statistics (kd.syncbn)
            from kd.syncbn import synchronise

            model = synchronise(model, self.device)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        m = Member(self, model, optimizer, objective, compile_model(model, self.cfg) if compile else model)
        if self.ckpt:
            if len(self.ckpt["history"]) != self.ckpt["epoch"]:
                raise KDError(f"the checkpoint pointer {self.folder.checkpoints.pointer} says epoch "
                              f"{self.ckpt['epoch']} but holds {len(self.ckpt['history'])} epochs of history (an "
                              "edited pointer?): restore it, or pass --resume=False to train this run from scratch")
            tensors = self.folder.tensors(self.device)
            load_state_tensors(tensors, self.ckpt, self.accelerator.unwrap_model(model), optimizer)
            if hasattr(objective, "restore_state"):
                objective.restore_state(tensors)
            self.extra_state = self.ckpt.get("extra", {})
            if self.main:
                print(f"resuming {self.run_dir} at epoch {self.ckpt['epoch']} step {self.ckpt['step']}", flush=True)
            self.tracker.replay([(row["epoch"], row) for row in self.ckpt["history"]])
            m.epoch, m.step = self.ckpt["epoch"], self.ckpt["step"]
            m.sums, m.history = dict(self.ckpt["sums"]), list(self.ckpt["history"])
        return m

    def fit(self, model, optimizer, objective) -> list[dict]:
        """The engine's loop over this run alone; ``self.model`` is the trained model."""
        m = self.member(model, optimizer, objective)
        fit([m])
        self.model = self.accelerator.unwrap_model(m.model)
        return m.history

    # ----------------------------------------------------------------------------------------- outputs
    def publish_weights(self, model, name: str, type: str, meta: dict) -> Path:
        """Final weights (safetensors + meta.json) into the run folder, then :meth:`publish`."""
        path = None
        if self.main:
            state = dict(self.accelerator.unwrap_model(model).state_dict())
            full = save_weights(self.run_dir / "final", state, meta)
            files = [self.run_dir / "final" / "model.safetensors", self.run_dir / "final" / "meta.json"]
            path = self.publish(name, type, files, full)
        self.accelerator.wait_for_everyone()
        return path

    def publish(self, name: str, type: str, files: list[Path], meta: dict) -> Path | None:
        """``files`` as the next version of artifact ``name`` in the local store and W&B (main process), with the
        study's aliases; recorded for ``done.json``."""
        if not self.main:
            return None
        path = artifacts.publish(name, type, files, meta, run=self.tracker.run, store=self.cfg.store,
                                 aliases=self.aliases())
        faults.point("published")  # in the store, not yet marked done
        self._published = {"artifact": name, "store_path": str(path)}
        return path

    def aliases(self) -> list[str]:
        """Aliases of what this run publishes: its study (students of the study resolve ``name:{study}``) and its
        recipe fingerprint; none for runs outside a study."""
        if self.cfg.study == "default":
            return []
        return [self.cfg.study, f"recipe-{self.folder.fingerprint}"]
