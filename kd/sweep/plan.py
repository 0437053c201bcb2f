"""What a study's folder of sweep specs asks for: each spec's runs, how many of them an earlier spec of the folder
already holds, and the disk and memory the study needs. ``python -m kd.sweep.plan sweeps/cifar100`` prints it as
Markdown; the README's and the reference's tables of every study are that output (``make docs`` writes them between
``<!-- plan FOLDER -->`` and ``<!-- /plan -->``, and a test fails when one is stale).

* Runs: every config of each grid, parsed from the flags ``wandb agent`` would pass; a run is its run folder
  (configs that differ only in what the run does not depend on, e.g. the pool of a real-data-only run, are one run).
  Specs are taken in the study's order (:data:`ORDER`); "new" counts the runs no earlier spec holds.
* Needs, computed from the code that sizes the files (:func:`kd.teacher_cache.cache_bytes`,
  :func:`kd.session.room_needed`, the dataset table): per agent machine the data, the teacher caches of every
  teacher (float32, one file per teacher, in the store), the runs' folders and store entries (a checkpoint of
  weights and momentum, the final weights, their store copy and the mirrored checkpoint), the pools; per GPU the
  largest run (the student with the most teachers: its combined cache and the accumulator it is combined in, the
  dataset on the device, the student's weights, gradients and momentum, and its activations at the spec's batch,
  counted on the meta device).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kd.errors import KDError, cli
from kd.sweep.spec import Spec, load_spec

ORDER = ("teachers", "self_distill", "ensemble_distill", "ensemble_size", "generator_quality", "online")
VENV_BYTES = 6.0e9  # `du -s .venv` after `make setup` (torch's CUDA build), measured on this project's machines
MARK = "<!-- plan {folder} -->"
END = "<!-- /plan -->"


@dataclass
class SpecRuns:
    path: Path
    program: str
    configs: int  # the grid's configs
    runs: int  # distinct runs (run folders)
    new: int  # runs no earlier spec of the folder holds
    cfgs: list = field(default_factory=list)  # one config per run


def _order(path: Path) -> tuple:
    return (ORDER.index(path.stem) if path.stem in ORDER else len(ORDER), path.name)


def runs_of(spec: Spec) -> dict:
    """Run folder -> config, for every config of a grid spec (the first config of each run folder)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    from kd.flags import parse_flags

    if spec.grid is None or spec.flags_cls is None:
        raise KDError(f"{spec.path}: a plan needs a grid of train.py or distill.py runs (method grid)")
    out: dict = {}
    for config in spec.grid:
        cfg = parse_flags(spec.flags_cls, create_sweep_command_args({"args": config})["args"], notes=False)
        out.setdefault(cfg.run_dir(), cfg)
    return out


def plan(folder: str | Path) -> list[SpecRuns]:
    folder = Path(folder)
    files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")], key=_order)
    if not files:
        raise KDError(f"{folder}: no sweep specs (*.yaml) there")
    seen: set = set()
    rows = []
    for path in files:
        spec = load_spec(path)
        runs = runs_of(spec)
        rows.append(SpecRuns(path, Path(spec.program).name, len(spec.grid), len(runs), len(set(runs) - seen),
                             list(runs.values())))
        seen |= set(runs)
    return rows


# ------------------------------------------------------------------------------------------------ the needs
@functools.cache
def _params(arch: str, classes: int) -> int:
    import torch

    from kd.models import build_model, count_params

    with torch.device("meta"):
        return count_params(build_model(arch, classes))


def activation_bytes(arch: str, classes: int, batch: int, size: int) -> int:
    """What one training step keeps for its backward pass: every module's output at ``batch``, float32, counted on
    the meta device (no memory is used)."""
    import torch

    from kd.models import build_model

    total = 0

    def count(module, inputs, output):
        nonlocal total
        if torch.is_tensor(output) and not list(module.children()):  # leaf modules: convs, BN, ReLU, linear
            total += output.numel() * 4

    with torch.device("meta"):
        model = build_model(arch, classes)
        hooks = [m.register_forward_hook(count) for m in model.modules()]
        model(torch.empty(batch, 3, size, size))
    for h in hooks:
        h.remove()
    return total


def needs(rows: list[SpecRuns]) -> dict:
    """The study's disk (per agent machine) and memory (per GPU) in bytes, by part."""
    import torch

    from kd.data import Data, num_views
    from kd.datasets import dataset_spec
    from kd.draws import pool_images_needed
    from kd.session import kept_bytes
    from kd.teacher_cache import cache_bytes

    cfgs = [c for r in rows for c in r.cfgs]
    spec = dataset_spec(cfgs[0].dataset)
    views = num_views(spec)
    shape = Data(spec, torch.empty(spec.n_train, 0), torch.empty(0), torch.empty(0), torch.empty(0))
    per_cache = cache_bytes(shape, spec.num_classes, torch.float32)
    teachers = [c for r in rows if r.program == "train.py" for c in r.cfgs]
    students = [c for r in rows if r.program == "distill.py" for c in r.cfgs]
    image = 3 * spec.image_size * spec.image_size
    pool_images: dict[str, int] = {}  # each trial draws its own block of a pool (kd.draws)
    for c in students:
        if c.synthetic_ratio and c.synthetic_pool:
            need = pool_images_needed(round(c.synthetic_ratio * spec.n_train), c.trial)
            pool_images[c.synthetic_pool] = max(pool_images.get(c.synthetic_pool, 0), need)
    run_bytes = sum(kept_bytes(_params(c.arch, spec.num_classes)) for c in cfgs)
    largest = max(students, key=lambda c: (len(c.teacher_names()) or c.ensemble_size, c.batch_size), default=None)
    gpu = {}
    if largest is not None:
        m = len(largest.teacher_names()) or largest.ensemble_size
        params = _params(largest.arch, spec.num_classes)
        gpu = {"teacher cache (combined, and its float32 accumulator)": per_cache * (2 if m > 1 else 1),
               "dataset on the device": (spec.n_train + spec.n_test) * image,
               "student weights, gradients, momentum": 3 * 4 * params,
               f"activations at batch {largest.batch_size}": activation_bytes(largest.arch, spec.num_classes,
                                                                            largest.batch_size, spec.image_size)}
    disk = {"dataset (archive and extracted)": spec.download_bytes + (spec.n_train + spec.n_test) * image,
            f"teacher caches ({len(teachers)} teachers, float32)": len(teachers) * per_cache if students else 0,
            f"run folders and store ({len(cfgs)} runs)": run_bytes,
            f"pools ({len(pool_images)})": sum(2 * n * image for n in pool_images.values()),
            "the virtualenv (.venv)": int(VENV_BYTES)}
    return {"dataset": spec.name, "views": views, "disk": disk, "gpu": gpu,
            "largest": largest.run_name() if largest is not None else None}


# The GPU-time estimate's assumptions (README, "GPU-hours: ESTIMATED"): a step moves MOVED_PER_STEP times the
# bytes its forward writes as activations, at an effective memory bandwidth of BANDWIDTH bytes/s (an H100 has
# 3.35 TB/s); bf16 halves the activations' bytes. Not a measurement: python -m kd.bench --device=cuda measures.
MOVED_PER_STEP = (4, 8)
BANDWIDTH = (2.0e12, 2.5e12)


def work(rows: list[SpecRuns]) -> dict:
    """The study's training work, each run once: runs, images (epochs x real images x (1 + synthetic ratio)),
    steps at the largest batch, one step's forward activations (float32), and the estimated GPU-hours."""
    from kd.datasets import dataset_spec

    runs = {c.run_dir(): c for r in rows for c in r.cfgs}
    spec = dataset_spec(next(iter(runs.values())).dataset)
    images = sum(c.epochs * spec.n_train * (1 + getattr(c, "synthetic_ratio", 0.0)) for c in runs.values())
    batch = max(c.batch_size for c in runs.values() if hasattr(c, "synthetic_ratio"))
    arch = next(c.arch for c in runs.values() if hasattr(c, "synthetic_ratio"))
    steps = images / batch
    act = activation_bytes(arch, spec.num_classes, batch, spec.image_size)

    def hours(halve: bool) -> tuple[float, float]:
        per = act / (2 if halve else 1)
        return (steps * per * MOVED_PER_STEP[0] / BANDWIDTH[1] / 3600,
                steps * per * MOVED_PER_STEP[1] / BANDWIDTH[0] / 3600)

    return {"runs": len(runs), "images": images, "batch": batch, "steps": steps, "activations": act,
            "bf16_hours": hours(True), "fp32_hours": hours(False)}


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def markdown(folder: str | Path) -> str:
    """The study's runs and needs as Markdown (what ``make docs`` writes into the README and the reference)."""
    folder = Path(folder)
    rows = plan(folder)
    lines = ["| spec | program | configs | runs | new runs |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{folder.name}/{r.path.name}` | {r.program} | {r.configs} | {r.runs} | {r.new} |")
    total = sum(r.new for r in rows)
    lines.append(f"| all | | {sum(r.configs for r in rows)} | | {total} |")
    need = needs(rows)
    disk = need["disk"]
    lines += ["", f"Disk per agent machine ({need['dataset']}): " + ", ".join(
        f"{k} {_gb(v)}" for k, v in disk.items() if v) + f"; in all about {_gb(sum(disk.values()))}."]
    if need["gpu"]:
        gpu = need["gpu"]
        lines.append(f"GPU memory of the largest run ({need['largest']}): " + ", ".join(
            f"{k} {_gb(v)}" for k, v in gpu.items()) + f"; in all about {_gb(sum(gpu.values()))}.")
    w = work(rows)
    lines.append(f"Training work, each run once: {w['runs']} runs, {w['images'] / 1e9:.2f}G images, "
                 f"{w['steps'] / 1e6:.1f}M steps at batch {w['batch']}; a step's forward writes "
                 f"{_gb(w['activations'])} of activations (float32). Estimated, not measured (a step moving "
                 f"{MOVED_PER_STEP[0]}-{MOVED_PER_STEP[1]}x that at {BANDWIDTH[0] / 1e12:.1f}-"
                 f"{BANDWIDTH[1] / 1e12:.1f} TB/s): {w['bf16_hours'][0]:.0f}-{w['bf16_hours'][1]:.0f} GPU-hours "
                 f"in bf16, {w['fp32_hours'][0]:.0f}-{w['fp32_hours'][1]:.0f} in float32, one run at a time.")
    return "\n".join(lines)


def rewrite(doc: Path) -> bool:
    """Every ``<!-- plan FOLDER -->`` block of ``doc`` regenerated; True when the file changed."""
    from kd.io import atomic_write

    text = doc.read_text()
    out, rest = [], text
    while (start := rest.find("<!-- plan ")) >= 0:
        head_end = rest.index("-->", start) + 3
        folder = rest[start + len("<!-- plan "):head_end - 3].strip()
        end = rest.index(END, head_end)
        out.append(rest[:head_end] + "\n" + markdown(folder) + "\n")
        rest = rest[end:]
    new = "".join(out) + rest
    if new != text:
        with atomic_write(doc, "w") as fh:
            fh.write(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with cli():
        if not argv or argv[0] in ("-h", "--help"):
            print("usage: python -m kd.sweep.plan SWEEP_DIR ...   (the runs and needs of each study, as Markdown)\n"
                  "       python -m kd.sweep.plan --write DOC.md ...  (regenerate the <!-- plan --> blocks)")
            return 0
        if argv[0] == "--write":
            for doc in argv[1:]:
                print(f"{doc}: {'rewritten' if rewrite(Path(doc)) else 'up to date'}")
            return 0
        for folder in argv:
            print(f"## {folder}\n\n{markdown(folder)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
