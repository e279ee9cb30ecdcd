"""CTKD: Li et al., "Curriculum Temperature for Knowledge Distillation" (AAAI 2023), global temperature, on KD.

The KD temperature is learned, adversarially: one scalar parameter g (initialised to 1) gives

    T = t_start + t_end * sigmoid(R_lambda(g)),        loss = -r CE + -a T^2 KL(softmax(z_t / T) || softmax(z_s / T))

where R_lambda is a gradient reversal: the identity forward, the gradient times -lambda backward. The student
minimises the KD loss while g (through R) ascends it, scaled by lambda; lambda follows a cosine curriculum over
the epochs, lambda(e) = l_min + (l_max - l_min) * (1 - cos(pi * min(e, E) / E)) / 2, from l_min at epoch 0 to
l_max from epoch E on.

Official code (zhengli97/CTKD): ``models/temp_global.py`` (``Global_T``: ``nn.Parameter(torch.ones(1))``;
``GradientReversalFunction``: forward ``x.clone()``, backward ``lambda_ * grads``), ``helper/loops.py``
(``temp = opt.t_start + opt.t_end * torch.sigmoid(mlp_net(...))``, then ``DistillKL(y_s, y_t, temp)``),
``train_student.py`` (``CosineDecay(max_value=decay_max, min_value=decay_min, num_loops=decay_loops).get_value(epoch)``,
passed as ``lambda_``; defaults ``--t_start 1 --t_end 20``) and ``scripts/run_cifar_distill.sh`` (``--distill kd -r 0.1
-a 0.9 -b 0 --kd_T 4 --batch_size 64 --learning_rate 0.05 --have_mlp 1 --mlp_name global --cosine_decay 1
--decay_max 0 --decay_min -1 --decay_loops 10``). The official backward multiplies by the decay value itself,
which runs from 0 to -1: our lambda is its negative (``--ctkd_lambda_min 0`` = -decay_max, ``--ctkd_lambda_max 1``
= -decay_min, ``--ctkd_lambda_epochs 10`` = decay_loops). g is trained by the same SGD as the student (same lr,
momentum and weight decay), as in the official ``trainable_list``.

``--logit_stand`` (distiller_zoo/logit_stand.py): the KL compares z-scored logits at the learned T, with
``-a`` = ``--kd_weight`` (the logit-standardization repository's ``CTKD/``: ``DistillKL_logit_stand``, run with
``-r 0.1 -a 9``).
"""
from __future__ import annotations

import math
from argparse import ArgumentParser, Namespace
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from distiller_zoo.base import Distiller
from distiller_zoo.logit_stand import LogitStand, add_logit_stand_arguments, kd_divergence, kd_weight_as, \
    resolve_logit_stand
from helper.errors import UserError
from helper.options import updated


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``-lambda`` (a 0-dim tensor, no gradient)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lam: Tensor) -> Tensor:
        ctx.save_for_backward(lam)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (lam,) = ctx.saved_tensors
        return -lam * grad, None


def reverse_gradient(x: Tensor, lam: Tensor) -> Tensor:
    """``x`` forward, ``-lam * grad`` backward (gradient reversal, Ganin & Lempitsky 2015). ``lam`` is a tensor so
    that a compiled step reads its current value: a custom autograd.Function, which torch.compile traces."""
    return _ReverseGradient.apply(x, lam)


class GlobalTemperature(nn.Module):
    """CTKD's global temperature: ``T = t_start + t_end * sigmoid(reverse_gradient(global_T, lam))`` as a 0-dim tensor.

    ``global_T`` is the official parameter (shape (1,), initialised to 1: T = 1 + 20 sigmoid(1) = 15.62 at the start).
    """

    def __init__(self, t_start: float = 1.0, t_end: float = 20.0) -> None:
        super().__init__()
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.global_T = nn.Parameter(torch.ones(1))

    def forward(self, lam: Tensor) -> Tensor:
        return (self.t_start + self.t_end * torch.sigmoid(reverse_gradient(self.global_T, lam))).view(())

    @torch.no_grad()
    def value(self) -> float:
        """The current temperature (a host read: for logging, outside the training step)."""
        return float(self.t_start + self.t_end * torch.sigmoid(self.global_T).item())


def cosine_lambda(epoch: int, lambda_min: float, lambda_max: float, epochs: int) -> float:
    """lambda(e) = l_min + (l_max - l_min) (1 - cos(pi min(e, E) / E)) / 2, e clipped to [0, E] (official CosineDecay)."""
    if epochs <= 0:
        return lambda_max
    e = min(max(epoch, 0), epochs)
    return lambda_min + (lambda_max - lambda_min) * (1.0 - math.cos(math.pi * e / epochs)) / 2.0


def add_ctkd_arguments(parser: ArgumentParser) -> None:
    """CTKD's flags (the official defaults and scripts/run_cifar_distill.sh)."""
    g = parser.add_argument_group('CTKD')
    g.add_argument('--ctkd_t_start', type=float, default=1.0, help='CTKD: T = t_start + t_end * sigmoid(g) (official --t_start)')
    g.add_argument('--ctkd_t_end', type=float, default=20.0, help='CTKD: the range of T above t_start (official --t_end)')
    g.add_argument('--ctkd_lambda_min', type=float, default=0.0,
                   help='CTKD gradient-reversal weight at epoch 0 (official -decay_max)')
    g.add_argument('--ctkd_lambda_max', type=float, default=1.0,
                   help='CTKD gradient-reversal weight from --ctkd_lambda_epochs on (official -decay_min)')
    g.add_argument('--ctkd_lambda_epochs', type=int, default=10,
                   help='CTKD epochs of the cosine curriculum of lambda (official --decay_loops)')


class CTKD(LogitStand, Distiller):
    """``-r`` x CE + ``-a`` x T^2 KL at the learned temperature T (module doc); ``-b`` is not used."""

    name = 'ctkd'
    data_mode = 'plain'
    default_weights = (0.1, 0.9, 0.0)   # the official run_cifar_distill.sh: -r 0.1 -a 0.9 -b 0
    option_groups = (add_ctkd_arguments, add_logit_stand_arguments)

    @classmethod
    def resolve_options(cls, opt: Namespace) -> Namespace:
        values = resolve_logit_stand(opt, cls.name, learns_temperature=True)
        values.update(kd_weight_as('alpha', opt, values))
        opt = super().resolve_options(updated(opt, **values))
        if opt.beta != 0:
            raise UserError(f"ctkd does not use -b (got {opt.beta}); its KD weight is -a")
        if opt.ctkd_lambda_epochs < 0:
            raise UserError(f"--ctkd_lambda_epochs must be >= 0, got {opt.ctkd_lambda_epochs}")
        for flag in ('ctkd_t_start', 'ctkd_t_end', 'ctkd_lambda_min', 'ctkd_lambda_max'):
            if not math.isfinite(getattr(opt, flag)):
                raise UserError(f"--{flag} must be a finite number, got {getattr(opt, flag)}")
        if opt.ctkd_t_start <= 0 or opt.ctkd_t_end < 0:
            raise UserError(f"CTKD's temperature range must be positive: --ctkd_t_start {opt.ctkd_t_start} > 0, "
                            f"--ctkd_t_end {opt.ctkd_t_end} >= 0")
        return opt

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace, info: Any) -> None:
        super().__init__(student, teacher, opt, info)
        self.init_logit_stand(opt)
        self.temperature = GlobalTemperature(opt.ctkd_t_start, opt.ctkd_t_end)
        self.lambda_min, self.lambda_max = float(opt.ctkd_lambda_min), float(opt.ctkd_lambda_max)
        self.lambda_epochs = int(opt.ctkd_lambda_epochs)
        # the epoch's reversal weight, filled in place by start_epoch (a compiled step reads the buffer)
        self.register_buffer('grl_lambda', torch.tensor(self.curriculum(1)), persistent=False)

    def curriculum(self, epoch: int) -> float:
        """lambda of a (1-indexed) epoch."""
        return cosine_lambda(epoch, self.lambda_min, self.lambda_max, self.lambda_epochs)

    def start_epoch(self, epoch: int) -> None:
        self.grl_lambda.fill_(self.curriculum(epoch))

    def forward_train(self, image: Tensor, target: Tensor, **extras: Any) -> tuple[Tensor, dict[str, Tensor]]:
        logit_s = self.student(image)
        with torch.no_grad():
            logit_t = self.teacher(image)
        T = self.temperature(self.grl_lambda)
        losses = {'ce': self.gamma * self.criterion_cls(logit_s, target)}
        losses['kd'] = self.alpha * kd_divergence(self.stand(logit_s), self.stand(logit_t), T)
        return logit_s, losses

    def epoch_metrics(self) -> dict[str, float]:
        """The learned temperature at the end of the epoch and the epoch's lambda (official log: temp, decay_value)."""
        return {'ctkd_T': self.temperature.value(), 'ctkd_lambda': float(self.grl_lambda.item())}
