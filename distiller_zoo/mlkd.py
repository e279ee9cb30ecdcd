"""MLKD: Jin et al., "Multi-Level Logit Distillation" (CVPR 2023).

Instance-, batch- and class-level alignment of the softened predictions at five temperatures, on a weakly and a
strongly augmented view of each image (data mode 'weak_strong', dataset/strong_aug.py). With p = softmax(z / tau)
row-wise (B x C), tau in TEMPS = (T, 3, 5, 2, 6), T = ``--mlkd_T`` (4), and w = ``-b``:

    instance(s, t, tau) = tau^2 / B * sum_b KL(p_t[b] || p_s[b])
    class(s, t, tau)    = || P_t^T P_t - P_s^T P_s ||_F^2 / C          (C x C class-correlation matrices)
    batch(s, t, tau)    = || P_t P_t^T - P_s P_s^T ||_F^2 / B          (B x B sample-correlation matrices)

    ce            = -r * (CE(z_s^weak, y) + CE(z_s^strong, y))
    mlkd_instance = w * [ m * sum_tau instance(weak, tau)
                          + sum_{tau in (T, 3, 5)} instance(strong, tau) + sum_{tau in (2, 6)} instance(weak, tau) ]
    mlkd_class    = w * k * sum_tau class(weak, tau)
    mlkd_batch    = w * m * sum_tau batch(weak, tau)

The masks come from the teacher's weak-view prediction q = softmax(z_t^weak) (temperature 1, never standardized):
m = the fraction of samples whose confidence max_c q[b, c] is at most its batch median, k = the fraction of classes
whose summed confidence sum_b q[b, c] is at most its median (medians as numpy's 50th percentile, linear
interpolation).

This is the official code, term by term (Jin-Ying/Multi-Level-Logit-Distillation ``mdistiller/distillers/KD_ours.py``,
``KD_ours.forward_train``; the logit-standardization repository's ``mdistiller/distillers/MLKD.py`` is the same plus
``logit_stand`` in ``kd_loss``), including what reads like accidents there and is kept because the published numbers
come from it:
- the masks multiply already-averaged scalars (``kd_loss(...)`` and ``bc_loss(...)`` with ``reduce=True``, times a
  (B,) mask, then ``.mean()``; the per-sample version is commented out there), so "confidence masking" scales each
  masked term by the masked fraction (about 1/2) instead of dropping samples: m and k above;
- the strong-view instance terms at tau = 2 and 6 use the weak-view logits;
- the strong-view class and batch terms are computed there but left out of the returned losses: not computed here.
Teacher and student run on both views (the teacher in eval mode, so its two views go through one forward here).

``--logit_stand`` (distiller_zoo/logit_stand.py): the instance-level KLs compare z-scored logits, with T =
``--base_temp`` and w = ``--kd_weight`` (the official tools/train.py sets KD.TEMPERATURE and KD.LOSS.KD_WEIGHT);
the class- and batch-level terms and the masks keep the raw logits, as in the official MLKD.py.

Published protocol (configs/cifar100/ours/*.yaml of the MLKD repository, and mdistiller's cfg.py defaults it reads:
KD.TEMPERATURE 4, KD.LOSS.CE_WEIGHT 0.1, KD.LOSS.KD_WEIGHT 0.9): batch 64, SGD momentum 0.9, weight decay 5e-4,
lr x0.1 at 150 / 180 / 210; lr 0.025 for the same-family pairs, 0.01 for MobileNetV2 / ShuffleNet students; 240
epochs for the same-family pairs since the Sep 2024 configs (480 before), 480 for vgg13 / ResNet50 -> MobileNetV2 and
wrn_40_2 -> ShuffleV1, 960 for resnet32x4 -> ShuffleV1 / ShuffleV2.
"""
from __future__ import annotations

import math
from argparse import ArgumentParser, Namespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from distiller_zoo.base import Distiller
from distiller_zoo.logit_stand import LogitStand, add_logit_stand_arguments, kd_divergence, kd_weight_as, \
    resolve_logit_stand
from helper.errors import UserError
from helper.options import updated

OTHER_TEMPS = (3.0, 5.0, 2.0, 6.0)      # after the first temperature, in the official order
STRONG_ON_WEAK = 2                      # the last two strong-view instance terms read the weak view (official)


def class_alignment(logit_s: Tensor, logit_t: Tensor, temperature: float) -> Tensor:
    """||P_t^T P_t - P_s^T P_s||_F^2 / C with P = softmax(z / tau): the official ``cc_loss`` (reduce=True)."""
    p_s = F.softmax(logit_s / temperature, dim=1)
    p_t = F.softmax(logit_t / temperature, dim=1)
    return ((p_t.t() @ p_t - p_s.t() @ p_s) ** 2).sum() / logit_s.shape[1]


def batch_alignment(logit_s: Tensor, logit_t: Tensor, temperature: float) -> Tensor:
    """||P_t P_t^T - P_s P_s^T||_F^2 / B with P = softmax(z / tau): the official ``bc_loss`` (reduce=True)."""
    p_s = F.softmax(logit_s / temperature, dim=1)
    p_t = F.softmax(logit_t / temperature, dim=1)
    return ((p_t @ p_t.t() - p_s @ p_s.t()) ** 2).sum() / logit_s.shape[0]


def fraction_at_most_median(values: Tensor) -> Tensor:
    """The fraction of ``values`` (1-d) that are <= their median, numpy's ``percentile(values, 50)`` (linear
    interpolation between the two middle values); sort-based, so no host read and a static shape."""
    ordered = values.sort().values
    n = values.shape[0]
    position = 0.5 * (n - 1)
    lo, hi = math.floor(position), math.ceil(position)
    median = ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)
    return (values <= median).to(values.dtype).mean()


def add_mlkd_arguments(parser: ArgumentParser) -> None:
    """MLKD's flag (the official cfg: KD.TEMPERATURE 4; the other temperatures are fixed: 3, 5, 2, 6)."""
    g = parser.add_argument_group('MLKD')
    g.add_argument('--mlkd_T', type=float, default=4.0,
                   help='MLKD: the first of its five temperatures (the others are 3, 5, 2, 6)')


class MLKD(LogitStand, Distiller):
    """``-r`` x CE on both views + ``-b`` x the instance-, class- and batch-level alignments (module doc)."""

    name = 'mlkd'
    data_mode = 'weak_strong'
    default_weights = (0.1, 0.0, 0.9)   # the official cfg: KD.LOSS.CE_WEIGHT 0.1, KD.LOSS.KD_WEIGHT 0.9
    option_groups = (add_mlkd_arguments, add_logit_stand_arguments)

    @classmethod
    def resolve_options(cls, opt: Namespace) -> Namespace:
        values = resolve_logit_stand(opt, cls.name)
        values.update(kd_weight_as('beta', opt, values))
        opt = super().resolve_options(updated(opt, **values))
        if opt.alpha != 0:
            raise UserError(f"mlkd does not use -a (got {opt.alpha}); its weight is -b (all three levels)")
        if not (math.isfinite(opt.mlkd_T) and opt.mlkd_T > 0):
            raise UserError(f"--mlkd_T must be a positive number, got {opt.mlkd_T}")
        if getattr(opt, 'device_data', False):
            raise UserError("mlkd's strong view (RandAugment + Cutout on PIL images) exists only in the reference "
                            "loaders; pass --no-device_data (--fast alone leaves device data off for mlkd)")
        return opt

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace, info: Any) -> None:
        super().__init__(student, teacher, opt, info)
        self.init_logit_stand(opt)
        first = float(opt.base_temp) if self.logit_stand else float(opt.mlkd_T)
        self.temperatures = (first, *OTHER_TEMPS)

    def forward_train(self, image: Tensor, target: Tensor, image_strong: Tensor | None = None, **extras: Any
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        if image_strong is None:
            raise ValueError("mlkd needs the strong view: a batch (image, target, index, image_strong) of the "
                             "'weak_strong' data mode")
        logit_s_weak = self.student(image)
        logit_s_strong = self.student(image_strong)
        with torch.no_grad():
            logit_t_weak, logit_t_strong = self.teacher(torch.cat([image, image_strong])).chunk(2)
            confidence = F.softmax(logit_t_weak, dim=1)
            sample_keep = fraction_at_most_median(confidence.max(dim=1).values)
            class_keep = fraction_at_most_median(confidence.sum(dim=0))

        weak_s, weak_t = self.stand(logit_s_weak), self.stand(logit_t_weak)
        strong_s, strong_t = self.stand(logit_s_strong), self.stand(logit_t_strong)
        temps = self.temperatures
        instance = sample_keep * sum(kd_divergence(weak_s, weak_t, tau) for tau in temps)
        instance = instance + sum(kd_divergence(strong_s, strong_t, tau) for tau in temps[:-STRONG_ON_WEAK])
        instance = instance + sum(kd_divergence(weak_s, weak_t, tau) for tau in temps[-STRONG_ON_WEAK:])
        classes = class_keep * sum(class_alignment(logit_s_weak, logit_t_weak, tau) for tau in temps)
        batch = sample_keep * sum(batch_alignment(logit_s_weak, logit_t_weak, tau) for tau in temps)

        ce = F.cross_entropy(logit_s_weak, target) + F.cross_entropy(logit_s_strong, target)
        losses = {'ce': self.gamma * ce, 'mlkd_instance': self.beta * instance, 'mlkd_class': self.beta * classes,
                  'mlkd_batch': self.beta * batch}
        return logit_s_weak, losses
