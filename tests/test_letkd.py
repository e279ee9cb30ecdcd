"""letKD-1/2 and QUEST: the KD layer, teacher targets and losses on hand-computed inputs, the insertion
places of every Table-1 pair, gradients, metrics and the deployed student (random quantizer tensors here;
the offline step is tested in test_letkd_offline.py)."""
import copy
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn as nn

from distiller_zoo import ALIASES, DISTILLERS, build_distiller, canonical_name, load_deployed
from distiller_zoo.letkd import CosineConv1x1, KDLayer, LetKDStudent, SubclassQuantizer, position_kl
from helper.errors import UserError
from helper.letkd_offline import codebook_targets, flatten_positions, kd_sites
from helper.util import count_params, save_checkpoint
from models import Site, create_model, model_dict, model_facts, site_shapes, tap
from tests.fixtures_data import load_random_quantizers, train_on_fixed_batch
from tests.options import data_info, student_options


def opt(distill='letkd2', **kw):
    base = dict(gamma=1.0, alpha=0.0, beta=1.0, kd_T=4.0, k_penult=16, k_inter=2, lda_dim=60, alpha_penult=None,
                alpha_inter=None, letkd_tau=1.0, quest_tau=5.0, quantizer_seed=0, max_positions=10 ** 6,
                dataset='cifar100', path_t=None, model_s='resnet8', model_t='resnet8')
    base.update(kw)
    return student_options(distill, **base)


def info(num_classes=100, image_size=32):
    return data_info(num_classes=num_classes, image_size=image_size)


def make(method, model_t='resnet8', model_s='resnet8', num_classes=100, **kw):
    torch.manual_seed(0)
    o = opt(method, model_t=model_t, model_s=model_s, **kw)
    d = build_distiller(method, create_model(model_s, num_classes), create_model(model_t, num_classes), o,
                        info(num_classes))
    load_random_quantizers(d)
    return d


def cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------------------------------------- the layer

@pytest.mark.parametrize('c_in, c_out', [(3, 4), (5, 2)])      # both sides of the normalisation shortcut
def test_cosine_conv_is_scale_times_cosine(c_in, c_out):
    torch.manual_seed(0)
    conv = CosineConv1x1(c_in, c_out, scale=2.5)
    assert {n: tuple(p.shape) for n, p in conv.named_parameters()} == {'weight': (c_out, c_in, 1, 1), 'scale': (1,)}
    x = torch.randn(2, c_in, 2, 3)
    out = conv(x).detach().numpy()
    xs, w = x.numpy(), conv.weight.detach().numpy()[:, :, 0, 0]
    for b in range(2):
        for k in range(c_out):
            for i in range(2):
                for j in range(3):
                    assert out[b, k, i, j] == pytest.approx(2.5 * cosine(xs[b, :, i, j], w[k]), abs=1e-5)
    # a zero position gives 0, not NaN (eps 1e-12)
    assert torch.equal(conv(torch.zeros(1, c_in, 1, 1)), torch.zeros(1, c_out, 1, 1))


def test_kd_layer_parameters_and_initial_scales():
    layer = KDLayer(6, 5)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {'predictor.weight': (5, 6, 1, 1), 'predictor.scale': (1,), 'bn.weight': (5,), 'bn.bias': (5,),
                      'value.weight': (6, 5, 1, 1), 'value.scale': (1,)}
    assert layer.predictor.scale.item() == 3.0 and layer.value.scale.item() == 1.0 and layer.alpha == 1.0
    assert isinstance(layer.bn, nn.BatchNorm2d) and layer.bn.eps == 1e-5 and layer.bn.momentum == 0.1
    assert count_params(layer) == 2 * 5 * 6 + 2 * 5 + 2


def test_kd_layer_adds_alpha_times_the_value_vector():
    torch.manual_seed(1)
    layer = KDLayer(6, 5, alpha=0.5).eval()
    with torch.no_grad():
        layer.bn.running_mean.uniform_(-1, 1)
        layer.bn.running_var.uniform_(0.5, 2)
        layer.bn.weight.uniform_(0.5, 2)
        layer.bn.bias.uniform_(-0.5, 0.5)
        layer.predictor.scale.fill_(2.0)
        layer.value.scale.fill_(1.5)
    feat = torch.randn(2, 6, 3, 3)
    out, scores = layer(feat)
    assert out.is_contiguous()            # the rest of the network gets the usual NCHW layout
    f = feat.numpy()
    wp, wv = (conv.weight.detach().numpy()[:, :, 0, 0] for conv in (layer.predictor, layer.value))
    bn = {k: getattr(layer.bn, k).detach().numpy() for k in ('running_mean', 'running_var', 'weight', 'bias')}
    for b in range(2):
        for i in range(3):
            for j in range(3):
                s = np.array([2.0 * cosine(f[b, :, i, j], wp[k]) for k in range(5)])
                np.testing.assert_allclose(scores[b, :, i, j].detach().numpy(), s, atol=1e-5)
                p = (s - bn['running_mean']) / np.sqrt(bn['running_var'] + 1e-5) * bn['weight'] + bn['bias']
                p = np.maximum(p, 0)
                v = np.array([1.5 * cosine(p, wv[c]) if p.any() else 0.0 for c in range(6)])
                np.testing.assert_allclose((out - feat)[b, :, i, j].detach().numpy(), 0.5 * v, atol=1e-5)


# ---------------------------------------------------------------------------------------------- targets and loss

def test_codebook_targets_are_softmax_of_minus_tau_squared_distance():
    t = torch.tensor([[0.0, 1.0, 2.0], [1.5, -0.5, 0.0], [0.2, 0.2, 0.2]])
    c = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [2.0, 2.0, 2.0], [0.0, 0.0, 0.0]])
    tau = 0.7
    got = codebook_targets(t, c, tau)
    for n in range(3):
        d = [sum((t[n, i].item() - c[k, i].item()) ** 2 for i in range(3)) for k in range(4)]
        e = [math.exp(-tau * dk) for dk in d]
        for k in range(4):
            assert got[n, k].item() == pytest.approx(e[k] / sum(e), rel=1e-5)
    torch.testing.assert_close(got.sum(1), torch.ones(3))


def test_intermediate_target_uses_the_nearest_centroid_of_the_true_class():
    q = SubclassQuantizer(num_classes=2, k_inter=2, dim=3)
    # z = (t - xbar) @ scalings keeps the first two coordinates minus 1
    scalings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    xbar = torch.tensor([1.0, 1.0, 0.0])
    centroids = torch.tensor([[0.0, 0.0], [10.0, 0.0],     # class 0: sub-classes 0, 1
                              [1.0, 0.0], [5.0, 5.0]])     # class 1: sub-classes 2, 3
    scores = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.0, 1.0, 0.0, 0.0], [0.2, 0.2, 0.6, 0.0], [0.1, 0.3, 0.0, 0.6]])
    q.load({'scalings': scalings, 'xbar': xbar, 'centroids': centroids, 'scores': scores})
    # z = (1.1, 0): globally nearest is sub-class 2 (class 1), but the label is 0 -> sub-class 0
    # z = (9, 1):   globally nearest is sub-class 1 (class 0), but the label is 1 -> sub-class 3 (32 < 65)
    t = torch.tensor([[2.1, 1.0, 7.0], [10.0, 2.0, -3.0]])
    target, chosen = q(t, torch.tensor([0, 1]))
    assert chosen.tolist() == [0, 3]
    torch.testing.assert_close(target, scores[[0, 3]])


def test_position_kl_is_the_mean_of_per_position_kl():
    torch.manual_seed(2)
    scores = torch.randn(2, 3, 2, 2)
    target_map = torch.randn(2, 3, 2, 2).softmax(1)
    got = position_kl(flatten_positions(scores), flatten_positions(target_map)).item()
    total = 0.0
    for b in range(2):
        for i in range(2):
            for j in range(2):
                logq = scores[b, :, i, j].log_softmax(0)
                p = target_map[b, :, i, j]
                total += sum(p[k].item() * (math.log(p[k].item()) - logq[k].item()) for k in range(3))
    assert got == pytest.approx(total / 8, rel=1e-5)


def _pool2(t):
    b, c, h, w = t.shape
    return t.reshape(b, c, h // 2, 2, w // 2, 2).mean((3, 5))


def test_losses_equal_explicit_loops_with_teacher_pooling():
    """resnet8 teacher (8x8 maps) -> vgg8 student (4x4): teacher maps 2x2-average-pooled, targets, KL, -b."""
    d = make('letkd2', 'resnet8', 'vgg8', num_classes=3, beta=0.5, k_penult=5)
    assert d.pool_sizes == {'inter': (4, 4), 'penult': (4, 4)}
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([2, 0])
    _, losses = d.forward_train(x, y)
    with torch.no_grad():
        feats, _ = d.teacher(x, is_feat=True)
    scores = {role: s.detach() for role, s in d.student.scores.items()}
    t = _pool2(feats[3])                      # resnet8: layer3 output = layer3[0] output, (2, 64, 4, 4)
    q_pen, q_int = d.quantizers['penult'], d.quantizers['inter']
    kl_pen = kl_int = 0.0
    for b in range(2):
        for i in range(4):
            for j in range(4):
                tv = t[b, :, i, j].double()
                d2 = ((tv - q_pen.centroids.double()) ** 2).sum(1)
                p = (-d2).softmax(0)
                logq = scores['penult'][b, :, i, j].double().log_softmax(0)
                kl_pen += float((p * ((p + (p == 0)).log() - logq)).sum())
                z = (tv - q_int.xbar.double()) @ q_int.scalings.double()
                own = q_int.centroids.double()[2 * y[b]:2 * y[b] + 2]
                k_star = 2 * y[b].item() + int(((z - own) ** 2).sum(1).argmin())
                p = q_int.scores.double()[k_star]
                logq = scores['inter'][b, :, i, j].double().log_softmax(0)
                kl_int += float((p * ((p + (p == 0)).log() - logq)).sum())
    assert losses['kl_penult'].item() == pytest.approx(0.5 * kl_pen / 32, rel=1e-4)
    assert losses['kl_inter'].item() == pytest.approx(0.5 * kl_int / 32, rel=1e-4)


# ---------------------------------------------------------------------------------------------- places

TABLE1 = {   # (teacher, student): role -> (student C, H, W), (teacher C, H, W) before pooling; letkd-official 1.3 / 2
    ('resnet56', 'resnet20'): {'inter': ((64, 8, 8), (64, 8, 8)), 'penult': ((64, 8, 8), (64, 8, 8))},
    ('resnet110', 'resnet20'): {'inter': ((64, 8, 8), (64, 8, 8)), 'penult': ((64, 8, 8), (64, 8, 8))},
    ('resnet110', 'resnet32'): {'inter': ((64, 8, 8), (64, 8, 8)), 'penult': ((64, 8, 8), (64, 8, 8))},
    ('resnet32x4', 'resnet8x4'): {'inter': ((256, 8, 8), (256, 8, 8)), 'penult': ((256, 8, 8), (256, 8, 8))},
    ('wrn_40_2', 'wrn_16_2'): {'inter': ((128, 8, 8), (128, 8, 8)), 'penult': ((128, 8, 8), (128, 8, 8))},
    ('wrn_40_2', 'wrn_40_1'): {'inter': ((64, 8, 8), (128, 8, 8)), 'penult': ((64, 8, 8), (128, 8, 8))},
    ('resnet32x4', 'ShuffleV1'): {'inter': ((960, 4, 4), (256, 8, 8)), 'penult': ((960, 4, 4), (256, 8, 8))},
    ('resnet32x4', 'ShuffleV2'): {'inter': ((464, 4, 4), (256, 8, 8)), 'penult': ((1024, 4, 4), (256, 8, 8))},
    ('wrn_40_2', 'ShuffleV1'): {'inter': ((960, 4, 4), (128, 8, 8)), 'penult': ((960, 4, 4), (128, 8, 8))},
    ('ResNet50', 'MobileNetV2'): {'inter': ((80, 2, 2), (2048, 4, 4)), 'penult': ((1280, 2, 2), (2048, 4, 4))},
}


# the KD places written out per model: role -> (module name, its input rather than its output); models/facts.py
# must agree, and the tensors the KD layers and the teacher taps get must be those modules' (letkd-official 1.3)
_RESNET = {'inter': ('layer3.0', False), 'penult': ('layer3', False)}
_WRN = {'inter': ('block3.layer.0', False), 'penult': ('relu', False)}
_VGG = {'inter': ('block4.2', False), 'penult': ('pool4', True)}
SITES = {
    'resnet8': _RESNET, 'resnet14': _RESNET, 'resnet20': _RESNET, 'resnet32': _RESNET, 'resnet44': _RESNET,
    'resnet56': _RESNET, 'resnet110': _RESNET, 'resnet8x4': _RESNET, 'resnet32x4': _RESNET,
    'ResNet50': {'inter': ('layer4.0', False), 'penult': ('layer4', False)},
    'wrn_16_1': _WRN, 'wrn_16_2': _WRN, 'wrn_40_1': _WRN, 'wrn_40_2': _WRN,
    'vgg8': {'inter': ('pool4', True), 'penult': ('pool4', True)},
    'vgg11': _VGG, 'vgg13': _VGG, 'vgg16': _VGG, 'vgg19': _VGG,
    'MobileNetV2': {'inter': ('blocks.5.0', False), 'penult': ('conv2', False)},
    'ShuffleV1': {'inter': ('layer3.0', False), 'penult': ('layer3', False)},
    'ShuffleV2': {'inter': ('layer3.0', False), 'penult': ('relu2', False)},
}


def test_kd_sites_are_the_pinned_modules():
    assert set(SITES) == set(model_dict)
    for name, sites in SITES.items():
        expected = {role: Site(module, on_input) for role, (module, on_input) in sites.items()}
        assert model_facts(name).kd_sites == expected and kd_sites(name) == expected, name


@contextmanager
def module_tensors(model, sites, first=False):
    """role -> the output (or first input) of the module named in ``sites``, read by plain torch hooks; with
    ``first`` the hook runs before the module's other hooks (the tensor a KD layer receives, not its F_hat; not
    for vgg8, whose two places are the one input of pool4, which no Table-1 pair uses)."""
    seen, handles = {}, []
    for role, (name, on_input) in sites.items():
        module = model.get_submodule(name)
        if on_input:
            handles.append(module.register_forward_pre_hook(
                lambda m, args, role=role: seen.__setitem__(role, args[0]), prepend=first))
        else:
            handles.append(module.register_forward_hook(
                lambda m, args, out, role=role: seen.__setitem__(role, out), prepend=first))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def avg_pool_to(t, size):
    """Average over the non-overlapping windows that take t (B, C, H, W) to ``size``."""
    b, c, h, w = t.shape
    return t.reshape(b, c, size[0], h // size[0], size[1], w // size[1]).mean((3, 5))


def reached_by(loss, named_params):
    """Names of the parameters that get a non-zero gradient from ``loss`` alone."""
    assert loss.requires_grad, 'the loss carries no graph'
    names = list(named_params)
    grads = torch.autograd.grad(loss, [named_params[n] for n in names], retain_graph=True, allow_unused=True)
    return {n for n, g in zip(names, grads) if g is not None and bool(g.abs().sum() > 0)}


@pytest.mark.parametrize('pair', list(TABLE1), ids=lambda p: f'{p[0]}-{p[1]}')
def test_letkd2_forward_backward_on_every_table1_pair(pair):
    model_t, model_s = pair
    d = make('letkd2', model_t, model_s)
    expected = TABLE1[pair]
    assert d.student_shapes == {role: s for role, (s, _) in expected.items()}
    assert d.teacher_shapes == {role: t for role, (_, t) in expected.items()}
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([5, 99])
    backbone = d.student.backbone
    with module_tensors(backbone, SITES[model_s], first=True) as f_in, module_tensors(backbone, SITES[model_s]) as f_out:
        logits, losses = d.forward_train(x, y)
    assert logits.shape == (2, 100) and list(losses) == ['ce', 'kl_inter', 'kl_penult']
    for role, words in (('inter', 200), ('penult', 16)):
        _, h, w = expected[role][0]
        assert d.student.scores[role].shape == (2, words, h, w)
    # each KD layer reads the output of its pinned module (after the intermediate layer's F_hat) and hands F_hat on
    with torch.no_grad():
        for role, layer in d.student.kd_layers.items():
            torch.testing.assert_close(d.student.scores[role], layer.predictor(f_in[role]))
            torch.testing.assert_close(f_out[role], layer(f_in[role])[0])
    with module_tensors(d.teacher, SITES[model_t]) as t_out:
        maps, _ = d.teacher_maps(x)
    assert {r: tuple(m.shape[1:]) for r, m in maps.items()} == \
        {r: (t[0], *s[1:]) for r, (s, t) in expected.items()}      # teacher channels at the student's size
    for role, m in maps.items():
        assert tuple(t_out[role].shape[1:]) == expected[role][1]
        torch.testing.assert_close(m, avg_pool_to(t_out[role], m.shape[2:]))

    # each KL alone trains its KD layer's predictor (and the backbone below it), never the classifier; the
    # penultimate KL also reaches the whole intermediate KD layer, whose F_hat feeds the penultimate place
    params = dict(d.student.named_parameters())
    kd = {role: {f'kd_layers.{role}.{n}' for n, _ in layer.named_parameters()}
          for role, layer in d.student.kd_layers.items()}
    predictor = {role: {f'kd_layers.{role}.predictor.weight', f'kd_layers.{role}.predictor.scale'} for role in kd}
    classifier = {n for n in params if n.startswith(f'backbone.{model_facts(model_s).classifier}.')}
    stem = next(iter(params))
    assert stem.startswith('backbone.') and classifier
    inter, penult = reached_by(losses['kl_inter'], params), reached_by(losses['kl_penult'], params)
    assert inter & (kd['inter'] | kd['penult']) == predictor['inter'] and stem in inter and not inter & classifier
    assert penult & (kd['inter'] | kd['penult']) == kd['inter'] | predictor['penult']
    assert stem in penult and not penult & classifier
    # CE cannot reach the teacher: it is frozen and its maps carry no graph
    assert not any(p.requires_grad for p in d.teacher.parameters())
    assert not any(m.requires_grad for m in maps.values())
    sum(losses.values()).backward()
    for layer in d.student.kd_layers.values():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    assert all(p.grad is None for p in d.teacher.parameters())
    # the teacher keeps RepDistiller's keys (strict load); its only hooks are the recorder's, attached once at
    # the KD sites (not per step: a compiled step cannot register hooks), and they change none of its outputs
    plain = create_model(model_t, 100)
    plain.load_state_dict(d.teacher.state_dict(), strict=True)
    hooked = {name for name, m in d.teacher.named_modules() if m._forward_hooks or m._forward_pre_hooks}
    assert hooked == {site.module for site in d.teacher_sites.values()}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(d.teacher(x), plain.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize('name', list(model_dict))
def test_every_model_has_places_and_the_penultimate_one_feeds_global_pooling(name):
    model = create_model(name, 10).eval()
    sites = kd_sites(name)
    assert set(model_facts(name).kd_sites) == {'inter', 'penult'}
    shapes = site_shapes(model, sites, 32)
    with torch.no_grad(), tap(model, sites) as maps:
        feats, _ = model(torch.randn(2, 3, 32, 32), is_feat=True)
    torch.testing.assert_close(maps['penult'].mean((2, 3)), feats[-1], rtol=1e-4, atol=1e-5)
    assert shapes['inter'][1] >= shapes['penult'][1]


def test_shufflev2_head_relu_module_keeps_keys_and_outputs():
    model = create_model('ShuffleV2', 100).eval()
    assert isinstance(model.relu2, nn.ReLU) and not any('relu2' in k for k in model.state_dict())
    assert len(model.state_dict()) == 338 and count_params(model) == 1_355_528
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.layer3(model.layer2(model.layer1(torch.relu(model.bn1(model.conv1(x))))))
        head = torch.relu(model.bn2(model.conv2(out)))
        torch.testing.assert_close(model(x), model.linear(head.mean((2, 3))))


def test_resnet8x4_runs_both_layers_on_the_same_tensor_intermediate_first():
    d = make('letkd2', 'resnet32x4', 'resnet8x4', k_penult=4)
    backbone, layers = d.student.backbone, d.student.kd_layers
    x = torch.randn(2, 3, 32, 32)
    d.eval()
    with torch.no_grad():
        # calling layer3[0] goes through its hook, so f is already the intermediate layer's F_hat
        f = backbone.layer3[0](backbone.layer2(backbone.layer1(backbone.relu(backbone.bn1(backbone.conv1(x))))))
        expected = backbone.fc(layers['penult'](f)[0].mean((2, 3)))
        torch.testing.assert_close(d.student(x), expected)


# ---------------------------------------------------------------------------------------------- training behaviour

def test_gradients_reach_student_and_kd_layers_not_teacher_or_quantizers():
    d = make('letkd2')
    _, losses = d.forward_train(torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,)))
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in d.student.parameters())
    assert all(p.grad is None for p in d.teacher.parameters())
    trainable = {id(p) for p in d.trainable_parameters()}
    assert trainable == {id(p) for p in d.student.parameters()}
    quantizer_tensors = list(d.quantizers.buffers())
    # centroids; scalings, xbar, centroids, scores and their rows' negative entropies
    assert len(quantizer_tensors) == 6 and not any(t.requires_grad for t in quantizer_tensors)
    assert not any(k.startswith('quantizers.') for k in d.state_dict())      # non-persistent: not checkpointed


def test_letkd2_loss_decreases_on_a_fixed_batch():
    d = make('letkd2', num_classes=10)
    assert d.kl_weight == 1.0                  # -b 1: the recorded KLs are the unweighted ones
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    history = train_on_fixed_batch(d, x, y)
    first, last = history[0], history[-1]
    assert last['total'] < 0.7 * first['total']
    # not only CE: each KL falls too (15 steps: kl_penult 1.44 -> 0.85, kl_inter 0.106 -> 0.088)
    assert last['kl_penult'] < 0.75 * first['kl_penult']
    assert last['kl_inter'] < 0.9 * first['kl_inter']
    assert all(b['kl_inter'] < a['kl_inter'] for a, b in zip(history, history[1:]))


def test_forward_before_prepare_is_refused():
    torch.manual_seed(0)
    d = build_distiller('letkd1', create_model('resnet8', 10), create_model('resnet8', 10), opt('letkd1'), info(10))
    with pytest.raises(RuntimeError, match='prepare'):
        d.forward_train(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))


def test_epoch_metrics_average_and_reset():
    d = make('letkd1', k_penult=4)
    target = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7]])
    scores = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0], [5.0, 0, 0, 0]])   # 3 of 4 agree
    d._record('penult', torch.tensor(0.3), scores, target, torch.tensor([0, 0, 1, 1]))
    d._record('penult', torch.tensor(0.1), scores[:2], target[:2], torch.tensor([3, 3]))
    m = d.epoch_metrics()
    assert m['kl_penult'] == pytest.approx((0.3 * 4 + 0.1 * 2) / 6)
    assert m['agree_penult'] == pytest.approx((75.0 * 4 + 100.0 * 2) / 6)
    assert m['perplexity_penult'] == pytest.approx((2.0 + 1.0) / 2)      # histograms (1/2, 1/2) and (1)
    assert m['teacher_maxprob_penult'] == pytest.approx(0.7)
    assert d.epoch_metrics() == {}
    d.forward_train(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert set(d.epoch_metrics()) == {'kl_penult', 'agree_penult', 'perplexity_penult', 'teacher_maxprob_penult'}


# ---------------------------------------------------------------------------------------------- deployed student

def test_deployed_letkd_student_counts_and_reloads(tmp_path):
    d = make('letkd2', num_classes=10)
    deployed = d.deployable()
    assert isinstance(deployed, LetKDStudent) and deployed is d.student
    plain = count_params(create_model('resnet8', 10))
    kd = [2 * 16 * 64 + 2 * 16 + 2, 2 * 20 * 64 + 2 * 20 + 2]       # penult K=16; inter 10 classes x 2
    assert count_params(deployed) == plain + sum(kd)
    d.forward_train(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))   # moves BN statistics
    path = tmp_path / 'ckpt.pth'
    save_checkpoint({'model': deployed.state_dict(), 'deploy': d.deploy_spec()}, path)
    rebuilt = load_deployed(path)
    x = torch.randn(3, 3, 32, 32)
    deployed.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), deployed(x), rtol=0, atol=0)
    assert isinstance(rebuilt, LetKDStudent) and set(rebuilt.kd_layers) == {'inter', 'penult'}
    assert all(k.startswith(('backbone.', 'kd_layers.')) for k in rebuilt.state_dict())
    with pytest.raises(ValueError, match='pre-activation'):
        deployed(x, is_feat=True, preact=True)


def test_published_kd_layer_parameter_counts():
    """letkd-official 1.4: resnet20 + 0.532 M (letKD-1) / + 0.636 M (letKD-2) at K 4096 / 100 x 8."""
    backbone = count_params(create_model('resnet20', 100))
    one = LetKDStudent(create_model('resnet20', 100), 'resnet20', {'penult': KDLayer(64, 4096)})
    two = LetKDStudent(create_model('resnet20', 100), 'resnet20',
                       {'inter': KDLayer(64, 800), 'penult': KDLayer(64, 4096)})
    assert count_params(one) - backbone == 532_482
    assert count_params(two) - backbone == 636_484


def test_deepcopy_of_the_deployed_student_uses_its_own_kd_layers():
    d = make('letkd1', num_classes=10)
    d.eval()
    twin = copy.deepcopy(d.student)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = d.student(x)
        torch.testing.assert_close(twin(x), before)
        twin.kd_layers['penult'].alpha = 0.0
        assert not torch.allclose(twin(x), before)
        torch.testing.assert_close(d.student(x), before)


# ---------------------------------------------------------------------------------------------- options

def test_names_defaults_and_alphas():
    assert canonical_name('letkd') == 'letkd2' and ALIASES['letkd'] == 'letkd2'
    for method in ('letkd1', 'letkd2', 'quest'):
        assert DISTILLERS[method].default_weights == (1.0, 0.0, 1.0)
    o = opt('letkd2', model_t='ResNet50', model_s='MobileNetV2')
    d = build_distiller('letkd2', create_model('MobileNetV2', 100), create_model('ResNet50', 100), o, info(100))
    assert (o.alpha_penult, o.alpha_inter) == (0.1, 0.2)
    assert d.student.kd_layers['penult'].alpha == 0.1 and d.student.kd_layers['inter'].alpha == 0.2
    o = opt('letkd2', model_t='ResNet50', model_s='MobileNetV2', dataset='tinyimagenet', alpha_penult=0.3)
    d = build_distiller('letkd2', create_model('MobileNetV2', 200), create_model('ResNet50', 200), o, info(200))
    assert (o.alpha_penult, o.alpha_inter) == (0.3, 1.0)
    o = opt('letkd1')
    build_distiller('letkd1', create_model('resnet8', 100), create_model('resnet8', 100), o, info(100))
    assert o.alpha_penult == 1.0


@pytest.mark.parametrize('method', ['letkd1', 'quest'])
def test_incompatible_pairs_and_flags_are_user_errors(method):
    with pytest.raises(UserError, match='smaller'):
        build_distiller(method, create_model('resnet8', 10), create_model('MobileNetV2', 10),
                        opt(method, model_t='MobileNetV2'), info(10))
    with pytest.raises(UserError, match='k_penult'):
        opt(method, k_penult=0)
    with pytest.raises(UserError, match='KD-layer places'):
        kd_sites('nope')


# ---------------------------------------------------------------------------------------------- QUEST

def test_quest_keeps_the_student_plain_and_uses_tau_5():
    d = make('quest', num_classes=10)
    assert d.deployable() is d.student and count_params(d.student) == count_params(create_model('resnet8', 10))
    assert d.quantizers['penult'].tau == 5.0 and d.predictor.scale.item() == 3.0
    d.eval()       # BN in eval mode so two forwards agree
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    with torch.no_grad():
        s, t = d.student, d.teacher
        f = s.layer3(s.layer2(s.layer1(s.relu(s.bn1(s.conv1(x))))))          # (2, 64, 8, 8), both
        t_map = t.layer3(t.layer2(t.layer1(t.relu(t.bn1(t.conv1(x))))))
    # a codebook around the teacher's rows (offsets of one norm in their span), so that the targets at tau 5
    # are soft (random centroids give one-hot targets, the same for any tau)
    rows = t_map.permute(0, 2, 3, 1).reshape(-1, 64).double()
    offsets = torch.randn(16, 128, generator=torch.Generator().manual_seed(3), dtype=torch.float64) @ (rows - rows.mean(0))
    radius = (rows - rows.mean(0)).norm(dim=1).mean()
    centroids = rows.mean(0) + offsets / offsets.norm(dim=1, keepdim=True) * 3.0 / (5.0 * radius)
    d.quantizers['penult'].load({'centroids': centroids.float()})
    centroids = d.quantizers['penult'].centroids.double()
    logits, losses = d.forward_train(x, y)
    with torch.no_grad():
        torch.testing.assert_close(logits, d.student(x))          # features are not modified
    # per image and position: predictor scores = scale * cosine with each word; target = softmax over the
    # centroids of -5 * squared distance; KL(target || softmax(scores)); mean over the 128 positions
    words = d.predictor.weight.detach()[:, :, 0, 0].double()
    scale = d.predictor.scale.item()
    kl = maxprob = 0.0
    for b in range(2):
        for i in range(8):
            for j in range(8):
                fv, tv = f[b, :, i, j].double(), t_map[b, :, i, j].double()
                scores = torch.stack([scale * (fv @ words[k]) / (fv.norm() * words[k].norm()) for k in range(16)])
                d2 = torch.stack([((tv - centroids[k]) ** 2).sum() for k in range(16)])
                p = torch.exp(-5.0 * (d2 - d2.min()))
                p = p / p.sum()
                kl += float((p * ((p + (p == 0)).log() - scores.log_softmax(0))).sum())
                maxprob += float(p.max()) / 128
    assert 0.2 < maxprob < 0.9, maxprob
    assert list(losses) == ['ce', 'kl_penult']
    assert losses['kl_penult'].item() == pytest.approx(kl / 128, rel=1e-4)
    d.train()
    _, losses = d.forward_train(x, y)
    sum(losses.values()).backward()
    assert d.predictor.weight.grad is not None and all(p.grad is not None for p in d.student.parameters())
    assert all(p.grad is None for p in d.teacher.parameters())
    assert d.deploy_spec()['kind'] == 'plain'
