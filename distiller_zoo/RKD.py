"""RKD: Park et al., "Relational Knowledge Distillation" (CVPR 2019), as RepDistiller runs it.

Distance- and angle-wise relations between the penultimate vectors (``feat[-1]``) of a batch.
Published weight: ``-b 1`` (with w_d = 25, w_a = 50 inside).
"""
from __future__ import annotations

from argparse import Namespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset import DataInfo
from distiller_zoo.base import Distiller


def _pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(B, D) -> (B, B) Euclidean distances from ``|a|^2 + |b|^2 - 2ab`` (clamped at eps), zero diagonal."""
    sq = e.pow(2).sum(1)
    dist = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return dist * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def _normalised_distances(e: torch.Tensor) -> torch.Tensor:
    """Distances divided by their mean over the positive entries (RepDistiller's ``d[d > 0].mean()``, as a sum
    over a count: no boolean indexing, whose data-dependent shape would break a compiled step's graph)."""
    d = _pairwise_distances(e)
    return d / (d.sum() / (d > 0).sum())


def _angles(e: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B^3,) cosines ``<unit(e_j - e_i), unit(e_k - e_i)>`` for every anchor i and pair (j, k)."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)     # diff[i, j] = unit(e_j - e_i)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


class RKDLoss(nn.Module):
    """forward(f_s, f_t): (B, ...) features -> ``w_d * smoothL1(dist) + w_a * smoothL1(angle)`` (scalar).

    Distances are divided by their mean over the positive (off-diagonal) entries; the teacher's relations
    carry no gradient.
    """

    def __init__(self, w_d: float = 25, w_a: float = 50) -> None:
        super().__init__()
        self.w_d = w_d
        self.w_a = w_a

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        student = f_s.reshape(f_s.shape[0], -1)
        teacher = f_t.reshape(f_t.shape[0], -1)
        with torch.no_grad():
            t_dist, t_angle = _normalised_distances(teacher), _angles(teacher)
        loss_d = F.smooth_l1_loss(_normalised_distances(student), t_dist)
        loss_a = F.smooth_l1_loss(_angles(student), t_angle)
        return self.w_d * loss_d + self.w_a * loss_a


class RKDDistiller(Distiller):
    """``--distill rkd``: ``RKDLoss(w_d=25, w_a=50)`` on ``feat[-1]``."""

    name = 'rkd'
    default_weights = (1.0, 0.0, 1.0)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                 info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        self.criterion = RKDLoss(w_d=25, w_a=50)

    def method_loss(self, feat_s: list[torch.Tensor], feat_t: list[torch.Tensor], logit_s: torch.Tensor,
                    logit_t: torch.Tensor, target: torch.Tensor, **extras: Any) -> torch.Tensor:
        return self.criterion(feat_s[-1], feat_t[-1])
