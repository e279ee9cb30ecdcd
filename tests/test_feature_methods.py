"""RepDistiller's feature-based methods: criteria on hand-computed inputs, the Distillers on real model
pairs (construction, refusals, gradients, optimisation, the AB/FT/FSP init stage) and one CLI epoch each."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import train_student
from dataset import DataBundle
from distiller_zoo import DISTILLERS, build_distiller
from distiller_zoo.AB import ABLoss
from distiller_zoo.AT import Attention
from distiller_zoo.CC import Correlation
from distiller_zoo.FitNet import HintLoss
from distiller_zoo.FSP import FSP
from distiller_zoo.FT import FactorTransfer
from distiller_zoo.KDSVD import KDSVD
from distiller_zoo.NST import NSTLoss
from distiller_zoo.PKT import PKT
from distiller_zoo.RKD import RKDLoss
from distiller_zoo.SP import Similarity
from distiller_zoo.VID import VIDLoss
from helper.errors import UserError
from models import create_model
from models.util import Connector, ConvReg, Embed, LinearEmbed, Paraphraser, Translator
from tests.options import data_info, student_options
from tests.fixtures_data import one_intra_op_thread

METHODS = ['hint', 'attention', 'similarity', 'correlation', 'vid', 'rkd', 'pkt', 'abound', 'factor', 'fsp', 'nst',
           'kdsvd']
INIT_ONLY = {'abound', 'fsp'}                      # no main-stage loss
WITH_INIT = {'abound', 'factor', 'fsp'}
PUBLISHED_BETA = {'hint': 100, 'attention': 1000, 'similarity': 3000, 'correlation': 0.02, 'vid': 1, 'rkd': 1,
                  'pkt': 30000, 'abound': 1, 'factor': 200, 'fsp': 50, 'nst': 50, 'kdsvd': 1}
PAIRS = [('resnet56', 'resnet20'), ('wrn_40_2', 'wrn_16_2'), ('resnet32x4', 'ShuffleV1')]
EQUAL_CHANNELS_ONLY = {'fsp', 'kdsvd'}


def make_opt(distill='hint', model_s='resnet8', **kw):
    base = dict(model_s=model_s, gamma=1.0, alpha=0.0, beta=1.0, kd_T=4.0, hint_layer=2, feat_dim=128,
                init_epochs=1, learning_rate=0.05, momentum=0.9, weight_decay=5e-4, seed=0)
    base.update(kw)
    return student_options(distill, **base)


def make_info(num_classes=10, image_size=32):
    return data_info(num_classes=num_classes, image_size=image_size)


def init_learning_rate(opt):
    """The init stage's learning rate of the method named by ``opt.distill``."""
    return DISTILLERS[opt.distill].init_learning_rate(opt)


def build(method, teacher_name, student_name, num_classes=10, **kw):
    torch.manual_seed(0)
    student, teacher = create_model(student_name, num_classes), create_model(teacher_name, num_classes)
    return build_distiller(method, student, teacher, make_opt(method, student_name, **kw), make_info(num_classes))


def smooth_l1(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# ----------------------------------------------------------------------------------------- criteria, by hand

def test_hint_loss_is_the_elementwise_mean_squared_error():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 2.0], [5.0, 1.0]])
    assert HintLoss()(a, b).item() == pytest.approx((1 + 0 + 4 + 9) / 4)


def test_attention_on_a_2x2_map():
    f_s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    f_t = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    a_s = [v / math.sqrt(1 + 16 + 81 + 256) for v in (1, 4, 9, 16)]      # squares, L2-normalised
    a_t = [v / math.sqrt(2) for v in (1, 0, 0, 1)]
    expected = sum((s - t) ** 2 for s, t in zip(a_s, a_t)) / 4
    (loss,) = Attention(p=2)([f_s], [f_t])
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_attention_averages_channels_pools_the_larger_map_and_truncates_the_lists():
    f_s = torch.arange(16.0).view(1, 1, 4, 4)                            # pooled to 2x2 block means
    pooled = [sum(f_s[0, 0, 2 * i + a, 2 * j + b].item() for a in (0, 1) for b in (0, 1)) / 4
              for i in (0, 1) for j in (0, 1)]
    f_t = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]], [[3.0, 0.0], [0.0, 1.0]]]])  # two channels
    t_map = [(1 + 9) / 2, (4 + 0) / 2, 0.0, (1 + 1) / 2]
    a_s = [v * v / math.sqrt(sum(u ** 4 for u in pooled)) for v in pooled]
    a_t = [v / math.sqrt(sum(u * u for u in t_map)) for v in t_map]
    expected = sum((s - t) ** 2 for s, t in zip(a_s, a_t)) / 4
    losses = Attention()([f_s, f_s, f_s], [f_t, f_t])
    assert len(losses) == 2
    assert losses[0].item() == pytest.approx(expected, rel=1e-6)


def test_similarity_gram_matrices_by_hand():
    f_s = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).view(2, 2, 1, 1)
    f_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 1, 2, 1)
    g_s = [[1 / math.sqrt(2), 1 / math.sqrt(2)], [1 / math.sqrt(5), 2 / math.sqrt(5)]]  # F F^T, rows normalised
    g_t = [[1.0, 0.0], [0.0, 1.0]]
    expected = sum((g_t[i][j] - g_s[i][j]) ** 2 for i in range(2) for j in range(2)) / 4
    (loss,) = Similarity()([f_s], [f_t])
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_correlation_multiplies_gaps_of_consecutive_samples():
    f_s = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
    f_t = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    d = [[1, 2], [1, 1], [2, 2]]                                         # |f_s - f_t|
    expected = ((d[0][0] * d[1][0] + d[0][1] * d[1][1]) + (d[1][0] * d[2][0] + d[1][1] * d[2][1])) / 2
    assert Correlation()(f_s, f_t).item() == pytest.approx(expected)


def test_vid_starts_at_variance_5_and_matches_the_gaussian_nll():
    vid = VIDLoss(1, 1, 1)
    assert [k for k in vid.state_dict()] == ['log_scale', 'regressor.0.weight', 'regressor.2.weight',
                                            'regressor.4.weight']
    assert vid.log_scale.item() == pytest.approx(4.993226, abs=1e-5)
    assert (F.softplus(vid.log_scale) + 1e-5).item() == pytest.approx(5.0, abs=1e-5)
    with torch.no_grad():
        for i in (0, 2, 4):
            vid.regressor[i].weight.fill_(1.0)                           # mu = relu(relu(x)) = x for x > 0
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    t = torch.tensor([0.0, 2.0, 5.0, 4.0]).view(1, 1, 2, 2)
    expected = sum(0.5 * ((a - b) ** 2 / 5.0 + math.log(5.0)) for a, b in zip([1, 2, 3, 4], [0, 2, 5, 4])) / 4
    assert vid(x, t).item() == pytest.approx(expected, rel=1e-5)
    # a larger student map is pooled to the teacher's size first: the mean of (1, 2, 3, 4) is 2.5
    expected_pooled = 0.5 * ((2.5 - 1.0) ** 2 / 5.0 + math.log(5.0))
    assert vid(x, torch.ones(1, 1, 1, 1)).item() == pytest.approx(expected_pooled, rel=1e-5)


def _rkd_by_loops(s, t):
    def dists(x):
        n = len(x)
        d = [[math.dist(x[i], x[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
        mean = sum(v for row in d for v in row if v > 0) / sum(1 for row in d for v in row if v > 0)
        return [[v / mean for v in row] for row in d]

    def unit(a, b):
        diff = [q - p for p, q in zip(a, b)]
        norm = math.sqrt(sum(v * v for v in diff))
        return [v / norm for v in diff] if norm > 0 else [0.0] * len(diff)

    def angles(x):
        n = len(x)
        return [sum(a * b for a, b in zip(unit(x[i], x[j]), unit(x[i], x[k])))
                for i in range(n) for j in range(n) for k in range(n)]

    ds, dt = dists(s), dists(t)
    loss_d = sum(smooth_l1(ds[i][j] - dt[i][j]) for i in range(len(s)) for j in range(len(s))) / len(s) ** 2
    a_s, a_t = angles(s), angles(t)
    loss_a = sum(smooth_l1(a - b) for a, b in zip(a_s, a_t)) / len(a_s)
    return 25 * loss_d + 50 * loss_a


def test_rkd_distance_and_angle_terms_by_loops():
    s = [[0.0, 0.0], [3.0, 0.0], [0.0, 1.0]]
    t = [[1.0, 1.0], [2.0, 3.0], [-1.0, 0.0]]
    loss = RKDLoss(w_d=25, w_a=50)(torch.tensor(s), torch.tensor(t))
    assert loss.item() == pytest.approx(_rkd_by_loops(s, t), rel=1e-5)
    assert RKDLoss()(torch.tensor(t), torch.tensor(t)).item() == pytest.approx(0.0, abs=1e-6)


def test_pkt_kl_of_cosine_distributions_by_loops():
    s = [[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]
    t = [[1.0, 1.0], [-1.0, 1.0], [2.0, 0.0]]
    eps = 1e-7

    def probs(x):
        unit = [[v / (math.sqrt(sum(u * u for u in row)) + eps) for v in row] for row in x]
        sim = [[(sum(a * b for a, b in zip(p, q)) + 1) / 2 for q in unit] for p in unit]
        return [[v / sum(row) for v in row] for row in sim]

    p_s, p_t = probs(s), probs(t)
    expected = sum(p_t[i][j] * math.log((p_t[i][j] + eps) / (p_s[i][j] + eps)) for i in range(3) for j in range(3)) / 9
    assert PKT()(torch.tensor(s), torch.tensor(t)).item() == pytest.approx(expected, rel=1e-5)


def test_ab_margin_cases_and_layer_weights():
    # (s, t) cases with margin 1: s > -1 & t <= 0 -> (s+1)^2; s <= 1 & t > 0 -> (s-1)^2; otherwise 0
    s = torch.tensor([0.5, -2.0, 0.5, 2.0]).view(1, 1, 1, 4)
    t = torch.tensor([-1.0, -1.0, 1.0, 1.0]).view(1, 1, 1, 4)
    (loss,) = ABLoss(1)([s], [t])
    assert loss.item() == pytest.approx((2.25 + 0 + 0.25 + 0) * 3 / 1000)
    assert ABLoss(3).w == [0.25, 0.5, 1]
    assert ABLoss(4).w == [0.125, 0.25, 0.5, 1]
    # three layers, batch of 2: weight * sum / B * 3 / 1000
    s2, t2 = s.repeat(2, 1, 1, 1), t.repeat(2, 1, 1, 1)
    losses = ABLoss(3)([s2, s2, s2], [t2, t2, t2])
    assert [v.item() for v in losses] == pytest.approx([w * 2 * 2.5 / 2 * 3 / 1000 for w in (0.25, 0.5, 1)])


def test_factor_transfer_is_l1_between_normalised_squared_maps():
    f_s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    f_t = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    a_s = [v / math.sqrt(354) for v in (1, 4, 9, 16)]
    a_t = [v / math.sqrt(2) for v in (1, 0, 0, 1)]
    expected = sum(abs(x - y) for x, y in zip(a_s, a_t)) / 4
    assert FactorTransfer()(f_s, f_t).item() == pytest.approx(expected, rel=1e-6)


def _fsp_by_loops(maps):
    out = []
    for bot, top in zip(maps[:-1], maps[1:]):
        if bot.shape[2] > top.shape[2]:
            bot = F.adaptive_avg_pool2d(bot, top.shape[2:])
        n = bot.shape[2] * bot.shape[3]
        g = [[sum(top[0, j].flatten()[k].item() * bot[0, i].flatten()[k].item() for k in range(n)) / n
              for i in range(bot.shape[1])] for j in range(top.shape[1])]
        out.append(g)
    return out


def test_fsp_gram_matrices_by_loops():
    torch.manual_seed(0)
    g_s = [torch.randn(1, 2, 2, 2), torch.randn(1, 3, 2, 2), torch.randn(1, 3, 1, 1)]
    g_t = [torch.randn(1, 2, 2, 2), torch.randn(1, 3, 2, 2), torch.randn(1, 3, 1, 1)]
    fsp = FSP([f.shape for f in g_s], [f.shape for f in g_t])
    losses = fsp(g_s, g_t)
    assert len(losses) == 2
    for loss, m_s, m_t in zip(losses, _fsp_by_loops(g_s), _fsp_by_loops(g_t)):
        diffs = [(a - b) ** 2 for row_s, row_t in zip(m_s, m_t) for a, b in zip(row_s, row_t)]
        assert loss.item() == pytest.approx(sum(diffs) / len(diffs), rel=1e-5)
    with pytest.raises(UserError, match='fsp needs equal channel counts per stage'):
        FSP([(1, 2, 2, 2), (1, 3, 2, 2)], [(1, 2, 2, 2), (1, 4, 2, 2)])


def test_nst_polynomial_mmd_by_hand():
    f_s = torch.tensor([[3.0, 4.0], [1.0, 0.0]]).view(1, 2, 1, 2)   # channels normalise to (.6, .8), (1, 0)
    f_t = torch.tensor([[0.0, 1.0]]).view(1, 1, 1, 2)
    k_tt = 1.0
    k_ss = (1 + 0.36 + 0.36 + 1) / 4
    k_st = (0.64 + 0.0) / 2
    (loss,) = NSTLoss()([f_s], [f_t])
    assert loss.item() == pytest.approx(k_tt + k_ss - 2 * k_st, rel=1e-6)


def _kdsvd_by_loops(g_s, g_t):
    bsz = g_s[0].shape[0]
    total = []
    prev = None
    for f_s, f_t in zip(g_s, g_t):
        layer = []
        for b in range(bsz):
            _, sv_t, vh_t = torch.linalg.svd(f_t[b].flatten(1).t())
            _, _, vh_s = torch.linalg.svd(f_s[b].flatten(1).t())
            v_t = (vh_t[0] / vh_t[0].norm()).tolist()
            scale = (sv_t[0] / sv_t[0].abs()).item()                       # top-1 singular value, normalised
            candidates = [(vh_s[j] / vh_s[j].norm()).tolist() for j in range(4)]
            cosines = [sum(a * c for a, c in zip(cand, v_t)) for cand in candidates]
            best = max(range(4), key=lambda j: abs(cosines[j]))
            sign = 1.0 if cosines[best] > 0 else -1.0
            v_s = [sign * v * scale for v in candidates[best]]
            layer.append(([v * scale for v in v_t], v_s))
        if prev is not None:
            loss = 0.0
            for b in range(bsz):
                (vt, vs), (pt, ps) = layer[b], prev[b]
                for p in range(len(vt)):
                    for q in range(len(pt)):
                        k_s = math.exp(-(vs[p] - ps[q]) ** 2 / 8)
                        k_t = math.exp(-(vt[p] - pt[q]) ** 2 / 8)
                        loss += (k_s - k_t) ** 2
            total.append(loss / bsz)
        prev = layer
    return total


def test_kdsvd_rbf_between_aligned_singular_vectors_by_loops():
    torch.manual_seed(0)
    g_s = [torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)]
    g_t = [torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)]
    losses = KDSVD(k=1)(g_s, g_t)
    expected = _kdsvd_by_loops(g_s, g_t)
    assert len(losses) == 2 and all(e > 1e-4 for e in expected)
    assert [v.item() for v in losses] == pytest.approx(expected, rel=1e-4)
    assert all(v.item() == pytest.approx(0.0, abs=1e-7) for v in KDSVD()(g_t, g_t))


def test_kdsvd_svd_gradient_is_exact_and_finite_with_dead_channels():
    """Repeated zero singular values (dead channels) made torch's SVD backward NaN in a real CLI run."""
    torch.manual_seed(0)
    for shape in [(2, 16, 8), (2, 4, 8), (2, 9, 5)]:              # H*W > C, H*W < C, no dead channel
        a = torch.randn(*shape, dtype=torch.float64)
        if shape[-1] == 8:
            a[:, :, 5:] = 0                                           # three dead channels
        a.requires_grad_(True)

        def top_projector(x):                                         # sign-invariant function of the top-2 vectors
            _, v = KDSVD.svd(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], x.shape[1], 1), 2)
            return v @ v.transpose(1, 2)

        assert torch.autograd.gradcheck(top_projector, (a,))
    f_s = torch.relu(torch.randn(2, 6, 3, 3))
    f_s[:, 3:] = 0
    f_s.requires_grad_(True)
    g_t = [torch.randn(2, 6, 3, 3), torch.randn(2, 6, 3, 3)]
    sum(KDSVD()([f_s, f_s * 2], g_t)).backward()
    assert torch.isfinite(f_s.grad).all() and f_s.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------- helper modules

def test_conv_reg_cases_and_impossible_sizes():
    cases = [((2, 8, 16, 16), (2, 4, 8, 8), nn.Conv2d, (3, 3)),
             ((2, 8, 8, 8), (2, 4, 16, 16), nn.ConvTranspose2d, (4, 4)),
             ((2, 8, 8, 8), (2, 4, 8, 8), nn.Conv2d, (1, 1)),
             ((2, 8, 6, 6), (2, 4, 4, 4), nn.Conv2d, (3, 3))]
    for s, t, kind, kernel in cases:
        reg = ConvReg(s, t)
        assert type(reg.conv) is kind and reg.conv.kernel_size == kernel
        out = reg(torch.randn(*s))
        assert out.shape == t and (out >= 0).all()
        assert (ConvReg(s, t, use_relu=False)(torch.randn(*s)) < 0).any()
    with pytest.raises(UserError, match='cannot regress'):
        ConvReg((2, 8, 4, 4), (2, 8, 16, 16))


def test_connector_paraphraser_translator_and_embeddings_keep_repdistillers_layout():
    conn = Connector([(2, 16, 32, 32), (2, 32, 16, 16)], [(2, 16, 32, 32), (2, 64, 16, 16)])
    assert len(conn.connectors[0]) == 0 and isinstance(conn.connectors[1], ConvReg)
    assert not conn.connectors[1].use_relu
    x = [torch.randn(2, 16, 32, 32), torch.randn(2, 32, 16, 16)]
    out = conn(x)
    assert out[0] is x[0] and out[1].shape == (2, 64, 16, 16)
    para = Paraphraser((2, 256, 8, 8))
    assert sum(p.numel() for p in para.parameters()) == 2_065_536          # r32x4 teacher (fact sheet)
    assert [k for k in para.state_dict() if k.endswith('weight')] == [
        'encoder.0.weight', 'encoder.3.weight', 'encoder.6.weight',
        'decoder.0.weight', 'decoder.3.weight', 'decoder.6.weight']
    factor, rec = para(torch.randn(2, 256, 8, 8))
    assert factor.shape == (2, 128, 8, 8) and rec.shape == (2, 256, 8, 8)
    assert para(torch.randn(2, 256, 8, 8), is_factor=True).shape == (2, 128, 8, 8)
    trans = Translator((2, 256, 8, 8), (2, 256, 8, 8))
    assert sum(p.numel() for p in trans.parameters()) == 1_033_728
    assert trans(torch.randn(2, 256, 8, 8)).shape == (2, 128, 8, 8)
    emb = Embed(6, 3)
    assert set(emb.state_dict()) == {'linear.weight', 'linear.bias'} and emb.l2norm.power == 2
    assert emb(torch.randn(4, 6, 1, 1)).norm(dim=1).tolist() == pytest.approx([1.0] * 4)
    lin = LinearEmbed(6, 3)
    v = torch.randn(4, 6)
    assert torch.equal(lin(v), lin.linear(v))


def test_regressor_sizes_match_repdistiller():
    fit = build('hint', 'resnet32x4', 'resnet8x4')
    assert sum(p.numel() for p in fit.regressor.parameters()) == 16_768
    vid = build('vid', 'wrn_40_2', 'wrn_16_2')
    assert sum(p.numel() for p in vid.vid.parameters()) == 64_736
    vid = build('vid', 'resnet56', 'resnet20')
    assert sum(p.numel() for p in vid.vid.parameters()) == 16_240


# ----------------------------------------------------------------------------------------- distillers on real pairs

@pytest.fixture(scope='module')
def model_pairs():
    torch.manual_seed(0)
    return {pair: (create_model(pair[0], 100), create_model(pair[1], 100)) for pair in PAIRS}


@pytest.mark.parametrize('pair', PAIRS, ids=lambda p: f'{p[0]}->{p[1]}')
@pytest.mark.parametrize('method', METHODS)
def test_each_method_builds_and_runs_on_homogeneous_and_heterogeneous_pairs(method, pair, model_pairs):
    teacher, student = model_pairs[pair]
    opt = make_opt(method, pair[1], beta=PUBLISHED_BETA[method])
    info = make_info(num_classes=100)
    heterogeneous = pair[1] == 'ShuffleV1'
    if method in EQUAL_CHANNELS_ONLY and heterogeneous:
        with pytest.raises(UserError, match=f'{method} needs equal channel counts per stage'):
            build_distiller(method, student, teacher, opt, info)
        return
    distiller = build_distiller(method, student, teacher, opt, info)
    assert DISTILLERS[method].default_weights == (1.0, 0.0, PUBLISHED_BETA[method])
    distiller.train()
    with torch.no_grad():
        logits, losses = distiller.forward_train(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]))
    assert logits.shape == (3, 100)
    expected_keys = {'ce'} if method in INIT_ONLY else {'ce', method}
    assert set(losses) == expected_keys
    assert all(v.numel() == 1 and torch.isfinite(v) for v in losses.values())


def test_fsp_refuses_wrn_40_2_to_wrn_40_1_and_hint_refuses_a_non_spatial_layer():
    with pytest.raises(UserError, match=r'fsp needs equal channel counts per stage: student \[16, 16, 32, 64\], '
                                        r'teacher \[16, 32, 64, 128\]'):
        build('fsp', 'wrn_40_2', 'wrn_40_1')
    with pytest.raises(UserError, match='kdsvd needs equal channel counts'):
        build('kdsvd', 'wrn_40_2', 'wrn_40_1')
    with pytest.raises(UserError, match='--hint_layer 4 is not a feature map'):
        build('hint', 'resnet14', 'resnet8', hint_layer=4)


def test_feature_indices_follow_repdistiller():
    """Each criterion sees exactly RepDistiller's features (checked by recording the arguments)."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    expected = {'hint': lambda f: [f[2]], 'attention': lambda f: f[1:-1], 'nst': lambda f: f[1:-1],
                'kdsvd': lambda f: f[1:-1], 'similarity': lambda f: [f[-2]], 'rkd': lambda f: [f[-1]],
                'pkt': lambda f: [f[-1]]}
    for method, select in expected.items():
        d = build(method, 'resnet14', 'resnet8')
        seen = []
        d.criterion.register_forward_pre_hook(lambda mod, args: seen.append(args))
        if method == 'hint':
            d.regressor = nn.Identity()
        d.eval()
        with torch.no_grad():
            d.forward_train(x, y)
            feat_s, _ = d.student(x, is_feat=True)
            feat_t, _ = d.teacher(x, is_feat=True)
        (args,) = seen
        for got, feats in zip(args, (feat_s, feat_t)):
            got = got if isinstance(got, (list, tuple)) else [got]
            assert len(got) == len(select(feats)), method
            assert all(torch.equal(a, b) for a, b in zip(got, select(feats))), method


@pytest.fixture
def one_thread():
    """Small convolutions run several times faster on one intra-op thread when the CPUs are shared."""
    with one_intra_op_thread():
        yield


def _recorder(module):
    """The positional arguments of every call of ``module`` (a forward pre-hook)."""
    calls = []
    module.register_forward_pre_hook(lambda mod, args: calls.append(args))
    return calls


def _same(got, want):
    got = list(got) if isinstance(got, (list, tuple)) else [got]
    return len(got) == len(want) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, want))


@torch.no_grad()
def test_feature_indices_of_vid_cc_ft_fsp_and_ab_follow_repdistiller(one_thread):
    """VID: each VIDLoss i sees (feat_s[1+i], feat_t[1+i]); CC: the embeddings see feat[-1]; FT: the translator
    sees feat_s[-2] and the paraphraser feat_t[-2]; FSP's init loss feat[:-1] (feat[0] included); AB's init loss
    the pre-activation feat[1:-1] of both networks (section 3.3/3.4 of the fact sheet)."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])

    def features(d, preact=False):
        return d.student(x, is_feat=True, preact=preact)[0], d.teacher(x, is_feat=True, preact=preact)[0]

    d = build('vid', 'resnet14', 'resnet8').eval()
    calls = [_recorder(vid) for vid in d.vid]
    d.forward_train(x, y)
    feat_s, feat_t = features(d)
    assert len(calls) == 3
    for i, (args,) in enumerate(calls):
        assert _same(args, [feat_s[1 + i], feat_t[1 + i]]), f'vid[{i}]'

    d = build('correlation', 'resnet14', 'resnet8').eval()
    seen_s, seen_t = _recorder(d.embed_s), _recorder(d.embed_t)
    d.forward_train(x, y)
    feat_s, feat_t = features(d)
    assert _same(seen_s[0], [feat_s[-1]]) and _same(seen_t[0], [feat_t[-1]]) and len(seen_s) == len(seen_t) == 1

    d = build('factor', 'resnet14', 'resnet8').eval()
    seen_s, seen_t = _recorder(d.translator), _recorder(d.paraphraser)
    d.forward_train(x, y)
    feat_s, feat_t = features(d)
    assert _same(seen_s[0], [feat_s[-2]]) and _same(seen_t[0], [feat_t[-2]]) and len(seen_s) == len(seen_t) == 1

    d = build('fsp', 'resnet14', 'resnet8').eval()
    seen = _recorder(d.criterion)
    d.init_loss(x)
    feat_s, feat_t = features(d)
    ((got_s, got_t),) = seen
    assert _same(got_s, feat_s[:-1]) and _same(got_t, feat_t[:-1]) and len(got_s) == 4

    d = build('abound', 'resnet14', 'resnet8').eval()
    seen_connector, seen = _recorder(d.connector), _recorder(d.criterion)
    d.init_loss(x)
    pre_s, pre_t = features(d, preact=True)
    post_s, post_t = features(d, preact=False)
    assert not any(torch.equal(a, b) for a, b in zip(pre_s[1:-1], post_s[1:-1]))   # the flavours differ here
    ((connected,),) = seen_connector
    assert _same(connected, pre_s[1:-1])
    ((got_s, got_t),) = seen
    assert _same(got_s, pre_s[1:-1]) and _same(got_t, pre_t[1:-1])       # identity connectors for equal shapes


def _method_grad_pair(method):
    # AB's connector has parameters only when the channel counts differ
    return ('wrn_16_2', 'wrn_16_1') if method == 'abound' else ('resnet14', 'resnet8')


TRAINABLE_MODULES = {'hint': ['regressor'], 'correlation': ['embed_s', 'embed_t'], 'vid': ['vid'], 'factor': ['translator']}
FROZEN_MODULE = {'abound': 'connector', 'factor': 'paraphraser'}


@pytest.mark.parametrize('method', METHODS)
def test_gradients_reach_student_and_trainable_modules_but_not_teacher_or_frozen_parts(method):
    teacher_name, student_name = _method_grad_pair(method)
    d = build(method, teacher_name, student_name)
    d.train()
    assert not d.teacher.training
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    frozen = getattr(d, FROZEN_MODULE[method]) if method in FROZEN_MODULE else None
    if frozen is not None:
        assert not frozen.training and len(list(frozen.parameters())) > 0
    module_names = TRAINABLE_MODULES.get(method, [])
    trainable = {id(p) for p in d.trainable_parameters()}
    expected = {id(p) for p in d.student.parameters()}
    for name in module_names:
        expected |= {id(p) for p in getattr(d, name).parameters()}
    assert trainable == expected

    if method in INIT_ONLY:
        # the main stage is CE only: the loss reaches the student's classifier, nothing else of the method
        _, losses = d.forward_train(x, y)
        sum(losses.values()).backward()
        assert d.student.fc.weight.grad is not None
    else:
        feat_s, logit_s = d.student(x, is_feat=True, preact=d.preact)
        feat_t, logit_t = d.teacher_forward(x)
        d.method_loss(feat_s, feat_t, logit_s, logit_t, y).backward()
        assert d.student.conv1.weight.grad is not None and d.student.conv1.weight.grad.abs().sum() > 0
        assert d.student.fc.weight.grad is None               # the feature loss does not touch the classifier
        for name in module_names:
            for pname, p in getattr(d, name).named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, f'{name}.{pname}'
    assert all(p.grad is None for p in d.teacher.parameters())
    if frozen is not None:
        assert all(p.grad is None for p in frozen.parameters())


# (SGD lr, bound on last/first loss); VID has its own test below
LOSS_DECREASE = {'hint': (0.05, 0.7), 'attention': (0.05, 0.5), 'similarity': (0.01, 0.2), 'correlation': (0.01, 0.2),
                 'rkd': (0.01, 0.3), 'pkt': (0.05, 0.3), 'factor': (0.01, 0.7), 'nst': (0.1, 0.8),
                 'kdsvd': (0.3, 0.7)}


@pytest.mark.parametrize('method', sorted(LOSS_DECREASE))
def test_method_loss_decreases_over_sgd_steps_on_a_fixed_batch(method):
    lr, bound = LOSS_DECREASE[method]
    d = build(method, 'resnet14', 'resnet8', beta=PUBLISHED_BETA[method], gamma=0.0)
    optimizer = torch.optim.SGD(d.trainable_parameters(), lr=lr, momentum=0.9)
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    d.train()
    history = []
    for _ in range(8):
        _, losses = d.forward_train(x, y)
        optimizer.zero_grad()
        losses[method].backward()
        optimizer.step()
        history.append(losses[method].item())
    assert history[-1] < bound * history[0], history


def test_vid_fits_both_the_mean_and_the_variance_over_sgd_steps_on_a_fixed_batch(one_thread):
    """VID's loss is mostly 0.5 log(var) at the start (var = 5 on 3 layers: 2.41 of 2.81), so a falling total alone
    says little. Over 20 steps the total must fall by 10%, the regressors' squared error by half, and the
    predicted variances must move down from 5 towards that error (log_scale learned).
    Measured (torch 2.x, CPU): total 2.81 -> 2.44, squared error 1.31 -> 0.45, mean variance 5.0 -> 4.62."""
    d = build('vid', 'resnet14', 'resnet8', beta=1.0, gamma=0.0)
    optimizer = torch.optim.SGD(d.trainable_parameters(), lr=1.0, momentum=0.9)
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    seen = {}
    for i, vid in enumerate(d.vid):
        vid.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(('target', i), args[1]))
        vid.regressor.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(('mean', i), out))

    def variance():
        return sum((F.softplus(vid.log_scale) + vid.eps).mean().item() for vid in d.vid) / len(d.vid)

    d.train()
    totals, errors = [], []
    assert variance() == pytest.approx(5.0, abs=1e-4)
    for _ in range(20):
        _, losses = d.forward_train(x, y)
        optimizer.zero_grad()
        losses['vid'].backward()
        optimizer.step()
        totals.append(losses['vid'].item())
        errors.append(sum((seen['mean', i] - seen['target', i]).pow(2).mean().item() for i in range(3)) / 3)
    assert totals[-1] < 0.9 * totals[0], totals
    assert errors[-1] < 0.5 * errors[0], errors
    assert variance() < 4.8
    assert all(((F.softplus(vid.log_scale) + vid.eps) < 5.0).float().mean() > 0.9 for vid in d.vid)


# ----------------------------------------------------------------------------------------- init stage

def tiny_bundle(n=8, batch=4, num_classes=10):
    torch.manual_seed(0)
    items = TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, num_classes, (n,)), torch.arange(n))
    loader = DataLoader(items, batch_size=batch, shuffle=True, generator=torch.Generator())
    return DataBundle(train_loader=loader, val_loader=loader, train_eval_loader=loader, num_classes=num_classes,
                      n_data=n, image_size=32)


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def _init_case(method):
    return {'abound': ('wrn_16_2', 'wrn_16_1'), 'factor': ('resnet14', 'resnet8'), 'fsp': ('resnet14', 'resnet8')}[method]


@pytest.mark.parametrize('method', sorted(WITH_INIT))
def test_init_stage_trains_only_its_modules(method, capsys):
    teacher_name, student_name = _init_case(method)
    d = build(method, teacher_name, student_name)
    before = {name: _snapshot(m) for name, m in d.named_children()}
    d.prepare(tiny_bundle(), device=torch.device('cpu'), cache_dir='unused', resumed=False)
    assert 'init epoch [1/1]' in capsys.readouterr().out
    changed = {name: _changed(before[name], m) for name, m in d.named_children()}
    assert changed['teacher'] == set()
    assert all(p.grad is None for p in d.parameters())
    student_changed = {k.split('.')[0] for k in changed['student']}
    if method == 'factor':
        assert student_changed == set() and changed['translator'] == set()
        assert changed['paraphraser'] == set(before['paraphraser'])            # every weight and bias moved
        assert not any(p.requires_grad for p in d.paraphraser.parameters())   # frozen again for the main stage
    elif method == 'abound':
        # WRN's feature modules: conv1, block1..3 (the final bn1 and fc stay: they are not feature modules)
        assert student_changed == {'conv1', 'block1', 'block2', 'block3'}
        assert changed['connector'] == set(before['connector'])
        assert not any(p.requires_grad for p in d.connector.parameters())
    else:
        assert student_changed == {'conv1', 'bn1', 'layer1', 'layer2', 'layer3'}


@pytest.mark.parametrize('method', sorted(WITH_INIT))
def test_init_stage_is_skipped_on_resume(method, capsys):
    teacher_name, student_name = _init_case(method)
    d = build(method, teacher_name, student_name)
    before = _snapshot(d)
    d.prepare(tiny_bundle(), device=torch.device('cpu'), cache_dir='unused', resumed=True)
    assert _changed(before, d) == set()
    assert 'init epoch' not in capsys.readouterr().out


def test_init_learning_rate_follows_repdistiller():
    assert init_learning_rate(make_opt('factor', 'resnet8', learning_rate=0.05)) == 0.01
    assert init_learning_rate(make_opt('factor', 'wrn_16_2', learning_rate=0.05)) == 0.01
    assert init_learning_rate(make_opt('factor', 'vgg8', learning_rate=0.05)) == 0.05
    assert init_learning_rate(make_opt('factor', 'MobileNetV2', learning_rate=0.01)) == 0.01
    assert init_learning_rate(make_opt('abound', 'resnet8', learning_rate=0.05)) == 0.05
    assert init_learning_rate(make_opt('fsp', 'resnet20', learning_rate=0.03)) == 0.03


def test_init_stage_is_reproducible():
    results = []
    for _ in range(2):
        d = build('fsp', 'resnet14', 'resnet8')
        d.prepare(tiny_bundle(), device=torch.device('cpu'), cache_dir='unused', resumed=False)
        results.append(d.student.conv1.weight.detach().clone())
    assert torch.equal(results[0], results[1])


# ----------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope='module')
def cli_setup(data_dir, vanilla_teacher):
    """(data folder, resnet14 teacher checkpoint)."""
    return data_dir, vanilla_teacher('resnet14')


@pytest.mark.parametrize('method', METHODS)
def test_one_cli_epoch_per_method(method, cli_setup, tmp_path, capsys):
    args = ['--path_t', str(cli_setup[1]), '--model_s', 'resnet8',
            '--distill', method, '--data_folder', cli_setup[0], '--save_dir', str(tmp_path),
            '--num_workers', '0', '--batch_size', '32', '--device', 'cpu', '--epochs', '1', '--print_freq', '1000']
    if method in WITH_INIT:
        args += ['--init_epochs', '1']
    assert train_student.cli(args) == 0
    out = capsys.readouterr().out
    assert ('init epoch [1/1]' in out) == (method in WITH_INIT)
    run = tmp_path / 'student_model' / f'S:resnet8_T:resnet14_cifar100_{method}_r:1.0_a:0.0_b:{float(PUBLISHED_BETA[method])}_1'
    summary = json.loads((run / 'summary.json').read_text())
    assert summary['distill'] == method and summary['epochs'] == 1 and summary['params_deployed'] == 83_892
    (record,) = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert ('loss_' + method in record) == (method not in INIT_ONLY)
    assert math.isfinite(record['train_loss'])


def test_cli_refuses_an_incompatible_fsp_pair_before_writing_anything(cli_setup, tmp_path, capsys):
    args = ['--path_t', str(cli_setup[1]), '--model_s', 'ShuffleV1',
            '--distill', 'fsp', '--data_folder', cli_setup[0], '--save_dir', str(tmp_path),
            '--num_workers', '0', '--device', 'cpu', '--epochs', '1']
    assert train_student.cli(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith('error: fsp needs equal channel counts per stage: student [24, 240, 480, 960]')
    assert not (tmp_path / 'student_model').exists()


def test_resume_restores_the_initialised_modules_without_rerunning_the_init_stage(cli_setup, tmp_path, capsys):
    args = ['--path_t', str(cli_setup[1]), '--model_s', 'resnet8',
            '--distill', 'factor', '--data_folder', cli_setup[0], '--save_dir', str(tmp_path),
            '--num_workers', '0', '--batch_size', '64', '--device', 'cpu', '--init_epochs', '1', '--print_freq', '1000']
    assert train_student.cli(args + ['--epochs', '1']) == 0
    assert 'init epoch [1/1]' in capsys.readouterr().out
    run = tmp_path / 'student_model' / 'S:resnet8_T:resnet14_cifar100_factor_r:1.0_a:0.0_b:200.0_1'
    paraphraser = {k: v for k, v in torch.load(run / 'last.pth')['distiller'].items() if k.startswith('paraphraser.')}
    assert len(paraphraser) == 12
    assert train_student.cli(args + ['--epochs', '2', '--resume']) == 0
    assert 'init epoch' not in capsys.readouterr().out
    state = torch.load(run / 'last.pth')
    assert state['epoch'] == 2
    assert all(torch.equal(state['distiller'][k], v) for k, v in paraphraser.items())   # frozen in the main stage
