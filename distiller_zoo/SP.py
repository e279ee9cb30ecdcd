"""SP: Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019), as RepDistiller runs it.

The batch similarity (Gram) matrices of the last spatial maps (``feat[-2]``) are matched.
Published weight: ``-b 3000``.
"""
from __future__ import annotations

from argparse import Namespace
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset import DataInfo
from distiller_zoo.base import Distiller


class Similarity(nn.Module):
    """forward(g_s, g_t): lists of (B, ...) features -> list of per-pair losses, each of shape (1,).

    ``G = F F^T`` over the flattened features (B x B), each row L2-normalised;
    the loss is ``sum((G_t - G_s)^2) / B^2``.
    """

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.similarity_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]

    @staticmethod
    def similarity_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        bsz = f_s.shape[0]
        f_s, f_t = f_s.reshape(bsz, -1), f_t.reshape(bsz, -1)
        g_s = F.normalize(f_s @ f_s.t())
        g_t = F.normalize(f_t @ f_t.t())
        return (g_t - g_s).pow(2).sum().reshape(1) / (bsz * bsz)


class SPDistiller(Distiller):
    """``--distill similarity``: ``Similarity`` on ``feat[-2]``."""

    name = 'similarity'
    default_weights = (1.0, 0.0, 3000.0)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                 info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        self.criterion = Similarity()

    def method_loss(self, feat_s: list[torch.Tensor], feat_t: list[torch.Tensor], logit_s: torch.Tensor,
                    logit_t: torch.Tensor, target: torch.Tensor, **extras: Any) -> torch.Tensor:
        return sum(self.criterion([feat_s[-2]], [feat_t[-2]])).squeeze(0)
