"""Sample quality of a synthetic pool: FID (and Inception Score) through torchmetrics.

Images are uint8 [N, C, H, W] with C = 1 or 3 (one channel is repeated to three). With ``feature=None`` the
standard FID Inception (torch-fidelity's port of pt_inception-2015-12-05, 2048 pool features) is used; it resizes
every image to 299 x 299 itself, so 8 px digits and 32 px CIFAR go in as they are. The resize is the TF1.x-compatible
bilinear one (``antialias=False``) that the original TF FID code and torch-fidelity use. Its weights are downloaded on
first use into ``$TORCH_HOME/hub/checkpoints``; when that is impossible :class:`QualityUnavailable` is raised, never a
NaN or a made-up number. A custom ``feature`` module receives the uint8 batches unchanged ([B, 3, H, W], any H, W)
and must return [B, d] features and have an int ``num_features`` (torchmetrics' contract).

FID depends on the number of samples (it is biased upwards for small N): compare pools only at the same N.
:func:`pool_quality` is what ``python -m kd.synthetic generate`` records in pool.json (FID against the dataset's
training images, and the Inception Score).
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import torch
import torch.nn as nn

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's file for pt_inception-2015-12-05
STANDARD = "inception-2015-12-05"  # the features name pool.json records for the standard Inception
_UNAVAILABLE: dict = {}  # weights path -> the first failure to build the standard Inception in this process


class QualityUnavailable(Exception):
    """The metric cannot be computed here (missing package or Inception weights); the message says what to do."""


def _inception_error(e: BaseException) -> QualityUnavailable:
    """One-line explanation of why the standard Inception could not be built."""
    why = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}".rstrip(": ")
    if isinstance(e, ImportError):
        return QualityUnavailable(f"sample quality needs torchmetrics and torch-fidelity ({why}): "
                                  "pip install torchmetrics torch-fidelity")
    return QualityUnavailable(
        f"FID and IS need the Inception weights (pt_inception-2015-12-05, {INCEPTION_WEIGHTS}), which could not be "
        f"loaded or downloaded ({why}): run once where the network is reachable, or copy the file into "
        "$TORCH_HOME/hub/checkpoints (or pass weights_path)")


def _check_images(x: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 [N, 1|3, H, W] with N >= 2 -> uint8 [N, 3, H, W]."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
        desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a uint8 tensor [N, 1 or 3, H, W], got {desc}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 images for a covariance, got {x.shape[0]}")
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def _standard(make, **kwargs):
    """Build a torchmetrics metric on the standard Inception; a failed import/download -> QualityUnavailable.

    torch.hub's "Downloading: ..." line and its progress bar are held back: the caller says it in one line.
    A failure is remembered for the rest of the process (no second download attempt per pool)."""
    key = kwargs.get("feature_extractor_weights_path")
    if key in _UNAVAILABLE:
        raise _UNAVAILABLE[key]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return make(**kwargs)
    except (ImportError, OSError, RuntimeError) as e:  # URLError and HTTPError are OSErrors; bad file: RuntimeError
        _UNAVAILABLE[key] = _inception_error(e)
        raise _UNAVAILABLE[key] from e


def _fid_class():
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as e:
        raise _inception_error(e) from e
    return FrechetInceptionDistance


def check_standard() -> None:
    """Build the standard FID Inception once (downloading its weights if need be); QualityUnavailable if not."""
    _standard(_fid_class(), feature=2048, antialias=False)


def _feed(update, images: torch.Tensor, batch_size: int, device: torch.device | str, **kwargs) -> None:
    for i in range(0, images.shape[0], batch_size):
        update(images[i:i + batch_size].to(device), **kwargs)


@torch.no_grad()
def fid(pool_uint8: torch.Tensor, real_uint8: torch.Tensor, feature: nn.Module | None = None, batch_size: int = 200,
        device: torch.device | str = "cpu", weights_path: str | None = None) -> float:
    """Frechet Inception Distance between a pool of generated images and the dataset's training images.

    ``feature=None``: the standard 2048-d Inception pool features (raises :class:`QualityUnavailable` when the
    weights or packages are missing); otherwise a custom extractor as described in the module docstring.
    """
    pool, real = _check_images(pool_uint8, "pool"), _check_images(real_uint8, "real")
    cls = _fid_class()
    if feature is None:
        metric = _standard(cls, feature=2048, antialias=False, feature_extractor_weights_path=weights_path)
    else:
        metric = cls(feature=feature)
    metric = metric.to(device)
    _feed(metric.update, real, batch_size, device, real=True)
    _feed(metric.update, pool, batch_size, device, real=False)
    value = float(metric.compute())
    if not math.isfinite(value):
        raise ValueError(f"FID came out {value}: the features are degenerate (constant images or too few samples?)")
    return value  # identical feature sets give 0 up to the eigenvalue round-off (about 1e-6, either sign)


@torch.no_grad()
def inception_score(pool_uint8: torch.Tensor, feature: nn.Module | None = None, splits: int = 10,
                    batch_size: int = 200, device: torch.device | str = "cpu", seed: int = 0) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) of a pool. ``feature=None``: the standard Inception's 1008
    logits (QualityUnavailable when unavailable); a custom module must return class logits [B, K]. The split
    shuffle is seeded, so the score is deterministic."""
    pool = _check_images(pool_uint8, "pool")
    if not 2 <= splits <= pool.shape[0]:
        raise ValueError(f"inception_score needs 2 <= splits <= {pool.shape[0]} (the pool size), got {splits}")
    try:
        from torchmetrics.image.inception import InceptionScore
    except ImportError as e:
        raise _inception_error(e) from e
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=feature, splits=splits) if feature is not None else _standard(
            InceptionScore, splits=splits)
    metric = metric.to(device)
    _feed(metric.update, pool, batch_size, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def pool_quality(pool_uint8: torch.Tensor, real_uint8: torch.Tensor, feature: nn.Module | None = None,
                 device: torch.device | str = "cpu") -> dict:
    """FID of a pool against real images and the pool's Inception Score, as pool.json records them.

    ``feature=None``: the standard Inception (:class:`QualityUnavailable` where it cannot be had); a stand-in
    module serves both metrics (its outputs taken as features for FID and as logits for IS) and is named in
    ``fid_features``, so a number from a stand-in is never mistaken for an Inception FID."""
    value = fid(pool_uint8, real_uint8, feature=feature, device=device)
    splits = min(10, pool_uint8.shape[0])
    mean, std = inception_score(pool_uint8, feature=feature, splits=splits, device=device)
    return {"fid": value, "inception_score": mean, "inception_score_std": std,
            "fid_features": STANDARD if feature is None else type(feature).__name__,
            "fid_real_images": int(real_uint8.shape[0])}
