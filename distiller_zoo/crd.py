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
from crd.criterion import check_crd_options
from distiller_zoo.base import Distiller, probe_features


def build_crd_loss(student: nn.Module, teacher: nn.Module, opt: Namespace) -> CRDLoss:
    """A CRDLoss sized for this pair: opt.s_dim / opt.t_dim are set to the pooled feature sizes (B, D)."""
    check_crd_options(opt)
    image_size = getattr(opt, 'image_size', 32)
    opt.s_dim = probe_features(student, image_size)[-1].shape[1]
    opt.t_dim = probe_features(teacher, image_size)[-1].shape[1]
    return CRDLoss(opt)


class CRD(Distiller):
    """``-r`` x CE + ``-a`` x KL_T + ``-b`` x CRDLoss(feat_s[-1], feat_t[-1], index, contrast_idx)."""

    name = 'crd'
    data_mode = 'crd'
    default_weights = (1.0, 0.0, 0.8)   # RepDistiller's run_cifar_distill.sh; CRD+KD: -a 1

    @classmethod
    def check_options(cls, opt: Namespace) -> None:
        check_crd_options(opt)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace) -> None:
        super().__init__(student, teacher, opt)
        self.criterion_crd = build_crd_loss(student, teacher, opt)

    def method_loss(self, feat_s: list[torch.Tensor], feat_t: list[torch.Tensor], logit_s: torch.Tensor,
                    logit_t: torch.Tensor, target: torch.Tensor, *, index: torch.Tensor,
                    contrast_idx: torch.Tensor | None = None, **extras: Any) -> torch.Tensor:
        return self.criterion_crd(feat_s[-1], feat_t[-1], index, contrast_idx)
