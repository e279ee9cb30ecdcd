"""What each block family of the zoo computes, number by number (test_models.py checks shapes, counts and
keys; this file checks the arithmetic): one forward per block family on a tiny input, with the weights set to
chosen values (quarter steps of both signs, BN in eval mode with chosen running statistics and affine), against
the block's published definition written out here in numpy with explicit loops (convolution, BN, ReLU, pooling,
channel shuffle, channel split). The expected values never come from calling the module under test.

Chosen so that every part matters: BN statistics far from (0, 1), pre-activations of both signs (a lost ReLU
changes the output), shortcuts whose contribution differs from zero, strides that change the sampled pixels.
Everything runs in float64, so the comparisons are tight.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from models import mobilenetv1, mobilenetv2, resnet, resnet_imagenet, resnetv2, wrn
from models.ShuffleNetv1 import Bottleneck as ShuffleV1Unit
from models.ShuffleNetv2 import BasicBlock as ShuffleV2Unit
from models.ShuffleNetv2 import DownBlock as ShuffleV2Down
from models._common import ShuffleBlock
from models.vgg import VGG

EPS = 1e-5   # BatchNorm2d's default eps


# ---------------------------------------------------------------------------------------------- numpy reference

def conv(x: np.ndarray, w: np.ndarray, stride: int = 1, pad: int = 0, groups: int = 1,
         bias: np.ndarray | None = None) -> np.ndarray:
    """Cross-correlation of one image x (C, H, W) with w (O, C / groups, kh, kw), zero padding, by loops."""
    c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    assert c == cg * groups and o % groups == 0
    xp = np.zeros((c, h + 2 * pad, wd + 2 * pad))
    xp[:, pad:pad + h, pad:pad + wd] = x
    ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((o, ho, wo))
    per_group = o // groups
    for oc in range(o):
        g = oc // per_group
        for i in range(ho):
            for j in range(wo):
                total = 0.0
                for ic in range(cg):
                    for di in range(kh):
                        for dj in range(kw):
                            total += xp[g * cg + ic, i * stride + di, j * stride + dj] * w[oc, ic, di, dj]
                out[oc, i, j] = total + (bias[oc] if bias is not None else 0.0)
    return out


def bn(x: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """Eval-mode BN of x (C, H, W): (x - mean) / sqrt(var + eps) * gamma + beta, channel by channel."""
    out = np.empty_like(x)
    for ch in range(x.shape[0]):
        out[ch] = (x[ch] - p['mean'][ch]) / np.sqrt(p['var'][ch] + EPS) * p['gamma'][ch] + p['beta'][ch]
    return out


def relu(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, 0.0)


def avgpool3x3_s2_p1(x: np.ndarray) -> np.ndarray:
    """AvgPool2d(3, stride=2, padding=1), padded zeros counted (PyTorch's default count_include_pad)."""
    c, h, w = x.shape
    xp = np.zeros((c, h + 2, w + 2))
    xp[:, 1:1 + h, 1:1 + w] = x
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    out = np.zeros((c, ho, wo))
    for ch in range(c):
        for i in range(ho):
            for j in range(wo):
                out[ch, i, j] = xp[ch, 2 * i:2 * i + 3, 2 * j:2 * j + 3].sum() / 9.0
    return out


def maxpool2(x: np.ndarray) -> np.ndarray:
    c, h, w = x.shape
    out = np.zeros((c, h // 2, w // 2))
    for ch in range(c):
        for i in range(h // 2):
            for j in range(w // 2):
                out[ch, i, j] = max(x[ch, 2 * i, 2 * j], x[ch, 2 * i, 2 * j + 1],
                                    x[ch, 2 * i + 1, 2 * j], x[ch, 2 * i + 1, 2 * j + 1])
    return out


def shuffle(x: np.ndarray, groups: int) -> np.ndarray:
    """Channel shuffle: output channel j is input channel (j % groups) * (C / groups) + j // groups."""
    c = x.shape[0]
    return np.stack([x[(j % groups) * (c // groups) + j // groups] for j in range(c)])


# ---------------------------------------------------------------------------------------------- chosen weights

def choose_weights(module: nn.Module, seed: int) -> nn.Module:
    """Every conv / linear weight and bias a multiple of 1/4 in [-1, 1] (no zero weights), every BN's running
    mean in [-1, 1], running var in {0.25, 0.5, 2, 4}, gamma in +-{0.5, 1, 1.5, 2}, beta in [-1, 1]; then eval
    mode and float64."""
    rng = np.random.default_rng(seed)
    quarters = np.array([-1.0, -0.75, -0.5, -0.25, 0.25, 0.5, 0.75, 1.0])
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.from_numpy(rng.choice(quarters, size=tuple(m.weight.shape))))
                if m.bias is not None:
                    m.bias.copy_(torch.from_numpy(rng.choice(quarters, size=tuple(m.bias.shape))))
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.from_numpy(rng.choice(quarters, size=n)))
                m.running_var.copy_(torch.from_numpy(rng.choice([0.25, 0.5, 2.0, 4.0], size=n)))
                m.weight.copy_(torch.from_numpy(rng.choice([-2.0, -1.5, -1.0, -0.5, 0.5, 1.0, 1.5, 2.0], size=n)))
                m.bias.copy_(torch.from_numpy(rng.choice(quarters, size=n)))
    return module.eval().double()


def w(conv_module: nn.Conv2d) -> np.ndarray:
    return conv_module.weight.detach().numpy()


def p(bn_module: nn.BatchNorm2d) -> dict[str, np.ndarray]:
    return {'mean': bn_module.running_mean.numpy(), 'var': bn_module.running_var.numpy(),
            'gamma': bn_module.weight.detach().numpy(), 'beta': bn_module.bias.detach().numpy()}


def image(channels: int, size: int, seed: int, batch: int = 2) -> np.ndarray:
    """A batch of (channels, size, size) images, values in [-2, 2] in quarter steps."""
    return np.random.default_rng(100 + seed).integers(-8, 9, size=(batch, channels, size, size)) / 4.0


def run(module: nn.Module, x: np.ndarray, method: str = 'forward') -> np.ndarray | tuple[np.ndarray, ...]:
    with torch.no_grad():
        out = getattr(module, method)(torch.from_numpy(x))
    if isinstance(out, tuple):
        return tuple(o.numpy() for o in out)
    return out.numpy()


def per_image(fn, x: np.ndarray) -> np.ndarray:
    return np.stack([fn(xi) for xi in x])


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-10)


def test_the_reference_convolution_on_a_hand_worked_example():
    """The numpy helpers themselves, on numbers worked out by hand: a 3x3 all-ones kernel over a 3x3 image
    padded by 1 sums each pixel's neighbourhood; stride 2 keeps the corners; groups split the channels."""
    x = np.arange(1.0, 10.0).reshape(1, 3, 3)            # 1 2 3 / 4 5 6 / 7 8 9
    ones = np.ones((1, 1, 3, 3))
    assert conv(x, ones, pad=1).tolist() == [[[12.0, 21.0, 16.0], [27.0, 45.0, 33.0], [24.0, 39.0, 28.0]]]
    assert conv(x, ones, stride=2, pad=1).tolist() == [[[12.0, 16.0], [24.0, 28.0]]]
    two = np.stack([x[0], -x[0]])                          # channel 1 = -channel 0
    grouped = conv(two, np.ones((2, 1, 1, 1)) * np.array([2.0, 3.0])[:, None, None, None], groups=2)
    assert grouped[0].tolist() == (2 * x[0]).tolist() and grouped[1].tolist() == (-3 * x[0]).tolist()
    assert shuffle(np.arange(6.0)[:, None, None], 3).ravel().tolist() == [0, 2, 4, 1, 3, 5]
    assert shuffle(np.arange(6.0)[:, None, None], 2).ravel().tolist() == [0, 3, 1, 4, 2, 5]
    assert bn(np.full((1, 1, 1), 3.0), {'mean': [1.0], 'var': [4.0 - EPS], 'gamma': [-1.0], 'beta': [0.5]}).item() == \
        pytest.approx(-0.5)
    assert avgpool3x3_s2_p1(x).tolist() == [[[12 / 9, 16 / 9], [24 / 9, 28 / 9]]]
    assert maxpool2(np.arange(16.0).reshape(1, 4, 4)).tolist() == [[[5.0, 7.0], [13.0, 15.0]]]


def test_channel_shuffle_module_reorders_channels_as_the_grid_transpose():
    x = np.arange(12.0).reshape(1, 6, 1, 2)
    out = run(ShuffleBlock(groups=3), x)
    assert out[0, :, 0, 0].tolist() == [0.0, 4.0, 8.0, 2.0, 6.0, 10.0]      # channels 0, 2, 4, 1, 3, 5
    out = run(ShuffleBlock(groups=2), x)
    assert out[0, :, 0, 0].tolist() == [0.0, 6.0, 2.0, 8.0, 4.0, 10.0]     # channels 0, 3, 1, 4, 2, 5


# ---------------------------------------------------------------------------------------------- CIFAR ResNet

def test_cifar_resnet_basic_block_with_identity_shortcut():
    """models/resnet.py: out = relu(bn2(conv2(relu(bn1(conv1 x)))) + x); preact is the sum before the ReLU.
    The block is layer1.0 of a ResNet-8 with widths 2/2/4/4 (no downsample)."""
    block = choose_weights(resnet.ResNet(8, [2, 2, 4, 4], num_classes=3), seed=1).layer1[0]
    assert block.downsample is None
    x = image(2, 5, seed=1)

    def expected(xi):
        out = relu(bn(conv(xi, w(block.conv1), pad=1), p(block.bn1)))
        return bn(conv(out, w(block.conv2), pad=1), p(block.bn2)) + xi

    pre = per_image(expected, x)
    out, preact = run(block, x, 'forward_with_preact')
    assert_close(preact, pre)
    assert_close(out, relu(pre))
    assert_close(run(block, x), relu(pre))


def test_cifar_resnet_basic_block_with_stride_and_downsample():
    """layer2.0 of the same ResNet-8: conv1 has stride 2, the shortcut is bn(conv1x1 stride 2 (x))."""
    block = choose_weights(resnet.ResNet(8, [2, 2, 4, 4], num_classes=3), seed=2).layer2[0]
    x = image(2, 5, seed=2)
    down_conv, down_bn = block.downsample[0], block.downsample[1]

    def expected(xi):
        out = relu(bn(conv(xi, w(block.conv1), stride=2, pad=1), p(block.bn1)))
        shortcut = bn(conv(xi, w(down_conv), stride=2), p(down_bn))
        return bn(conv(out, w(block.conv2), pad=1), p(block.bn2)) + shortcut

    pre = per_image(expected, x)
    out, preact = run(block, x, 'forward_with_preact')
    assert out.shape == (2, 4, 3, 3)
    assert_close(preact, pre)
    assert_close(out, relu(pre))


@pytest.mark.parametrize('in_planes, planes, stride', [(8, 2, 1), (4, 2, 2)])
def test_resnet50_bottleneck(in_planes, planes, stride):
    """models/resnetv2.py (ResNet50's block): relu(bn3(conv3(relu(bn2(conv2/stride(relu(bn1(conv1 x))))))) +
    shortcut), the shortcut being x, or bn(conv1x1/stride(x)) when the shape changes."""
    block = choose_weights(resnetv2.Bottleneck(in_planes, planes, stride), seed=3 + stride)
    x = image(in_planes, 5, seed=3 + stride)

    def expected(xi):
        out = relu(bn(conv(xi, w(block.conv1)), p(block.bn1)))
        out = relu(bn(conv(out, w(block.conv2), stride=stride, pad=1), p(block.bn2)))
        out = bn(conv(out, w(block.conv3)), p(block.bn3))
        if stride == 1 and in_planes == 4 * planes:
            return out + xi
        return out + bn(conv(xi, w(block.shortcut[0]), stride=stride), p(block.shortcut[1]))

    pre = per_image(expected, x)
    out, preact = run(block, x, 'forward_with_preact')
    side = 3 if stride == 2 else 5
    assert out.shape == (2, 4 * planes, side, side)
    assert_close(preact, pre)
    assert_close(out, relu(pre))


@pytest.mark.parametrize('in_planes, planes, stride', [(2, 2, 1), (2, 3, 2)])
def test_resnetv2_basic_block(in_planes, planes, stride):
    block = choose_weights(resnetv2.BasicBlock(in_planes, planes, stride), seed=5 + stride)
    x = image(in_planes, 4, seed=5)

    def expected(xi):
        out = relu(bn(conv(xi, w(block.conv1), stride=stride, pad=1), p(block.bn1)))
        out = bn(conv(out, w(block.conv2), pad=1), p(block.bn2))
        if stride == 1 and in_planes == planes:
            return out + xi
        return out + bn(conv(xi, w(block.shortcut[0]), stride=stride), p(block.shortcut[1]))

    assert_close(run(block, x), relu(per_image(expected, x)))


# ---------------------------------------------------------------------------------------------- WRN

@pytest.mark.parametrize('in_planes, out_planes, stride', [(2, 2, 1), (2, 3, 2)])
def test_wrn_preactivation_block(in_planes, out_planes, stride):
    """models/wrn.py: a = relu(bn1 x); out = shortcut + conv2(relu(bn2(conv1/stride(a)))), shortcut = x when
    the widths agree, else conv1x1/stride(a) (from the activated input, not x). No final ReLU."""
    block = choose_weights(wrn.BasicBlock(in_planes, out_planes, stride), seed=7 + stride)
    x = image(in_planes, 5, seed=7 + stride)

    def expected(xi):
        a = relu(bn(xi, p(block.bn1)))
        out = relu(bn(conv(a, w(block.conv1), stride=stride, pad=1), p(block.bn2)))
        shortcut = xi if in_planes == out_planes else conv(a, w(block.convShortcut), stride=stride)
        return shortcut + conv(out, w(block.conv2), pad=1)

    x_before = x.copy()
    assert_close(run(block, x), per_image(expected, x))
    assert np.array_equal(x, x_before)          # the in-place ReLU never writes into the input


def test_wrn_network_block_chains_its_blocks_with_the_stride_on_the_first():
    group = choose_weights(wrn.NetworkBlock(2, 2, 3, wrn.BasicBlock, 2), seed=9)
    first, second = group.layer
    x = image(2, 4, seed=9)

    def block_ref(b, xi, stride):
        a = relu(bn(xi, p(b.bn1)))
        out = relu(bn(conv(a, w(b.conv1), stride=stride, pad=1), p(b.bn2)))
        shortcut = xi if b.convShortcut is None else conv(a, w(b.convShortcut), stride=stride)
        return shortcut + conv(out, w(b.conv2), pad=1)

    assert_close(run(group, x), per_image(lambda xi: block_ref(second, block_ref(first, xi, 2), 1), x))


# ---------------------------------------------------------------------------------------------- VGG

def test_vgg_stage_units_pools_and_classifier():
    """models/vgg.py on a VGG with BN whose blocks are 2, 2+2, 2, 2, 2 channels wide, on 8x8 images: each block
    is conv3x3(+bias)-BN[-ReLU-conv3x3-BN], the forward applies the block's last ReLU (the features f1..f4 are
    post-ReLU, pre-ReLU with preact), max-pools 2x2 before blocks 1-3 (not before block 4 at this size), then
    averages and classifies."""
    model = choose_weights(VGG([[2], [2, 2], [2], [2], [2]], batch_norm=True, num_classes=3), seed=11)
    x = image(3, 8, seed=11)

    def unit(block, xi):               # a block: (conv-BN-ReLU)* conv-BN, without the last ReLU
        convs = [m for m in block if isinstance(m, nn.Conv2d)]
        bns = [m for m in block if isinstance(m, nn.BatchNorm2d)]
        out = xi
        for k, (c, b) in enumerate(zip(convs, bns)):
            out = bn(conv(out, w(c), pad=1, bias=c.bias.detach().numpy()), p(b))
            if k < len(convs) - 1:
                out = relu(out)
        return out

    def expected(xi):
        f0 = relu(unit(model.block0, xi))
        pre1 = unit(model.block1, maxpool2(f0))
        pre2 = unit(model.block2, maxpool2(relu(pre1)))
        pre3 = unit(model.block3, maxpool2(relu(pre2)))
        pre4 = unit(model.block4, relu(pre3))
        pooled = relu(pre4).mean(axis=(1, 2))
        logits = model.classifier.weight.detach().numpy() @ pooled + model.classifier.bias.detach().numpy()
        return f0, pre1, pre2, pre3, pre4, pooled, logits

    ref = [np.stack(parts) for parts in zip(*(expected(xi) for xi in x))]
    assert len(model.block1) == 5                      # conv, BN, ReLU, conv, BN
    with torch.no_grad():
        feats, logits = model(torch.from_numpy(x), is_feat=True)
        pre_feats, _ = model(torch.from_numpy(x), is_feat=True, preact=True)
    assert_close(logits.numpy(), ref[6])
    assert_close(feats[0].numpy(), ref[0])
    for k in range(1, 5):
        assert_close(feats[k].numpy(), relu(ref[k]))
        assert_close(pre_feats[k].numpy(), ref[k])
    assert_close(feats[5].numpy(), ref[5])


# ---------------------------------------------------------------------------------------------- MobileNetV2

@pytest.mark.parametrize('inp, oup, stride', [(2, 2, 1), (2, 3, 2), (2, 3, 1)])
def test_mobilenetv2_inverted_residual(inp, oup, stride):
    """models/mobilenetv2.py: expand 1x1 (x3) - BN - ReLU - depthwise 3x3/stride - BN - ReLU - project 1x1 - BN
    (linear), plus x only when stride 1 and inp == oup."""
    block = choose_weights(mobilenetv2.InvertedResidual(inp, oup, stride, expand_ratio=3), seed=13 + oup + stride)
    c = block.conv
    x = image(inp, 5, seed=13 + stride)

    def expected(xi):
        out = relu(bn(conv(xi, w(c[0])), p(c[1])))
        out = relu(bn(conv(out, w(c[3]), stride=stride, pad=1, groups=inp * 3), p(c[4])))
        out = bn(conv(out, w(c[6])), p(c[7]))
        return out + xi if (stride == 1 and inp == oup) else out

    assert_close(run(block, x), per_image(expected, x))


# ---------------------------------------------------------------------------------------------- ShuffleNet V1

@pytest.mark.parametrize('in_planes, out_planes, stride', [(16, 16, 1), (8, 16, 2), (24, 12, 2)])
def test_shufflenet_v1_unit(in_planes, out_planes, stride):
    """models/ShuffleNetv1.py, groups 2 (3 for the 24-channel first unit, whose 1x1 is ungrouped): grouped 1x1
    to out/4 - BN - ReLU - channel shuffle - depthwise 3x3/stride - BN - ReLU - grouped 1x1 - BN, then
    relu(branch + x) at stride 1, relu(cat[branch, avgpool3x3/2(x)]) at stride 2."""
    groups = 3 if in_planes == 24 else 2
    unit = choose_weights(ShuffleV1Unit(in_planes, out_planes, stride, groups), seed=17 + stride + in_planes)
    mid = out_planes // 4
    g1 = 1 if in_planes == 24 else groups
    x = image(in_planes, 4, seed=17 + stride)

    def expected(xi):
        out = relu(bn(conv(xi, w(unit.conv1), groups=g1), p(unit.bn1)))
        out = shuffle(out, g1)
        out = relu(bn(conv(out, w(unit.conv2), stride=stride, pad=1, groups=mid), p(unit.bn2)))
        out = bn(conv(out, w(unit.conv3), groups=groups), p(unit.bn3))
        if stride == 2:
            return np.concatenate([out, avgpool3x3_s2_p1(xi)])
        return out + xi

    pre = per_image(expected, x)
    out, preact = run(unit, x, 'forward_with_preact')
    assert_close(preact, pre)
    assert_close(out, relu(pre))


def test_shufflenet_v1_shuffle_matters_here():
    """The shuffle is not a no-op in the units above (with 2 groups it needs at least 4 mid channels: on 2 it
    is the identity): on the chosen weights, reordering the mid channels changes what the depthwise conv makes
    of them, so a unit without its shuffle fails test_shufflenet_v1_unit."""
    unit = choose_weights(ShuffleV1Unit(16, 16, 1, 2), seed=18)
    xi = image(16, 4, seed=18)[0]
    out = relu(bn(conv(xi, w(unit.conv1), groups=2), p(unit.bn1)))
    assert shuffle(np.arange(4.0)[:, None, None], 2).ravel().tolist() == [0, 2, 1, 3]
    after = [bn(conv(o, w(unit.conv2), pad=1, groups=4), p(unit.bn2)) for o in (shuffle(out, 2), out)]
    assert not np.allclose(after[0], after[1])


# ---------------------------------------------------------------------------------------------- ShuffleNet V2

def test_shufflenet_v2_basic_unit_splits_then_shuffles():
    """models/ShuffleNetv2.py stride-1 unit on 4 channels: x1 = channels 0-1 pass through, x2 = channels 2-3 go
    through 1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU; out = shuffle(cat[x1, branch], 2 groups); preact is
    cat[x1, branch before its ReLU], not shuffled."""
    unit = choose_weights(ShuffleV2Unit(4), seed=19)
    x = image(4, 4, seed=19)

    def expected(xi):
        x1, x2 = xi[:2], xi[2:]
        out = relu(bn(conv(x2, w(unit.conv1)), p(unit.bn1)))
        out = bn(conv(out, w(unit.conv2), pad=1, groups=2), p(unit.bn2))
        branch = bn(conv(out, w(unit.conv3)), p(unit.bn3))
        return shuffle(np.concatenate([x1, relu(branch)]), 2), np.concatenate([x1, branch])

    ref_out = np.stack([expected(xi)[0] for xi in x])
    ref_pre = np.stack([expected(xi)[1] for xi in x])
    out, preact = run(unit, x, 'forward_with_preact')
    assert_close(out, ref_out)
    assert_close(preact, ref_pre)
    # channel by channel: out = [x1_0, b_0, x1_1, b_1]
    assert_close(out[:, 0], x[:, 0])
    assert_close(out[:, 2], x[:, 1])


def test_shufflenet_v2_down_unit():
    """The stride-2 unit, 2 -> 4 channels: left = depthwise 3x3/2-BN, 1x1-BN-ReLU; right = 1x1-BN-ReLU,
    depthwise 3x3/2-BN, 1x1-BN-ReLU; out = shuffle(cat[left, right], 2 groups)."""
    unit = choose_weights(ShuffleV2Down(2, 4), seed=21)
    x = image(2, 5, seed=21)

    def expected(xi):
        left = bn(conv(xi, w(unit.conv1), stride=2, pad=1, groups=2), p(unit.bn1))
        left = relu(bn(conv(left, w(unit.conv2)), p(unit.bn2)))
        right = relu(bn(conv(xi, w(unit.conv3)), p(unit.bn3)))
        right = bn(conv(right, w(unit.conv4), stride=2, pad=1, groups=2), p(unit.bn4))
        right = relu(bn(conv(right, w(unit.conv5)), p(unit.bn5)))
        return shuffle(np.concatenate([left, right]), 2)

    assert_close(run(unit, x), per_image(expected, x))


# ---------------------------------------------------------------------------------------------- ImageNet ResNets

@pytest.mark.parametrize('in_planes, planes, stride', [(2, 2, 1), (2, 3, 2)])
def test_imagenet_basic_block(in_planes, planes, stride):
    """models/resnet_imagenet.py (torchvision's BasicBlock): relu(bn2(conv2(relu(bn1(conv1/stride x)))) +
    identity), identity = x or downsample = bn(conv1x1/stride(x))."""
    block = choose_weights(resnet_imagenet.ImageNetBasicBlock(in_planes, planes, stride), seed=23 + stride)
    x = image(in_planes, 5, seed=23 + stride)

    def expected(xi):
        out = relu(bn(conv(xi, w(block.conv1), stride=stride, pad=1), p(block.bn1)))
        out = bn(conv(out, w(block.conv2), pad=1), p(block.bn2))
        if block.downsample is None:
            return out + xi
        return out + bn(conv(xi, w(block.downsample[0]), stride=stride), p(block.downsample[1]))

    assert (block.downsample is None) == (stride == 1)
    pre = per_image(expected, x)
    out, preact = run(block, x, 'forward_with_preact')
    assert_close(preact, pre)
    assert_close(out, relu(pre))


@pytest.mark.parametrize('in_planes, planes, stride', [(8, 2, 1), (4, 2, 2)])
def test_imagenet_bottleneck_strides_in_its_3x3(in_planes, planes, stride):
    """torchvision's v1.5 Bottleneck: the stride is in the 3x3 conv (not the first 1x1)."""
    block = choose_weights(resnet_imagenet.ImageNetBottleneck(in_planes, planes, stride), seed=27 + stride)
    x = image(in_planes, 6, seed=27 + stride)

    def expected(xi):
        out = relu(bn(conv(xi, w(block.conv1)), p(block.bn1)))
        out = relu(bn(conv(out, w(block.conv2), stride=stride, pad=1), p(block.bn2)))
        out = bn(conv(out, w(block.conv3)), p(block.bn3))
        if block.downsample is None:
            return out + xi
        return out + bn(conv(xi, w(block.downsample[0]), stride=stride), p(block.downsample[1]))

    assert (block.downsample is None) == (stride == 1)
    pre = per_image(expected, x)
    out, preact = run(block, x, 'forward_with_preact')
    assert_close(preact, pre)
    assert_close(out, relu(pre))


# ---------------------------------------------------------------------------------------------- MobileNetV1

@pytest.mark.parametrize('stride', [1, 2])
def test_mobilenetv1_depthwise_separable_unit(stride):
    """models/mobilenetv1.py: depthwise 3x3/stride - BN - ReLU - pointwise 1x1 - BN - ReLU."""
    unit = choose_weights(mobilenetv1._separable(2, 3, stride), seed=31 + stride)
    x = image(2, 5, seed=31 + stride)

    def expected(xi):
        out = relu(bn(conv(xi, w(unit[0]), stride=stride, pad=1, groups=2), p(unit[1])))
        return relu(bn(conv(out, w(unit[3])), p(unit[4])))

    assert_close(run(unit, x), per_image(expected, x))


def test_mobilenetv1_stem():
    """The full 3x3/2 conv - BN - ReLU that opens MobileNetV1."""
    stem = choose_weights(mobilenetv1._conv_bn_relu(3, 2, 2), seed=33)
    x = image(3, 5, seed=33)
    assert_close(run(stem, x), per_image(lambda xi: relu(bn(conv(xi, w(stem[0]), stride=2, pad=1), p(stem[1]))), x))
