"""SimKD: Chen et al., "Knowledge Distillation with the Reused Teacher Classifier" (CVPR 2022).

A projector (models.util.SimKD) maps the student's last feature map (feat[-2]) onto the teacher's,
trained with MSE; predictions come from the teacher's own classifier, reused and frozen. The deployed
student is therefore student backbone + projector + teacher classifier (``SimKDStudent``), and that
is what is evaluated, counted and saved; ``load_deployed`` rebuilds it without the teacher file.
"""
from __future__ import annotations

from argparse import Namespace
from typing import Any

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from distiller_zoo.base import Distiller, probe_features
from distiller_zoo.deploy import register_deployable
from helper.errors import UserError
from models import create_model
from models.util import SimKD as SimKDProjector


def last_linear_name(model: nn.Module) -> str:
    """Module name of the last nn.Linear of ``model`` (its classifier: fc, linear, classifier, classifier.0)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise UserError(f"{type(model).__name__} has no linear classifier for SimKD to reuse")
    return names[-1]


class SimKDStudent(nn.Module):
    """The deployed SimKD student: (B, 3, H, W) -> (B, classes) logits without any teacher forward.

    Runs ``student`` to its last feature map, pools it to ``target_size`` (the teacher map's size,
    recorded at training time) when it is larger, then ``projector`` and the reused classifier ``cls_t``.
    """

    def __init__(self, student: nn.Module, projector: SimKDProjector, cls_t: nn.Module,
                 target_size: tuple[int, int]) -> None:
        super().__init__()
        self.student = student
        self.projector = projector
        self.cls_t = cls_t
        self.target_size = tuple(target_size)

    def forward(self, x: Tensor) -> Tensor:
        feats, _ = self.student(x, is_feat=True)
        feat = feats[-2]
        if feat.shape[2] > self.target_size[0]:
            feat = F.adaptive_avg_pool2d(feat, self.target_size)
        return self.projector.classify(self.projector.transfer(feat), self.cls_t)


class SimKDDistiller(Distiller):
    """``-b`` x MSE(projector(feat_s[-2]), feat_t[-2]); logits = teacher classifier on the projected map.

    ``-r`` / ``-a`` act on the student's own logits (SimKD's ``-c`` / ``-d``, 0 in its protocol).
    """

    name = 'simkd'
    default_weights = (0.0, 0.0, 1.0)   # SimKD's scripts: -c 0 -d 0 -b 1

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace) -> None:
        super().__init__(student, teacher, opt)
        map_s = probe_features(student, self.image_size)[-2]
        map_t = probe_features(teacher, self.image_size)[-2]
        s_n, t_n = map_s.shape[1], map_t.shape[1]
        self.cls_t_name = last_linear_name(teacher)
        cls_t = teacher.get_submodule(self.cls_t_name)
        if cls_t.in_features != t_n:
            teacher_name = getattr(opt, 'model_t', type(teacher).__name__)
            raise UserError(f"teacher {teacher_name} cannot be a SimKD teacher: its classifier '{self.cls_t_name}' "
                            f"takes {cls_t.in_features} features but its last feature map has {t_n} channels")
        self.factor = int(opt.simkd_factor)
        if not 1 <= self.factor <= t_n:
            raise UserError(f"--simkd_factor must be between 1 and the teacher's {t_n} channels, "
                            f"got {opt.simkd_factor}")
        self.s_n, self.t_n = s_n, t_n
        self.target_size = tuple(map_t.shape[2:])
        self.projector = SimKDProjector(s_n=s_n, t_n=t_n, factor=self.factor)

    @property
    def cls_t(self) -> nn.Module:
        """The teacher's classifier (frozen with the rest of the teacher)."""
        return self.teacher.get_submodule(self.cls_t_name)

    def forward_train(self, image: Tensor, target: Tensor, **extras: Any) -> tuple[Tensor, dict[str, Tensor]]:
        feat_s, logit_s = self.student(image, is_feat=True)
        feat_t, logit_t = self.teacher_forward(image)
        losses = self.logit_losses(logit_s, logit_t, target)
        trans_feat_s, trans_feat_t, pred_feat_s = self.projector(feat_s[-2], feat_t[-2], self.cls_t)
        losses[self.name] = self.beta * F.mse_loss(trans_feat_s, trans_feat_t)
        return pred_feat_s, losses

    def deployable(self) -> SimKDStudent:
        return SimKDStudent(self.student, self.projector, self.cls_t, self.target_size)

    def deploy_spec(self) -> dict[str, Any]:
        return {'kind': 'simkd', 'model_s': self.opt.model_s, 'model_t': self.opt.model_t,
                'num_classes': self.opt.num_classes, 'factor': self.factor, 's_n': self.s_n, 't_n': self.t_n,
                'target_size': list(self.target_size), 'cls_t': self.cls_t_name}


@register_deployable('simkd')
def build_simkd_student(spec: dict[str, Any]) -> SimKDStudent:
    """An untrained SimKDStudent of the shapes ``spec`` (SimKDDistiller.deploy_spec) describes."""
    return SimKDStudent(create_model(spec['model_s'], num_classes=spec['num_classes']),
                        SimKDProjector(s_n=spec['s_n'], t_n=spec['t_n'], factor=spec['factor']),
                        nn.Linear(spec['t_n'], spec['num_classes']), spec['target_size'])
