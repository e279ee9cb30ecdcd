"""NST: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer" (2017),
as RepDistiller runs it.

A squared MMD with a degree-2 polynomial kernel between the channels' spatial activation patterns of
the intermediate stage outputs (``feat[1:-1]``, zip-truncated). Published weight: ``-b 50``.
"""
from __future__ import annotations

from argparse import Namespace
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset import DataInfo
from distiller_zoo.base import Distiller
from models.util import pool_to_smaller


class NSTLoss(nn.Module):
    """forward(g_s, g_t): lists of (B, C, H, W) maps -> list of per-pair losses (scalars).

    Each channel's H*W vector is L2-normalised; with ``K(x, y)[b, i, j] = <y_i, x_j>^2`` the loss is
    ``mean K(t, t) + mean K(s, s) - 2 mean K(s, t)`` (the teacher-only term carries no gradient).
    """

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.nst_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]

    def nst_loss(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s, f_t = pool_to_smaller(f_s, f_t)
        f_s = F.normalize(f_s.flatten(2), dim=2)
        f_t = F.normalize(f_t.flatten(2), dim=2)
        return (self.poly_kernel(f_t, f_t).mean().detach() + self.poly_kernel(f_s, f_s).mean()
                - 2 * self.poly_kernel(f_s, f_t).mean())

    @staticmethod
    def poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(B, Ca, N), (B, Cb, N) -> (B, Cb, Ca) squared inner products."""
        return torch.bmm(b, a.transpose(1, 2)).pow(2)


class NSTDistiller(Distiller):
    """``--distill nst``: the sum of ``NSTLoss`` over ``feat[1:-1]``."""

    name = 'nst'
    default_weights = (1.0, 0.0, 50.0)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                 info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        self.criterion = NSTLoss()

    def method_loss(self, feat_s: list[torch.Tensor], feat_t: list[torch.Tensor], logit_s: torch.Tensor,
                    logit_t: torch.Tensor, target: torch.Tensor, **extras: Any) -> torch.Tensor:
        return sum(self.criterion(feat_s[1:-1], feat_t[1:-1]))
