"""A run's own synthetic draw: which images of a pool, or which fresh samples of a generator, a student adds.

The paper's code sampled each run's N images afresh from the generator, from the run's random seed: the trials of a
grid point never share a synthetic image, and a smaller amount is not the first part of a larger one. Here:

* from a generator (``--synthetic_generator``; an SN-GAN pool of 50k takes seconds): image i of the run's draw is
  sampled from ``derived_seed(draw seed, i)``; the draw seed depends on the run's seed and on N
  (:func:`draw_seed`), so trials (other seeds) and amounts (other N) draw other images;
* from a pool (``--synthetic_pool``; a diffusion model's pool is costly): a permutation of the pool that depends on
  the pool and N only; trial t takes its t-th block of N images (so the trials of one amount never overlap, and the
  pool must hold (t + 1) * N images), and another N is another permutation (not a prefix).

Every run records its draw in its W&B config under ``synthetic_draw``: how it was drawn, from what, the seed, the
count, and the sha256 (64 hex digits) of the ordered list of pool indices it used, or of the images it sampled; so
anyone can check from the runs alone that two runs drew different images.
"""

from __future__ import annotations

import hashlib

import torch

from kd.errors import KDError
from kd.generators.sampling import derived_seed, to_pixels

BATCH = 1024  # images sampled per forward pass


def draw_seed(run_seed: int, n: int) -> int:
    """The seed of a run's synthetic draw of ``n`` images: a function of its own seed and of n."""
    return derived_seed("synthetic-draw", run_seed, n)


def pool_images_needed(n: int, trial: int) -> int:
    """The images a pool must hold for trial ``trial`` to draw its own block of ``n`` (:func:`from_pool`)."""
    return (trial + 1) * n


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to("cpu").contiguous().numpy().tobytes()).hexdigest()


def from_pool(images: torch.Tensor, pool_sha: str, n: int, trial: int, name: str) -> tuple[torch.Tensor, dict]:
    """Trial ``trial``'s block of ``n`` images of a pool, in the order of the permutation of (pool, n)."""
    total = images.shape[0]
    if pool_images_needed(n, trial) > total:
        raise KDError(f"pool {name} holds {total} images, but trial {trial} draws {n} images apart from the other "
                      f"trials' (the images {trial * n} to {(trial + 1) * n - 1} of its permutation for {n}): generate "
                      f"a pool of {(trial + 1) * n} images or more (--num), one block per trial")
    g = torch.Generator().manual_seed(derived_seed("synthetic-pool", pool_sha, n))
    idx = torch.randperm(total, generator=g)[trial * n:(trial + 1) * n]
    record = {"kind": "pool-block", "source": name, "pool_sha256": pool_sha, "count": n, "trial": trial,
              "sha256": _sha(idx.to(torch.int64))}
    return images[idx], record


@torch.no_grad()
def from_generator(sampler, n: int, seed: int, size: int, name: str, progress: bool = True) -> tuple[torch.Tensor,
                                                                                                     dict]:
    """``n`` fresh images of ``sampler`` (a :class:`kd.generators.Sampler`), image i from (seed, i), as uint8 at the
    dataset's ``size``."""
    from tqdm.auto import tqdm

    parts = []
    with tqdm(total=n, unit="img", desc=f"synthetic draw of {name}", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, n, BATCH):
            ids = range(start, min(n, start + BATCH))
            parts.append(to_pixels(sampler(ids, seed).float().cpu(), size, size))
            bar.update(len(ids))
    images = torch.cat(parts) if parts else torch.empty(0, 3, size, size, dtype=torch.uint8)
    record = {"kind": "sampled", "source": name, "seed": seed, "count": n, "sampler": sampler.identity(),
              "sha256": _sha(images)}
    return images, record
