"""Fidelity fixes against the reference code (issue: SimKD with WRN teachers)."""
from __future__ import annotations

import pytest
import torch

from distiller_zoo import build_distiller
from models import create_model
from tests.options import data_info, student_options


@pytest.mark.parametrize('teacher_name', ['wrn_40_2', 'resnet56', 'ResNet50', 'vgg13'])
def test_simkd_target_is_the_map_the_teacher_classifier_pools(teacher_name):
    torch.manual_seed(0)
    teacher = create_model(teacher_name, 10).eval()
    for module in teacher.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
    opt = student_options('simkd', model_s='resnet8', model_t=teacher_name)
    distiller = build_distiller('simkd', create_model('resnet8', 10), teacher, opt, data_info(num_classes=10))
    seen = {}
    original = distiller.projector.forward

    def spy(feat_s, feat_t, cls_t):
        seen['target'] = feat_t
        return original(feat_s, feat_t, cls_t)

    distiller.projector.forward = spy
    image = torch.randn(2, 3, 32, 32)
    distiller.forward_train(image, torch.tensor([1, 2]))
    with torch.no_grad():
        feats, logits = teacher(image, is_feat=True)
        # the teacher's classifier applied to the pooled target reproduces its logits exactly
        cls = teacher.get_submodule(distiller.cls_t_name)
        torch.testing.assert_close(cls(seen['target'].mean(dim=(2, 3))), logits, rtol=1e-5, atol=1e-5)
    if teacher_name.startswith('wrn'):
        torch.testing.assert_close(seen['target'], torch.relu(teacher.bn1(feats[-2])))
