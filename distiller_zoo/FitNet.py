"""FitNet: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015), as RepDistiller runs it.

A ``ConvReg`` regresses the student's feature ``feat[hint_layer]`` (default 2) onto the teacher's, trained
jointly with the student under CE + beta * MSE (no separate hint stage). Published weight: ``-b 100``.
"""
from __future__ import annotations

from argparse import ArgumentParser, Namespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset import DataInfo
from distiller_zoo.base import Distiller, probe_features
from helper.errors import UserError
from models.util import ConvReg


class HintLoss(nn.Module):
    """forward(f_s, f_t): mean squared error over all elements of two equally shaped tensors."""

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(f_s, f_t)


def hint_regressor(student: nn.Module, teacher: nn.Module, hint_layer: int, image_size: int) -> ConvReg:
    """The ``ConvReg`` from the student's feat[hint_layer] to the teacher's; UserError when either network
    has no such feature map."""
    f_s, f_t = probe_features(student, image_size), probe_features(teacher, image_size)
    if not (hint_layer < len(f_s) - 1 and hint_layer < len(f_t) - 1):
        raise UserError(f"--hint_layer {hint_layer} is not a feature map of both networks "
                        f"(student has {len(f_s) - 1}, teacher {len(f_t) - 1} maps: indices 0..{min(len(f_s), len(f_t)) - 2})")
    return ConvReg(f_s[hint_layer].shape, f_t[hint_layer].shape)


def add_hint_arguments(parser: ArgumentParser) -> None:
    """FitNet's flag (RepDistiller's)."""
    g = parser.add_argument_group('FitNet')
    g.add_argument('--hint_layer', type=int, default=2, choices=range(5), help='FitNet feature index')


class FitNetDistiller(Distiller):
    """``--distill hint``: MSE(ConvReg(feat_s[hint_layer]), feat_t[hint_layer]); the regressor is trainable."""

    name = 'hint'
    default_weights = (1.0, 0.0, 100.0)
    option_groups = (add_hint_arguments,)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                 info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        self.hint_layer = int(opt.hint_layer)
        self.regressor = hint_regressor(student, teacher, self.hint_layer, self.image_size)
        self.criterion = HintLoss()

    def method_loss(self, feat_s: list[torch.Tensor], feat_t: list[torch.Tensor], logit_s: torch.Tensor,
                    logit_t: torch.Tensor, target: torch.Tensor, **extras: Any) -> torch.Tensor:
        return self.criterion(self.regressor(feat_s[self.hint_layer]), feat_t[self.hint_layer])
