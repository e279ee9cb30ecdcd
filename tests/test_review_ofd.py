"""ReviewKD and OFD: their criteria on hand-computed inputs, the Distillers on RepDistiller's 13 CIFAR-100 pairs,
gradients, optimisation, the teacher-BN facts OFD needs, and one CLI epoch each on digits (reference and fast).

Expected values are worked out here independently (explicit loops, closed forms, numerical integrals), never by
calling the code under test a second time."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import integrate

import train_student
import train_teacher
from distiller_zoo import build_distiller
from distiller_zoo.ofd import OFD, ofd_margin, partial_l2
from distiller_zoo.reviewkd import ABF, hcl_loss
from helper.errors import UserError
from models import MODEL_FACTS, create_model, stage_bns_before_relu
from models.util import ConnectorV2
from tests.options import data_info, student_options

# RepDistiller's 13 CIFAR-100 pairs (teacher, student)
PAIRS = [('wrn_40_2', 'wrn_16_2'), ('wrn_40_2', 'wrn_40_1'), ('resnet56', 'resnet20'), ('resnet110', 'resnet20'),
         ('resnet110', 'resnet32'), ('resnet32x4', 'resnet8x4'), ('vgg13', 'vgg8'), ('vgg13', 'MobileNetV2'),
         ('ResNet50', 'MobileNetV2'), ('ResNet50', 'vgg8'), ('resnet32x4', 'ShuffleV1'), ('resnet32x4', 'ShuffleV2'),
         ('wrn_40_2', 'ShuffleV1')]
EPS = 1e-5     # BatchNorm2d's default eps


@pytest.fixture(autouse=True)
def one_thread():
    """Small convolutions run faster on one intra-op thread when the CPUs are shared (restored by conftest)."""
    torch.set_num_threads(1)


def build(method, teacher_name, student_name, num_classes=10, **values):
    torch.manual_seed(0)
    student, teacher = create_model(student_name, num_classes), create_model(teacher_name, num_classes)
    opt = student_options(method, model_s=student_name, model_t=teacher_name, **values)
    return build_distiller(method, student, teacher, opt, data_info(num_classes=num_classes))


def block_mean(x, size):
    """Average of the (H/size x W/size) blocks of a (B, C, H, W) map, written with a reshape (size divides H, W)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, size, h // size, size, w // size).mean(dim=(3, 5))


# ================================================================================================ ReviewKD

def test_hcl_on_a_4x4_map_with_the_pyramid_written_out():
    """Mirrors the official CIFAR-100/model/reviewkd.py `hcl` (= mdistiller distillers/ReviewKD.py `hcl_loss`):
    a 4x4 map is compared in full, at 2x2 (weight 1/2) and 1x1 (weight 1/4), divided by 1 + 1/2 + 1/4; a 1x1 map
    only in full; a 2x2 map in full and at 1x1 (weight 1/2), divided by 1.5; the pairs are summed."""
    fs = torch.arange(16.0).view(1, 1, 4, 4)
    ft = torch.zeros(1, 1, 4, 4)
    full = sum(v * v for v in range(16)) / 16                                   # 1240 / 16 = 77.5
    quarters = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    two_by_two = sum((sum(q) / 4) ** 2 for q in quarters) / 4                    # (2.5^2 + 4.5^2 + 10.5^2 + 12.5^2) / 4
    one_by_one = 7.5 ** 2
    expected_4x4 = (full + two_by_two / 2 + one_by_one / 4) / 1.75
    assert expected_4x4 == pytest.approx(73.25)
    assert hcl_loss([fs], [ft]).item() == pytest.approx(73.25)

    pooled_s, pooled_t = torch.tensor([[[[3.0]]]]), torch.tensor([[[[1.0]]]])
    assert hcl_loss([pooled_s], [pooled_t]).item() == pytest.approx(4.0)     # no pyramid below 1x1

    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 8.0]]]])    # (1, 2, 2, 2)
    b = torch.zeros(1, 2, 2, 2)
    full_2 = (1 + 4 + 9 + 16 + 64) / 8
    mean_2 = ((2.5 ** 2) + (2.0 ** 2)) / 2
    expected_2x2 = (full_2 + mean_2 / 2) / 1.5
    got = hcl_loss([fs, a, pooled_s], [ft, b, pooled_t]).item()
    assert got == pytest.approx(73.25 + expected_2x2 + 4.0)


def test_hcl_on_8x8_maps_uses_four_levels():
    """Official `hcl` on an 8x8 map: full, 4x4, 2x2, 1x1 at weights 1, 1/2, 1/4, 1/8, divided by 1.875 (pools written as
    block means)."""
    torch.manual_seed(0)
    fs, ft = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)

    def mse(a, b):
        return ((a - b) ** 2).mean().item()

    expected = (mse(fs, ft) + mse(block_mean(fs, 4), block_mean(ft, 4)) / 2 + mse(block_mean(fs, 2), block_mean(ft, 2)) / 4
                + mse(block_mean(fs, 1), block_mean(ft, 1)) / 8) / (1 + 0.5 + 0.25 + 0.125)
    assert hcl_loss([fs], [ft]).item() == pytest.approx(expected, rel=1e-5)


def test_abf_fuses_with_attention_and_resizes_by_hand():
    """Mirrors the official `ABF.forward` (CIFAR-100/model/reviewkd.py): conv1 (1x1 + BN), the residual upsampled by
    nearest neighbour to the student's size, sigmoid attention from a 1x1 conv (with bias) of [x, residual],
    x * a0 + residual * a1, nearest resize to the teacher's size, conv2 (3x3 + BN). BN in eval mode with fresh
    statistics divides by sqrt(1 + eps)."""
    torch.manual_seed(0)
    abf = ABF(in_channel=2, mid_channel=3, out_channel=2, fuse=True).eval()
    x, residual = torch.randn(1, 2, 2, 2), torch.randn(1, 3, 1, 1)
    w1 = abf.conv1[0].weight.detach()[:, :, 0, 0]                  # (3, 2)
    wa, ba = abf.att_conv[0].weight.detach()[:, :, 0, 0], abf.att_conv[0].bias.detach()
    bn = 1 / math.sqrt(1 + EPS)
    c = torch.einsum('oi,bihw->bohw', w1, x) * bn
    r = residual.expand(1, 3, 2, 2)
    att = torch.sigmoid(torch.einsum('oi,bihw->bohw', wa, torch.cat([c, r], 1)) + ba.view(1, 2, 1, 1))
    fused = c * att[:, 0:1] + r * att[:, 1:2]
    up = fused.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)             # nearest, 2x2 -> 4x4
    want = F.conv2d(up, abf.conv2[0].weight.detach(), padding=1) * bn
    with torch.no_grad():
        out, res = abf(x, residual, (4, 4))
    torch.testing.assert_close(res, up)
    torch.testing.assert_close(out, want)

    deepest = ABF(in_channel=2, mid_channel=3, out_channel=2, fuse=False).eval()
    assert deepest.att_conv is None
    with torch.no_grad():
        out, res = deepest(x[:, :, :1, :1], None, (1, 1))
    torch.testing.assert_close(res, torch.einsum('oi,bihw->bohw', deepest.conv1[0].weight[:, :, 0, 0], x[:, :, :1, :1]) * bn)
    torch.testing.assert_close(out, F.conv2d(res, deepest.conv2[0].weight, padding=1) * bn)


# the official `build_review_kd` lists (CIFAR-100/model/reviewkd.py): in_channels, out_channels, shapes, out_shapes
# (None: = shapes); the official `shapes` of the CIFAR ResNets has a fifth entry (32) that its zip never reaches
OFFICIAL_LISTS = {
    ('resnet32x4', 'resnet8x4'): ([64, 128, 256, 256], [64, 128, 256, 256], [1, 8, 16, 32], None),
    ('resnet56', 'resnet20'): ([16, 32, 64, 64], [16, 32, 64, 64], [1, 8, 16, 32, 32], None),
    ('resnet110', 'resnet20'): ([16, 32, 64, 64], [16, 32, 64, 64], [1, 8, 16, 32, 32], None),
    ('resnet110', 'resnet32'): ([16, 32, 64, 64], [16, 32, 64, 64], [1, 8, 16, 32, 32], None),
    ('wrn_40_2', 'wrn_16_2'): ([32, 64, 128, 128], [32, 64, 128, 128], [1, 8, 16, 32], None),
    ('wrn_40_2', 'wrn_40_1'): ([16, 32, 64, 64], [32, 64, 128, 128], [1, 8, 16, 32], None),
    ('vgg13', 'vgg8'): ([128, 256, 512, 512, 512], [128, 256, 512, 512, 512], [1, 4, 4, 8, 16], None),
    ('ResNet50', 'vgg8'): ([128, 256, 512, 512, 512], [256, 512, 1024, 2048, 2048], [1, 4, 4, 8, 16], [1, 4, 8, 16, 32]),
    ('vgg13', 'MobileNetV2'): ([12, 16, 48, 160, 1280], [128, 256, 512, 512, 512], [1, 2, 4, 8, 16], [1, 4, 4, 8, 16]),
    ('ResNet50', 'MobileNetV2'): ([12, 16, 48, 160, 1280], [256, 512, 1024, 2048, 2048], [1, 2, 4, 8, 16],
                                  [1, 4, 8, 16, 32]),
    ('resnet32x4', 'ShuffleV1'): ([240, 480, 960, 960], [64, 128, 256, 256], [1, 4, 8, 16], [1, 8, 16, 32]),
    ('wrn_40_2', 'ShuffleV1'): ([240, 480, 960, 960], [32, 64, 128, 128], [1, 4, 8, 16], [1, 8, 16, 32]),
    ('resnet32x4', 'ShuffleV2'): ([116, 232, 464, 1024], [64, 128, 256, 256], [1, 4, 8, 16], [1, 8, 16, 32]),
}


@pytest.mark.parametrize('pair', PAIRS, ids=lambda p: f'{p[0]}->{p[1]}')
def test_reviewkd_channels_and_sizes_read_from_the_models_equal_the_official_lists(pair):
    """The official build_review_kd keeps a table per student architecture; here they are probed from the models."""
    in_channels, out_channels, shapes, out_shapes = OFFICIAL_LISTS[pair]
    d = build('reviewkd', *pair, num_classes=100)
    assert d.in_channels == in_channels and d.out_channels == out_channels
    assert [h for h, w in d.shapes] == shapes[:len(in_channels)]
    assert [h for h, w in d.out_shapes] == (out_shapes or shapes)[:len(in_channels)]
    mid = min(512, in_channels[-1])
    assert d.abfs[0].conv1[0].weight.shape == (mid, in_channels[-1], 1, 1)
    assert d.abfs[-1].conv2[0].weight.shape == (out_channels[0], mid, 3, 3)


def test_reviewkd_module_names_follow_mdistiller():
    """mdistiller distillers/ReviewKD.py: `abfs` reversed (abfs.0 = the deepest level, no att_conv), each ABF with
    conv1.{0,1}, conv2.{0,1} and att_conv.0; resnet32x4 -> resnet8x4: in = out = [64, 128, 256, 256], mid 256."""
    d = build('reviewkd', 'resnet32x4', 'resnet8x4')
    keys = {k for k in d.state_dict() if k.startswith('abfs.')}
    bn = {'weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'}
    want = set()
    for i in range(4):
        want |= {f'abfs.{i}.conv1.0.weight', f'abfs.{i}.conv2.0.weight'}
        want |= {f'abfs.{i}.conv1.1.{b}' for b in bn} | {f'abfs.{i}.conv2.1.{b}' for b in bn}
        if i > 0:
            want |= {f'abfs.{i}.att_conv.0.weight', f'abfs.{i}.att_conv.0.bias'}
    assert keys == want
    shapes = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    assert shapes['abfs.0.conv1.0.weight'] == (256, 256, 1, 1)
    assert shapes['abfs.3.conv1.0.weight'] == (256, 64, 1, 1)
    assert shapes['abfs.3.conv2.0.weight'] == (64, 256, 3, 3)
    assert shapes['abfs.1.att_conv.0.weight'] == (2, 512, 1, 1)


def test_review_runs_from_deep_to_shallow():
    """Official ReviewKD.forward: the deepest level (the pooled vector) first, each shallower level fused with the
    one below it; so an output depends on its own level and the deeper ones only."""
    d = build('reviewkd', 'resnet14', 'resnet8').eval()
    torch.manual_seed(1)
    levels = [torch.randn(2, 16, 32, 32), torch.randn(2, 32, 16, 16), torch.randn(2, 64, 8, 8), torch.randn(2, 64, 1, 1)]
    with torch.no_grad():
        base = d.review(levels)
        shallow = d.review([levels[0] + 1, *levels[1:]])
        deep = d.review([*levels[:3], levels[3] + 1])
    assert [tuple(r.shape) for r in base] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8), (2, 64, 1, 1)]
    assert not torch.equal(shallow[0], base[0]) and all(torch.equal(a, b) for a, b in zip(shallow[1:], base[1:]))
    assert all(not torch.allclose(a, b) for a, b in zip(deep, base))


def test_reviewkd_compares_with_the_teachers_pre_relu_stage_maps(monkeypatch):
    """The official ReviewKD (and mdistiller) distils the teacher's pre-activation stage maps ("preact_feats") plus
    its pooled vector: the teacher levels that reach the HCL loss hold negative values (a post-ReLU map cannot) and
    equal the teacher's preact features; the student levels are its plain (post-ReLU) stage maps."""
    import distiller_zoo.reviewkd as reviewkd
    seen = {}
    real = reviewkd.hcl_loss

    def spy(fstudent, fteacher):
        seen['teacher'] = [f.detach().clone() for f in fteacher]
        return real(fstudent, fteacher)

    monkeypatch.setattr(reviewkd, 'hcl_loss', spy)
    d = build('reviewkd', 'resnet14', 'resnet8')
    torch.manual_seed(3)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    d.train().forward_train(x, y)
    with torch.no_grad():
        pre, _ = d.teacher(x, is_feat=True, preact=True)
    levels = seen['teacher']
    assert len(levels) == 4
    for level, expected in zip(levels[:3], pre[1:-1]):
        assert (level < 0).any()
        torch.testing.assert_close(level, expected)
    torch.testing.assert_close(levels[3], pre[-1][:, :, None, None])


def test_reviewkd_warm_up_and_weights_per_pair():
    """mdistiller: REVIEWKD_WEIGHT x min(epoch / WARMUP_EPOCHS, 1) with 1-indexed epochs, warm-up 20; the official
    CIFAR-100/script/reviewKD.sh --kd-loss-weight per pair; mdistiller's default weight 1 elsewhere."""
    d = build('reviewkd', 'resnet14', 'resnet8')
    torch.manual_seed(2)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    values = {}
    for epoch, factor in ((1, 0.05), (10, 0.5), (20, 1.0), (35, 1.0)):
        d.start_epoch(epoch)
        assert d.warmup_scale.item() == pytest.approx(factor)
        with torch.no_grad():
            values[epoch] = d.train().forward_train(x, y)[1]['reviewkd'].item()
    assert values[1] == pytest.approx(0.05 * values[20], rel=1e-5) and values[35] == pytest.approx(values[20], rel=1e-5)
    no_warmup = build('reviewkd', 'resnet14', 'resnet8', reviewkd_warmup=0)
    assert no_warmup.warmup_scale.item() == 1.0
    no_warmup.start_epoch(1)
    assert no_warmup.warmup_scale.item() == 1.0

    published = {('resnet56', 'resnet20'): 0.6, ('resnet110', 'resnet32'): 1.0, ('resnet32x4', 'resnet8x4'): 5.0,
                 ('resnet32x4', 'ShuffleV1'): 5.0, ('resnet32x4', 'ShuffleV2'): 8.0, ('wrn_40_2', 'wrn_16_2'): 5.0,
                 ('wrn_40_2', 'wrn_40_1'): 5.0, ('wrn_40_2', 'ShuffleV1'): 5.0, ('vgg13', 'vgg8'): 1.0,
                 ('resnet110', 'resnet20'): 1.0}
    for (t, s), beta in published.items():
        opt = student_options('reviewkd', model_t=t, model_s=s)
        assert (opt.gamma, opt.alpha, opt.beta) == (1.0, 0.0, beta), (t, s)
    assert student_options('reviewkd', model_t='resnet56', model_s='resnet20', beta=2.0).beta == 2.0
    assert student_options('reviewkd', model_t='resnet56', model_s='resnet20', dataset='digits').beta == 1.0
    with pytest.raises(UserError, match='--reviewkd_warmup must be >= 0'):
        student_options('reviewkd', reviewkd_warmup=-1)


def test_reviewkd_refuses_networks_with_different_level_counts():
    """Official ReviewKD.forward + `hcl` zip the student's ABF outputs with the teacher's levels from the shallow end;
    with 5 student levels (vgg8) and 4 teacher levels (resnet32x4) they would compare maps of different depths."""
    with pytest.raises(UserError, match=r'reviewkd needs as many feature levels .* vgg8 has 5 .* resnet32x4 4'):
        build('reviewkd', 'resnet32x4', 'vgg8')


def test_reviewkd_gradients_reach_student_and_every_abf_but_not_the_teacher():
    """mdistiller ReviewKD.get_learnable_parameters: the student and the ABFs train (the official optimiser holds the
    ReviewKD module: student + abfs); the teacher's features are computed without grad."""
    d = build('reviewkd', 'resnet14', 'resnet8', gamma=0.0)
    d.train().start_epoch(20)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    _, losses = d.forward_train(x, y)
    losses['reviewkd'].backward()
    trainable = {id(p) for p in d.trainable_parameters()}
    assert trainable == {id(p) for p in d.student.parameters()} | {id(p) for p in d.abfs.parameters()}
    for name, p in d.abfs.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert d.student.conv1.weight.grad.abs().sum() > 0
    assert d.student.fc.weight.grad is None or d.student.fc.weight.grad.abs().sum() == 0
    assert all(p.grad is None for p in d.teacher.parameters()) and not d.teacher.training


def test_reviewkd_loss_decreases_on_a_fixed_batch():
    """The HCL of mdistiller's ReviewKD.forward_train (warm-up over) falls under SGD on the student and the ABFs."""
    d = build('reviewkd', 'resnet14', 'resnet8', gamma=0.0)
    d.train().start_epoch(20)
    optimizer = torch.optim.SGD(d.trainable_parameters(), lr=0.3, momentum=0.9)
    torch.manual_seed(3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    history = []
    for _ in range(10):
        _, losses = d.forward_train(x, y)
        optimizer.zero_grad()
        losses['reviewkd'].backward()
        optimizer.step()
        history.append(losses['reviewkd'].item())
    assert history[-1] < 0.5 * history[0], history


# ================================================================================================ OFD

def negative_part_mean_by_quadrature(mean, std):
    """E[x | x < 0] for x ~ N(mean, std^2), both integrals numerically over (-inf, 0)."""
    def density(x):
        return math.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    first = integrate.quad(lambda x: x * density(x), -math.inf, 0, epsabs=1e-13, epsrel=1e-11)[0]
    mass = integrate.quad(density, -math.inf, 0, epsabs=1e-13, epsrel=1e-11)[0]
    return first / mass, mass


def test_ofd_margin_is_the_mean_of_the_gaussians_negative_part():
    """Mirrors the official CIFAR-100/distiller.py `get_margin_from_BN` (= mdistiller OFD.init_ofd_modules): std =
    |BN weight|, mean = BN bias, E[x | x < 0] where the negative mass exceeds 1e-3, else -3 std."""
    cases = [(1.0, 0.0), (2.0, 1.0), (0.5, -1.0), (-1.5, 0.5), (1.0, 3.0), (0.3, -2.0), (4.0, 2.5)]
    weight = torch.tensor([w for w, _ in cases])
    bias = torch.tensor([b for _, b in cases])
    got = ofd_margin(weight, bias)
    assert got.dtype == torch.float32 and got.shape == (len(cases),)
    for (w, b), value in zip(cases, got.tolist()):
        expected, mass = negative_part_mean_by_quadrature(b, abs(w))
        assert mass > 1e-3
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-6), (w, b)
    assert got[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-6)      # half-normal mean

    # negative mass at or below 1e-3: -3 std (P(N(0,1) < -3.2) = 6.9e-4; P(< -3.0) = 1.35e-3 is above, in `cases`)
    far = ofd_margin(torch.tensor([1.0, -0.1, 2.0]), torch.tensor([3.2, 5.0, 7.0]))
    assert negative_part_mean_by_quadrature(3.2, 1.0)[1] < 1e-3
    torch.testing.assert_close(far, torch.tensor([-3.0, -0.3, -6.0]))
    # a channel with std 0 is the constant `bias`: its negative part is bias itself, or nothing (margin 0)
    torch.testing.assert_close(ofd_margin(torch.zeros(3), torch.tensor([-0.7, 0.4, 0.0])), torch.tensor([-0.7, 0.0, 0.0]))


def test_partial_l2_mask_by_hand():
    """Official distillation_loss: target = max(t, margin); (s - target)^2 where s > target or target > 0.
    Channel margins -1 and -0.5; every element's case is worked out in the comment."""
    s = torch.tensor([[[[2.0, -2.0, 0.5]], [[-0.2, 0.3, -1.0]]]])      # (1, 2, 1, 3)
    t = torch.tensor([[[[1.0, -3.0, -3.0]], [[-0.1, -0.1, 0.5]]]])
    margin = torch.tensor([-1.0, -0.5]).view(1, 2, 1, 1)
    # c0: t=1 > 0 -> (2-1)^2 = 1; t=-3 -> target -1, s=-2 below it -> 0; target -1, s=0.5 above -> 1.5^2 = 2.25
    # c1: t=-0.1 -> target -0.1, s=-0.2 below -> 0; s=0.3 above -> 0.4^2 = 0.16; t=0.5 > 0 -> (-1-0.5)^2 = 2.25
    assert partial_l2(s, t, margin).item() == pytest.approx(1 + 0 + 2.25 + 0 + 0.16 + 2.25)

    total = 0.0
    for c in range(2):
        for j in range(3):
            sv, tv, mv = s[0, c, 0, j].item(), t[0, c, 0, j].item(), margin[0, c, 0, 0].item()
            target = max(tv, mv)
            if sv > target or target > 0:
                total += (sv - target) ** 2
    assert partial_l2(s, t, margin).item() == pytest.approx(total)


def test_ofd_loss_weights_stages_and_divides_by_the_batch():
    """mdistiller OFD.ofd_loss: connectors on the student's pre-ReLU stage maps, the teacher's map average-pooled to
    the student's size, mdistiller's three-case feat_loss ((s - m)^2 where s > m >= t; (s - t)^2 where s > t, m < t
    <= 0; (s - t)^2 where t > 0) summed and divided by B, stage i weighted 1 / 2^(n - i - 1). resnet32x4 -> ShuffleV1:
    the teacher's 32/16/8 maps are pooled to 16/8/4."""
    d = build('ofd', 'resnet32x4', 'ShuffleV1', ofd_teacher_bn='running').eval()
    torch.manual_seed(4)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feat_s, logit_s = d.student(x, is_feat=True, preact=True)
        feat_t, logit_t = d.teacher(x, is_feat=True, preact=True)
        got = d.method_loss(feat_s, feat_t, logit_s, logit_t, torch.zeros(3, dtype=torch.long)).item()
        bns = d.teacher.get_bn_before_relu()
        expected = 0.0
        for i in range(3):
            s = d.connectors.connectors[i](feat_s[1 + i])
            t = block_mean(feat_t[1 + i], s.shape[2])
            m = ofd_margin(bns[i].weight, bns[i].bias).view(1, -1, 1, 1)
            loss = ((s - m) ** 2 * ((s > m) & (t <= m)) + (s - t) ** 2 * ((s > t) & (t > m) & (t <= 0))
                    + (s - t) ** 2 * (t > 0))
            expected += loss.sum().item() / 3 / 2 ** (2 - i)
    assert got == pytest.approx(expected, rel=1e-5)
    assert d.beta == 1e-3 and OFD.default_weights == (1.0, 0.0, 1e-3)


def test_ofd_margins_connectors_and_names():
    """Official names: buffers margin1..marginN (1, C, 1, 1) from the teacher's get_bn_before_relu(); connectors as
    RepDistiller's ConnectorV2 / mdistiller's ConnectorConvBN (connectors.connectors.<i>.{0: 1x1 conv, 1: BN})."""
    torch.manual_seed(5)
    d = build('ofd', 'wrn_40_2', 'wrn_16_2')
    bns = [d.teacher.block2.layer[0].bn1, d.teacher.block3.layer[0].bn1, d.teacher.bn1]
    assert d.teacher.get_bn_before_relu() == bns
    for i, bn in enumerate(bns, start=1):
        margin = getattr(d, f'margin{i}')
        assert margin.shape == (1, bn.num_features, 1, 1)
        # fresh BNs: weight 1, bias 0 -> the half-normal mean everywhere
        torch.testing.assert_close(margin.flatten(), torch.full((bn.num_features,), -math.sqrt(2 / math.pi)))
    keys = {k for k in d.state_dict() if not k.startswith(('student.', 'teacher.'))}
    conv_bn = {'0.weight', '1.weight', '1.bias', '1.running_mean', '1.running_var', '1.num_batches_tracked'}
    assert keys == {'margin1', 'margin2', 'margin3'} | {f'connectors.connectors.{i}.{k}' for i in range(3) for k in conv_bn}
    assert [tuple(c[0].weight.shape) for c in d.connectors.connectors] == [(32, 32, 1, 1), (64, 64, 1, 1), (128, 128, 1, 1)]

    connector = ConnectorV2([(2, 500, 4, 4)], [(2, 200, 4, 4)]).connectors[0]
    assert connector[0].bias is None and connector[0].stride == (1, 1)
    assert connector[0].weight.std().item() == pytest.approx(math.sqrt(2 / 200), rel=0.05)
    assert torch.equal(connector[1].weight, torch.ones(200)) and torch.equal(connector[1].bias, torch.zeros(200))


def test_ofd_pairs_the_deepest_stages_with_their_own_margins():
    """vgg13 (4 stages) -> resnet8 (3): the last three teacher stages, with the margins of their BNs (mdistiller keeps
    the first margins there, which do not belong to the stages it compares)."""
    d = build('ofd', 'vgg13', 'resnet8')
    bns = d.teacher.get_bn_before_relu()[1:]
    assert d.num_stages == 3
    for i, bn in enumerate(bns, start=1):
        torch.testing.assert_close(getattr(d, f'margin{i}').flatten(), ofd_margin(bn.weight, bn.bias))
    assert [c[0].weight.shape[:2] for c in d.connectors.connectors] == [(256, 16), (512, 32), (512, 64)]


def test_ofd_teacher_bn_uses_batch_statistics_and_never_changes_its_buffers():
    """Both reference implementations run the teacher in train mode during OFD (clovaai train_with_distillation.py:
    d_net.t_net.train(); mdistiller OFD.train() leaves the teacher in train mode): batch statistics. Here the teacher's
    BNs follow the Distiller's mode without writing their running statistics; --ofd_teacher_bn running: eval mode."""
    torch.manual_seed(6)
    teacher = create_model('resnet14', 10)
    for m in teacher.modules():          # non-trivial running statistics, so the two modes differ
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    batch_reference = copy.deepcopy(teacher).train()
    running_reference = copy.deepcopy(teacher).eval()
    buffers = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = student_options('ofd', model_s='resnet8', model_t='resnet14')
    d = build_distiller('ofd', create_model('resnet8', 10), teacher, opt, data_info(10))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    d.train()
    assert not d.teacher.training and all(bn.training for bn in d.teacher_bns)
    feat_t, _ = d.teacher_forward(x)
    with torch.no_grad():
        want, _ = batch_reference(x, is_feat=True, preact=True)
    torch.testing.assert_close(feat_t[3], want[3])
    d.forward_train(x, y)[1]['ofd'].backward()
    assert all(torch.equal(v, buffers[k]) for k, v in d.teacher.state_dict().items())
    d.eval()
    assert not any(m.training for m in d.teacher.modules())
    with torch.no_grad():
        torch.testing.assert_close(d.teacher(x), running_reference(x))

    running = build('ofd', 'resnet14', 'resnet8', ofd_teacher_bn='running').train()
    assert not any(m.training for m in running.teacher.modules())
    assert all(m.track_running_stats for m in running.teacher.modules() if isinstance(m, nn.BatchNorm2d))


def test_ofd_gradients_reach_student_and_connectors_but_not_the_teacher():
    """mdistiller OFD.get_learnable_parameters (clovaai: the optimiser's s_net and Connectors groups): student and
    connectors train; the teacher's maps are detached."""
    d = build('ofd', 'resnet14', 'resnet8', gamma=0.0)
    d.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    _, losses = d.forward_train(x, y)
    losses['ofd'].backward()
    trainable = {id(p) for p in d.trainable_parameters()}
    assert trainable == {id(p) for p in d.student.parameters()} | {id(p) for p in d.connectors.parameters()}
    for name, p in d.connectors.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert d.student.conv1.weight.grad.abs().sum() > 0
    assert d.student.fc.weight.grad is None or d.student.fc.weight.grad.abs().sum() == 0
    assert all(p.grad is None for p in d.teacher.parameters())


def test_ofd_loss_decreases_on_a_fixed_batch():
    """mdistiller OFD.forward_train's feature loss (FEAT_WEIGHT 1e-3) falls under SGD on the student and connectors."""
    d = build('ofd', 'resnet14', 'resnet8', gamma=0.0)           # -b 1e-3, the published weight
    d.train()
    optimizer = torch.optim.SGD(d.trainable_parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(7)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    history = []
    for _ in range(10):
        _, losses = d.forward_train(x, y)
        optimizer.zero_grad()
        losses['ofd'].backward()
        optimizer.step()
        history.append(losses['ofd'].item())
    assert history[-1] < 0.5 * history[0], history


@pytest.mark.parametrize('teacher', ['ShuffleV1', 'ShuffleV2', 'MobileNetV2'])
def test_ofd_refuses_teachers_without_a_bn_before_each_stage_relu(teacher):
    """mdistiller's ShuffleNetV1/V2 get_bn_before_relu raise NotImplementedError ('not supported for "Overhaul"
    teacher'); MobileNetV2's BNs are not followed by a ReLU (models/facts.py `no_bn_before_relu`)."""
    with pytest.raises(UserError, match=f'{teacher} has no BN before a ReLU per stage'):
        build('ofd', teacher, 'resnet8')


@pytest.mark.parametrize('name', sorted(MODEL_FACTS))
def test_bn_before_relu_fact_of_every_cifar_model(name):
    """The BN record OFD reads: for each stage map of forward(preact=True)[1:-1], the BN whose output is that map (WRN,
    VGG) or its residual branch, the shortcut added (ResNets); ReLU of the map is the stage output the network uses."""
    torch.manual_seed(8)
    model = create_model(name, 10).eval()
    if MODEL_FACTS[name].no_bn_before_relu:
        with pytest.raises(UserError, match='has no BN before a ReLU per stage'):
            stage_bns_before_relu(model, name)
        return
    bns = stage_bns_before_relu(model, name)
    outputs = []
    handles = [bn.register_forward_hook(lambda m, i, o: outputs.append(o)) for bn in bns]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pre, _ = model(x, is_feat=True, preact=True)
    for h in handles:
        h.remove()
    pre = pre[1:-1]
    assert len(bns) == len(pre)
    family = MODEL_FACTS[name].family
    for bn, out, p in zip(bns, outputs[-len(bns):] if family == 'wrn' else outputs, pre):
        assert out.shape == p.shape and bn.num_features == p.shape[1]
        if family in ('wrn', 'vgg'):
            torch.testing.assert_close(out, p)
    if family != 'wrn':           # WRN's stage outputs are the raw sums, read by the next BN + ReLU
        with torch.no_grad():
            post, _ = model(x, is_feat=True)
        for p, q in zip(pre, post[1:-1]):
            torch.testing.assert_close(torch.relu(p), q)


# ================================================================================================ both, 13 pairs

@pytest.mark.parametrize('pair', PAIRS, ids=lambda p: f'{p[0]}->{p[1]}')
@pytest.mark.parametrize('method', ['reviewkd', 'ofd'])
def test_every_repdistiller_pair_builds_runs_and_backpropagates(method, pair):
    """RepDistiller's 13 pairs through mdistiller's ReviewKD.forward_train / OFD.forward_train (the official ReviewKD
    CIFAR-100 code can run 9 of them, the clovaai OFD code none, mdistiller's OFD 11): forward and backward on a (2, 3, 32, 32)
    batch; every ABF output has its teacher level's shape, every connected map the teacher's channels."""
    d = build(method, *pair, num_classes=100)
    d.train().start_epoch(20)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    logits, losses = d.forward_train(x, y)
    assert logits.shape == (2, 100) and set(losses) == {'ce', method}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert next(d.student.parameters()).grad.abs().sum() > 0          # the stem's first conv
    assert all(p.grad is None for p in d.teacher.parameters())
    extra = d.abfs if method == 'reviewkd' else d.connectors
    assert all(p.grad is not None for p in extra.parameters())
    with torch.no_grad():
        feat_s, _ = d.student(x, is_feat=True, preact=d.preact)
        feat_t, _ = d.teacher(x, is_feat=True, preact=True)
    if method == 'reviewkd':       # each ABF output has the shape of the teacher's level
        levels = [*feat_t[1:-1], feat_t[-1][:, :, None, None]]
        results = d.review([*feat_s[1:-1], feat_s[-1][:, :, None, None]])
        assert [r.shape for r in results] == [t.shape for t in levels]
    else:                          # each connected student map has the teacher's channels at the student's size
        n = d.num_stages
        connected = d.connectors(feat_s[1:-1][-n:])
        assert [c.shape[:2] for c in connected] == [t.shape[:2] for t in feat_t[1:-1][-n:]]
        assert [c.shape[2:] for c in connected] == [s.shape[2:] for s in feat_s[1:-1][-n:]]


# ================================================================================================ CLI, digits

@pytest.fixture(scope='module')
def digits_teacher(tmp_path_factory):
    """A resnet14 teacher trained here for 1 epoch on digits. The digits splits are cut to their first 150 train /
    50 test images for the module (as tests/test_cli.py's quickstart test does): a full digits epoch of a student
    takes about a minute on the shared CPUs."""
    import dataset.digits as digits
    images, labels, train_idx, test_idx = digits._digits_arrays()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(digits, '_digits_arrays', lambda: (images, labels, train_idx[:150], test_idx[:50]))
        save = tmp_path_factory.mktemp('digits_teacher')
        assert train_teacher.cli(['--model', 'resnet14', '--dataset', 'digits', '--epochs', '1', '--device', 'cpu',
                                  '--num_workers', '0', '--save_dir', str(save), '--print_freq', '1000']) == 0
        yield save / 'models' / 'resnet14_digits_lr_0.05_decay_0.0005_trial_0' / 'ckpt_epoch_1.pth'


@pytest.mark.parametrize('fast', [False, True], ids=['reference', 'fast'])
@pytest.mark.parametrize('method', ['reviewkd', 'ofd'])
def test_one_cli_epoch_on_digits(method, fast, digits_teacher, tmp_path):
    """train_student.py --dataset digits --distill <method> --model_s resnet8 (and --fast --compile none)."""
    args = ['--dataset', 'digits', '--device', 'cpu', '--num_workers', '0', '--epochs', '1', '--path_t', str(digits_teacher),
            '--distill', method, '--model_s', 'resnet8', '--save_dir', str(tmp_path), '--print_freq', '1000']
    if fast:
        args += ['--fast', '--compile', 'none']
    assert train_student.cli(args) == 0
    beta = {'reviewkd': 1.0, 'ofd': 0.001}[method]
    (run,) = (tmp_path / 'student_model').iterdir()
    assert run.name == f'S:resnet8_T:resnet14_digits_{method}_r:1.0_a:0.0_b:{beta}_1'
    summary = json.loads((run / 'summary.json').read_text())
    assert summary['distill'] == method and summary['epochs'] == 1 and summary['params_deployed'] == 78_042
    (record,) = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert math.isfinite(record[f'loss_{method}']) and record[f'loss_{method}'] > 0
    args_json = json.loads((run / 'args.json').read_text())
    flag, value = {'reviewkd': ('reviewkd_warmup', 20), 'ofd': ('ofd_teacher_bn', 'batch')}[method]
    assert args_json['beta'] == beta and args_json[flag] == value
