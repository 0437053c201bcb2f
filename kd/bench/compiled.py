"""The compile section: eager vs ``--compile=True`` (:mod:`kd.accel`) on the student step distill.py runs
(m = 1, cache, ratio 0), and whether a SIGTERM that arrives while the first step compiles is honoured.

It runs in a child process (``python -m kd.bench.compiled SPEC.json OUT.json``) under the time left in the
run's budget: a compilation cannot be cut short from inside, so the parent kills the child at its deadline
and reports what the child had written by then (it writes OUT.json after every phase). In the child:

* **sigterm**: a fresh compiled Session.fit; the process sends itself SIGTERM once the first batch is made
  (while that step compiles) and the time until :class:`~kd.errors.Interrupted` (checkpoint written) is timed.
* **rounds**: eager and each compile mode, interleaved, ``compile_epochs`` epochs a round on a training set
  with a short last batch; per round the first epoch's seconds (the compilation) and the median img/s of
  the others, and dynamo's graph count after the first epoch and at the end (0 more: nothing recompiled).
* **pack** (where packs stack, i.e. not on the CPU; when the pack section measured one): the stacked pack of
  the pack section's best k, eager vs compiled (:class:`kd.bench.packs.CompiledStackedPack`, default mode),
  interleaved; its compilation is the compiled variant's untimed first round. Skipped, and named, when the
  time left is short of what the student step's compilation took (x 1.5, a pack's graph is larger).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from kd.bench.common import TEMPERATURE, Bench, Clock, Sizes, amp, interleave, random_data, ratio, teachers
from kd.bench.table import note, row
from kd.metadata import OBJECT, read_json


class Counted:
    """An objective that records dynamo's graph count in every epoch's metrics (and calls ``on_first`` once,
    when its first batch is made)."""

    def __init__(self, inner, on_first=None):
        self.inner, self.on_first = inner, on_first

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def batches(self, epoch: int, start: int = 0):
        for batch in self.inner.batches(epoch, start):
            if self.on_first is not None:
                self.on_first()
                self.on_first = None
            yield batch

    def epoch_metrics(self, sums: dict) -> dict:
        from torch._dynamo.utils import counters

        return {**self.inner.epoch_metrics(sums), "bench/graphs": counters["stats"]["unique_graphs"]}


def _objective(spec: dict, data, cache, ens, session, on_first=None):
    from kd.config import DistillConfig
    from kd.objectives import Distill

    cfg = DistillConfig(batch_size=spec["batch"], temperature=TEMPERATURE, seed=0)
    return Counted(Distill(cfg, data, ens, cache=cache, acc=session.accelerator), on_first)


def _sigterm(spec: dict, sizes: Sizes, device, data, cache, ens, root: Path) -> dict:
    """Seconds from a SIGTERM sent while the first step compiles to the loop's Interrupted."""
    from kd.bench.loops import engine_cfg
    from kd.errors import Interrupted
    from kd.models import build_model, to_device
    from kd.optim import optimizer
    from kd.session import Session

    cfg = engine_cfg(sizes, device, "student", spec["batch"], root / "sigterm", True, 2)
    session = Session(dataclasses.replace(cfg, compile_mode=spec["modes"][0]), job="bench")
    sent: list[float] = []

    def kill() -> None:
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGTERM)

    objective = _objective(spec, data, cache, ens, session, lambda: threading.Timer(0.2, kill).start())
    model = to_device(build_model(sizes.arch, 100), session.device)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            session.fit(model, optimizer(model.parameters(), session.cfg), objective)
    except Interrupted:
        stopped = time.perf_counter()
        ckpt = session.folder.checkpoints.load("")
        return {"honoured": True, "seconds_after_signal": stopped - sent[0], "signal_at_s": sent[0] - t0,
                "first_step_s": stopped - t0, "stopped_at_step": ckpt["step"] if ckpt else None,
                "checkpoint": ckpt is not None}
    return {"honoured": False, "signal_sent": bool(sent), "seconds": time.perf_counter() - t0}


def _rounds(spec: dict, sizes: Sizes, device, data, cache, ens, clock: Clock, out: dict, save) -> None:
    """Interleaved rounds of eager and every compile mode; per round, its first epoch and graph counts."""
    from kd.bench.loops import Engine

    variants = {}
    for mode in ["eager", *spec["modes"]]:
        engine = Engine(sizes, device, "student", spec["batch"], lambda s: _objective(spec, data, cache, ens, s),
                        Path(spec["root"]), mode != "eager", epochs=sizes.compile_epochs)
        variants[mode] = _variant(engine, mode, data.n_train, clock, out, save)
    interleave(variants, spec["rounds"])


def _variant(engine, mode: str, n: int, clock: Clock, out: dict, save):
    """A round of eager or of one compile mode; its rate also goes to out["samples_img_s"], saved at once."""
    def run() -> float:
        from torch._dynamo.utils import counters

        rounds = out.setdefault("per_round", {}).setdefault(mode, [])
        compile_s = out.setdefault("compile_s", {})
        estimate = max(compile_s.values(), default=0.0) if mode != "eager" and mode not in compile_s else 0.0
        if not clock.fits(estimate * 1.3 + 10):
            out.setdefault("skipped", []).append(mode)
            return float("nan")
        engine.cfg = dataclasses.replace(engine.cfg, compile_mode="default" if mode == "eager" else mode)
        before = counters["stats"]["unique_graphs"]
        rate = engine.round()
        h = engine.history
        first = n / h[0]["throughput/img_per_s"]
        rounds.append({"first_epoch_s": first, "img_s": rate, "graphs_before": before,
                       "graphs_after_epoch_1": h[0]["bench/graphs"], "graphs_at_end": h[-1]["bench/graphs"]})
        if h[0]["bench/graphs"] > before:  # this round compiled (in its first epoch)
            compile_s[mode] = first - n / rate
        out.setdefault("samples_img_s", {}).setdefault(mode, []).append(rate)
        save()
        return rate
    return run


def child(spec_path: str, out_path: str) -> None:
    """The child process: both phases, OUT.json rewritten after each."""
    import torch

    from kd.models import Ensemble
    from kd.teacher_cache import all_view_targets

    spec = read_json(spec_path, OBJECT)
    out = Path(out_path)
    clock = Clock(spec["deadline_s"])
    os.environ["WANDB_MODE"] = "disabled"
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    sizes = Sizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["sizes"].items()})
    data = random_data(spec["n"], device, seed=4)
    ens = Ensemble(teachers(1, sizes.arch, device))
    cache = all_view_targets(ens, data, autocast=lambda: amp(device), progress=False)
    result: dict = {"n": spec["n"], "batch": spec["batch"], "modes": spec["modes"]}

    def save() -> None:
        out.write_text(json.dumps(result))

    if spec["sigterm"]:
        result["sigterm"] = _sigterm(spec, sizes, device, data, cache, ens, Path(spec["root"]))
        if result["sigterm"].get("honoured"):
            result["compile_s"] = {spec["modes"][0]: result["sigterm"]["first_step_s"]}
        save()
    _rounds(spec, sizes, device, data, cache, ens, clock, result, save)
    if spec.get("pack"):
        _pack(spec["pack"], sizes, device, clock, result, save)


def _pack(pack: dict, sizes: Sizes, device, clock: Clock, out: dict, save) -> None:
    """The stacked pack of ``pack["k"]`` students, eager vs compiled, into ``out["pack"]``."""
    from kd.bench.packs import Pack, Students

    compile_s = max(out.get("compile_s", {}).values(), default=60.0)
    res = out["pack"] = {"k": pack["k"], "arch": pack["arch"], "batch": pack["batch"]}
    if not clock.fits(compile_s * 1.5 + 15):
        res["skipped"] = f"over budget ({clock.left():.0f} s left, the student step compiled in {compile_s:.0f} s)"
        out.setdefault("skipped", []).append("pack")
        save()
        return
    try:
        students = Students(pack["k"], pack["arch"], pack["batch"], pack["images"], device)
        eager = Pack(students, pack["k"], stacked=True)
        compiled = Pack(students, pack["k"], stacked=True, compiled=True)
        t0 = time.perf_counter()
        compiled.round(1)  # compiles
        res["compile_s"] = time.perf_counter() - t0
        eager.round(1)
        save()
        s = interleave({"eager": lambda: eager.round(pack["steps"]),
                        "compiled": lambda: compiled.round(pack["steps"])}, pack["rounds"])
    except Exception as e:  # a graph torch.compile cannot build is a finding, not the end of the run
        res["failed"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
        save()
        return
    res.update(samples_img_s=s, gain=ratio(s, "compiled", "eager"))
    save()


# ---------------------------------------------------------------------------------------------------------
# the parent


def spec_for(b: Bench, packs: dict | None = None) -> dict:
    """The child's work; ``packs``: the pack section's results (its best k is compiled where packs stack)."""
    import torch

    from kd.bench.packs import best_k, stacks

    sizes, batch = b.sizes, b.sizes.distill_batch
    k = best_k(packs or {})
    pack = None
    if k and stacks(b.device):
        pack = {"k": k, "arch": packs["arch"], "batch": packs["batch"], "images": packs["images"],
                "steps": packs["steps_per_round"], "rounds": max(1, min(sizes.rounds, 2))}
    return {"device": str(b.device), "sizes": asdict(sizes), "batch": batch,
            "n": sizes.compile_steps * batch + batch // 4, "modes": list(sizes.compile_modes),
            "rounds": max(1, min(sizes.rounds, 2)), "sigterm": True, "threads": torch.get_num_threads(),
            "root": str(b.root / "compile"), "deadline_s": max(b.clock.left() - 10, 1) if sizes.budget_s else 0,
            "pack": pack}


def run_child(b: Bench, spec: dict) -> tuple[dict, str]:
    """The child's results (whatever it wrote before its deadline) and how it ended."""
    spec_path, out_path = b.root / "compile-spec.json", b.root / "compile-out.json"
    spec_path.write_text(json.dumps(spec))
    timeout = spec["deadline_s"] + 5 if spec["deadline_s"] else None
    proc = subprocess.Popen([sys.executable, "-m", "kd.bench.compiled", str(spec_path), str(out_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
        how = "finished" if proc.returncode == 0 else f"failed (exit {proc.returncode}): {log.strip()[-600:]}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and its compile workers
        proc.communicate()
        how = f"stopped at the run's budget ({timeout:.0f} s)"
    return (read_json(out_path, OBJECT) if out_path.exists() else {}), how


def bench_compile(b: Bench, packs: dict | None = None) -> dict:
    spec = spec_for(b, packs)
    got, how = run_child(b, spec)
    got.update(ended=how, spec={k: spec[k] for k in ("n", "batch", "modes", "rounds", "deadline_s", "pack")})
    b.skipped.extend(f"compile: {name}" for name in got.get("skipped", []))
    s, compile_s = got.get("samples_img_s", {}), got.get("compile_s", {})
    for mode in spec["modes"]:
        if s.get(mode) and s.get("eager"):
            more = max(r["graphs_at_end"] - r["graphs_after_epoch_1"] for r in got["per_round"][mode])
            b.add(row(f"compile ({mode}): compiled vs eager student step", statistics.median(s[mode]),
                      statistics.median(s["eager"]), ratio(s, mode, "eager"), None),
                  note(f"compile ({mode}): compiling / recompiles", f"{compile_s.get(mode, float('nan')):.1f} s",
                       "", "", f"+{more} graphs after ep 1"))
        else:
            b.add(note(f"compile ({mode}): not measured", "skipped" if mode in got.get("skipped", []) else "failed",
                       "", "", how[:18]))
    sig = got.get("sigterm", {})
    if sig:
        b.add(note("compile: SIGTERM while the first step compiles",
                   f"{sig['seconds_after_signal']:.1f} s" if sig.get("honoured") else "NOT honoured",
                   f"stopped at step {sig.get('stopped_at_step')}" if sig.get("honoured") else "", "",
                   "checkpoint written" if sig.get("checkpoint") else ""))
    _pack_rows(b, spec, got)
    if not how.startswith("finished"):
        print(f"compile section {how}", flush=True)
    return got


def _pack_rows(b: Bench, spec: dict, got: dict) -> None:
    if not spec["pack"]:
        b.add(note("compile: pack", "not run", "", "", "packs loop here" if packs_loop(b) else "no pack measured"))
        return
    res, k = got.get("pack", {}), spec["pack"]["k"]
    if res.get("samples_img_s"):
        s = res["samples_img_s"]
        b.add(row(f"compile: pack k={k} compiled vs eager", statistics.median(s["compiled"]),
                  statistics.median(s["eager"]), res["gain"], None),
              note(f"compile: pack k={k} compiling", f"{res['compile_s']:.1f} s"))
    else:
        stopped = got.get("ended", "").startswith("stopped")  # killed at the budget before this phase ended
        why = "over budget" if res.get("skipped") or stopped else (res.get("failed") or got.get("ended", ""))
        b.add(note(f"compile: pack k={k}", "skipped" if res.get("skipped") or stopped else "failed", "", "",
                   why[:18]))
        if stopped and not res.get("skipped"):
            b.skipped.append("compile: pack")
        if res.get("failed"):
            print(f"compile: pack k={k} failed: {res['failed']}", flush=True)


def packs_loop(b: Bench) -> bool:
    from kd.bench.packs import stacks

    return not stacks(b.device)


if __name__ == "__main__":
    child(*sys.argv[1:3])
