"""CC: Peng et al., "Correlation Congruence for Knowledge Distillation" (ICCV 2019), RepDistiller's variant.

Both penultimate vectors (``feat[-1]``) go through a trainable ``LinearEmbed(dim, --feat_dim)`` (the
teacher-side embedding is trained too); the loss correlates the embedding gaps of consecutive samples.
Published weight: ``-b 0.02``.
"""
from __future__ import annotations

from argparse import Namespace
from typing import Any

import torch
import torch.nn as nn

from crd.criterion import add_crd_arguments
from dataset import DataInfo
from distiller_zoo.base import Distiller, probe_features
from helper.errors import UserError
from models.util import LinearEmbed


class Correlation(nn.Module):
    """forward(f_s, f_t): (B, D) embeddings -> scalar ``mean_i sum_d |f_s - f_t|[i, d] * |f_s - f_t|[i+1, d]``."""

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        delta = (f_s - f_t).abs()
        return (delta[:-1] * delta[1:]).sum(1).mean()


class CCDistiller(Distiller):
    """``--distill correlation``: ``Correlation(embed_s(feat_s[-1]), embed_t(feat_t[-1]))``."""

    name = 'correlation'
    default_weights = (1.0, 0.0, 0.02)
    option_groups = (add_crd_arguments,)     # --feat_dim

    @classmethod
    def resolve_options(cls, opt: Namespace) -> Namespace:
        if opt.feat_dim < 1:
            raise UserError(f"--feat_dim must be at least 1, got {opt.feat_dim}")
        return super().resolve_options(opt)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                 info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        dim_s = probe_features(student, self.image_size)[-1].shape[1]
        dim_t = probe_features(teacher, self.image_size)[-1].shape[1]
        self.embed_s = LinearEmbed(dim_s, opt.feat_dim)
        self.embed_t = LinearEmbed(dim_t, opt.feat_dim)
        self.criterion = Correlation()

    def method_loss(self, feat_s: list[torch.Tensor], feat_t: list[torch.Tensor], logit_s: torch.Tensor,
                    logit_t: torch.Tensor, target: torch.Tensor, **extras: Any) -> torch.Tensor:
        return self.criterion(self.embed_s(feat_s[-1]), self.embed_t(feat_t[-1]))
