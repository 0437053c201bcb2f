"""Generalization and fidelity metrics (paper Sec. 3.2), exact over the whole set (not means of batch means)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Top-1 agreement: share of points where student and teacher predict the same class."""
    return (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item()


def predictive_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Mean KL(p_teacher || p_student) at tau = 1 (teacher may be given as logits or log-probabilities)."""
    log_t = F.log_softmax(teacher_logits.double(), -1)
    log_s = F.log_softmax(student_logits.double(), -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean().item()


def ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """Expected calibration error with ``n_bins`` equal-width confidence bins over (0, 1]."""
    if labels.numel() == 0:
        raise ValueError("ece of an empty set is undefined")
    probs = F.softmax(logits.double(), -1)
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    bins = torch.clamp((conf * n_bins).ceil().long() - 1, 0, n_bins - 1)
    total = torch.zeros(n_bins, dtype=torch.float64, device=logits.device)
    gap = total.index_add(0, bins, correct) - total.index_add(0, bins, conf)
    return (gap.abs().sum() / labels.numel()).item()
