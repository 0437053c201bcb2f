"""How fast is this repository, and how much faster than the paper's way? One run, one table, one JSON.

    python -m kd.bench                     # the CPU: small sizes, a few minutes
    python -m kd.bench --device=cuda       # a GPU: the paper's sizes (preresnet56, batch 256 / 128, 32 px)
    python -m kd.bench --threads=0         # the CPU with torch's default thread count

Every figure is measured in this process on this machine, on random CIFAR-shaped data (32 px, 100
classes, 162 views). Variants of one comparison run interleaved, round by round in rotating order; a
figure is the median over rounds (images/s), a ratio the median of the per-round ratios. On the CPU the
bench runs one intra-op thread unless told otherwise: the figures that matter are ratios, and on a shared
machine torch's threads wait for each other (a small 2-core VM under load ran 6x slower with 2 threads).

* **engine**: :meth:`kd.engine.Session.fit` itself (the training loop of train.py and distill.py, W&B
  disabled), timed by its own per-epoch ``throughput/img_per_s`` with the first epoch of every round
  dropped (warm-up); checkpoints and evaluation fall outside that clock, as in a real run.
* **bare**: model forward/backward/SGD step on the same batches made beforehand (same model, memory
  format, precision and optimizer as the engine): the engine's overhead ratio.
* **paper**: the paper's way: a torchvision-style CIFAR Dataset of PIL images with RandomCrop(32, pad 4),
  RandomHorizontalFlip, ToTensor, Normalize(0.5, 0.5) through a torch DataLoader (0 workers on the CPU,
  whose cores the model needs; 8 persistent workers on a GPU), fp32 NCHW models, teachers run member by
  member, ``log(mean(softmax))``, ``loss.item()`` every step.
* **cache**: distillation reading the teacher-output cache (:mod:`kd.teachers`) vs running the teachers
  every step; the one-off build is shown apart, with the epoch after which it has paid for itself.
* **ensemble**: the m-member teacher forward, one stacked (vmap) call vs a loop over members: the
  evidence behind :class:`kd.models.Ensemble`'s default (loop on the CPU, stacked on accelerators).
* **synthetic**: images/s of :func:`kd.synthetic.denoise` (the batch loop of ``python -m kd.synthetic
  generate``: per-image generators, a fresh scheduler, UNet in bf16 on a GPU) with a randomly initialised
  UNet2DModel of a :mod:`kd.generator_presets` recipe (the CPU: the 8 px digits demo generator; a GPU: the
  google/ddpm-cifar10-32 architecture), for the DDPM, DDIM and DPM-Solver++ schedulers and a few step
  counts. Where kd.synthetic is absent the bench times the same loop over diffusers and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kd.errors import KDError


@dataclass(frozen=True)
class Sizes:
    arch: str  # students and teachers
    teacher_batch: int  # teacher training
    distill_batch: int
    n_teacher: int  # training images of the teacher-training comparison
    n_distill: int  # training images of distillation (the cache holds n_distill x 162 teacher outputs)
    epochs: int  # engine epochs per round; the first is warm-up
    bare_steps: int
    paper_steps: int
    rounds: int
    ensemble_sizes: tuple = (1, 3, 12)
    gen_batch: int = 8
    gen_steps: tuple = (10, 25)
    unet: str = "digits"  # a generator recipe of kd.generator_presets


CPU = Sizes(arch="preresnet20", teacher_batch=32, distill_batch=32, n_teacher=128, n_distill=32, epochs=4,
            bare_steps=12, paper_steps=4, rounds=3, gen_batch=64)
CUDA = Sizes(arch="preresnet56", teacher_batch=256, distill_batch=128, n_teacher=2048, n_distill=512, epochs=4,
             bare_steps=16, paper_steps=8, rounds=3, gen_batch=256, gen_steps=(25, 100), unet="cifar10")
SMOKE = Sizes(arch="preresnet8", teacher_batch=8, distill_batch=8, n_teacher=16, n_distill=8, epochs=2,
              bare_steps=2, paper_steps=2, rounds=1, ensemble_sizes=(1, 2), gen_batch=2, gen_steps=(2,))
CLASSES = 100
TEMPERATURE = 4.0
TARGETS = {  # (what, minimum ratio)
    "overhead": 0.9, "distill-paper-m3": 1.8, "distill-paper-m12": 4.0, "cache-vs-free-m12": 0.85,
}


# ---------------------------------------------------------------------------------------------------------
# the machine


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
           "device": str(device), "threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()[0]}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def machine_line(m: dict) -> str:
    where = m.get("gpu") or f"CPU {m['cpu']}"
    load = f"load average {m['load_avg_start']:.1f} at start"
    if "load_avg_end" in m:
        load += f", {m['load_avg_end']:.1f} at end"
    return (f"{where} | {m['cores']} cores, {m['threads']} torch threads | torch {m['torch']} | "
            f"device {m['device']} | {load}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_data(n: int, device: torch.device, seed: int):
    from kd.data import DATASETS, Data

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    tx = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)
    ty = torch.randint(0, CLASSES, (32,), generator=g)
    return Data(DATASETS["cifar100"], x, y, tx, ty).to(device)


def teachers(m: int, arch: str, device: torch.device, seed: int = 100) -> list[torch.nn.Module]:
    from kd.models import build_model

    torch.manual_seed(seed)
    return [build_model(arch, CLASSES).to(device).eval() for _ in range(m)]


# ---------------------------------------------------------------------------------------------------------
# the three ways to train


class Engine:
    """Session.fit as train.py / distill.py run it; one fresh Session (and student) per round."""

    def __init__(self, sizes: Sizes, device: torch.device, job: str, batch: int, make_objective, root: Path,
                 compile: bool):
        self.cfg = engine_cfg(sizes, device, job, batch, root, compile)
        self.job, self.make_objective = job, make_objective

    def round(self) -> float:
        from kd.engine import Session
        from kd.models import build_model

        session = Session(self.cfg, job=self.job)
        objective = self.make_objective(session)
        torch.manual_seed(0)
        model = build_model(self.cfg.arch, CLASSES)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            history = session.fit(model, objective)
        return statistics.median(row["throughput/img_per_s"] for row in history[1:])


class Bare:
    """Forward/backward/step of the engine's model on batches made beforehand: no loop, no objective."""

    def __init__(self, arch: str, batches: list, device: torch.device, compile: bool):
        from kd.models import build_model

        torch.manual_seed(0)
        self.model = build_model(arch, CLASSES).to(device).to(memory_format=torch.channels_last).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.fwd = torch.compile(self.model) if compile else self.model
        self.batches = [(b["x"].contiguous(memory_format=torch.channels_last), b["y"]) for b in batches]
        self.device = device
        self.i = 0
        self.round(2)  # warm-up

    def round(self, steps: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        n = 0
        for _ in range(steps):
            x, y = self.batches[self.i % len(self.batches)]
            self.i += 1
            with amp(self.device):
                loss = F.cross_entropy(self.fwd(x).float(), y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            n += x.shape[0]
        sync(self.device)
        return n / (time.perf_counter() - t0)


class PILCifar(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR100's __getitem__: HWC uint8 array -> PIL image -> transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.data = images.permute(0, 2, 3, 1).cpu().numpy()
        self.targets = labels.cpu().tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


class Paper:
    """The paper's loop: DataLoader over PIL transforms, fp32 NCHW, teachers member by member."""

    def __init__(self, arch: str, data, batch: int, device: torch.device, members: list | None = None):
        import torchvision.transforms as T

        from kd.models import build_model

        tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
        workers = 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)
        self.loader = torch.utils.data.DataLoader(
            PILCifar(data.train_x, data.train_y, tf), batch_size=batch, shuffle=True, drop_last=True,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")
        torch.manual_seed(0)
        self.student = build_model(arch, CLASSES).to(device).train()
        self.opt = torch.optim.SGD(self.student.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.teachers = [copy.deepcopy(m).eval() for m in members or []]
        self.device = device
        self.batches = self._forever()
        self.running_loss = 0.0
        self.round(2)  # warm-up (and the workers' start)

    def _forever(self):
        while True:
            yield from self.loader

    def round(self, steps: int) -> float:
        from kd.losses import kd_loss

        sync(self.device)
        t0 = time.perf_counter()
        n = 0
        for _ in range(steps):
            x, y = next(self.batches)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.teachers:
                with torch.no_grad():
                    probs = torch.stack([F.softmax(t(x), dim=-1) for t in self.teachers]).mean(0)
                loss = kd_loss(self.student(x), probs.log(), TEMPERATURE)
            else:
                loss = F.cross_entropy(self.student(x), y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.running_loss += loss.item()
            n += x.shape[0]
        sync(self.device)
        return n / (time.perf_counter() - t0)


def interleave(variants: dict, rounds: int) -> dict[str, list[float]]:
    """variant name -> callable returning images/s; every round runs each once, the order rotating."""
    names = list(variants)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(variants[name]())
    return out


def ratio(samples: dict, a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(samples[a], samples[b]))


# ---------------------------------------------------------------------------------------------------------
# the sections


def bench_training(sizes: Sizes, device, root: Path, compile: bool, rows: list, log) -> dict:
    from kd.objectives import Supervised

    data = random_data(sizes.n_teacher, device, seed=1)
    made = list(Supervised(data, sizes.teacher_batch, seed=0).batches(0))
    engine = Engine(sizes, device, "teacher", sizes.teacher_batch,
                    lambda s: Supervised(data, sizes.teacher_batch, seed=0), root, compile)
    bare = Bare(sizes.arch, made, device, compile)
    paper = Paper(sizes.arch, data, sizes.teacher_batch, device)
    s = interleave({"engine": engine.round, "bare": lambda: bare.round(sizes.bare_steps),
                    "paper": lambda: paper.round(sizes.paper_steps)}, sizes.rounds)
    med = {k: statistics.median(v) for k, v in s.items()}
    rows.append(row("train step: engine vs bare fwd/bwd/step", med["engine"], med["bare"],
                    ratio(s, "engine", "bare"), "overhead"))
    rows.append(row("teacher training: engine vs paper loop", med["engine"], med["paper"],
                    ratio(s, "engine", "paper"), None))
    log(rows[-2], rows[-1])
    return {"samples_img_s": s, "batch": sizes.teacher_batch, "n_train": sizes.n_teacher}


def engine_cfg(sizes: Sizes, device, job: str, batch: int, root: Path, compile: bool):
    from kd.config import DistillConfig, TrainConfig

    cls = TrainConfig if job == "teacher" else DistillConfig
    cfg = cls(dataset="cifar100", arch=sizes.arch, epochs=sizes.epochs, batch_size=batch, eval_every=sizes.epochs,
              out_dir=str(root), resume="False", cpu=device.type == "cpu", channels_last=True, compile=compile,
              mixed_precision="bf16" if device.type == "cuda" else "no")
    cfg.validate()
    return cfg


def bench_distill(sizes: Sizes, device, root: Path, compile: bool, rows: list, log) -> dict:
    data = random_data(sizes.n_distill, device, seed=2)
    results = {}
    for m in sizes.ensemble_sizes:
        results[f"m{m}"], new = distill_m(m, data, sizes, device, root, compile)
        rows.extend(new)
        log(*new)
    return results


def distill_m(m: int, data, sizes: Sizes, device, root: Path, compile: bool):
    from kd.engine import Session
    from kd.models import Ensemble
    from kd.objectives import Distill, Supervised
    from kd.teacher_cache import all_view_targets

    b = sizes.distill_batch
    members = teachers(m, sizes.arch, device)
    ens = Ensemble(members)
    autocast = Session(engine_cfg(sizes, device, "student", b, root, False), job="bench").accelerator.autocast
    sync(device)
    t0 = time.perf_counter()
    cache = all_view_targets(ens, data, autocast=autocast, progress=False)
    sync(device)
    build_s = time.perf_counter() - t0

    def distill(table):
        return lambda session: Distill(data, ens, b, TEMPERATURE, seed=0, cache=table,
                                       autocast=session.accelerator.autocast)

    with_cache = Engine(sizes, device, "student", b, distill(cache), root, compile)
    without = Engine(sizes, device, "student", b, distill(None), root, compile)
    free = Engine(sizes, device, "student", b, lambda session: Supervised(data, b, seed=0), root, compile)
    paper = Paper(sizes.arch, data, b, device, members)
    s = interleave({"cache": with_cache.round, "teachers": without.round, "free": free.round,
                    "paper": lambda: paper.round(sizes.paper_steps)}, sizes.rounds)
    med = {k: statistics.median(v) for k, v in s.items()}
    saved = b / med["teachers"] - b / med["cache"]  # seconds a step saves
    # the build covers n x V outputs; without it the teachers see the n images once an epoch (n / b steps)
    break_even = build_s / (saved * sizes.n_distill / b) if saved > 0 else float("inf")
    pairs = sizes.n_distill * data.num_views
    result = {"samples_img_s": s, "cache_build_s": build_s, "cache_pairs": pairs,
              "cache_member_forwards_per_s": pairs * m / build_s, "cache_break_even_epochs": break_even,
              "cache_mib": cache.numel() * cache.element_size() / 2**20}
    new = [row(f"distill m={m}: engine (cache) vs paper loop", med["cache"], med["paper"],
               ratio(s, "cache", "paper"), f"distill-paper-m{m}"),
           row(f"distill m={m}: cache vs teachers each step", med["cache"], med["teachers"],
               ratio(s, "cache", "teachers"), None),
           row(f"distill m={m}: cache vs teacher-free step", med["cache"], med["free"],
               ratio(s, "cache", "free"), f"cache-vs-free-m{m}"),
           {"what": f"cache build m={m} (one-off)", "ours": f"{build_s:.1f} s", "ref": f"{pairs} img x {m}",
            "ratio": f"{pairs * m / build_s:.0f} fwd/s", "target": f"pays off: {break_even:.1f} ep",
            "holds": ""}]
    return result, new


def amp(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def ensemble_rate(ens, x, device, reps: int = 3):
    def run() -> float:
        with amp(device):
            ens(x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            with amp(device):
                ens(x)
        sync(device)
        return reps * x.shape[0] / (time.perf_counter() - t0)
    return run


def bench_ensemble(sizes: Sizes, device, rows: list, log) -> dict:
    from kd.models import Ensemble

    x = torch.randn(sizes.distill_batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    out = {}
    for m in [k for k in sizes.ensemble_sizes if k > 1]:
        members = teachers(m, sizes.arch, device)
        s = interleave({"stacked": ensemble_rate(Ensemble(members, stacked=True), x, device),
                        "loop": ensemble_rate(Ensemble(members, stacked=False), x, device)}, sizes.rounds)
        med = {k: statistics.median(v) for k, v in s.items()}
        out[f"m{m}"] = s
        rows.append(row(f"ensemble m={m} forward: stacked vs loop", med["stacked"], med["loop"],
                        ratio(s, "stacked", "loop"), None))
        log(rows[-1])
    return out


_TINY_UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                  norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def generator_recipe(name: str):
    """(UNet2DModel kwargs, DDPMScheduler kwargs, label): kd.generator_presets' recipe when it exists."""
    if importlib.util.find_spec("kd.generator_presets") is not None:
        from kd.generator_presets import PRESETS

        if name in PRESETS:
            return PRESETS[name].unet, PRESETS[name].noise, f"kd.generator_presets[{name!r}]"
    return _TINY_UNET, {"num_train_timesteps": 1000}, "a tiny 32 px UNet"


def denoiser():
    """kd.synthetic.denoise (what `python -m kd.synthetic generate` runs per batch) when it exists, else the
    same loop over diffusers written here."""
    if importlib.util.find_spec("kd.synthetic") is not None:
        from kd import synthetic

        if hasattr(synthetic, "denoise") and hasattr(synthetic, "scheduler_class"):
            return synthetic.denoise, synthetic.scheduler_class, "kd.synthetic.denoise"

    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    @torch.no_grad()
    def denoise(unet, scheduler_cls, scheduler_config, steps, generators, device, dtype=torch.float32):
        sched = scheduler_cls.from_config(scheduler_config)
        sched.set_timesteps(steps, device=device)
        c, size = unet.config.in_channels, unet.config.sample_size
        x = torch.stack([torch.randn(c, size, size, generator=g) for g in generators]).to(device)
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:
            eps = unet(sched.scale_model_input(x, t).to(dtype), t).sample.float()
            x = sched.step(eps, t, x, generator=generators).prev_sample
        return x.cpu()

    classes = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}
    return denoise, classes.__getitem__, "diffusers scheduler loop in kd.bench"


@torch.no_grad()
def bench_synthetic(sizes: Sizes, device, rows: list, log) -> dict:
    from diffusers import DDPMScheduler, UNet2DModel

    unet_kwargs, noise, recipe = generator_recipe(sizes.unet)
    denoise, scheduler_class, how = denoiser()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as kd.synthetic generate
    unet = UNet2DModel(**unet_kwargs).to(device).eval()
    if dtype != torch.float32:
        unet = unet.to(dtype)
    config = DDPMScheduler(**noise).config

    def generate(name: str, steps: int) -> float:
        gens = [torch.Generator().manual_seed(i) for i in range(sizes.gen_batch)]
        sync(device)
        t0 = time.perf_counter()
        denoise(unet, scheduler_class(name), config, steps, gens, device, dtype)
        sync(device)
        return sizes.gen_batch / (time.perf_counter() - t0)

    generate("ddim", 2)  # warm-up
    names = ("ddpm", "ddim", "dpm")
    variants = {f"{n}-{k}": (lambda n=n, k=k: generate(n, k)) for n in names for k in sizes.gen_steps}
    s = interleave(variants, max(2, sizes.rounds - 1))
    side = unet_kwargs["sample_size"]
    for name, v in s.items():
        sched, steps = name.split("-")
        rows.append({"what": f"synthetic {sched}, {steps} steps", "ours": f"{statistics.median(v):.1f} img/s",
                     "ref": f"{side} px, batch {sizes.gen_batch}", "ratio": "", "target": "", "holds": ""})
        log(rows[-1])
    return {"samples_img_s": s, "unet": recipe, "params": sum(p.numel() for p in unet.parameters()),
            "batch": sizes.gen_batch, "dtype": str(dtype), "timed": how}


# ---------------------------------------------------------------------------------------------------------
# the table


def row(what: str, ours: float, ref: float, r: float, target: str | None) -> dict:
    need = TARGETS.get(target) if target else None
    return {"what": what, "ours": f"{ours:.0f} img/s", "ref": f"{ref:.0f} img/s", "ratio": f"{r:.2f}x",
            "target": f">= {need}x" if need else "", "holds": ("yes" if r >= need else "NO") if need else "",
            "value": r, "ours_img_s": ours, "ref_img_s": ref, "key": target, "min": need}


COLUMNS = (("what", 48), ("ours", 14), ("ref", 16), ("ratio", 12), ("target", 18), ("holds", 5))


def fmt(r: dict) -> str:
    return "| " + " | ".join(f"{r[k]:<{w}}" for k, w in COLUMNS) + " |"


def table(rows: list) -> str:
    head = {k: k for k, _ in COLUMNS}
    head.update(ours="ours", ref="reference")
    rule = "|" + "|".join("-" * (w + 2) for _, w in COLUMNS) + "|"
    return "\n".join([fmt(head), rule, *(fmt(r) for r in rows)])


def main(argv=None) -> None:
    from kd.errors import cli as user_errors

    p = argparse.ArgumentParser(prog="python -m kd.bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="bench/results.json")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads; 0: torch's default (default: 1 on the CPU, see above)")
    p.add_argument("--rounds", type=int, default=0, help="interleaved rounds per comparison (0: the preset's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the student (engine and bare)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every section runs, no more")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: train,distill,ensemble,synthetic")
    args = p.parse_args(argv)
    with user_errors():
        if args.device == "cuda" and not torch.cuda.is_available():
            raise KDError("--device=cuda but torch sees no GPU: run on a GPU machine, or without --device")
        threads = (1 if args.device == "cpu" else 0) if args.threads is None else args.threads
        if threads < 0 or args.rounds < 0:
            raise KDError("--threads and --rounds must be >= 0")
        if threads:
            torch.set_num_threads(threads)
        device = torch.device(args.device)
        sizes = SMOKE if args.smoke else CPU if device.type == "cpu" else CUDA
        if args.rounds:
            sizes = Sizes(**{**asdict(sizes), "rounds": args.rounds})
        skip = set(filter(None, args.skip.split(",")))
        os.environ["WANDB_MODE"] = "disabled"  # the engine runs here only to be timed
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        info = machine(device)
        print(f"kd.bench on {machine_line(info)}", flush=True)
        print(f"student and teachers {sizes.arch}, 32 px, {CLASSES} classes; teacher batch {sizes.teacher_batch}, "
              f"distillation batch {sizes.distill_batch} (tau {TEMPERATURE:g}); {sizes.rounds} rounds", flush=True)
        rows: list = []
        t_start = time.perf_counter()

        def log(*new):
            for r in new:
                print(fmt(r), flush=True)

        print(table([]), flush=True)
        results: dict = {}
        with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
            root = Path(tmp)
            if "train" not in skip:
                results["training"] = bench_training(sizes, device, root, args.compile, rows, log)
            if "distill" not in skip:
                results["distillation"] = bench_distill(sizes, device, root, args.compile, rows, log)
        if "ensemble" not in skip:
            results["ensemble"] = bench_ensemble(sizes, device, rows, log)
        if "synthetic" not in skip:
            results["synthetic"] = bench_synthetic(sizes, device, rows, log)
        info["load_avg_end"] = os.getloadavg()[0]
        info["seconds"] = time.perf_counter() - t_start
        checks = [r for r in rows if r.get("min")]
        print(f"\n{machine_line(info)}; {info['seconds']:.0f} s\n{table(rows)}")
        held = sum(r["holds"] == "yes" for r in checks)
        print(f"targets: {held} of {len(checks)} hold" + "".join(
            f"\n  {r['what']}: {r['ratio']} (target {r['target']})" for r in checks if r["holds"] != "yes"))
        from kd.io import write_json

        out = Path(args.out)
        write_json(out, {"machine": info, "sizes": asdict(sizes), "compile": args.compile, "smoke": args.smoke,
                         "rows": rows,
                         "targets": {r["what"]: {"ratio": r["value"], "min": r["min"], "holds": r["holds"] == "yes"}
                                     for r in checks},
                         "results": results, "table": table(rows)})
        print(f"wrote {out}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
