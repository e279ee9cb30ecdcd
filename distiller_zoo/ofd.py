"""OFD: Heo et al., "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019), with mdistiller's numbers.

Pre-ReLU stage maps of both networks (``preact=True``, feat[1:-1]). Each student map goes through a
connector (1x1 conv + BN to the teacher's channels: ``models.util.ConnectorV2``); the teacher's map is
average-pooled to the student's size where the sizes differ. Per teacher channel c, the margin m_c is the
expectation of the negative part of the BN output before the stage's ReLU, read as a Gaussian N(beta_c,
gamma_c^2) of that BN (``ofd_margin``). Partial L2 with target = max(t, m): (s - target)^2 summed where
s > target or target > 0, i.e. skipped where the teacher is below zero and the student below the target.

Loss: ``-r`` CE + ``-b`` x sum_i L2_i / 2^(n - i - 1) / B over the n aligned stages (the deepest gets weight
1), with ``-b`` = 1e-3 (mdistiller's FEAT_WEIGHT; the official code's / 1000). When the networks have
different numbers of stages the deepest ones are paired (mdistiller's ``_align_list``).

The teacher's BNs use the batch's statistics by default (``--ofd_teacher_bn batch``), as in both reference
implementations, which run the teacher in train mode (the margins assume a standardised BN input); here
its BNs stop tracking running statistics, so the teacher's buffers (and its eval-mode outputs) never change.
``--ofd_teacher_bn running`` keeps the whole teacher in eval mode.
"""
from __future__ import annotations

import math
from argparse import ArgumentParser, Namespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dataset import DataInfo
from distiller_zoo.base import Distiller, probe_features
from helper.errors import UserError
from models import stage_bns_before_relu
from models.util import ConnectorV2

# below this probability of a negative value the margin is -3 std (the official threshold)
MIN_NEGATIVE_MASS = 1e-3


@torch.no_grad()
def ofd_margin(weight: Tensor, bias: Tensor) -> Tensor:
    """Per channel, E[x | x < 0] for x ~ N(mean=bias, std=|weight|) (the BN before a ReLU): (C,) float32.

    m - s phi(m / s) / Phi(-m / s), with phi / Phi the standard normal density / distribution function, where
    Phi(-m / s) > 1e-3; otherwise -3 s (the official rule). Computed in float64 on the CPU (MPS has no float64),
    returned on the parameters' device. A channel with s = 0 gets m when m < 0 (its only value) and 0 otherwise
    (no negative part; the official code divides by zero there).
    """
    s = weight.detach().to('cpu', torch.float64).abs()
    m = bias.detach().to('cpu', torch.float64)
    negative_mass = torch.special.ndtr(-m / s)
    density = torch.exp(-0.5 * (m / s) ** 2) / math.sqrt(2.0 * math.pi)
    conditional = m - s * density / negative_mass
    margin = torch.where(negative_mass > MIN_NEGATIVE_MASS, conditional, -3.0 * s)
    return margin.to(weight.device, torch.float32)


def partial_l2(source: Tensor, target: Tensor, margin: Tensor) -> Tensor:
    """Summed partial L2 of (B, C, H, W) maps with a (1, C, 1, 1) margin: with t' = max(t, margin),
    sum of (s - t')^2 over the elements where s > t' or t' > 0."""
    target = torch.maximum(target, margin)
    counted = ((source > target) | (target > 0)).to(source.dtype)
    return ((source - target).pow(2) * counted).sum()


def add_ofd_arguments(parser: ArgumentParser) -> None:
    """OFD's flag (its weight is -b)."""
    g = parser.add_argument_group('OFD')
    g.add_argument('--ofd_teacher_bn', choices=('batch', 'running'), default='batch',
                   help="statistics of the teacher's BNs during training: the batch's (the reference code's teacher "
                        "in train mode; running statistics stay untouched) or the running ones (eval mode)")


class OFD(Distiller):
    """``--distill ofd``: -r CE + -b x sum_i partial_L2(connector_i(s_i), pool(t_i), margin_i) / 2^(n-i-1) / B."""

    name = 'ofd'
    preact = True                                 # both networks' pre-ReLU stage maps
    default_weights = (1.0, 0.0, 1e-3)           # mdistiller: OFD.LOSS.CE_WEIGHT 1, FEAT_WEIGHT 0.001
    option_groups = (add_ofd_arguments,)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace, info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        bns = stage_bns_before_relu(teacher, opt.model_t, opt.dataset)
        maps_s = probe_features(student, self.image_size, preact=True)[1:-1]
        maps_t = probe_features(teacher, self.image_size, preact=True)[1:-1]
        if len(bns) != len(maps_t) or any(bn.num_features != f.shape[1] for bn, f in zip(bns, maps_t)):
            raise UserError(f"{opt.model_t}'s BNs before the ReLUs {[bn.num_features for bn in bns]} do not match its "
                            f"stage maps {[int(f.shape[1]) for f in maps_t]}")
        n = min(len(maps_s), len(maps_t))
        self.num_stages = n
        maps_s, maps_t, bns = maps_s[-n:], maps_t[-n:], bns[-n:]      # the deepest n stages of each
        self.connectors = ConnectorV2([f.shape for f in maps_s], [f.shape for f in maps_t])
        for i, bn in enumerate(bns, start=1):                         # official buffer names margin1..marginN
            self.register_buffer(f'margin{i}', ofd_margin(bn.weight, bn.bias).view(1, -1, 1, 1))
        self.teacher_bn = opt.ofd_teacher_bn
        self.teacher_bns = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if self.teacher_bn == 'batch':
            for bn in self.teacher_bns:     # batch statistics in train mode, running buffers never written
                bn.track_running_stats = False

    def train(self, mode: bool = True) -> 'OFD':
        """As Distiller.train (the teacher in eval mode), but with ``--ofd_teacher_bn batch`` the teacher's BNs
        follow ``mode``: batch statistics while training, running statistics in eval mode."""
        super().train(mode)
        if self.teacher_bn == 'batch':
            for bn in self.teacher_bns:
                bn.train(mode)
        return self

    def margins(self) -> list[Tensor]:
        return [getattr(self, f'margin{i}') for i in range(1, self.num_stages + 1)]

    def method_loss(self, feat_s: list[Tensor], feat_t: list[Tensor], logit_s: Tensor, logit_t: Tensor,
                    target: Tensor, **extras: Any) -> Tensor:
        n = self.num_stages
        sources = self.connectors(feat_s[1:-1][-n:])
        batch = sources[0].shape[0]
        total = sources[0].new_zeros(())
        for i, (source, teacher_map, margin) in enumerate(zip(sources, feat_t[1:-1][-n:], self.margins())):
            if teacher_map.shape[2:] != source.shape[2:]:
                teacher_map = F.adaptive_avg_pool2d(teacher_map, source.shape[2:])
            total = total + partial_l2(source, teacher_map.detach(), margin) / 2 ** (n - i - 1)
        return total / batch
