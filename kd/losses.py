"""The distillation loss of Stanton et al. (Eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """-tau^2 * sum_j softmax(z_t/tau)_j * log softmax(z_s/tau)_j, averaged over the batch.

    ``teacher_logits`` may be logits or log-probabilities (e.g. :func:`kd.models.ensemble_log_probs`):
    softmax is shift-invariant, so both give the same loss. No label term (alpha = 0).
    """
    t = temperature
    p_teacher = F.softmax(teacher_logits.float() / t, dim=-1)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    return -(t * t) * (p_teacher * log_p_student).sum(-1).mean()
