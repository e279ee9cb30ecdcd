"""AT: Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017), as RepDistiller runs it.

Spatial attention maps of every intermediate stage output (``feat[1:-1]``, zip-truncated to the shorter
list) are matched with a squared error. Published weight: ``-b 1000``.
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


class Attention(nn.Module):
    """forward(g_s, g_t): lists of (B, C, H, W) maps -> list of per-pair losses (scalars).

    ``a(f) = l2-normalise over H*W of mean_over_channels(f ** p)``; the pair loss is the mean of
    ``(a(f_s) - a(f_t))^2`` over (B, H*W), after pooling the larger map to the smaller size.
    """

    def __init__(self, p: int = 2) -> None:
        super().__init__()
        self.p = p

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.at_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]

    def at_loss(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s, f_t = pool_to_smaller(f_s, f_t)
        return (self.at(f_s) - self.at(f_t)).pow(2).mean()

    def at(self, f: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H*W) attention map."""
        return F.normalize(f.pow(self.p).mean(1).flatten(1))


class ATDistiller(Distiller):
    """``--distill attention``: the sum of ``Attention(p=2)`` over ``feat[1:-1]``."""

    name = 'attention'
    default_weights = (1.0, 0.0, 1000.0)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                 info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        self.criterion = Attention(p=2)

    def method_loss(self, feat_s: list[torch.Tensor], feat_t: list[torch.Tensor], logit_s: torch.Tensor,
                    logit_t: torch.Tensor, target: torch.Tensor, **extras: Any) -> torch.Tensor:
        return sum(self.criterion(feat_s[1:-1], feat_t[1:-1]))
