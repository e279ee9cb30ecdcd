"""PKT: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer" (ECCV 2018).

The cosine-similarity distributions of the penultimate vectors (``feat[-1]``) of a batch are matched
with a KL divergence, as RepDistiller does. Published weight: ``-b 30000``.
"""
from __future__ import annotations

from argparse import Namespace
from typing import Any

import torch
import torch.nn as nn

from dataset import DataInfo
from distiller_zoo.base import Distiller


def _conditional_probabilities(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, D) -> (B, B): cosine similarities mapped to [0, 1], each row normalised to sum to 1."""
    x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    sim = (x @ x.t() + 1.0) / 2.0
    return sim / sim.sum(1, keepdim=True)


class PKT(nn.Module):
    """forward(f_s, f_t): (B, ...) features -> scalar ``mean over B*B of P_t log((P_t + eps) / (P_s + eps))``."""

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        p_s = _conditional_probabilities(f_s.reshape(f_s.shape[0], -1), self.eps)
        p_t = _conditional_probabilities(f_t.reshape(f_t.shape[0], -1), self.eps)
        return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()


class PKTDistiller(Distiller):
    """``--distill pkt``: ``PKT`` on ``feat[-1]``."""

    name = 'pkt'
    default_weights = (1.0, 0.0, 30000.0)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                 info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        self.criterion = PKT()

    def method_loss(self, feat_s: list[torch.Tensor], feat_t: list[torch.Tensor], logit_s: torch.Tensor,
                    logit_t: torch.Tensor, target: torch.Tensor, **extras: Any) -> torch.Tensor:
        return self.criterion(feat_s[-1], feat_t[-1])
