"""The two logit-only methods: plain CE (``--distill ce``) and Hinton KD (``--distill kd``).

KD's criterion is ``DistillKL`` in KD.py (RepDistiller's file); the base Distiller already
computes ``gamma * CE + alpha * KL_T``, so KD adds no loss of its own. The protocol runs it with
``-r 0.1 -a 0.9`` (RepDistiller's script). ``--logit_stand`` (distiller_zoo/logit_stand.py) compares the
z-scored logits at ``--base_temp`` with weight ``--kd_weight`` instead.
"""
from __future__ import annotations

from argparse import Namespace
from typing import Any

import torch
import torch.nn as nn

from dataset import DataInfo
from distiller_zoo.base import Distiller
from distiller_zoo.logit_stand import LogitStand, add_logit_stand_arguments, kd_weight_as, resolve_logit_stand
from helper.options import updated


class Vanilla(Distiller):
    """``gamma * CE(student(x), y)`` only: the student from scratch, and the teacher trainer. No teacher."""

    name = 'ce'
    data_mode = 'plain'
    needs_teacher = False

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                 info: DataInfo) -> None:
        super().__init__(student, None, opt, info)

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **extras: Any
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(image)
        return logits, {'ce': self.gamma * self.criterion_cls(logits, target)}


class KD(LogitStand, Distiller):
    """Hinton KD: ``gamma * CE + alpha * T^2 KL(p_t || p_s)`` (T = ``--kd_T``, default 4).

    With ``--logit_stand``: ``gamma * CE + kd_weight * T_b^2 KL(softmax(std(z_t) / T_b) || softmax(std(z_s) / T_b))``,
    T_b = ``--base_temp``, ``-a`` = ``--kd_weight`` (the official logit-standardization ``KD.py`` / ``tools/train.py``).
    """

    name = 'kd'
    default_weights = (0.1, 0.9, 0.0)   # RepDistiller's run_cifar_distill.sh
    option_groups = (add_logit_stand_arguments,)

    @classmethod
    def resolve_options(cls, opt: Namespace) -> Namespace:
        values = resolve_logit_stand(opt, cls.name)
        values.update(kd_weight_as('alpha', opt, values))
        return super().resolve_options(updated(opt, **values))

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                 info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        self.init_logit_stand(opt)

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **extras: Any
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # features are not needed: plain forwards are cheaper
        logit_s = self.student(image)
        with torch.no_grad():
            logit_t = self.teacher(image)
        return logit_s, self.logit_losses(logit_s, logit_t, target)
