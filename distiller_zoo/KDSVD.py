"""KDSVD: Lee et al., "Self-supervised Knowledge Distillation Using Singular Value Decomposition" (ECCV 2018),
as RepDistiller runs it.

The top right-singular vectors of the intermediate stage outputs (``feat[1:-1]``, zip-truncated) carry
the knowledge; RBF kernels between consecutive layers' vectors are matched. Needs equal channel counts in
every compared pair. Weight ``-b 1`` (mdistiller's; RepDistiller's scripts do not run it).
"""
from __future__ import annotations

from argparse import Namespace
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset import DataInfo
from distiller_zoo.base import Distiller, probe_features
from helper.errors import UserError


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _safe_reciprocal(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.zeros_like(x), 1.0 / torch.where(x == 0, torch.ones_like(x), x))


class _SingularValuesAndVectors(torch.autograd.Function):
    """Thin SVD of a (B, m, k) batch -> singular values (B, r) and right-singular vectors V (B, k, r).

    The values are torch.linalg.svd's. The backward is the standard one for these outputs,
    ``U [diag(gS) + S (skew(V^T gV) / E)] V^T + U S^-1 gV^T (I - V V^T)`` with ``E_jk = S_k^2 - S_j^2``,
    except that a zero denominator contributes 0 instead of NaN. Post-ReLU maps with dead channels have
    repeated zero singular values; their vectors are never used, but PyTorch's own backward then turns
    the whole gradient into NaN (0/0).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        v = vh.transpose(-2, -1)
        ctx.save_for_backward(u, s, v)
        return s, v

    @staticmethod
    def backward(ctx, g_s: torch.Tensor, g_v: torch.Tensor) -> torch.Tensor:
        u, s, v = ctx.saved_tensors
        vt = v.transpose(-2, -1)
        vt_gv = vt @ g_v
        s2 = s.pow(2)
        gap = s2.unsqueeze(-2) - s2.unsqueeze(-1)                            # E_jk = S_k^2 - S_j^2
        inner = torch.diag_embed(g_s) + s.unsqueeze(-1) * ((vt_gv - vt_gv.transpose(-2, -1)) * _safe_reciprocal(gap))
        grad = u @ inner @ vt
        if v.shape[-2] > v.shape[-1]:                                        # k > r: V does not span R^k
            g_vt = g_v.transpose(-2, -1)
            grad = grad + u @ (_safe_reciprocal(s).unsqueeze(-1) * (g_vt - (g_vt @ v) @ vt))
        return grad


class KDSVD(nn.Module):
    """forward(g_s, g_t): lists of (B, C, H, W) maps (equal C per pair) -> n - 1 per-layer losses (scalars).

    Per map: SVD of the (B, H*W, C) matrix; the teacher keeps its top k right-singular vectors, the
    student its top k + 3, both L2-normalised over C, the singular values normalised. Each teacher vector
    picks the student vector of largest |cosine| (sign-corrected); both are scaled by the teacher's
    singular values. For layers i >= 1, ``K[b, p, q] = exp(-(v_i[b, p] - v_{i-1}[b, q])^2 / 8)`` and the
    loss is ``sum((K_s - K_t)^2) / B`` (non-finite entries set to 0; no gradient through the teacher).
    """

    def __init__(self, k: int = 1) -> None:
        super().__init__()
        self.k = k

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        losses = []
        prev_s = prev_t = None
        for f_s, f_t in zip(g_s, g_t):
            s_t, v_t = self.svd(f_t, self.k)
            _, v_s = self.svd(f_s, self.k + 3)
            v_s = self.align_rsv(v_s, v_t)
            scale = s_t.unsqueeze(1)                       # (B, 1, k)
            v_t, v_s = v_t * scale, v_s * scale
            if prev_s is not None:
                rbf_s = torch.exp(-(v_s.unsqueeze(2) - prev_s.unsqueeze(1)).pow(2) / 8)
                rbf_t = torch.exp(-(v_t.unsqueeze(2) - prev_t.unsqueeze(1)).pow(2) / 8)
                losses.append(_finite_or_zero((rbf_s - rbf_t.detach()).pow(2)).sum())
            prev_s, prev_t = v_s, v_t
        bsz = g_s[0].shape[0]
        return [loss / bsz for loss in losses]

    @staticmethod
    def svd(feat: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> normalised top-n singular values (B, n) and right-singular vectors (B, C, n)."""
        x = feat.flatten(2).transpose(1, 2)                # (B, H*W, C)
        s, v = _SingularValuesAndVectors.apply(x)
        s, v = _finite_or_zero(s), _finite_or_zero(v)
        return F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)

    @staticmethod
    def align_rsv(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
        """For each teacher vector, the student vector of largest |cosine|, times the cosine's sign. -> (B, C, k)."""
        cosine = v_s.transpose(1, 2) @ v_t                 # (B, k_s, k_t)
        best = cosine.abs().amax(1, keepdim=True)
        selection = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
        return v_s @ selection


class KDSVDDistiller(Distiller):
    """``--distill kdsvd``: the sum of ``KDSVD(k=1)`` over ``feat[1:-1]``."""

    name = 'kdsvd'
    default_weights = (1.0, 0.0, 1.0)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                 info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        s_c = [f.shape[1] for f in probe_features(student, self.image_size)[1:-1]]
        t_c = [f.shape[1] for f in probe_features(teacher, self.image_size)[1:-1]]
        n = min(len(s_c), len(t_c))
        if s_c[:n] != t_c[:n]:
            raise UserError(f"kdsvd needs equal channel counts per stage: student {s_c[:n]}, teacher {t_c[:n]}")
        self.criterion = KDSVD(k=1)

    def method_loss(self, feat_s: list[torch.Tensor], feat_t: list[torch.Tensor], logit_s: torch.Tensor,
                    logit_t: torch.Tensor, target: torch.Tensor, **extras: Any) -> torch.Tensor:
        return sum(self.criterion(feat_s[1:-1], feat_t[1:-1]))
