"""CRD: Tian et al., "Contrastive Representation Distillation" (ICLR 2020); ``crd -a 1`` is CRD+KD.

The loss (crd/) compares the pooled penultimate features (feat[-1]) of both networks through two
trainable embeddings and a memory bank of every training sample's embeddings; the loader gives each
sample's negatives (``contrast_idx``, data_mode 'crd').
"""
from __future__ import annotations

from argparse import Namespace
from typing import Any

import torch
import torch.nn as nn

from crd import CRDLoss
from distiller_zoo.base import Distiller, probe_features
from helper.errors import UserError


class CRD(Distiller):
    """``-r`` x CE + ``-a`` x KL_T + ``-b`` x CRDLoss(feat_s[-1], feat_t[-1], index, contrast_idx)."""

    name = 'crd'
    data_mode = 'crd'
    default_weights = (1.0, 0.0, 0.8)   # RepDistiller's run_cifar_distill.sh; CRD+KD: -a 1

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace) -> None:
        super().__init__(student, teacher, opt)
        for flag in ('feat_dim', 'nce_k'):
            if getattr(opt, flag) < 1:
                raise UserError(f"--{flag} must be at least 1, got {getattr(opt, flag)}")
        if not 0 <= opt.nce_m < 1:
            raise UserError(f"--nce_m must be in [0, 1), got {opt.nce_m}")
        if opt.nce_t <= 0:
            raise UserError(f"--nce_t must be positive, got {opt.nce_t}")
        opt.s_dim = probe_features(student, self.image_size)[-1].shape[1]
        opt.t_dim = probe_features(teacher, self.image_size)[-1].shape[1]
        self.criterion_crd = CRDLoss(opt)

    def method_loss(self, feat_s: list[torch.Tensor], feat_t: list[torch.Tensor], logit_s: torch.Tensor,
                    logit_t: torch.Tensor, target: torch.Tensor, *, index: torch.Tensor,
                    contrast_idx: torch.Tensor | None = None, **extras: Any) -> torch.Tensor:
        return self.criterion_crd(feat_s[-1], feat_t[-1], index, contrast_idx)
