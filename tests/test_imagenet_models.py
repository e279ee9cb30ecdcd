"""ImageNet models of Table 2 (models/imagenet.py): torchvision compatibility of the ResNets (keys,
shapes, parameter counts, initialisation, strict loading, identical logits), the MobileNetV1 layout,
and the zoo's feature-list convention (shapes and strides, preact, pooling, helper methods, gradients).

torchvision models are built with ``weights=None`` (random init, nothing downloaded).
"""
from __future__ import annotations

import functools
from typing import Callable, Iterator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from models.imagenet import IMAGENET_MODELS
from models.mobilenetv1 import MobileNetV1
from models.resnet_imagenet import ImageNetResNet
from tests.fixtures_data import one_intra_op_thread

RESNETS = ['ResNet18', 'ResNet34', 'ResNet50']
NAMES = RESNETS + ['MobileNetV1']
TORCHVISION: dict[str, Callable[..., nn.Module]] = {
    'ResNet18': torchvision.models.resnet18,
    'ResNet34': torchvision.models.resnet34,
    'ResNet50': torchvision.models.resnet50,
}
PARAMS_1000 = {'ResNet18': 11_689_512, 'ResNet34': 21_797_672, 'ResNet50': 25_557_032,
               'MobileNetV1': 4_231_976}
# (channels, spatial stride) of every spatial feature; the last entry of feats is the pooled vector
FEAT_LAYOUT: dict[str, list[tuple[int, int]]] = {
    'ResNet18': [(64, 2), (64, 4), (128, 8), (256, 16), (512, 32)],
    'ResNet34': [(64, 2), (64, 4), (128, 8), (256, 16), (512, 32)],
    'ResNet50': [(64, 2), (256, 4), (512, 8), (1024, 16), (2048, 32)],
    'MobileNetV1': [(128, 4), (256, 8), (512, 16), (1024, 32)],
}
# proposed letKD places: (intermediate = first block of the last stage, penultimate = last map before pooling)
LETKD_SITES = {'ResNet18': ('layer4.0', 'layer4'), 'ResNet34': ('layer4.0', 'layer4'),
               'ResNet50': ('layer4.0', 'layer4'), 'MobileNetV1': ('model.12', 'model.13')}


@pytest.fixture(scope='module', autouse=True)
def single_thread_and_cleanup() -> Iterator[None]:
    """One intra-op thread (shared CPUs); drop the cached models afterwards."""
    with one_intra_op_thread():
        yield
    ours.cache_clear()
    outputs.cache_clear()


@functools.cache
def ours(name: str) -> nn.Module:
    """One shared eval-mode instance per model (1000 classes, seed 0); tests must not modify it."""
    torch.manual_seed(0)
    return IMAGENET_MODELS[name]().eval()


def image(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))


@functools.cache
@torch.no_grad()
def outputs(name: str, preact: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    feats, logits = ours(name)(image(64), is_feat=True, preact=preact)
    return list(feats), logits


def randomise_bn(model: nn.Module, seed: int) -> None:
    """Give every BN non-trivial affine parameters and running statistics (fresh ones are identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


# ------------------------------------------------------------------------- registry and counts

def test_registry_names_and_num_classes() -> None:
    assert list(IMAGENET_MODELS) == NAMES
    assert isinstance(IMAGENET_MODELS['ResNet50'](num_classes=7), ImageNetResNet)
    small = IMAGENET_MODELS['MobileNetV1'](num_classes=7).eval()
    assert isinstance(small, MobileNetV1) and small.fc.out_features == 7
    assert small(image(32, batch=1)).shape == (1, 7)


@pytest.mark.parametrize('name', NAMES)
def test_parameter_counts(name: str) -> None:
    assert sum(p.numel() for p in ours(name).parameters()) == PARAMS_1000[name]


@pytest.mark.parametrize('name', RESNETS)
def test_resnet_state_dict_and_init_equal_torchvision(name: str) -> None:
    """Same keys in the same order, same shapes, same parameter count; and with the same seed the
    very same initial tensors (so the initialisation is torchvision's, fc included)."""
    torch.manual_seed(0)
    reference = TORCHVISION[name](weights=None)
    ref_sd, our_sd = reference.state_dict(), ours(name).state_dict()
    assert list(our_sd) == list(ref_sd)
    assert {k: v.shape for k, v in our_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    assert sum(p.numel() for p in reference.parameters()) == PARAMS_1000[name]
    for key, value in ref_sd.items():
        assert torch.equal(our_sd[key], value), key
    # the initialisation itself: BN 1/0, conv std close to kaiming fan_out's sqrt(2 / (k*k*out))
    conv = ours(name).layer3[0].conv1
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.05)
    bns = [m for m in ours(name).modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(b.weight, torch.ones_like(b.weight)) and not b.bias.any() for b in bns)


@pytest.mark.parametrize('name', RESNETS)
@torch.no_grad()
def test_torchvision_weights_load_strictly_and_give_the_same_outputs(name: str) -> None:
    """A torchvision state_dict (random, with non-trivial BN) loads with strict=True; logits and the
    stage outputs are identical in eval mode, i.e. the forward is the same computation."""
    torch.manual_seed(1)
    reference = TORCHVISION[name](weights=None)
    randomise_bn(reference, seed=2)
    reference.eval()
    model = IMAGENET_MODELS[name]()
    model.load_state_dict(reference.state_dict(), strict=True)
    model.eval()

    stage_outputs: list[torch.Tensor] = []
    hooks = [getattr(reference, f'layer{i}').register_forward_hook(
        lambda _m, _a, out: stage_outputs.append(out)) for i in range(1, 5)]
    x = image(64)
    expected = reference(x)
    for h in hooks:
        h.remove()
    feats, logits = model(x, is_feat=True)
    assert logits.std() > 0.01
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    for ours_f, ref_f in zip(feats[1:5], stage_outputs):
        torch.testing.assert_close(ours_f, ref_f, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ MobileNetV1

def test_mobilenetv1_layout() -> None:
    model = ours('MobileNetV1')
    sd = model.state_dict()
    assert len(sd) == 164
    assert sd['model.0.0.weight'].shape == (32, 3, 3, 3)
    assert sd['model.1.0.weight'].shape == (32, 1, 3, 3)       # depthwise
    assert sd['model.1.3.weight'].shape == (64, 32, 1, 1)      # pointwise
    assert sd['model.3.3.weight'].shape == (128, 128, 1, 1)
    assert sd['model.13.4.running_var'].shape == (1024,)
    assert sd['fc.weight'].shape == (1000, 1024) and sd['fc.bias'].shape == (1000,)
    assert not any(k.startswith('model.14.') for k in sd)
    strides = [unit[0].stride[0] for unit in model.model[:14]]
    assert strides == [2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
    widths = [unit[-2].num_features for unit in model.model[:14]]
    assert widths == [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    assert all(model.model[i][0].groups == model.model[i][0].in_channels for i in range(1, 14))


# ----------------------------------------------------------------------------------- feature lists

@pytest.mark.parametrize('name', NAMES)
def test_feature_shapes_and_strides_at_64(name: str) -> None:
    feats, logits = outputs(name, False)
    layout = FEAT_LAYOUT[name]
    assert len(feats) == len(layout) + 1
    for f, (channels, stride) in zip(feats, layout):
        assert f.shape == (2, channels, 64 // stride, 64 // stride)
    assert feats[-1].shape == (2, layout[-1][0])
    assert logits.shape == (2, 1000)


@pytest.mark.parametrize('name', ['ResNet18', 'MobileNetV1'])
@torch.no_grad()
def test_feature_shapes_at_224(name: str) -> None:
    feats, logits = ours(name)(image(224, batch=1), is_feat=True)
    shapes = [tuple(f.shape[1:]) for f in feats]
    assert shapes == [(c, 224 // s, 224 // s) for c, s in FEAT_LAYOUT[name]] + [(FEAT_LAYOUT[name][-1][0],)]
    assert feats[-2].shape[-1] == 7 and logits.shape == (1, 1000)


@pytest.mark.parametrize('name', NAMES)
@torch.no_grad()
def test_last_features_feed_pooling_and_classifier(name: str) -> None:
    """feats[-1] is the global average of feats[-2], and fc(feats[-1]) are the logits."""
    feats, logits = outputs(name, False)
    torch.testing.assert_close(feats[-1], F.adaptive_avg_pool2d(feats[-2], 1).flatten(1))
    torch.testing.assert_close(ours(name).fc(feats[-1]), logits)
    torch.testing.assert_close(ours(name)(image(64)), logits)


@pytest.mark.parametrize('name', NAMES)
def test_preact_features_differ_only_by_the_relu(name: str) -> None:
    post, logits = outputs(name, False)
    pre, pre_logits = outputs(name, True)
    torch.testing.assert_close(pre_logits, logits)
    torch.testing.assert_close(pre[-1], post[-1])
    stage_idx = range(1, 5) if name in RESNETS else range(4)
    if name in RESNETS:
        torch.testing.assert_close(pre[0], post[0])     # the stem feature has no preact flavour
    for i in stage_idx:
        assert (pre[i] < 0).any(), i                      # really before the ReLU
        torch.testing.assert_close(F.relu(pre[i]), post[i])


@pytest.mark.parametrize('name', NAMES)
@torch.no_grad()
def test_bn_before_relu_feeds_the_preact_features(name: str) -> None:
    """get_bn_before_relu()[i] is the BN whose output (plus the identity shortcut, for a ResNet) is
    the i-th preact stage feature."""
    model = ours(name)
    bns = model.get_bn_before_relu()
    assert len(bns) == 4 and all(isinstance(b, nn.BatchNorm2d) for b in bns)
    bn_out: dict[int, torch.Tensor] = {}
    block_in: dict[int, torch.Tensor] = {}
    hooks = [bn.register_forward_hook(lambda _m, _a, out, i=i: bn_out.__setitem__(i, out.clone()))
             for i, bn in enumerate(bns)]
    if name in RESNETS:
        stages = [model.layer1, model.layer2, model.layer3, model.layer4]
        # the input of each stage's last block = the output of the block before it
        hooks += [s[-2].register_forward_hook(lambda _m, _a, out, i=i: block_in.__setitem__(i, out))
                  for i, s in enumerate(stages)]
    pre, _ = model(image(64), is_feat=True, preact=True)
    for h in hooks:
        h.remove()
    offset = 1 if name in RESNETS else 0
    for i in range(4):
        shortcut = block_in[i] if name in RESNETS else 0.0   # last blocks have no downsample
        torch.testing.assert_close(bn_out[i] + shortcut, pre[offset + i])


@pytest.mark.parametrize('name', NAMES)
def test_feat_modules_hold_every_parameter_but_the_classifier(name: str) -> None:
    model = ours(name)
    feat_params = {id(p) for p in model.get_feat_modules().parameters()}
    fc_params = {id(p) for p in model.fc.parameters()}
    assert feat_params.isdisjoint(fc_params)
    assert feat_params | fc_params == {id(p) for p in model.parameters()}


@pytest.mark.parametrize('name', NAMES)
@torch.no_grad()
def test_letkd_sites_exist_and_penultimate_is_the_pooled_map(name: str) -> None:
    """The proposed KD-layer places are submodules; the penultimate one outputs feats[-2] and the
    intermediate one a map of the same size (first block of the last stage)."""
    model = ours(name)
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = [modules[site].register_forward_hook(lambda _m, _a, out, s=site: seen.__setitem__(s, out))
             for site in LETKD_SITES[name]]
    feats, _ = model(image(64), is_feat=True)
    for h in hooks:
        h.remove()
    inter, penult = LETKD_SITES[name]
    torch.testing.assert_close(seen[penult], feats[-2])
    assert seen[inter].shape == feats[-2].shape


@pytest.mark.parametrize('name', ['ResNet18', 'ResNet50', 'MobileNetV1'])
def test_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(3)
    model = IMAGENET_MODELS[name](num_classes=10).train()
    feats, logits = model(image(32), is_feat=True, preact=True)
    loss = F.cross_entropy(logits, torch.tensor([1, 2])) + sum(f.pow(2).mean() for f in feats)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
