"""AB: Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons"
(AAAI 2019), as RepDistiller runs it.

Uses pre-activation features (``preact=True``) of the intermediate stages (``feat[1:-1]``). All of the
transfer happens in the init stage (``--init_epochs``, default 30): a ``Connector`` and the student's feature
modules learn the teacher's activation boundaries. The main stage is CE only (plus ``-a`` KD if asked):
the connector is frozen (eval mode, not optimised) and ``-b`` has no effect.
"""
from __future__ import annotations

from argparse import Namespace
from typing import Any, Sequence

import torch
import torch.nn as nn

from dataset import DataInfo
from distiller_zoo.base import Distiller, probe_features
from helper.pretrain import InitStageMethod, run_init_stage
from models.util import Connector


class ABLoss(nn.Module):
    """forward(g_s, g_t): lists of (B, C, H, W) pre-activation maps (student already connected) -> per-layer losses.

    Per element with margin m: ``(s + m)^2`` where ``s > -m`` and ``t <= 0``, ``(s - m)^2`` where ``s <= m``
    and ``t > 0``, else 0; summed per layer, weighted by ``2^(i - feat_num + 1)`` (the deepest layer gets 1),
    divided by B and multiplied by 3/1000.
    """

    def __init__(self, feat_num: int, margin: float = 1.0) -> None:
        super().__init__()
        self.w = [2 ** (i - feat_num + 1) for i in range(feat_num)]
        self.margin = margin

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        bsz = g_s[0].shape[0]
        return [w * self.criterion_alternative_l2(s, t) / bsz / 1000 * 3 for w, s, t in zip(self.w, g_s, g_t)]

    def criterion_alternative_l2(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The summed margin loss of one layer (scalar)."""
        m = self.margin
        below = ((source > -m) & (target <= 0)).to(source.dtype)
        above = ((source <= m) & (target > 0)).to(source.dtype)
        return ((source + m).pow(2) * below + (source - m).pow(2) * above).sum()


class ABDistiller(InitStageMethod, Distiller):
    """``--distill abound``: init stage ``sum(ABLoss(Connector(feat_s[1:-1]), feat_t[1:-1]))``; main stage CE only."""

    name = 'abound'
    preact = True
    default_weights = (1.0, 0.0, 1.0)   # RepDistiller's script passes -b 1; it is unused

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                 info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        f_s = probe_features(student, self.image_size, preact=True)[1:-1]
        f_t = probe_features(teacher, self.image_size, preact=True)[1:-1]
        self.connector = Connector([f.shape for f in f_s], [f.shape for f in f_t])
        self.connector.requires_grad_(False)      # trained only by the init stage
        self.criterion = ABLoss(min(len(f_s), len(f_t)))

    def train(self, mode: bool = True) -> 'ABDistiller':
        super().train(mode)
        self.connector.eval()
        return self

    def init_loss(self, image: torch.Tensor) -> torch.Tensor:
        """The init stage's loss of one batch (grad to the connector and the student's feature modules)."""
        feat_s, _ = self.student(image, is_feat=True, preact=True)
        feat_t, _ = self.teacher_forward(image)
        return sum(self.criterion(self.connector(feat_s[1:-1]), feat_t[1:-1]))

    def prepare(self, data: Any, *, device: torch.device, cache_dir: str, resumed: bool = False) -> None:
        if resumed:    # the checkpoint holds the connector and the initialised student
            return
        init_modules = nn.ModuleList([*self.student.get_feat_modules(), self.connector])
        run_init_stage(self, init_modules, self.init_loss, data, self.opt, device,
                       self.init_learning_rate(self.opt))
