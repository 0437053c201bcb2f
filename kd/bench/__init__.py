"""How fast is this repository, and how much faster than the paper's way? One run, two tables, one JSON.

    python -m kd.bench                     # the CPU: small sizes, a few minutes
    python -m kd.bench --device=cuda       # a GPU: the paper's sizes (preresnet56, batch 256 / 128, 32 px), <= 4 min
    python -m kd.bench --threads=0         # the CPU with torch's default thread count

Every figure is measured in this process on this machine, on random CIFAR-shaped data (32 px, 100
classes, 162 views). Variants of one comparison run interleaved, round by round in rotating order; a
figure is the median over rounds (images/s), a ratio the median of the per-round ratios. Device time is
synchronised around every timed call; warm-ups (first epochs, first calls) are not timed. On the CPU the
bench runs one intra-op thread unless told otherwise: the figures that matter are ratios, and on a shared
machine torch's threads wait for each other (a small 2-core VM under load ran 6x slower with 2 threads).

Sections (``--skip`` takes their names):

* **train**: :meth:`kd.session.Session.fit` itself (the loop of train.py and distill.py, W&B disabled), timed
  by its own per-epoch ``throughput/img_per_s`` with the first epoch of every round dropped; vs **bare**, the
  model's forward/backward/SGD step on batches made beforehand (the engine's overhead), and **paper**, the
  paper's way: a torchvision-style CIFAR Dataset of PIL images with RandomCrop(32, pad 4),
  RandomHorizontalFlip, ToTensor, Normalize(0.5, 0.5) through a DataLoader (0 workers on the CPU, 8 on a
  GPU), fp32 NCHW models, teachers member by member, ``log(mean(softmax))``, ``loss.item()`` every step.
* **distill**: distillation reading the teacher-output cache (:mod:`kd.teacher_cache`, per-member files
  shared by the m = 1 and m = 3 ensembles) vs running the teachers every step, a teacher-free step and the
  paper's loop; the one-off build apart, with the epoch after which it has paid for itself.
* **pack**: k students trained as one pack (``python -m kd.sweep.pack``: stacked on accelerators, one after
  another on the CPU) vs the same k students trained plainly, for k = 1, 2, 4, 8, 16 on a GPU (1, 2, 4 on the
  CPU, 1, 2 with ``--smoke``), at the study's student batch (128; PreResNet-56 on a GPU) through the
  teacher-cache step: images/s and student-steps/s in all and per member (:mod:`kd.bench.packs`). Eager; the
  compile section times the compiled pack of the best k where packs stack.
* **cache**: the cache build, old design (one stacked pass per ensemble, a file per ensemble) vs new (one
  pass per member, combined on the fly), in member-forwards/s; and a cache file's save and verified load.
* **ensemble**: the m-member teacher forward, one stacked (vmap) call vs a loop over members.
* **synthetic**: images/s of kd.synthetic's sampler with a random UNet of one of its DDPM recipes, for the
  DDPM, DDIM and DPM-Solver++ schedulers, and the pool recipe at a larger batch (:mod:`kd.bench.sampler`).
* **compile**: eager vs ``--compile=True`` (:mod:`kd.accel`) on the student step, in a child process under
  the run's budget, with a SIGTERM sent while the first step compiles, then the best pack eager vs compiled
  where packs stack (:mod:`kd.bench.compiled`). It runs on GPUs, and on the CPU with ``--compile`` (which
  also compiles the other sections' engine and bare step).

With a budget (``--budget``, 210 s on a GPU), a section, a pack size or a compile phase that no longer fits
is skipped and named (the output's "skipped" line, the JSON's ``skipped``). After the detailed table the
repository's speed table (what | measured | what it means) and the CIFAR-100 study's device-hours projected
from this run's rates, each part with what was measured and what extrapolated, beside the work it is in
counted FLOPs (:mod:`kd.bench.projection`). Everything goes to the JSON.
"""

from kd.bench.common import interleave

__all__ = ["interleave", "main"]


def main(argv=None) -> None:
    from kd.bench.cli import main as run

    run(argv)
