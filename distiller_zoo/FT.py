"""FT: Kim et al., "Paraphrasing Complex Network: Network Compression via Factor Transfer" (NeurIPS 2018),
as RepDistiller runs it.

Init stage (``--init_epochs``, default 30): a ``Paraphraser`` learns to reconstruct the teacher's last
spatial map (``feat_t[-2]``). Main stage: the paraphraser is frozen (eval mode, not optimised) and a
trainable ``Translator`` on the student's ``feat_s[-2]`` matches its factor with ``FactorTransfer``.
Published weight: ``-b 200``.
"""
from __future__ import annotations

from argparse import Namespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset import DataInfo
from distiller_zoo.base import Distiller, probe_features
from helper.pretrain import InitStageMethod, run_init_stage
from models import model_facts
from models.util import Paraphraser, Translator, pool_to_smaller


class FactorTransfer(nn.Module):
    """forward(f_s, f_t): (B, C, H, W) factors -> scalar ``mean |phi(f_s) - phi(f_t)|^p2``.

    ``phi(f) = l2-normalise over H*W of mean_over_channels(f ** p1)``, after pooling the larger map to the
    smaller size; p2 = 1 gives the L1 distance.
    """

    def __init__(self, p1: int = 2, p2: int = 1) -> None:
        super().__init__()
        self.p1 = p1
        self.p2 = p2

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return self.factor_loss(f_s, f_t)

    def factor_loss(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s, f_t = pool_to_smaller(f_s, f_t)
        diff = (self.factor(f_s) - self.factor(f_t)).abs()
        return (diff if self.p2 == 1 else diff.pow(self.p2)).mean()

    def factor(self, f: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H*W)."""
        return F.normalize(f.pow(self.p1).mean(1).flatten(1))


class FTDistiller(InitStageMethod, Distiller):
    """``--distill factor``: ``FactorTransfer(Translator(feat_s[-2]), Paraphraser.encoder(feat_t[-2]))``."""

    name = 'factor'
    default_weights = (1.0, 0.0, 200.0)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                 info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        s_shape = probe_features(student, self.image_size)[-2].shape
        t_shape = probe_features(teacher, self.image_size)[-2].shape
        self.paraphraser = Paraphraser(t_shape)
        self.paraphraser.requires_grad_(False)      # trained only by the init stage
        self.translator = Translator(s_shape, t_shape)
        self.criterion = FactorTransfer()

    @classmethod
    def init_learning_rate(cls, opt: Namespace) -> float:
        """RepDistiller trains the paraphraser at lr 0.01 for CIFAR ResNet and WRN students, else at --learning_rate."""
        return 0.01 if model_facts(opt.model_s, opt.dataset).family in ('resnet', 'wrn') else float(opt.learning_rate)

    def train(self, mode: bool = True) -> 'FTDistiller':
        super().train(mode)
        self.paraphraser.eval()
        return self

    def method_loss(self, feat_s: list[torch.Tensor], feat_t: list[torch.Tensor], logit_s: torch.Tensor,
                    logit_t: torch.Tensor, target: torch.Tensor, **extras: Any) -> torch.Tensor:
        factor_t = self.paraphraser(feat_t[-2], is_factor=True)
        return self.criterion(self.translator(feat_s[-2]), factor_t)

    def init_loss(self, image: torch.Tensor) -> torch.Tensor:
        """The init stage's loss of one batch: the paraphraser's reconstruction MSE of the teacher's map."""
        feat_t, _ = self.teacher_forward(image)
        _, reconstruction = self.paraphraser(feat_t[-2])
        return F.mse_loss(reconstruction, feat_t[-2])

    def prepare(self, data: Any, *, device: torch.device, cache_dir: str, resumed: bool = False) -> None:
        if resumed:    # the checkpoint holds the trained paraphraser
            return
        run_init_stage(self, self.paraphraser, self.init_loss, data, self.opt, device,
                       self.init_learning_rate(self.opt))
