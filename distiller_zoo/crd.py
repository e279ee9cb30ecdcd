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
from crd.criterion import add_crd_arguments, check_crd_options
from dataset import DataInfo
from distiller_zoo.base import Distiller, probe_features
from helper.options import updated


def build_crd_loss(student: nn.Module, teacher: nn.Module, opt: Namespace, info: DataInfo) -> CRDLoss:
    """A CRDLoss sized for this pair and data: RepDistiller's ``CRDLoss(opt)`` reads s_dim / t_dim (the
    pooled feature sizes) and n_data from its argument, given here as a copy of ``opt`` with them added."""
    s_dim = probe_features(student, info.image_size)[-1].shape[1]
    t_dim = probe_features(teacher, info.image_size)[-1].shape[1]
    return CRDLoss(updated(opt, s_dim=s_dim, t_dim=t_dim, n_data=info.n_data))


class CRD(Distiller):
    """``-r`` x CE + ``-a`` x KL_T + ``-b`` x CRDLoss(feat_s[-1], feat_t[-1], index, contrast_idx)."""

    name = 'crd'
    data_mode = 'crd'
    default_weights = (1.0, 0.0, 0.8)   # RepDistiller's run_cifar_distill.sh; CRD+KD: -a 1

    option_groups = (add_crd_arguments,)

    @classmethod
    def resolve_options(cls, opt: Namespace) -> Namespace:
        check_crd_options(opt)
        return super().resolve_options(opt)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                 info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        self.criterion_crd = build_crd_loss(student, teacher, opt, info)

    def method_loss(self, feat_s: list[torch.Tensor], feat_t: list[torch.Tensor], logit_s: torch.Tensor,
                    logit_t: torch.Tensor, target: torch.Tensor, *, index: torch.Tensor,
                    contrast_idx: torch.Tensor | None = None, **extras: Any) -> torch.Tensor:
        return self.criterion_crd(feat_s[-1], feat_t[-1], index, contrast_idx)
