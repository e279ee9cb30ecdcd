"""FSP: Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and
Transfer Learning" (CVPR 2017), as RepDistiller runs it.

All of the transfer happens in the init stage (``--init_epochs``, default 30): the student's feature
modules learn to match the teacher's FSP (flow) matrices between consecutive maps of ``feat[:-1]``.
The main stage is CE only (plus ``-a`` KD if asked); ``-b`` has no effect. Needs equal channel counts per
stage (so not wrn_40_2 -> wrn_40_1, nor any cross-architecture pair).
"""
from __future__ import annotations

from argparse import Namespace
from typing import Any, Sequence

import torch
import torch.nn as nn

from dataset import DataInfo
from distiller_zoo.base import Distiller, probe_features
from helper.errors import UserError
from helper.pretrain import InitStageMethod, run_init_stage
from models.util import pool_to_smaller


class FSP(nn.Module):
    """forward(g_s, g_t): lists of n (B, C_i, H_i, W_i) maps -> n - 1 per-pair losses ``mean((G_s - G_t)^2)``.

    ``G[b, j, i] = mean over H*W of top[b, j] * bottom[b, i]`` for consecutive maps (bottom = g[k], top =
    g[k+1], the larger pooled to the smaller size), shape (B, C_top, C_bottom).
    The constructor refuses (UserError) shapes whose channel counts differ.
    """

    def __init__(self, s_shapes: Sequence[Sequence[int]], t_shapes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        s_c, t_c = [s[1] for s in s_shapes], [t[1] for t in t_shapes]
        if s_c != t_c:
            raise UserError(f"fsp needs equal channel counts per stage: student {s_c}, teacher {t_c}")

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [(s - t).pow(2).mean() for s, t in zip(self.compute_fsp(g_s), self.compute_fsp(g_t))]

    @staticmethod
    def compute_fsp(g: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The FSP matrices (B, C_top, C_bottom) of consecutive maps."""
        matrices = []
        for bottom, top in zip(g[:-1], g[1:]):
            bottom, top = pool_to_smaller(bottom, top)
            matrices.append(torch.einsum('bjn,bin->bji', top.flatten(2), bottom.flatten(2)) / top[0, 0].numel())
        return matrices


class FSPDistiller(InitStageMethod, Distiller):
    """``--distill fsp``: init stage ``sum(FSP(feat_s[:-1], feat_t[:-1]))``; main stage CE only."""

    name = 'fsp'
    default_weights = (1.0, 0.0, 50.0)   # RepDistiller's script passes -b 50; it is unused

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                 info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        s_shapes = [f.shape for f in probe_features(student, self.image_size)[:-1]]
        t_shapes = [f.shape for f in probe_features(teacher, self.image_size)[:-1]]
        self.criterion = FSP(s_shapes, t_shapes)

    def init_loss(self, image: torch.Tensor) -> torch.Tensor:
        """The init stage's loss of one batch (grad to the student's feature modules)."""
        feat_s, _ = self.student(image, is_feat=True)
        feat_t, _ = self.teacher_forward(image)
        return sum(self.criterion(feat_s[:-1], feat_t[:-1]))

    def prepare(self, data: Any, *, device: torch.device, cache_dir: str, resumed: bool = False) -> None:
        if resumed:    # the checkpoint holds the initialised student
            return
        run_init_stage(self, self.student.get_feat_modules(), self.init_loss, data, self.opt, device,
                       self.init_learning_rate(self.opt))
