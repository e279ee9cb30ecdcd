"""VID: Ahn et al., "Variational Information Distillation for Knowledge Transfer" (CVPR 2019), as RepDistiller runs it.

For each pair of intermediate stage outputs (``feat[1:-1]``, zip-truncated) a ``VIDLoss`` predicts the
teacher map with a Gaussian whose mean regresses the student map and whose per-channel variance is
learnt; the regressors and variances train with the student. Published weight: ``-b 1``.
"""
from __future__ import annotations

import math
from argparse import Namespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset import DataInfo
from distiller_zoo.base import Distiller, probe_features
from models.util import pool_to_smaller


def _conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)


class VIDLoss(nn.Module):
    """Negative log-likelihood of the teacher map under N(regressor(student map), softplus(log_scale) + eps).

    ``regressor``: 1x1 convs in->mid, ReLU, mid->mid, ReLU, mid->target (no bias; indices 0, 2, 4).
    ``log_scale``: (target,) parameter, initialised so that the variance starts at ``init_pred_var``.
    forward(input (B, Cin, Hs, Ws), target (B, Ct, Ht, Wt)) -> scalar mean over all elements of
    ``0.5 * ((mu - target)^2 / var + log var)``, after pooling the larger map to the smaller size.
    """

    def __init__(self, num_input_channels: int, num_mid_channel: int, num_target_channels: int,
                 init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.regressor = nn.Sequential(
            _conv1x1(num_input_channels, num_mid_channel), nn.ReLU(),
            _conv1x1(num_mid_channel, num_mid_channel), nn.ReLU(),
            _conv1x1(num_mid_channel, num_target_channels))
        # inverse softplus of (init_pred_var - eps), computed in float64 as RepDistiller does with numpy
        inv_softplus = math.log(math.exp(init_pred_var - eps) - 1.0)
        self.log_scale = nn.Parameter(torch.full((num_target_channels,), inv_softplus))
        self.eps = eps

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, target = pool_to_smaller(input, target)
        pred_mean = self.regressor(input)
        pred_var = (F.softplus(self.log_scale) + self.eps).view(1, -1, 1, 1)
        neg_log_prob = 0.5 * ((pred_mean - target).pow(2) / pred_var + torch.log(pred_var))
        return neg_log_prob.mean()


class VIDDistiller(Distiller):
    """``--distill vid``: the sum over ``feat[1:-1]`` pairs of ``VIDLoss(C_s, C_t, C_t)`` (all trainable)."""

    name = 'vid'
    default_weights = (1.0, 0.0, 1.0)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                 info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        f_s = probe_features(student, self.image_size)[1:-1]
        f_t = probe_features(teacher, self.image_size)[1:-1]
        self.vid = nn.ModuleList(VIDLoss(s.shape[1], t.shape[1], t.shape[1]) for s, t in zip(f_s, f_t))

    def method_loss(self, feat_s: list[torch.Tensor], feat_t: list[torch.Tensor], logit_s: torch.Tensor,
                    logit_t: torch.Tensor, target: torch.Tensor, **extras: Any) -> torch.Tensor:
        return sum(vid(s, t) for vid, s, t in zip(self.vid, feat_s[1:-1], feat_t[1:-1]))
