"""DKD: Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022), with mdistiller's numbers.

``DKDLoss`` is ``alpha * TCKD + beta * NCKD`` (no CE, no warm-up). The Distiller ``dkd`` adds
``-r`` x CE and multiplies DKD by ``min(epoch / --dkd_warmup, 1)``, a buffer ``start_epoch`` sets.
``--logit_stand`` (distiller_zoo/logit_stand.py) feeds DKDLoss the z-scored logits, at ``--base_temp``, with
alpha and beta multiplied by ``--kd_weight`` (the official logit-standardization ``DKD.py`` / ``tools/train.py``).
"""
from __future__ import annotations

from argparse import ArgumentParser, Namespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dataset import DataInfo
from distiller_zoo.base import Distiller
from distiller_zoo.logit_stand import LogitStand, add_logit_stand_arguments, resolve_logit_stand
from helper.errors import UserError
from helper.options import updated

# subtracted from the target logit (after /T) so that it vanishes from the non-target softmax
_MASK_SHIFT = 1000.0


class DKDLoss(nn.Module):
    """Decoupled KD on (B, C) logits and (B,) integer targets -> scalar.

    TCKD = T^2 / B * sum_b KL([p_t(g), 1 - p_t(g)] || [p_s(g), 1 - p_s(g)]) with p = softmax(z / T) and
    g the target; the binary masses are sums of the full softmax and the student side takes a plain
    log (no epsilon, as mdistiller). NCKD = T^2 / B * sum_b KL over the non-target classes, computed
    by shifting the target logit down by 1000 before the (log-)softmax.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = float(temperature)

    def forward(self, logits_student: Tensor, logits_teacher: Tensor, target: Tensor) -> Tensor:
        T = self.temperature
        batch = logits_student.shape[0]
        # scatter, not F.one_hot: one_hot checks the labels' range on the host (a sync)
        gt_mask = torch.zeros_like(logits_student).scatter_(1, target.view(-1, 1), 1.0)
        z_s, z_t = logits_student / T, logits_teacher / T

        p_s, p_t = F.softmax(z_s, dim=1), F.softmax(z_t, dim=1)
        binary_s = torch.stack([(p_s * gt_mask).sum(1), (p_s * (1 - gt_mask)).sum(1)], dim=1)
        binary_t = torch.stack([(p_t * gt_mask).sum(1), (p_t * (1 - gt_mask)).sum(1)], dim=1)
        tckd = F.kl_div(torch.log(binary_s), binary_t, reduction='sum') * T ** 2 / batch

        log_q_s = F.log_softmax(z_s - _MASK_SHIFT * gt_mask, dim=1)
        q_t = F.softmax(z_t - _MASK_SHIFT * gt_mask, dim=1)
        nckd = F.kl_div(log_q_s, q_t, reduction='sum') * T ** 2 / batch
        return self.alpha * tckd + self.beta * nckd


def add_dkd_arguments(parser: ArgumentParser) -> None:
    """DKD's flags (mdistiller's defaults; the per-pair beta is in docs/methods.md and scripts/settings.py)."""
    g = parser.add_argument_group('DKD')
    g.add_argument('--dkd_alpha', type=float, default=1.0, help='DKD weight of TCKD')
    g.add_argument('--dkd_beta', type=float, default=8.0, help='DKD weight of NCKD (per pair: docs/methods.md)')
    g.add_argument('--dkd_T', type=float, default=4.0, help='DKD temperature')
    g.add_argument('--dkd_warmup', type=int, default=20, help='epochs of linear DKD warm-up (0: none)')


class DKD(LogitStand, Distiller):
    """``-r`` x CE(student) + min(epoch / warmup, 1) x DKDLoss(--dkd_alpha, --dkd_beta, --dkd_T).

    ``-b`` is not used (DKD's weights are ``--dkd_alpha`` / ``--dkd_beta``); ``-a`` adds Hinton KD on top.
    With ``--logit_stand``: DKDLoss(w * --dkd_alpha, w * --dkd_beta, --base_temp) on the z-scored logits, w = ``--kd_weight``.
    """

    name = 'dkd'
    default_weights = (1.0, 0.0, 0.0)   # mdistiller: DKD.CE_WEIGHT = 1, no KD term
    option_groups = (add_dkd_arguments, add_logit_stand_arguments)

    @classmethod
    def resolve_options(cls, opt: Namespace) -> Namespace:
        opt = super().resolve_options(updated(opt, **resolve_logit_stand(opt, cls.name)))
        if opt.beta != 0:
            raise UserError(f"dkd does not use -b (got {opt.beta}); set its weights with --dkd_alpha / --dkd_beta")
        if opt.dkd_warmup < 0:
            raise UserError(f"--dkd_warmup must be >= 0 epochs, got {opt.dkd_warmup}")
        if opt.dkd_T <= 0:
            raise UserError(f"--dkd_T must be positive, got {opt.dkd_T}")
        return opt

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                 info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        self.warmup = int(opt.dkd_warmup)
        self.init_logit_stand(opt)
        if self.logit_stand:   # the official tools/train.py: ALPHA and BETA times --kd-weight, T = --base-temp
            self.criterion_dkd = DKDLoss(opt.kd_weight * opt.dkd_alpha, opt.kd_weight * opt.dkd_beta, opt.base_temp)
        else:
            self.criterion_dkd = DKDLoss(opt.dkd_alpha, opt.dkd_beta, opt.dkd_T)
        # the epoch's warm-up factor as a tensor: a Python number would recompile a compiled step every epoch
        self.register_buffer('warmup_scale', torch.tensor(self.warmup_factor(1)), persistent=False)

    def warmup_factor(self, epoch: int) -> float:
        """min(epoch / warmup, 1) for 1-indexed epochs (1 without warm-up)."""
        return min(epoch / self.warmup, 1.0) if self.warmup > 0 else 1.0

    def start_epoch(self, epoch: int) -> None:
        self.warmup_scale.fill_(self.warmup_factor(epoch))

    def forward_train(self, image: Tensor, target: Tensor, **extras: Any) -> tuple[Tensor, dict[str, Tensor]]:
        logit_s = self.student(image)
        with torch.no_grad():
            logit_t = self.teacher(image)
        losses = self.logit_losses(logit_s, logit_t, target)
        losses[self.name] = self.warmup_scale * self.criterion_dkd(self.stand(logit_s), self.stand(logit_t), target)
        return logit_s, losses
