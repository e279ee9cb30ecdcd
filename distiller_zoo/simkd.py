"""SimKD: Chen et al., "Knowledge Distillation with the Reused Teacher Classifier" (CVPR 2022).

A projector (models.util.SimKD) maps the student's last feature map (feat[-2]) onto the map the teacher's
classifier pools (models/facts.py ``pooled_map``: feat[-2] for most teachers, relu(bn1(feat[-2])) for WRN),
trained with MSE; predictions come from the teacher's own classifier, reused and frozen. The deployed
student is therefore student backbone + projector + teacher classifier (``SimKDStudent``), and that
is what is evaluated, counted and saved; ``load_deployed`` rebuilds it without the teacher file.
"""
from __future__ import annotations

from argparse import ArgumentParser, Namespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dataset import DataInfo
from distiller_zoo.base import Distiller, probe_features
from distiller_zoo.deploy import register_deployable
from helper.errors import UserError
from models import SiteRecorder, create_model, model_facts, site_shapes
from models.util import SimKD as SimKDProjector


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


def add_simkd_arguments(parser: ArgumentParser) -> None:
    """SimKD's flag."""
    g = parser.add_argument_group('SimKD')
    g.add_argument('--simkd_factor', type=int, default=2, help="SimKD projector's bottleneck factor (t_n / factor)")


class SimKDDistiller(Distiller):
    """``-b`` x MSE(projector(feat_s[-2]), teacher's pooled map); logits = teacher classifier on the projected map.

    ``-r`` / ``-a`` act on the student's own logits (SimKD's ``-c`` / ``-d``, 0 in its protocol).
    """

    name = 'simkd'
    default_weights = (0.0, 0.0, 1.0)   # SimKD's scripts: -c 0 -d 0 -b 1
    option_groups = (add_simkd_arguments,)

    @classmethod
    def resolve_options(cls, opt: Namespace) -> Namespace:
        if opt.simkd_factor < 1:
            raise UserError(f"--simkd_factor must be at least 1, got {opt.simkd_factor}")
        return super().resolve_options(opt)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                 info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        map_s = probe_features(student, self.image_size)[-2]
        facts_t = model_facts(opt.model_t, opt.dataset)
        self.target_site = {'target': facts_t.pooled_map}     # the map the teacher's classifier pools
        t_n, *target_size = site_shapes(teacher, self.target_site, self.image_size)['target']
        s_n = map_s.shape[1]
        self.cls_t_name = facts_t.classifier
        cls_t = teacher.get_submodule(self.cls_t_name)
        if cls_t.in_features != t_n:
            raise UserError(f"teacher {opt.model_t} cannot be a SimKD teacher: its classifier '{self.cls_t_name}' "
                            f"takes {cls_t.in_features} features but its pooled map has {t_n} channels")
        self.factor = int(opt.simkd_factor)
        if not 1 <= self.factor <= t_n:
            raise UserError(f"--simkd_factor must be between 1 and the teacher's {t_n} channels, "
                            f"got {opt.simkd_factor}")
        self.s_n, self.t_n = s_n, t_n
        self.target_size = tuple(target_size)
        self.projector = SimKDProjector(s_n=s_n, t_n=t_n, factor=self.factor)
        self.teacher_maps = SiteRecorder(teacher, self.target_site)   # hooks attached once, outside the step

    @property
    def cls_t(self) -> nn.Module:
        """The teacher's classifier (frozen with the rest of the teacher)."""
        return self.teacher.get_submodule(self.cls_t_name)

    def forward_train(self, image: Tensor, target: Tensor, **extras: Any) -> tuple[Tensor, dict[str, Tensor]]:
        feat_s, logit_s = self.student(image, is_feat=True)
        with torch.no_grad():
            logit_t = self.teacher(image)
        target_map = self.teacher_maps.take()['target']
        losses = self.logit_losses(logit_s, logit_t, target)
        trans_feat_s, trans_feat_t, pred_feat_s = self.projector(feat_s[-2], target_map, self.cls_t)
        losses[self.name] = self.beta * F.mse_loss(trans_feat_s, trans_feat_t)
        return pred_feat_s, losses

    def deployable(self) -> SimKDStudent:
        return SimKDStudent(self.student, self.projector, self.cls_t, self.target_size)

    def deploy_spec(self) -> dict[str, Any]:
        return {'kind': 'simkd', 'model_s': self.opt.model_s, 'model_t': self.opt.model_t,
                'num_classes': self.num_classes, 'factor': self.factor, 's_n': self.s_n, 't_n': self.t_n,
                'target_size': list(self.target_size), 'cls_t': self.cls_t_name, 'dataset': self.opt.dataset}


@register_deployable('simkd')
def build_simkd_student(spec: dict[str, Any]) -> SimKDStudent:
    """An untrained SimKDStudent of the shapes ``spec`` (SimKDDistiller.deploy_spec) describes."""
    return SimKDStudent(create_model(spec['model_s'], num_classes=spec['num_classes'], dataset=spec.get('dataset')),
                        SimKDProjector(s_n=spec['s_n'], t_n=spec['t_n'], factor=spec['factor']),
                        nn.Linear(spec['t_n'], spec['num_classes']), spec['target_size'])
