"""DistillKL on hand-computed inputs, and the kd / ce Distillers."""
import math

import pytest
import torch
import torch.nn as nn

from distiller_zoo import DistillKL, build_distiller
from helper.errors import UserError
from models import create_model
from tests.fixtures_data import train_on_fixed_batch
from tests.options import data_info, student_options


def opt(distill='kd', **kw):
    base = dict(gamma=1.0, alpha=0.9, beta=0.0, kd_T=4.0)
    base.update(kw)
    return student_options(distill, **base)


def info():
    """The models here have 10 classes."""
    return data_info(num_classes=10)


def test_distill_kl_equals_hand_computed_value():
    T = 2.0
    y_s = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    y_t = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    # sample 0: p_t = softmax([1, 0]) , p_s = [0.5, 0.5]; sample 1: identical distributions -> 0
    pt = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]
    kl0 = sum(p * math.log(p / 0.5) for p in pt)
    expected = T ** 2 * (kl0 + 0.0) / 2       # batch mean
    assert DistillKL(T)(y_s, y_t).item() == pytest.approx(expected, rel=1e-6)


def test_distill_kl_is_zero_for_equal_logits_and_positive_otherwise():
    y = torch.randn(5, 10)
    assert DistillKL(4)(y, y).item() == pytest.approx(0.0, abs=1e-6)
    assert DistillKL(4)(y, y.flip(1)).item() > 0


def test_kd_losses_are_weighted_and_gradients_reach_only_the_student():
    torch.manual_seed(0)
    student, teacher = create_model('resnet8', 10), create_model('resnet14', 10)
    distiller = build_distiller('kd', student, teacher, opt(gamma=0.1, alpha=0.9), info())
    distiller.train()
    assert not teacher.training                      # the teacher stays in eval mode
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits, losses = distiller.forward_train(x, y)
    assert set(losses) == {'ce', 'kd'}
    with torch.no_grad():
        distiller.eval()
        lt = teacher(x)
    assert losses['ce'].item() == pytest.approx(0.1 * nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert losses['kd'].item() == pytest.approx(0.9 * DistillKL(4)(logits, lt).item(), rel=1e-5)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert trainable == {id(p) for p in student.parameters()}


def test_kd_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    student, teacher = create_model('resnet8', 10), create_model('resnet8', 10)
    distiller = build_distiller('kd', student, teacher, opt(gamma=0.1, alpha=0.9), info())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    history = [step['total'] for step in train_on_fixed_batch(distiller, x, y)]
    assert history[-1] < 0.7 * history[0]


def test_ce_distiller_needs_no_teacher_and_trains_the_whole_student():
    student = create_model('resnet8', 10)
    distiller = build_distiller('ce', student, None, opt('ce', alpha=0.0), info())
    logits, losses = distiller.forward_train(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert list(losses) == ['ce'] and logits.shape == (2, 10)
    assert distiller.deployable() is student


def test_unknown_method_is_a_user_error():
    with pytest.raises(UserError, match='unknown --distill'):
        build_distiller('nope', create_model('resnet8', 10), None, opt(), info())
