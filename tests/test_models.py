"""Model zoo: RepDistiller compatibility (parameter counts, state-dict keys, feature lists, preact
semantics, helper methods) and our own additions (any input size, create_model errors).

The expected numbers are the fact sheet's (docs/reference/repdistiller-mdistiller-simkd.md, 5.2).
"""
from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helper.errors import UserError
from models import MODEL_FACTS, create_model, feature_channels, model_dict, model_facts, tap
from models._common import ShuffleBlock
from tests.fixtures_data import one_intra_op_thread

RESNET_FEATS = [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]
RESNET_X4_FEATS = [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)]
WRN_1_FEATS = [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]
WRN_2_FEATS = [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,)]
VGG_FEATS = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4), (512,)]

# name: (parameters at num_classes=100, state-dict key count, feature shapes at 32x32)
# Key counts not printed in the fact sheet, derived from its layer plans (5.3-5.6) with BN = 5 keys
# (weight, bias, running_mean, running_var, num_batches_tracked):
#   CIFAR ResNet, n = (depth - 2) / 6 blocks per stage: conv1 + bn1 (6) + 3n blocks x (2 convs + 2 BNs = 12)
#     + 2 downsamples x 6 + fc (2): resnet14 (n=2) 6 + 72 + 12 + 2 = 92, resnet44 (n=7) 6 + 252 + 12 + 2 = 272.
#   WRN, n = (depth - 4) / 6: conv1 (1) + 3n blocks x 12 + convShortcuts (2 for width 1) + bn1 (5) + fc (2):
#     wrn_40_1 (n=6) 1 + 216 + 2 + 5 + 2 = 226.
#   VGG-BN: 7 keys per conv (weight, bias, BN) + classifier (2): vgg11 8 convs 58, vgg16 13 convs 93, vgg19 16 convs 114.
EXPECTED: dict[str, tuple[int, int, list[tuple[int, ...]]]] = {
    'resnet8': (83_892, 56, RESNET_FEATS),
    'resnet14': (181_108, 92, RESNET_FEATS),
    'resnet20': (278_324, 128, RESNET_FEATS),
    'resnet32': (472_756, 200, RESNET_FEATS),
    'resnet44': (667_188, 272, RESNET_FEATS),
    'resnet56': (861_620, 344, RESNET_FEATS),
    'resnet110': (1_736_564, 668, RESNET_FEATS),
    'resnet8x4': (1_233_540, 62, RESNET_X4_FEATS),
    'resnet32x4': (7_433_860, 206, RESNET_X4_FEATS),
    'ResNet50': (23_705_252, 320, [(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8),
                                   (2048, 4, 4), (2048,)]),
    'wrn_16_1': (180_916, 82, WRN_1_FEATS),
    'wrn_16_2': (703_284, 83, WRN_2_FEATS),
    'wrn_40_1': (569_780, 226, WRN_1_FEATS),
    'wrn_40_2': (2_255_156, 227, WRN_2_FEATS),
    'vgg8': (3_965_028, 37, VGG_FEATS),
    'vgg11': (9_277_284, 58, VGG_FEATS),
    'vgg13': (9_462_180, 72, VGG_FEATS),
    'vgg16': (14_774_436, 93, VGG_FEATS),
    'vgg19': (20_086_692, 114, VGG_FEATS),
    'MobileNetV2': (812_836, 320, [(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2), (1280,)]),
    'ShuffleV1': (949_258, 296, [(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4), (960,)]),
    'ShuffleV2': (1_355_528, 338, [(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4), (1024,)]),
}
NAMES = list(EXPECTED)
RESNETS = [n for n in NAMES if n.startswith('resnet')]
WRNS = [n for n in NAMES if n.startswith('wrn')]
VGGS = [n for n in NAMES if n.startswith('vgg')]


@pytest.fixture(scope='module', autouse=True)
def single_thread_and_cleanup() -> Iterator[None]:
    """Batch-2 forwards gain nothing from threads, and intra-op threads slow down badly when the
    CPUs are shared with other jobs. Afterwards the thread setting is restored and the cached
    models are dropped, so later test modules don't carry them."""
    with one_intra_op_thread():
        yield
    outputs.cache_clear()
    built.cache_clear()


@functools.cache
def built(name: str) -> nn.Module:
    """One shared eval-mode instance per model (num_classes=100); tests must not modify it."""
    torch.manual_seed(0)
    return model_dict[name](num_classes=100).eval()


@functools.cache
def image32() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@functools.cache
@torch.no_grad()
def outputs(name: str, preact: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    feats, logits = built(name)(image32(), is_feat=True, preact=preact)
    return list(feats), logits


def pre_pool_map(name: str, model: nn.Module, feats: list[torch.Tensor]) -> torch.Tensor:
    """The map that the model pools into feats[-1], rebuilt from feats[-2] (preact=False)."""
    last = feats[-2]
    if name in WRNS:
        return F.relu(model.bn1(last))
    if name == 'MobileNetV2':
        return model.conv2(last)
    if name == 'ShuffleV2':
        return F.relu(model.bn2(model.conv2(last)))
    return last


def repdistiller_pool(name: str, fmap: torch.Tensor) -> torch.Tensor:
    """RepDistiller's fixed-size pooling for 32x32 input, flattened."""
    if name in RESNETS or name in WRNS:
        pooled = F.avg_pool2d(fmap, 8)
    elif name in ('ShuffleV1', 'ShuffleV2'):
        pooled = F.avg_pool2d(fmap, 4)
    elif name == 'MobileNetV2':
        pooled = F.avg_pool2d(fmap, 2, ceil_mode=True)
    else:  # VGG and ResNet50 pool adaptively in RepDistiller too
        pooled = F.adaptive_avg_pool2d(fmap, 1)
    return pooled.flatten(1)


def classifier(name: str, model: nn.Module) -> nn.Module:
    if name in ('ResNet50', 'ShuffleV1', 'ShuffleV2'):
        return model.linear
    if name in VGGS or name == 'MobileNetV2':
        return model.classifier
    return model.fc


# ----------------------------------------------------------------------------- registry

def test_model_dict_names() -> None:
    assert list(model_dict) == NAMES


def test_create_model_builds_with_num_classes() -> None:
    model = create_model('resnet8', 10)
    assert model.fc.out_features == 10


def test_create_model_unknown_name() -> None:
    with pytest.raises(UserError) as info:
        create_model('nope', 100)
    message = str(info.value)
    assert '\n' not in message and 'nope' in message and 'resnet32x4' in message and 'ShuffleV2' in message


# ----------------------------------------------------------------------------- parameters and keys

@pytest.mark.parametrize('name', NAMES)
def test_parameter_count(name: str) -> None:
    assert sum(p.numel() for p in built(name).parameters()) == EXPECTED[name][0]


@pytest.mark.parametrize('name', NAMES)
def test_state_dict_key_count(name: str) -> None:
    assert len(built(name).state_dict()) == EXPECTED[name][1]


GOLDEN_KEYS = Path(__file__).parent / 'golden' / 'state_dict_keys.json'


@functools.cache
def golden_keys() -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """RepDistiller's sorted (key, shape) lists at num_classes=100, committed once (see the file's _about)."""
    data = json.loads(GOLDEN_KEYS.read_text())
    assert data['num_classes'] == 100
    return {name: [(key, tuple(shape)) for key, shape in entries] for name, entries in data['models'].items()}


def test_golden_key_lists_cover_the_zoo() -> None:
    assert set(golden_keys()) == set(model_dict)
    assert {name: len(entries) for name, entries in golden_keys().items()} == {n: EXPECTED[n][1] for n in NAMES}


@pytest.mark.parametrize('name', NAMES)
def test_state_dict_keys_and_shapes_match_the_golden_list(name: str) -> None:
    """Every key and shape a RepDistiller checkpoint of this model holds, and nothing else (strict loading)."""
    got = sorted((key, tuple(value.shape)) for key, value in built(name).state_dict().items())
    want = golden_keys()[name]
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not unexpected, f'missing {missing[:5]}, unexpected {unexpected[:5]}'
    assert got == want


TOP_LEVEL = {
    'resnet20': {'conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'fc'},
    'ResNet50': {'conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'layer4', 'linear'},
    'wrn_40_2': {'conv1', 'block1', 'block2', 'block3', 'bn1', 'fc'},
    'vgg13': {'block0', 'block1', 'block2', 'block3', 'block4', 'classifier'},
    'MobileNetV2': {'conv1', 'blocks', 'conv2', 'classifier'},
    'ShuffleV1': {'conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'linear'},
    'ShuffleV2': {'conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'conv2', 'bn2', 'linear'},
}


@pytest.mark.parametrize('name', list(TOP_LEVEL))
def test_state_dict_top_level(name: str) -> None:
    assert {k.split('.')[0] for k in built(name).state_dict()} == TOP_LEVEL[name]


KEY_SHAPES = {
    'resnet8': {'layer2.0.downsample.0.weight': (32, 16, 1, 1), 'layer3.0.downsample.1.running_var': (64,),
                'layer1.0.bn2.num_batches_tracked': (), 'fc.weight': (100, 64)},
    'resnet8x4': {'layer1.0.downsample.0.weight': (64, 32, 1, 1), 'layer1.0.downsample.1.weight': (64,)},
    'ResNet50': {'layer1.0.shortcut.0.weight': (256, 64, 1, 1), 'layer4.2.conv3.weight': (2048, 512, 1, 1),
                 'linear.weight': (100, 2048)},
    'wrn_16_2': {'block1.layer.0.convShortcut.weight': (32, 16, 1, 1), 'block3.layer.1.conv2.weight': (128, 128, 3, 3)},
    'wrn_40_2': {'block1.layer.0.convShortcut.weight': (32, 16, 1, 1)},
    'wrn_16_1': {'block2.layer.0.convShortcut.weight': (32, 16, 1, 1)},
    'vgg13': {'block0.0.weight': (64, 3, 3, 3), 'block0.0.bias': (64,), 'block0.1.running_mean': (64,),
              'block0.3.weight': (64, 64, 3, 3), 'block0.4.weight': (64,), 'classifier.weight': (100, 512)},
    'MobileNetV2': {'classifier.0.weight': (100, 1280), 'blocks.0.0.conv.0.weight': (16, 16, 1, 1),
                    'blocks.0.0.conv.3.weight': (16, 1, 3, 3), 'blocks.0.0.conv.6.weight': (8, 16, 1, 1),
                    'conv1.0.weight': (16, 3, 3, 3), 'conv2.0.weight': (1280, 160, 1, 1)},
    'ShuffleV1': {'layer1.0.conv1.weight': (54, 24, 1, 1), 'layer1.0.conv3.weight': (216, 18, 1, 1),
                  'layer2.0.conv1.weight': (60, 80, 1, 1), 'linear.weight': (100, 960)},
    'ShuffleV2': {'layer1.0.conv5.weight': (58, 58, 1, 1), 'layer1.3.conv2.weight': (58, 1, 3, 3),
                  'conv2.weight': (1024, 464, 1, 1), 'linear.weight': (100, 1024)},
}


@pytest.mark.parametrize('name', list(KEY_SHAPES))
def test_named_keys_and_shapes(name: str) -> None:
    state = built(name).state_dict()
    for key, shape in KEY_SHAPES[name].items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key


def test_key_absences() -> None:
    """Names that must NOT appear (they would break loading RepDistiller checkpoints)."""
    assert 'layer1.0.downsample.0.weight' not in built('resnet8').state_dict()
    assert not any('downsample' in k or k.startswith('fc.') for k in built('ResNet50').state_dict())
    for name in ('wrn_16_1', 'wrn_40_1'):
        assert not any(k.startswith('block1.') and 'convShortcut' in k for k in built(name).state_dict())
    # VGG blocks end with a BN: the trailing ReLU is removed, so block0 of vgg8 has conv 0 and BN 1 only.
    assert {k.split('.')[1] for k in built('vgg8').state_dict() if k.startswith('block0.')} == {'0', '1'}
    assert [len(built('ShuffleV2').layer1), len(built('ShuffleV2').layer2), len(built('ShuffleV2').layer3)] == [4, 8, 4]


# ----------------------------------------------------------------------------- features

@pytest.mark.parametrize('preact', [False, True])
@pytest.mark.parametrize('name', NAMES)
def test_feature_shapes_32(name: str, preact: bool) -> None:
    feats, logits = outputs(name, preact)
    assert [tuple(f.shape) for f in feats] == [(2, *s) for s in EXPECTED[name][2]]
    assert logits.shape == (2, 100)


@pytest.mark.parametrize('name', NAMES)
@torch.no_grad()
def test_pooled_feature_and_logits(name: str) -> None:
    """feat[-1] is RepDistiller's fixed pooling of the last map, and logits = classifier(feat[-1])."""
    model = built(name)
    feats, logits = outputs(name, preact=False)
    fmap = pre_pool_map(name, model, feats)
    torch.testing.assert_close(feats[-1], repdistiller_pool(name, fmap))
    torch.testing.assert_close(feats[-1], fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(logits, classifier(name, model)(feats[-1]))
    torch.testing.assert_close(model(image32()), logits)  # is_feat=False gives the same logits


@pytest.mark.parametrize('name', NAMES)
def test_preact_changes_only_the_features(name: str) -> None:
    feats, logits = outputs(name, preact=False)
    pre_feats, pre_logits = outputs(name, preact=True)
    torch.testing.assert_close(pre_logits, logits)
    torch.testing.assert_close(pre_feats[0], feats[0])
    torch.testing.assert_close(pre_feats[-1], feats[-1])


@pytest.mark.parametrize('name', RESNETS + ['ResNet50', 'ShuffleV1'] + VGGS)
def test_preact_is_the_value_before_relu(name: str) -> None:
    feats, _ = outputs(name, preact=False)
    pre_feats, _ = outputs(name, preact=True)
    for post, pre in zip(feats[1:-1], pre_feats[1:-1]):
        torch.testing.assert_close(F.relu(pre), post)
        assert (pre < 0).any()
        assert (post >= 0).all()


def test_shufflev2_preact_is_unshuffled() -> None:
    feats, _ = outputs('ShuffleV2', preact=False)
    pre_feats, _ = outputs('ShuffleV2', preact=True)
    for post, pre in zip(feats[1:-1], pre_feats[1:-1]):
        assert (pre < 0).any()
        torch.testing.assert_close(ShuffleBlock(2)(F.relu(pre)), post)
        assert not torch.equal(F.relu(pre), post)  # the channel order differs


@pytest.mark.parametrize('name', WRNS)
@torch.no_grad()
def test_wrn_features_are_raw_sums_and_preact_is_the_next_bn(name: str) -> None:
    model = built(name)
    feats, _ = outputs(name, preact=False)
    pre_feats, _ = outputs(name, preact=True)
    x = image32()
    torch.testing.assert_close(feats[0], model.conv1(x))
    torch.testing.assert_close(feats[1], model.block1(feats[0]))
    torch.testing.assert_close(feats[3], model.block3(model.block2(feats[1])))
    for f in feats[:4]:
        assert (f < 0).any()  # no BN/ReLU applied
    torch.testing.assert_close(pre_feats[1], model.block2.layer[0].bn1(feats[1]))
    torch.testing.assert_close(pre_feats[2], model.block3.layer[0].bn1(feats[2]))
    torch.testing.assert_close(pre_feats[3], model.bn1(feats[3]))


def test_mobilenetv2_ignores_preact() -> None:
    feats, _ = outputs('MobileNetV2', preact=False)
    pre_feats, _ = outputs('MobileNetV2', preact=True)
    for a, b in zip(feats, pre_feats):
        assert torch.equal(a, b)
    assert (feats[1] < 0).any()  # block outputs end in a linear BN


@torch.no_grad()
def test_blocks_return_plain_tensors_to_hooks() -> None:
    """Forward hooks on a stage's last block see a tensor (the stage output), also with preact=False."""
    model = built('resnet8x4')
    seen = []
    handle = model.layer3[0].register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        feats, _ = model(image32(), is_feat=True)
    finally:
        handle.remove()
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor)
    torch.testing.assert_close(seen[0], feats[3])


# ----------------------------------------------------------------------------- other input sizes

@pytest.mark.parametrize('name', NAMES)
@torch.no_grad()
def test_64x64_with_200_classes(name: str) -> None:
    torch.manual_seed(0)
    model = model_dict[name](num_classes=200).eval()
    feats, logits = model(torch.randn(2, 3, 64, 64), is_feat=True)
    assert logits.shape == (2, 200)
    assert feats[-1].shape[1] == EXPECTED[name][2][-1][0]
    torch.testing.assert_close(logits, classifier(name, model)(feats[-1]))
    if name in VGGS:  # pool3 is applied at 64x64, so block4 also runs at 4x4
        assert [tuple(f.shape[2:]) for f in feats[:-1]] == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    else:  # every map is twice the 32x32 size
        assert [tuple(f.shape[2:]) for f in feats[:-1]] == [(2 * s[1], 2 * s[2]) for s in EXPECTED[name][2][:-1]]


def test_vgg_skips_pool3_only_at_other_heights() -> None:
    with torch.no_grad():
        feats, logits = built('vgg8')(torch.randn(2, 3, 48, 48), is_feat=True)
    assert feats[3].shape[2:] == feats[4].shape[2:] == (6, 6)
    assert logits.shape == (2, 100)


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize('name', NAMES)
@torch.no_grad()
def test_state_dict_round_trip(name: str) -> None:
    source = model_dict[name](num_classes=100)
    for m in source.modules():  # non-default BN statistics, so a load that skips buffers shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    source.eval()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)

    target = model_dict[name](num_classes=100).eval()
    x = image32()
    assert not torch.allclose(target(x), source(x))
    target.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- helper methods

def test_resnet_helpers() -> None:
    model = built('resnet20')
    assert list(model.get_feat_modules()) == [model.conv1, model.bn1, model.relu, model.layer1, model.layer2,
                                              model.layer3]
    bns = model.get_bn_before_relu()
    assert bns == [model.layer1[-1].bn2, model.layer2[-1].bn2, model.layer3[-1].bn2]
    assert bns[0] is model.layer1[-1].bn2


def test_resnet50_helpers() -> None:
    model = built('ResNet50')
    assert list(model.get_feat_modules()) == [model.conv1, model.bn1, model.layer1, model.layer2, model.layer3,
                                              model.layer4]
    assert model.get_bn_before_relu() == [model.layer1[-1].bn3, model.layer2[-1].bn3, model.layer3[-1].bn3,
                                          model.layer4[-1].bn3]


def test_wrn_helpers() -> None:
    model = built('wrn_40_2')
    assert list(model.get_feat_modules()) == [model.conv1, model.block1, model.block2, model.block3]
    assert model.get_bn_before_relu() == [model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1]


def test_vgg_helpers() -> None:
    model = built('vgg13')
    assert list(model.get_feat_modules()) == [model.block0, model.pool0, model.block1, model.pool1, model.block2,
                                              model.pool2, model.block3, model.pool3, model.block4, model.pool4]
    bns = model.get_bn_before_relu()
    assert bns == [model.block1[4], model.block2[4], model.block3[4], model.block4[4]]
    assert all(isinstance(bn, nn.BatchNorm2d) for bn in bns)


def test_mobilenetv2_helpers() -> None:
    model = built('MobileNetV2')
    assert list(model.get_feat_modules()) == [model.conv1, model.blocks]
    bns = model.get_bn_before_relu()
    assert bns == [model.blocks[i][-1].conv[7] for i in (1, 2, 4, 6)]
    assert all(isinstance(bn, nn.BatchNorm2d) for bn in bns)


@pytest.mark.parametrize('name', ['ShuffleV1', 'ShuffleV2'])
def test_shufflenet_helpers(name: str) -> None:
    model = built(name)
    assert list(model.get_feat_modules()) == [model.conv1, model.bn1, model.layer1, model.layer2, model.layer3]
    with pytest.raises(NotImplementedError):
        model.get_bn_before_relu()


# ----------------------------------------------------------------------------- initialisation

def _std(t: torch.Tensor) -> float:
    return t.float().std().item()


def _assert_fan_out_normal(conv: nn.Conv2d) -> None:
    """std of the weights is sqrt(2 / fan_out), fan_out = k*k*out (kaiming fan_out / RepDistiller's normal),
    and measurably not sqrt(2 / fan_in): the convs checked here have in != out channels."""
    out_ch, in_ch, kh, kw = conv.weight.shape
    fan_out, fan_in = kh * kw * out_ch, kh * kw * in_ch
    assert fan_in != fan_out
    std = _std(conv.weight)
    assert abs(conv.weight.float().mean().item()) < 0.05 * std
    assert std == pytest.approx((2 / fan_out) ** 0.5, rel=0.03)
    # the two candidates differ by a factor sqrt(out / in) (sqrt(2) or more here), far beyond sampling noise
    assert std != pytest.approx((2 / fan_in) ** 0.5, rel=0.2)


def test_initialisation() -> None:
    # ResNet: kaiming fan_out on convs (std sqrt(2 / (9 * out))), BN 1/0; layer2[0].conv1 is 64 -> 128.
    resnet = built('resnet32x4')
    assert resnet.layer2[0].conv1.weight.shape == (128, 64, 3, 3)
    _assert_fan_out_normal(resnet.layer2[0].conv1)
    _assert_fan_out_normal(built('ResNet50').layer4[0].conv1)          # 1x1, 1024 -> 512 (fan_in > fan_out)
    assert torch.equal(resnet.layer2[0].bn1.weight, torch.ones(128))
    assert torch.equal(resnet.layer2[0].bn1.bias, torch.zeros(128))
    # WRN: conv normal(0, sqrt(2 / (k*k*out))), Linear bias zeroed; block3.layer[0].conv1 is 64 -> 128.
    wrn = built('wrn_40_2')
    _assert_fan_out_normal(wrn.block3.layer[0].conv1)
    assert torch.equal(wrn.fc.bias, torch.zeros(100))
    # VGG and MobileNetV2: conv normal(0, sqrt(2 / (k*k*out))); Linear normal(0, 0.01) with zero bias;
    # VGG conv bias zero.
    vgg = built('vgg13')
    _assert_fan_out_normal(vgg.block2[0])                               # 128 -> 256
    assert _std(vgg.classifier.weight) == pytest.approx(0.01, rel=0.05)
    assert torch.equal(vgg.classifier.bias, torch.zeros(100))
    assert torch.equal(vgg.block2[0].bias, torch.zeros(256))
    mobile = built('MobileNetV2')
    assert _std(mobile.classifier[0].weight) == pytest.approx(0.01, rel=0.05)
    _assert_fan_out_normal(mobile.conv2[0])                             # 1x1, 160 -> 1280
    # ShuffleNets keep PyTorch's defaults (Linear bias uniform, not zero).
    assert built('ShuffleV1').linear.bias.abs().sum() > 0
    assert built('ShuffleV2').linear.bias.abs().sum() > 0


# ----------------------------------------------------------------------------- training mode

@pytest.mark.parametrize('name', NAMES)
def test_backward_in_train_mode(name: str) -> None:
    """In-place ReLUs must not break autograd, with either feature flavour."""
    torch.manual_seed(0)
    model = model_dict[name](num_classes=10).train()
    for preact in (False, True):
        model.zero_grad()
        feats, logits = model(image32(), is_feat=True, preact=preact)
        loss = logits.logsumexp(1).mean() + sum(f.pow(2).mean() for f in feats)
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------- unregistered variants

@torch.no_grad()
def test_unregistered_variants_run() -> None:
    from models.resnet import ResNet
    from models.resnetv2 import ResNet18
    from models.vgg import vgg8

    bottleneck = ResNet(29, [16, 16, 32, 64], 'bottleneck', num_classes=10).eval()
    feats, logits = bottleneck(image32(), is_feat=True, preact=True)
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)]
    assert bottleneck.get_bn_before_relu()[2] is bottleneck.layer3[-1].bn3

    resnet18 = ResNet18(num_classes=10).eval()
    feats, logits = resnet18(image32(), is_feat=True)
    assert feats[-1].shape == (2, 512) and logits.shape == (2, 10)
    assert resnet18.get_bn_before_relu()[0] is resnet18.layer1[-1].bn2

    plain_vgg = vgg8(num_classes=10).eval()  # no BN: each block ends with its conv
    assert isinstance(plain_vgg.block1[-1], nn.Conv2d)
    assert plain_vgg(image32()).shape == (2, 10)


# ---------------------------------------------------------------------------------------------- model facts

@pytest.mark.parametrize('name', sorted(MODEL_FACTS))
def test_the_classifier_reads_exactly_the_pooled_map(name):
    """``pooled_map`` is the map the classifier pools: classifier(avgpool(map)) equals the logits (eval mode)."""
    torch.manual_seed(0)
    facts = model_facts(name)
    model = facts.build(num_classes=10).eval()
    for module in model.modules():      # non-trivial BN statistics, so a wrong BN/ReLU placement shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), tap(model, {'map': facts.pooled_map}) as maps:
        logits = model(x)
        recomputed = model.get_submodule(facts.classifier)(maps['map'].mean(dim=(2, 3)))
    assert maps['map'].dim() == 4
    torch.testing.assert_close(recomputed, logits, rtol=1e-5, atol=1e-5)


def test_wrn_pooled_map_is_after_the_final_bn_and_relu_not_feat_minus_2():
    torch.manual_seed(0)
    model = create_model('wrn_16_2', 10).eval()
    model.bn1.running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), tap(model, {'map': model_facts('wrn_16_2').pooled_map}) as maps:
        feats, _ = model(x, is_feat=True)
    torch.testing.assert_close(maps['map'], torch.relu(model.bn1(feats[-2])))
    assert not torch.allclose(maps['map'], feats[-2])


def test_facts_records_cover_the_zoo_and_name_real_modules():
    assert set(MODEL_FACTS) == set(model_dict)
    for name, facts in MODEL_FACTS.items():
        model = facts.build(num_classes=10)
        assert isinstance(model.get_submodule(facts.classifier), torch.nn.Linear), name
        for site in (facts.pooled_map, facts.last_stage_first_block):
            model.get_submodule(site.module)
    assert {n for n, f in MODEL_FACTS.items() if f.low_lr} == {'MobileNetV2', 'ShuffleV1', 'ShuffleV2'}
    assert feature_channels('resnet20') == (16, 16, 32, 64)
