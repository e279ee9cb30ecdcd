"""KD: Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).

``DistillKL(T)`` keeps RepDistiller's name and numbers: KL(p_t || p_s) at temperature T, summed over
classes, averaged over the batch, times T^2.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DistillKL(nn.Module):
    """KL divergence between temperature-softened teacher and student distributions.

    forward(y_s, y_t): (B, C) student and teacher logits -> scalar
    ``T^2 / B * sum_{b,c} p_t log(p_t / p_s)`` with ``p = softmax(logits / T)``.
    """

    def __init__(self, T: float) -> None:
        super().__init__()
        self.T = float(T)

    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        log_p_s = F.log_softmax(y_s / self.T, dim=1)
        log_p_t = F.log_softmax(y_t / self.T, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction='batchmean', log_target=True) * self.T ** 2
