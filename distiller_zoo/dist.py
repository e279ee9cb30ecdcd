"""DIST: Huang et al., "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022).

DIST matches relations instead of the distributions themselves. With Y = softmax(Z / tau) row-wise for the
student and the teacher (B x C),

    inter = 1 - mean_b pearson(Y_s[b, :], Y_t[b, :])      (per sample, across the classes)
    intra = 1 - mean_c pearson(Y_s[:, c], Y_t[:, c])      (per class, across the batch)
    DIST  = tau^2 * (beta * inter + gamma * intra)

where pearson(a, b) = <a - mean(a), b - mean(b)> / (|a - mean(a)| |b - mean(b)| + 1e-8): the epsilon is added
to the product of the norms. This is the official loss (hunto/image_classification_sota, the ``classification``
submodule of hunto/DIST_KD, ``lib/models/losses/dist_kd.py``: ``cosine_similarity``, ``pearson_correlation``,
``inter_class_relation``, ``intra_class_relation``, ``DIST(beta, gamma, tau)``).

CIFAR-100 protocol (DIST_KD README, ``configs/strategies/distill/dist_cifar.yaml`` and ``lib/models/losses/kd_loss.py``):
``kd: dist_t4`` = DIST(beta=1, gamma=1, tau=4), ``ori_loss_weight: 1`` (CE), ``kd_loss_weight: 2``; batch 64,
240 epochs, lr 0.05 (0.01 for MobileNetV2 / ShuffleNetV1 / ShuffleNetV2), x0.1 at 150 / 180 / 210
(a constant "warm-up" of 120 epochs at the same lr, then StepLR every 30), weight decay 5e-4, momentum 0.9.
Here: ``-r 1 -b 2 --dist_beta 1 --dist_gamma 1 --dist_T 4``.
"""
from __future__ import annotations

import math
from argparse import ArgumentParser, Namespace
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from distiller_zoo.base import Distiller
from helper.errors import UserError

PEARSON_EPS = 1e-8   # added to the product of the norms (official cosine_similarity)


def pearson_rows(a: Tensor, b: Tensor, eps: float = PEARSON_EPS) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (both (N, D)) -> (N,)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


class DISTLoss(nn.Module):
    """``tau^2 * (beta * inter + gamma * intra)`` on (B, C) student and teacher logits (module doc)."""

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 4.0) -> None:
        super().__init__()
        self.beta, self.gamma, self.tau = float(beta), float(gamma), float(tau)

    def relations(self, logit_s: Tensor, logit_t: Tensor) -> tuple[Tensor, Tensor]:
        """(inter, intra): 1 - mean Pearson over samples (across classes), and over classes (across the batch)."""
        y_s = torch.softmax(logit_s / self.tau, dim=1)
        y_t = torch.softmax(logit_t / self.tau, dim=1)
        inter = 1 - pearson_rows(y_s, y_t).mean()
        intra = 1 - pearson_rows(y_s.t(), y_t.t()).mean()
        return inter, intra

    def forward(self, logit_s: Tensor, logit_t: Tensor) -> Tensor:
        inter, intra = self.relations(logit_s, logit_t)
        return self.tau ** 2 * (self.beta * inter + self.gamma * intra)


def add_dist_arguments(parser: ArgumentParser) -> None:
    """DIST's flags (the official CIFAR-100 values: dist_t4, beta = gamma = 1; the loss weight is -b 2)."""
    g = parser.add_argument_group('DIST')
    g.add_argument('--dist_beta', type=float, default=1.0, help='DIST weight of the inter-class relation')
    g.add_argument('--dist_gamma', type=float, default=1.0, help='DIST weight of the intra-class relation')
    g.add_argument('--dist_T', type=float, default=4.0, help='DIST temperature tau')


class DIST(Distiller):
    """``-r`` x CE + ``-b`` x DISTLoss(--dist_beta, --dist_gamma, --dist_T); ``-a`` adds Hinton KD on top."""

    name = 'dist'
    data_mode = 'plain'
    default_weights = (1.0, 0.0, 2.0)   # dist_cifar.yaml: ori_loss_weight 1, kd_loss_weight 2
    option_groups = (add_dist_arguments,)

    @classmethod
    def resolve_options(cls, opt: Namespace) -> Namespace:
        if not (math.isfinite(opt.dist_T) and opt.dist_T > 0):
            raise UserError(f"--dist_T must be a positive number, got {opt.dist_T}")
        for flag in ('dist_beta', 'dist_gamma'):
            if not math.isfinite(getattr(opt, flag)) or getattr(opt, flag) < 0:
                raise UserError(f"--{flag} must be a number >= 0, got {getattr(opt, flag)}")
        return super().resolve_options(opt)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace, info: Any) -> None:
        super().__init__(student, teacher, opt, info)
        self.criterion_dist = DISTLoss(opt.dist_beta, opt.dist_gamma, opt.dist_T)

    def forward_train(self, image: Tensor, target: Tensor, **extras: Any) -> tuple[Tensor, dict[str, Tensor]]:
        logit_s = self.student(image)
        with torch.no_grad():
            logit_t = self.teacher(image)
        losses = self.logit_losses(logit_s, logit_t, target)
        losses[self.name] = self.beta * self.criterion_dist(logit_s, logit_t)
        return logit_s, losses
