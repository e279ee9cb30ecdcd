"""DIST, CTKD, logit standardization (on kd, dkd, mlkd, ctkd), MLKD and its 'weak_strong' data mode.

Every expected value here is computed independently of the code under test: explicit Python loops over floats
(softmax, KL, Pearson correlation, Gram matrices, z-scores, medians) or closed forms, and the expected gradients are
central differences of those pure-Python losses (float64). The Distillers run on ``LogitTable`` networks whose
"logits" are parameters picked by the image, so a whole ``forward_train`` (weights, masks, temperatures) is checked
against the hand computation. Each test names the official file and function its equality mirrors.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms

import train_student
import train_teacher
from dataset import get_dataloaders, set_epoch
from dataset.device_data import device_bundle
from dataset.generated import write_cifar100
from dataset.strong_aug import CUTOUT_FILL, OPERATIONS, FixMatchRandAugment, cutout, strong_transform
from distiller_zoo import DISTILLERS, build_distiller
from distiller_zoo.ctkd import cosine_lambda
from distiller_zoo.dist import DISTLoss
from distiller_zoo.logit_stand import standardize
from distiller_zoo.mlkd import fraction_at_most_median
from helper.compile_counter import CompileCounter
from helper.errors import UserError
from helper.loops import FastOptions, FastTrainer, extra_names, train_one_epoch_fast
from helper.sync_counter import SyncCounter
from tests.options import data_info, student_options
from tests.test_fast_path import PreloadedLoader, build, small_bundle

CPU = torch.device('cpu')

# ------------------------------------------------------------------------------------ pure-Python references

Rows = list[list[float]]


def softmax(row: list[float], tau: float = 1.0) -> list[float]:
    top = max(v / tau for v in row)
    e = [math.exp(v / tau - top) for v in row]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def z_score(row: list[float]) -> list[float]:
    """(x - mean) / (unbiased std + 1e-7), the official ``normalize``."""
    n = len(row)
    mean = sum(row) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (n - 1))
    return [(v - mean) / (std + 1e-7) for v in row]


def kd_by_hand(zs: Rows, zt: Rows, tau: float) -> float:
    """tau^2 / B * sum_b KL(softmax(zt_b / tau) || softmax(zs_b / tau))."""
    return tau ** 2 * sum(kl(softmax(t, tau), softmax(s, tau)) for s, t in zip(zs, zt)) / len(zs)


def ce_by_hand(z: Rows, target: list[int]) -> float:
    return -sum(math.log(softmax(row)[y]) for row, y in zip(z, target)) / len(z)


def pearson_by_hand(a: list[float], b: list[float], eps: float = 1e-8) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    da, db = [v - ma for v in a], [v - mb for v in b]
    dot = sum(x * y for x, y in zip(da, db))
    return dot / (math.sqrt(sum(x * x for x in da)) * math.sqrt(sum(y * y for y in db)) + eps)


def dist_by_hand(zs: Rows, zt: Rows, beta: float, gamma: float, tau: float) -> float:
    ys, yt = [softmax(r, tau) for r in zs], [softmax(r, tau) for r in zt]
    inter = 1 - sum(pearson_by_hand(a, b) for a, b in zip(ys, yt)) / len(ys)
    columns = range(len(ys[0]))
    intra = 1 - sum(pearson_by_hand([r[c] for r in ys], [r[c] for r in yt]) for c in columns) / len(columns)
    return tau ** 2 * (beta * inter + gamma * intra)


def dkd_by_hand(zs: Rows, zt: Rows, target: list[int], alpha: float, beta: float, tau: float) -> float:
    tckd = nckd = 0.0
    for s, t, g in zip(zs, zt, target):
        ps, pt = softmax(s, tau), softmax(t, tau)
        tckd += kl([pt[g], 1 - pt[g]], [ps[g], 1 - ps[g]])
        others = [c for c in range(len(s)) if c != g]
        nckd += kl(softmax([t[c] for c in others], tau), softmax([s[c] for c in others], tau))
    return tau ** 2 * (alpha * tckd + beta * nckd) / len(zs)


def gram_class(p: Rows) -> Rows:
    """P^T P (C x C)."""
    c = len(p[0])
    return [[sum(row[i] * row[j] for row in p) for j in range(c)] for i in range(c)]


def gram_batch(p: Rows) -> Rows:
    """P P^T (B x B)."""
    return [[sum(x * y for x, y in zip(a, b)) for b in p] for a in p]


def squared_distance(a: Rows, b: Rows) -> float:
    return sum((x - y) ** 2 for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def class_by_hand(zs: Rows, zt: Rows, tau: float) -> float:
    ps, pt = [softmax(r, tau) for r in zs], [softmax(r, tau) for r in zt]
    return squared_distance(gram_class(pt), gram_class(ps)) / len(zs[0])


def batch_by_hand(zs: Rows, zt: Rows, tau: float) -> float:
    ps, pt = [softmax(r, tau) for r in zs], [softmax(r, tau) for r in zt]
    return squared_distance(gram_batch(pt), gram_batch(ps)) / len(zs)


def median_fraction_by_hand(values: list[float]) -> float:
    """Share of values <= numpy's percentile(values, 50) (linear interpolation), written out."""
    ordered = sorted(values)
    position = 0.5 * (len(values) - 1)
    lo, hi = math.floor(position), math.ceil(position)
    median = ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)
    return sum(v <= median for v in values) / len(values)


def mlkd_by_hand(sw: Rows, ss: Rows, tw: Rows, ts: Rows, target: list[int], first_tau: float, ce_w: float,
                 w: float, stand: bool = False) -> dict[str, float]:
    """KD_ours.forward_train (Jin-Ying/Multi-Level-Logit-Distillation), term by term, in plain Python."""
    temps = [first_tau, 3.0, 5.0, 2.0, 6.0]
    q = [softmax(r) for r in tw]
    m = median_fraction_by_hand([max(r) for r in q])
    k = median_fraction_by_hand([sum(r[c] for r in q) for c in range(len(q[0]))])
    f = (lambda rows: [z_score(r) for r in rows]) if stand else (lambda rows: rows)
    instance = sum(w * m * kd_by_hand(f(sw), f(tw), tau) for tau in temps)
    instance += sum(w * kd_by_hand(f(ss), f(ts), tau) for tau in temps[:3])
    instance += sum(w * kd_by_hand(f(sw), f(tw), tau) for tau in temps[3:])      # the official strong terms at 2, 6
    return {'ce': ce_w * (ce_by_hand(sw, target) + ce_by_hand(ss, target)), 'mlkd_instance': instance,
            'mlkd_class': sum(w * k * class_by_hand(sw, tw, tau) for tau in temps),
            'mlkd_batch': sum(w * m * batch_by_hand(sw, tw, tau) for tau in temps)}


def numeric_gradient(loss, rows: Rows, h: float = 1e-6) -> Rows:
    """Central differences of ``loss(rows)`` (a pure-Python function) in every entry."""
    grad = []
    for i, row in enumerate(rows):
        grad.append([])
        for j in range(len(row)):
            up = [list(r) for r in rows]
            down = [list(r) for r in rows]
            up[i][j] += h
            down[i][j] -= h
            grad[i].append((loss(up) - loss(down)) / (2 * h))
    return grad


# ------------------------------------------------------------------------------------ networks with given logits

class LogitTable(nn.Module):
    """A "network" whose logits are rows of a table, picked by the value of each image's first pixel."""

    def __init__(self, rows: Rows, trainable: bool) -> None:
        super().__init__()
        table = torch.tensor(rows, dtype=torch.float64)
        if trainable:
            self.table = nn.Parameter(table)
        else:
            self.register_buffer('table', table)

    def forward(self, image: torch.Tensor, is_feat: bool = False, preact: bool = False):
        logits = self.table[image[:, 0, 0, 0].round().long()]
        return ([], logits) if is_feat else logits


def images(rows: list[int]) -> torch.Tensor:
    x = torch.zeros(len(rows), 3, 2, 2, dtype=torch.float64)
    x[:, 0, 0, 0] = torch.tensor(rows, dtype=torch.float64)
    return x


def table_distiller(name: str, student_rows: Rows, teacher_rows: Rows, **flags):
    opt = student_options(name, model_s='resnet8', model_t='resnet8', **flags)
    student, teacher = LogitTable(student_rows, True), LogitTable(teacher_rows, False)
    distiller = build_distiller(name, student, teacher, opt, data_info(num_classes=len(student_rows[0])))
    return distiller.double(), opt


Z_S = [[1.2, -0.3, 0.5, 2.0], [0.1, 0.4, -1.1, 0.9], [-0.7, 1.5, 0.2, 0.3]]
Z_T = [[2.5, -1.0, 0.7, 1.0], [-0.2, 1.3, -2.0, 0.6], [0.4, 2.2, -0.5, -0.1]]
TARGET = [3, 1, 1]


def check_gradient(distiller, term: str, expected_loss, rows: Rows = Z_S, rel: float = 1e-6) -> None:
    """``losses[term]`` of forward_train equals ``expected_loss(rows)``; its gradient w.r.t. the student's logits equals
    the central differences of ``expected_loss``."""
    n = len(rows)
    _, losses = distiller.forward_train(images(list(range(n))), torch.tensor(TARGET[:n]))
    assert losses[term].item() == pytest.approx(expected_loss(rows), rel=rel)
    distiller.student.table.grad = None
    losses[term].backward()
    torch.testing.assert_close(distiller.student.table.grad, torch.tensor(numeric_gradient(expected_loss, rows),
                                                                          dtype=torch.float64), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------ logit standardization

def test_standardize_is_the_official_z_score_with_unbiased_std_and_eps_on_the_std():
    """logit-standardization-KD mdistiller/distillers/KD.py ``normalize``: mean and std (unbiased) over the classes,
    1e-7 added to the std."""
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-2.0, 0.5, 0.0, 7.0]], dtype=torch.float64)
    expected = torch.tensor([z_score(row) for row in z.tolist()], dtype=torch.float64)
    torch.testing.assert_close(standardize(z), expected, rtol=1e-12, atol=1e-12)
    # unbiased: [1, 2, 3, 4] has variance 5/3, so its first z-score is -1.5 / sqrt(5/3)
    assert standardize(z)[0, 0].item() == pytest.approx(-1.5 / (math.sqrt(5 / 3) + 1e-7), rel=1e-12)


def test_logit_stand_on_a_constant_row_gives_zeros_not_nan():
    """A constant row has std 0: the official ``normalize`` gives (z - mean) / 1e-7 = 0 (a uniform softmax). The KD
    loss is then T^2 KL(teacher || uniform) and every gradient is finite (large: 1 / 1e-7 scale, as the official)."""
    z_s = torch.full((1, 4), 3.0, dtype=torch.float64)
    assert torch.equal(standardize(z_s), torch.zeros(1, 4, dtype=torch.float64))
    distiller, _ = table_distiller('kd', [[3.0] * 4], [Z_T[0]], logit_stand=True)
    _, losses = distiller.forward_train(images([0]), torch.tensor([0]))
    expected = 9.0 * 2.0 ** 2 * kl(softmax(z_score(Z_T[0]), 2.0), [0.25] * 4)
    assert losses['kd'].item() == pytest.approx(expected, rel=1e-9)
    losses['kd'].backward()
    assert torch.isfinite(distiller.student.table.grad).all()


def test_kd_with_logit_stand_loss_and_gradient_by_hand():
    """logit-standardization-KD mdistiller/distillers/KD.py ``kd_loss(..., logit_stand=True)`` times KD_WEIGHT, as
    tools/train.py sets it for --logit-stand --base-temp 2 --kd-weight 9: 9 * 2^2 KL(softmax(std(z_t) / 2) ||
    softmax(std(z_s) / 2)); CE (0.1) on the raw logits."""
    distiller, opt = table_distiller('kd', Z_S, Z_T, logit_stand=True)
    assert (opt.gamma, opt.alpha, opt.base_temp, opt.kd_weight) == (0.1, 9.0, 2.0, 9.0)
    stand = lambda rows: [z_score(r) for r in rows]
    check_gradient(distiller, 'kd', lambda zs: 9.0 * kd_by_hand(stand(zs), stand(Z_T), 2.0))
    check_gradient(distiller, 'ce', lambda zs: 0.1 * ce_by_hand(zs, TARGET))
    other, _ = table_distiller('kd', Z_S, Z_T, logit_stand=True, base_temp=3.0, kd_weight=1.0)
    check_gradient(other, 'kd', lambda zs: 1.0 * kd_by_hand(stand(zs), stand(Z_T), 3.0))


def test_kd_without_logit_stand_is_unchanged():
    """RepDistiller's DistillKL(4) with -r 0.1 -a 0.9 when the switch is off."""
    distiller, _ = table_distiller('kd', Z_S, Z_T)
    check_gradient(distiller, 'kd', lambda zs: 0.9 * kd_by_hand(zs, Z_T, 4.0))


@pytest.mark.parametrize('epoch, warm', [(1, 0.05), (20, 1.0)])
def test_dkd_with_logit_stand_loss_and_gradient_by_hand(epoch, warm):
    """logit-standardization-KD mdistiller/distillers/DKD.py ``dkd_loss(..., logit_stand=True)`` with tools/train.py's
    ALPHA * kd_weight, BETA * kd_weight and T = base_temp, times DKD's warm-up min(epoch / 20, 1)."""
    distiller, _ = table_distiller('dkd', Z_S, Z_T, logit_stand=True, base_temp=3.0, kd_weight=2.0, dkd_beta=6.0)
    distiller.start_epoch(epoch)
    stand = lambda rows: [z_score(r) for r in rows]
    check_gradient(distiller, 'dkd', lambda zs: warm * dkd_by_hand(stand(zs), stand(Z_T), TARGET, 2.0, 12.0, 3.0))


@pytest.mark.parametrize('distill, flags, message', [
    ('crd', {'logit_stand': True}, '--logit_stand, --base_temp and --kd_weight apply to kd, dkd, mlkd, ctkd, not crd'),
    ('dist', {'kd_weight': 3.0}, 'not dist'),
    ('kd', {'base_temp': 3.0}, 'act only together with --logit_stand'),
    ('dkd', {'kd_weight': 3.0}, 'act only together with --logit_stand'),
    ('kd', {'logit_stand': True, 'alpha': 0.9}, 'leave -a out'),
    ('mlkd', {'logit_stand': True, 'beta': 0.9}, 'leave -b out'),
    ('ctkd', {'logit_stand': True, 'base_temp': 2.0}, 'ctkd learns its temperature'),
    ('kd', {'logit_stand': True, 'base_temp': 0.0}, '--base_temp must be a positive number'),
    ('kd', {'logit_stand': True, 'kd_weight': -1.0}, '--kd_weight must be a number >= 0'),
    ('dist', {'dist_T': 0.0}, '--dist_T'),
    ('ctkd', {'beta': 1.0}, 'ctkd does not use -b'),
    ('ctkd', {'ctkd_lambda_epochs': -1}, '--ctkd_lambda_epochs'),
    ('mlkd', {'alpha': 0.5}, 'mlkd does not use -a'),
    ('mlkd', {'mlkd_T': -1.0}, '--mlkd_T'),
    ('mlkd', {'device_data': True}, 'pass --no-device_data'),
    ('mlkd', {'fast': True, 'device_data': True}, 'pass --no-device_data'),
])
def test_flags_are_checked_in_the_resolver(distill, flags, message):
    with pytest.raises(UserError, match=message.replace('-', r'\-').replace('.', r'\.')):
        student_options(distill, **flags)


def test_logit_stand_flags_resolve_to_the_official_defaults_and_weights():
    """tools/train.py: --base-temp 2 --kd-weight 9 by default; KD and MLKD take kd_weight as their KD weight, DKD
    multiplies alpha and beta by it, CTKD (its CTKD/ script) runs with -a 9 and its own temperature."""
    assert (student_options('kd').base_temp, student_options('kd').kd_weight) == (None, None)
    kd = student_options('kd', logit_stand=True, kd_weight=9.0, alpha=9.0)      # the same value twice is fine
    assert kd.alpha == 9.0 and kd.base_temp == 2.0
    mlkd = student_options('mlkd', logit_stand=True, kd_weight=6.0)
    assert (mlkd.gamma, mlkd.alpha, mlkd.beta, mlkd.base_temp) == (0.1, 0.0, 6.0, 2.0)
    ctkd = student_options('ctkd', logit_stand=True)
    assert (ctkd.gamma, ctkd.alpha, ctkd.base_temp, ctkd.kd_weight) == (0.1, 9.0, None, 9.0)
    dkd = student_options('dkd', logit_stand=True, dkd_beta=2.0, kd_weight=15.0)
    assert (dkd.dkd_alpha, dkd.dkd_beta, dkd.kd_weight, dkd.base_temp) == (1.0, 2.0, 15.0, 2.0)   # as given


# ------------------------------------------------------------------------------------ DIST

def test_dist_loss_and_gradient_by_hand():
    """hunto/image_classification_sota lib/models/losses/dist_kd.py ``DIST(beta, gamma, tau).forward``: tau^2 (beta
    (1 - mean per-sample Pearson) + gamma (1 - mean per-class Pearson)) of softmax(z / tau), eps 1e-8 on the norms'
    product; weighted by kd_loss_weight 2 (configs/strategies/distill/dist_cifar.yaml) = our -b 2."""
    distiller, opt = table_distiller('dist', Z_S, Z_T)
    assert (opt.gamma, opt.alpha, opt.beta, opt.dist_beta, opt.dist_gamma, opt.dist_T) == (1.0, 0.0, 2.0, 1.0, 1.0, 4.0)
    check_gradient(distiller, 'dist', lambda zs: 2.0 * dist_by_hand(zs, Z_T, 1.0, 1.0, 4.0))
    check_gradient(distiller, 'ce', lambda zs: ce_by_hand(zs, TARGET))
    other, _ = table_distiller('dist', Z_S, Z_T, dist_beta=0.5, dist_gamma=2.0, dist_T=1.0, beta=1.0)
    check_gradient(other, 'dist', lambda zs: dist_by_hand(zs, Z_T, 0.5, 2.0, 1.0))


def test_dist_edge_cases_identical_logits_and_a_batch_of_one():
    """Identical predictions correlate perfectly: the loss is 0 but for the 1e-8 in the denominator (|a|^2 / (|a|^2 +
    1e-8) < 1 with the small spread of softmax(z / 4)); a batch of one has zero variance across the batch, so the
    official intra-class Pearson is 0 / (0 + 1e-8) = 0 and the intra term is 1 (finite, no NaN)."""
    z = torch.tensor(Z_T, dtype=torch.float64)
    same = DISTLoss(1.0, 1.0, 4.0)(z, z).item()
    assert same == pytest.approx(dist_by_hand(Z_T, Z_T, 1.0, 1.0, 4.0), rel=1e-6) and 0 < same < 1e-4
    single_s = torch.tensor([Z_S[0]], dtype=torch.float64, requires_grad=True)
    single_t = torch.tensor([Z_T[0]], dtype=torch.float64)
    inter, intra = DISTLoss(1.0, 1.0, 4.0).relations(single_s, single_t)
    assert intra.item() == 1.0
    assert inter.item() == pytest.approx(1 - pearson_by_hand(softmax(Z_S[0], 4), softmax(Z_T[0], 4)), rel=1e-9)
    loss = DISTLoss(1.0, 1.0, 4.0)(single_s, single_t)
    loss.backward()
    assert torch.isfinite(single_s.grad).all()


# ------------------------------------------------------------------------------------ CTKD

def test_ctkd_curriculum_is_the_official_cosine_decay_negated():
    """zhengli97/CTKD train_student.py ``CosineDecay(max_value=0, min_value=-1, num_loops=10).get_value(epoch)``
    (the scripts' --decay_max 0 --decay_min -1 --decay_loops 10) is -lambda: (cos(pi e / 10) + 1) / 2 * 1 - 1."""
    official = lambda e: (math.cos(min(max(e, 0), 10) * math.pi / 10) + 1.0) * 0.5 * (0 - (-1)) + (-1)
    for epoch in (0, 1, 2, 5, 9, 10, 11, 240):
        assert cosine_lambda(epoch, 0.0, 1.0, 10) == pytest.approx(-official(epoch), abs=1e-12)
    assert cosine_lambda(0, 0.0, 1.0, 10) == 0.0 and cosine_lambda(5, 0.0, 1.0, 10) == pytest.approx(0.5)
    distiller, _ = table_distiller('ctkd', Z_S, Z_T)
    for epoch in (1, 10):
        distiller.start_epoch(epoch)
        assert distiller.grl_lambda.item() == pytest.approx(-official(epoch), rel=1e-6)


def ctkd_temperature_gradient(zs: Rows, zt: Rows, T: float, weight: float) -> float:
    """d/dT of weight * T^2 mean_b KL(softmax(zt_b / T) || softmax(zs_b / T)), in closed form: with u = 1 / T,
    dKL/du = sum_c p_t,c (zt_c - E_pt[zt]) (log p_t,c - log p_s,c) - E_pt[zs] + E_ps[zs], so
    dL/dT = weight * (2 T mean KL - mean dKL/du)."""
    kls, dkls = [], []
    for s, t in zip(zs, zt):
        ps, pt = softmax(s, T), softmax(t, T)
        mean_t = sum(p * v for p, v in zip(pt, t))
        dkl = sum(p * (v - mean_t) * (math.log(p) - math.log(q)) for p, v, q in zip(pt, t, ps))
        dkl += -sum(p * v for p, v in zip(pt, s)) + sum(q * v for q, v in zip(ps, s))
        kls.append(kl(pt, ps))
        dkls.append(dkl)
    return weight * (2 * T * sum(kls) / len(kls) - sum(dkls) / len(dkls))


@pytest.mark.parametrize('logit_stand', [False, True])
def test_ctkd_loss_student_gradient_and_reversed_temperature_gradient(logit_stand):
    """CTKD models/temp_global.py ``Global_T`` (parameter 1.0) and ``GradientReversalFunction`` (backward: value *
    grad, the value being -lambda), helper/loops.py ``temp = t_start + t_end * sigmoid(...)`` and distiller_zoo/KD.py
    ``DistillKL(y_s, y_t, temp)`` (batchmean KL times T^2), -a 0.9; with logit standardization the LS repository's
    CTKD/distiller_zoo/KD.py ``DistillKL_logit_stand`` and -a 9. The student's gradient is the plain one; the
    temperature parameter's is -lambda times the true one."""
    flags = {'logit_stand': True} if logit_stand else {}
    distiller, opt = table_distiller('ctkd', Z_S, Z_T, **flags)
    weight = 9.0 if logit_stand else 0.9
    f = (lambda rows: [z_score(r) for r in rows]) if logit_stand else (lambda rows: rows)
    sig = 1 / (1 + math.exp(-1.0))
    T = 1.0 + 20.0 * sig                               # 15.62 with g = 1
    distiller.start_epoch(3)
    lam = (1 - math.cos(math.pi * 3 / 10)) / 2
    check_gradient(distiller, 'kd', lambda zs: weight * kd_by_hand(f(zs), f(Z_T), T))
    d_dT = ctkd_temperature_gradient(f(Z_S), f(Z_T), T, weight)
    h = 1e-3                                           # T^2 KL is large next to its slope in T: a wider step
    d_dT_numeric = (weight * kd_by_hand(f(Z_S), f(Z_T), T + h) - weight * kd_by_hand(f(Z_S), f(Z_T), T - h)) / (2 * h)
    assert d_dT == pytest.approx(d_dT_numeric, rel=1e-5)
    expected = -lam * d_dT * 20.0 * sig * (1 - sig)
    assert distiller.temperature.global_T.grad.item() == pytest.approx(expected, rel=1e-6)
    assert distiller.epoch_metrics() == {'ctkd_T': pytest.approx(T), 'ctkd_lambda': pytest.approx(lam)}


def test_ctkd_temperature_is_trained_and_its_gradient_vanishes_at_lambda_zero():
    distiller, _ = table_distiller('ctkd', Z_S, Z_T, ctkd_lambda_min=0.0)
    assert any(p is distiller.temperature.global_T for p in distiller.trainable_parameters())
    distiller.grl_lambda.fill_(0.0)
    _, losses = distiller.forward_train(images([0, 1, 2]), torch.tensor(TARGET))
    losses['kd'].backward()
    assert distiller.temperature.global_T.grad.item() == 0.0
    assert distiller.student.table.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ MLKD

MLKD_WEAK_S = [[1.2, -0.3, 0.5], [0.1, 0.4, -1.1], [-0.7, 1.5, 0.2], [0.3, 0.3, 0.9], [2.0, -1.0, 0.0]]
MLKD_STRONG_S = [[0.2, 0.3, 0.1], [1.1, -0.4, 0.1], [-0.2, 0.5, 1.2], [0.8, -0.6, 0.4], [0.0, 1.0, -1.5]]
MLKD_WEAK_T = [[2.5, -1.0, 0.7], [-0.2, 1.3, -2.0], [0.4, 2.2, -0.5], [1.0, 1.1, 0.9], [3.0, 0.0, -1.0]]
MLKD_STRONG_T = [[1.5, 0.0, 0.2], [0.3, 0.3, -1.0], [-1.0, 1.2, 0.6], [0.0, 0.7, 0.1], [2.0, 0.5, -0.5]]
MLKD_TARGET = [0, 1, 1, 2, 0]


@pytest.mark.parametrize('n, logit_stand', [(4, False), (5, False), (5, True)])
def test_mlkd_losses_and_gradients_by_hand(n, logit_stand):
    """Jin-Ying/Multi-Level-Logit-Distillation mdistiller/distillers/KD_ours.py ``KD_ours.forward_train`` (and the LS
    repository's MLKD.py with logit_stand): five temperatures (4, 3, 5, 2, 6), masks from the teacher's weak-view
    confidence against its np.percentile(50) multiplying already-averaged terms, the strong-view instance terms at 2
    and 6 on the weak view, class (cc_loss) and batch (bc_loss) levels on the weak view only; CE 0.1 on both views,
    KD_WEIGHT 0.9 (9 with --logit_stand, base temperature 2, only the instance KL standardized). n = 4: the median
    halves the batch; n = 5: 3 of 5 samples kept."""
    flags = {'logit_stand': True} if logit_stand else {}
    first, w = (2.0, 9.0) if logit_stand else (4.0, 0.9)
    sw, ss, tw, ts, target = (MLKD_WEAK_S[:n], MLKD_STRONG_S[:n], MLKD_WEAK_T[:n], MLKD_STRONG_T[:n], MLKD_TARGET[:n])
    distiller, _ = table_distiller('mlkd', sw + ss, tw + ts, **flags)
    logits, losses = distiller.forward_train(images(list(range(n))), torch.tensor(target),
                                             image_strong=images(list(range(n, 2 * n))))
    assert torch.equal(logits, distiller.student.table[:n])           # the weak view's logits are reported
    expected = mlkd_by_hand(sw, ss, tw, ts, target, first, 0.1, w, logit_stand)
    assert set(losses) == set(expected)
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-9), name
    total = lambda rows: sum(mlkd_by_hand(rows[:n], rows[n:], tw, ts, target, first, 0.1, w, logit_stand).values())
    sum(losses.values()).backward()
    torch.testing.assert_close(distiller.student.table.grad,
                               torch.tensor(numeric_gradient(total, sw + ss), dtype=torch.float64), rtol=1e-5, atol=1e-7)


def test_mlkd_median_masks_match_numpy_percentile_with_ties():
    """KD_ours.py: ``confidence.le(np.percentile(confidence, 50))``; ties count as kept."""
    rng = np.random.default_rng(0)
    for values in (rng.random(64), rng.random(7), np.array([0.2, 0.5, 0.5, 0.5, 0.9]), np.array([0.3] * 6),
                   rng.integers(0, 3, 10).astype(float)):
        expected = float((values <= np.percentile(values, 50)).mean())
        assert fraction_at_most_median(torch.tensor(values)).item() == pytest.approx(expected)
        assert median_fraction_by_hand(values.tolist()) == pytest.approx(expected)


def test_mlkd_needs_the_strong_view():
    distiller, _ = table_distiller('mlkd', MLKD_WEAK_S, MLKD_WEAK_T)
    with pytest.raises(ValueError, match='strong view'):
        distiller.forward_train(images([0, 1]), torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------ training on a fixed batch

@pytest.mark.parametrize('name, flags', [('dist', {}), ('ctkd', {}), ('ctkd', {'logit_stand': True}),
                                         ('kd', {'logit_stand': True}), ('dkd', {'logit_stand': True}),
                                         ('mlkd', {}), ('mlkd', {'logit_stand': True})])
def test_loss_decreases_on_a_fixed_batch(name, flags):
    torch.manual_seed(0)
    n, classes = 8, 5
    student_rows = torch.randn(2 * n, classes).tolist()
    teacher_rows = (3 * torch.randn(2 * n, classes)).tolist()
    distiller, _ = table_distiller(name, student_rows, teacher_rows, **flags)
    distiller.start_epoch(20)
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.05 if name == 'dkd' else 0.2)
    target = torch.tensor(teacher_rows[:n]).argmax(dim=1)
    extras = {'image_strong': images(list(range(n, 2 * n)))} if name == 'mlkd' else {}
    history = []
    for _ in range(40):
        _, losses = distiller.forward_train(images(list(range(n))), target, **extras)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.8 * history[0], history[::8]


# ------------------------------------------------------------------------------------ the 'weak_strong' data mode

def test_strong_transform_inserts_the_fixmatch_randaugment_before_to_tensor():
    """MLKD's dataset/cifar100.py ``get_cifar100_train_transform_strong``: crop, flip, RandAugment(2, 10), ToTensor,
    Normalize; 14 operations with the official ranges, then Cutout filled with (125, 123, 114)."""
    weak = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.25,) * 3)])
    steps = strong_transform(weak).transforms
    assert [type(s).__name__ for s in steps] == ['RandomCrop', 'RandomHorizontalFlip', 'FixMatchRandAugment',
                                                 'ToTensor', 'Normalize']
    assert [name for name, *_ in OPERATIONS] == ['AutoContrast', 'Brightness', 'Color', 'Contrast', 'Equalize',
                                                 'Identity', 'Posterize', 'Rotate', 'Sharpness', 'ShearX', 'ShearY',
                                                 'Solarize', 'TranslateX', 'TranslateY']
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for name, operation, low, high in OPERATIONS:
        for v in (low, high):
            out = operation(img, v)
            assert out.size == img.size and out.mode == 'RGB', name
    torch.manual_seed(0)
    cut = np.asarray(cutout(img, 0.5))
    filled = (cut == np.array(CUTOUT_FILL)).all(axis=2)
    assert 64 <= filled.sum() <= 17 * 17                               # a square of side 16 (+1: PIL's inclusive box)
    torch.manual_seed(1)
    first = np.asarray(FixMatchRandAugment()(img))
    torch.manual_seed(1)
    assert np.array_equal(first, np.asarray(FixMatchRandAugment()(img)))   # torch's RNG drives every draw


def test_weak_strong_loader_layout_and_the_loops_names(tmp_path):
    write_cifar100(tmp_path, n_train_per_class=2, n_test_per_class=1, num_classes=10)
    bundle = get_dataloaders('cifar100', str(tmp_path), 8, 0, mode='weak_strong', download=False)
    set_epoch(bundle, 1, 0)
    weak, target, index, strong = next(iter(bundle.train_loader))
    assert weak.shape == strong.shape == (8, 3, 32, 32) and target.shape == index.shape == (8,)
    assert not torch.equal(weak, strong)
    assert extra_names(DISTILLERS['mlkd']) == ('index', 'image_strong')
    assert extra_names(DISTILLERS['crd']) == ('index', 'contrast_idx')
    with pytest.raises(UserError, match='no-device_data'):
        device_bundle(bundle, 'cifar100', 'cpu', mode='weak_strong')


# ------------------------------------------------------------------------------------ the fast step, with LS

@pytest.fixture(scope='module')
def cifar_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('cifar')
    write_cifar100(root, n_train_per_class=8, n_test_per_class=1, num_classes=10)
    return str(root)


@pytest.mark.parametrize('distill', ['kd', 'dkd', 'ctkd', 'mlkd'])
def test_logit_stand_fast_step_is_one_graph_without_host_syncs(distill, cifar_folder):
    """tests/test_fast_path.py's two promises for the --logit_stand variants: 0 graph breaks and one compile over
    three epochs (start_epoch between them), and no host sync in a step."""
    data = small_bundle(cifar_folder, mode=DISTILLERS[distill].data_mode, batch_size=12)
    distiller, _ = build(distill, data, logit_stand=True)
    trainer = FastTrainer(distiller, torch.optim.SGD(distiller.trainable_parameters(), lr=0.01, momentum=0.9), CPU,
                          FastOptions(compile='default', compile_backend='eager'))
    torch._dynamo.reset()
    with CompileCounter() as compiled:
        for epoch in (1, 2, 3):
            set_epoch(data, epoch, 0)
            stats = train_one_epoch_fast(trainer, data.train_loader, epoch=epoch, print_freq=3)
            distiller.epoch_metrics()
    assert compiled.graph_breaks == 0 and compiled.frames == 1, compiled.summary()
    assert np.isfinite(stats['train_loss'])
    eager = FastTrainer(distiller, torch.optim.SGD(distiller.trainable_parameters(), lr=0.01), CPU)
    eager.reset(1, len(data.train_loader))
    batches = iter(data.train_loader)
    eager.step(next(batches))
    with SyncCounter() as syncs:
        eager.step(next(batches))
    assert syncs.count == 0, syncs.summary()
    assert isinstance(data.train_loader, PreloadedLoader) == (distill == 'mlkd')


# ------------------------------------------------------------------------------------ end to end on digits

@pytest.fixture(scope='module')
def digits_teacher(tmp_path_factory):
    """A resnet8 teacher trained here for one epoch on the digits (cut to 150 train / 50 test images, as
    tests/test_cli.py's quickstart test does), by train_teacher.py."""
    import dataset.digits as digits
    arrays = digits._digits_arrays()
    images_, labels, train_idx, test_idx = arrays
    patch = pytest.MonkeyPatch()
    patch.setattr(digits, '_digits_arrays', lambda: (images_, labels, train_idx[:150], test_idx[:50]))
    save = tmp_path_factory.mktemp('digits_teacher')
    try:
        assert train_teacher.cli(['--model', 'resnet8', '--dataset', 'digits', '--epochs', '1', '--device', 'cpu',
                                  '--num_workers', '0', '--save_dir', str(save), '--print_freq', '1000']) == 0
        (ckpt,) = save.glob('models/*/ckpt_epoch_1.pth')
        yield ckpt
    finally:
        patch.undo()


@pytest.mark.parametrize('extra, losses', [
    (['--distill', 'dist'], {'ce', 'dist'}),
    (['--distill', 'ctkd'], {'ce', 'kd'}),
    (['--distill', 'ctkd', '--logit_stand'], {'ce', 'kd'}),
    (['--distill', 'kd', '--logit_stand'], {'ce', 'kd'}),
    (['--distill', 'dkd', '--logit_stand'], {'ce', 'dkd'}),
    (['--distill', 'mlkd'], {'ce', 'mlkd_instance', 'mlkd_class', 'mlkd_batch'}),
    (['--distill', 'mlkd', '--logit_stand', '--fast', '--compile', 'none'],
     {'ce', 'mlkd_instance', 'mlkd_class', 'mlkd_batch'}),
    (['--distill', 'dist', '--fast', '--compile', 'none'], {'ce', 'dist'}),
    (['--distill', 'ctkd', '--fast', '--compile', 'none'], {'ce', 'kd'}),
    (['--distill', 'dkd', '--logit_stand', '--fast', '--compile', 'none'], {'ce', 'dkd'}),
], ids=lambda value: '_'.join(flag.lstrip('-') for flag in value[1:]) if isinstance(value, list) else 'losses')
def test_cli_one_epoch_on_digits(tmp_path, digits_teacher, extra, losses):
    import dataset.digits as digits
    images_, labels, train_idx, test_idx = digits._digits_arrays()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(digits, '_digits_arrays', lambda: (images_, labels, train_idx[:150], test_idx[:50]))
        argv = ['--dataset', 'digits', '--device', 'cpu', '--num_workers', '0', '--epochs', '1', '--path_t',
                str(digits_teacher), '--model_s', 'resnet8', '--save_dir', str(tmp_path), '--print_freq', '1000', *extra]
        assert train_student.cli(argv) == 0
    (run_dir,) = Path(tmp_path, 'student_model').iterdir()
    (record,) = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    assert {k[5:] for k in record if k.startswith('loss_')} == losses
    assert all(math.isfinite(record[f'loss_{k}']) for k in losses)
    args = json.loads((run_dir / 'args.json').read_text())
    assert args['logit_stand'] == ('--logit_stand' in extra)
    distill = extra[extra.index('--distill') + 1]
    assert f"_digits_{distill}{'_ls' if '--logit_stand' in extra else ''}_r:" in run_dir.name
    if 'ctkd' in extra:
        assert 1.0 < record['ctkd_T'] < 21.0 and record['ctkd_lambda'] == pytest.approx((1 - math.cos(math.pi / 10)) / 2)
    assert args['device_data'] == ('--fast' in extra and distill != 'mlkd')    # --fast alone: no device data for mlkd
    summary = json.loads((run_dir / 'summary.json').read_text())
    assert summary['epochs'] == 1 and summary['dataset'] == 'digits'
    if distill != 'dist':
        assert summary['logit_stand'] == ('--logit_stand' in extra)
