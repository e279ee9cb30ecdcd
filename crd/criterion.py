"""CRD: Tian et al., "Contrastive Representation Distillation" (ICLR 2020). RepDistiller's names and numbers."""
from __future__ import annotations

from argparse import ArgumentParser, Namespace

import torch
import torch.nn as nn
from torch import Tensor

from crd.memory import ContrastMemory
from helper.errors import UserError
from models.util import Embed

EPS = 1e-7


class ContrastLoss(nn.Module):
    """NCE loss (eq. 18 of the paper) on (B, K+1, 1) scores whose column 0 is the positive.

    With noise prior Pn = 1 / n_data and M = K:
    ``-(sum_b log(x_b0 / (x_b0 + M Pn + eps)) + sum_{b,k>0} log(M Pn / (x_bk + M Pn + eps))) / B``.
    """

    def __init__(self, n_data: int) -> None:
        super().__init__()
        self.n_data = int(n_data)

    def forward(self, x: Tensor) -> Tensor:
        batch, m = x.shape[0], x.shape[1] - 1
        noise = m / self.n_data
        positive = x[:, 0]
        negative = x[:, 1:]
        log_d1 = torch.log(positive / (positive + (noise + EPS)))
        log_d0 = torch.log(torch.full_like(negative, noise) / (negative + (noise + EPS)))
        return -(log_d1.sum() + log_d0.sum()) / batch


def add_crd_arguments(parser: ArgumentParser) -> None:
    """CRD's flags (RepDistiller's names and defaults); ``--feat_dim`` is also CC's embedding size."""
    g = parser.add_argument_group('CRD')
    g.add_argument('--feat_dim', type=int, default=128, help='embedding size of CRD and CC')
    g.add_argument('--mode', type=str, default='exact', choices=('exact', 'relax'), help='CRD positive sampling')
    g.add_argument('--nce_k', type=int, default=16384, help='CRD negatives per anchor')
    g.add_argument('--nce_t', type=float, default=0.07, help='CRD temperature')
    g.add_argument('--nce_m', type=float, default=0.5, help='CRD memory momentum')


def check_crd_options(opt: Namespace) -> None:
    """UserError for CRD flags outside their domain (--feat_dim, --nce_k >= 1; --nce_m in [0, 1); --nce_t > 0)."""
    for flag in ('feat_dim', 'nce_k'):
        if getattr(opt, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(opt, flag)}")
    if not 0 <= opt.nce_m < 1:
        raise UserError(f"--nce_m must be in [0, 1), got {opt.nce_m}")
    if opt.nce_t <= 0:
        raise UserError(f"--nce_t must be positive, got {opt.nce_t}")


class CRDLoss(nn.Module):
    """The CRD objective on the penultimate (pooled) features of student and teacher.

    ``opt`` provides s_dim, t_dim (feature sizes), feat_dim (embedding size), n_data (training-set
    size), nce_k (negatives), nce_t (temperature), nce_m (memory momentum) and optionally seed
    (for the fallback negative sampler). forward(f_s, f_t, idx, contrast_idx=None): f_s (B, s_dim),
    f_t (B, t_dim), idx (B,) dataset indices, contrast_idx (B, K+1) -> scalar loss (both directions).
    """

    def __init__(self, opt: Namespace) -> None:
        super().__init__()
        self.embed_s = Embed(opt.s_dim, opt.feat_dim)
        self.embed_t = Embed(opt.t_dim, opt.feat_dim)
        self.contrast = ContrastMemory(opt.feat_dim, opt.n_data, opt.nce_k, opt.nce_t, opt.nce_m,
                                       seed=getattr(opt, 'seed', 0) or 0)
        self.criterion_s = ContrastLoss(opt.n_data)
        self.criterion_t = ContrastLoss(opt.n_data)

    def forward(self, f_s: Tensor, f_t: Tensor, idx: Tensor, contrast_idx: Tensor | None = None) -> Tensor:
        out_s, out_t = self.contrast(self.embed_s(f_s), self.embed_t(f_t), idx, contrast_idx)
        return self.criterion_s(out_s) + self.criterion_t(out_t)
