"""CRD (+KD), DKD and SimKD: criteria on hand-computed inputs, the three Distillers, and one CLI epoch each."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import train_student
from crd import ContrastLoss, ContrastMemory, CRDLoss
from dataset import get_dataloaders
from distiller_zoo import build_distiller, load_deployed
from distiller_zoo.DKD import DKDLoss
from helper.errors import UserError
from helper.loops import validate
from helper.options import updated
from helper.util import count_params, load_checkpoint, save_checkpoint
from models import create_model
from models.util import SimKD
from tests.options import data_info, student_options

FAST = ['--num_workers', '0', '--batch_size', '32', '--device', 'cpu', '--print_freq', '1000', '--epochs', '1']
PAIRS = [('resnet56', 'resnet20'), ('wrn_40_2', 'wrn_16_2'), ('resnet32x4', 'ShuffleV1'), ('ResNet50', 'MobileNetV2')]


def make_opt(distill, **kw):
    base = dict(gamma=1.0, alpha=0.0, beta=0.0, kd_T=4.0, feat_dim=16, nce_k=8, nce_t=0.07, nce_m=0.5,
                seed=0, dkd_alpha=1.0, dkd_beta=8.0, dkd_T=4.0, dkd_warmup=20,
                simkd_factor=2, model_s='resnet8', model_t='resnet14')
    base.update(kw)
    return student_options(distill, **base)


def make_info(num_classes=100, n_data=32, image_size=32):
    return data_info(num_classes=num_classes, n_data=n_data, image_size=image_size)


def batch(n=4, classes=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


def assert_grads_reach_student_not_teacher(distiller):
    student, teacher = distiller.student, distiller.teacher
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training


# ---------------------------------------------------------------------------------------------- CRD

def test_contrast_loss_equals_eq18_by_hand():
    n_data, eps = 10, 1e-7
    x = torch.tensor([[[0.9], [0.2], [0.05], [0.4]],
                      [[0.3], [0.7], [0.01], [0.1]]])
    batch_size, m = 2, 3
    pn = 1 / n_data
    total = 0.0
    for b in range(batch_size):
        total += math.log(x[b, 0, 0].item() / (x[b, 0, 0].item() + m * pn + eps))
        for k in range(1, m + 1):
            total += math.log(m * pn / (x[b, k, 0].item() + m * pn + eps))
    assert ContrastLoss(n_data)(x).item() == pytest.approx(-total / batch_size, rel=1e-6)


def _unit(rows):
    rows = torch.tensor(rows, dtype=torch.float32)
    return rows / rows.norm(dim=1, keepdim=True)


def test_contrast_memory_scores_normalisers_and_momentum_update(capsys):
    n_data, T, m = 5, 0.5, 0.5
    memory = ContrastMemory(2, n_data, K=2, T=T, momentum=m)
    memory.memory_v1.copy_(_unit([[1, 0], [0, 1], [1, 1], [1, -1], [-1, 2]]))
    memory.memory_v2.copy_(_unit([[0, 1], [1, 2], [-1, 0], [2, 1], [1, 3]]))
    mem1, mem2 = memory.memory_v1.clone(), memory.memory_v2.clone()
    v1 = _unit([[1, 2], [3, -1]]).requires_grad_()
    v2 = _unit([[2, -1], [1, 1]]).requires_grad_()
    y = torch.tensor([0, 3])
    idx = torch.tensor([[0, 2, 4], [3, 1, 2]])

    def raw(mem, anchors):   # exp(<mem[idx[b, k]], anchor_b> / T) by explicit loops
        return [[math.exp(sum(mem[idx[b, k], d].item() * anchors[b, d].item() for d in range(2)) / T)
                 for k in range(3)] for b in range(2)]

    raw1, raw2 = raw(mem2, v1), raw(mem1, v2)
    z1 = sum(map(sum, raw1)) / 6 * n_data
    z2 = sum(map(sum, raw2)) / 6 * n_data
    out_v1, out_v2 = memory(v1, v2, y, idx)
    assert out_v1.shape == out_v2.shape == (2, 3, 1)
    assert torch.allclose(out_v1[..., 0], torch.tensor(raw1) / z1, rtol=1e-5)
    assert torch.allclose(out_v2[..., 0], torch.tensor(raw2) / z2, rtol=1e-5)
    assert memory.params[2].item() == pytest.approx(z1, rel=1e-5)
    assert memory.params[3].item() == pytest.approx(z2, rel=1e-5)

    # rows y moved halfway to the embeddings and renormalised; the others untouched
    for mem_new, mem_old, v in ((memory.memory_v1, mem1, v1), (memory.memory_v2, mem2, v2)):
        for b, row in enumerate(y.tolist()):
            expected = m * mem_old[row] + (1 - m) * v[b].detach()
            assert torch.allclose(mem_new[row], expected / expected.norm(), atol=1e-6)
            assert mem_new[row].norm().item() == pytest.approx(1.0, abs=1e-6)
        others = [r for r in range(n_data) if r not in y.tolist()]
        assert torch.equal(mem_new[others], mem_old[others])

    # gradients reach the embeddings, never the memory
    (out_v1.sum() + out_v2.sum()).backward()
    assert v1.grad is not None and v2.grad is not None
    assert not memory.memory_v1.requires_grad and memory.memory_v1.grad is None

    # Z stays fixed after the first call (and is printed once)
    mem2_now = memory.memory_v2.clone()
    out_again, _ = memory(v1.detach(), v2.detach(), y, idx)
    assert memory.params[2].item() == pytest.approx(z1, rel=1e-6)
    assert torch.allclose(out_again[..., 0], torch.tensor(raw(mem2_now, v1)) / z1, rtol=1e-5)
    printed = capsys.readouterr().out
    assert printed.count('normalization constant Z_v1 is set to') == 1
    assert printed.count('normalization constant Z_v2 is set to') == 1


def test_contrast_memory_update_at_momentum_0_3_by_hand():
    """At momentum 0.3 (not 0.5, where m and 1 - m coincide) a row becomes 0.3 old + 0.7 new, renormalised:
    numbers worked out on paper. Row 1 of the student bank: old (1, 0), embedding (0, 1) -> (0.3, 0.7) / |.|;
    row 3: old (0.6, 0.8), embedding (0.8, -0.6) -> (0.74, -0.18) / |.|. Teacher bank, the same rows: old (0, 1)
    and (-1, 0), embeddings (1, 0) and (0, -1) -> (0.7, 0.3) / |.| and (-0.3, -0.7) / |.|."""
    memory = ContrastMemory(2, 4, K=1, T=1.0, momentum=0.3)
    memory.memory_v1.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [0.6, 0.8]]))
    memory.memory_v2.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, -0.8], [-1.0, 0.0]]))
    untouched_v1, untouched_v2 = memory.memory_v1[[0, 2]].clone(), memory.memory_v2[[0, 2]].clone()
    v1 = torch.tensor([[0.0, 1.0], [0.8, -0.6]])
    v2 = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    memory(v1, v2, torch.tensor([1, 3]), torch.tensor([[1, 0], [3, 2]]))

    def unit(a, b):
        norm = math.sqrt(a * a + b * b)
        return [a / norm, b / norm]

    assert memory.memory_v1[1].tolist() == pytest.approx(unit(0.3, 0.7), abs=1e-6)          # (0.394, 0.919)
    assert memory.memory_v1[3].tolist() == pytest.approx(unit(0.74, -0.18), abs=1e-6)       # (0.972, -0.236)
    assert memory.memory_v2[1].tolist() == pytest.approx(unit(0.7, 0.3), abs=1e-6)          # (0.919, 0.394)
    assert memory.memory_v2[3].tolist() == pytest.approx(unit(-0.3, -0.7), abs=1e-6)
    assert torch.equal(memory.memory_v1[[0, 2]], untouched_v1)
    assert torch.equal(memory.memory_v2[[0, 2]], untouched_v2)


def test_nce_m_reaches_the_memory_of_the_crd_distiller():
    """--nce_m 0.3 on the command line is the momentum the bank uses (RepDistiller's default is 0.5)."""
    opt = make_opt('crd', nce_m=0.3)
    distiller = build_distiller('crd', create_model('resnet8', num_classes=100), create_model('resnet14', num_classes=100),
                                opt, make_info())
    assert distiller.criterion_crd.contrast.params[4].item() == pytest.approx(0.3)
    assert train_student.get_args_parser().parse_args(['--distill', 'crd']).nce_m == 0.5


def test_contrast_memory_fallback_sampler_is_seeded_and_keeps_the_positive():
    a = ContrastMemory(4, 50, K=7, seed=3)
    b = ContrastMemory(4, 50, K=7, seed=3)
    y = torch.tensor([5, 11, 49])
    ia, ib = a.sample_indices(y), b.sample_indices(y)
    assert ia.shape == (3, 8) and torch.equal(ia, ib)
    assert torch.equal(ia[:, 0], y) and ia.min() >= 0 and ia.max() < 50
    out_v1, out_v2 = a(F.normalize(torch.randn(3, 4)), F.normalize(torch.randn(3, 4)), y)   # no idx given
    assert out_v1.shape == out_v2.shape == (3, 8, 1)


def test_crd_loss_state_dict_keys_embed_sizes_and_z_survive_a_reload(capsys):
    # RepDistiller's CRDLoss(opt) reads the embedding inputs and the bank size from its argument
    opt = updated(make_opt('crd', feat_dim=128, nce_k=5), s_dim=256, t_dim=256, n_data=40)
    loss = CRDLoss(opt)
    assert set(loss.state_dict()) == {
        'embed_s.linear.weight', 'embed_s.linear.bias', 'embed_t.linear.weight', 'embed_t.linear.bias',
        'contrast.params', 'contrast.memory_v1', 'contrast.memory_v2'}
    assert count_params(loss) == 65_792                       # RepDistiller's r32x4 -> r8x4 embeds
    assert loss.contrast.memory_v1.shape == loss.contrast.memory_v2.shape == (40, 128)
    assert loss.contrast.params.tolist()[:2] == [5.0, pytest.approx(0.07)]
    assert loss.contrast.params[4].item() == 0.5
    bound = 1 / math.sqrt(128 / 3)
    assert loss.contrast.memory_v1.abs().max() <= bound

    f_s, f_t, index = torch.randn(4, 256), torch.randn(4, 256), torch.arange(4)
    contrast_idx = torch.cat([index[:, None], torch.randint(4, 40, (4, 5))], dim=1)
    loss(f_s, f_t, index, contrast_idx)
    z = loss.contrast.params[2:4].clone()
    assert (z > 0).all()
    capsys.readouterr()

    resumed = CRDLoss(opt)
    resumed.load_state_dict(loss.state_dict())
    resumed(f_s, f_t, index, contrast_idx)
    assert torch.equal(resumed.contrast.params[2:4], z)
    assert 'normalization constant' not in capsys.readouterr().out


def test_crd_distiller_gradients_reach_student_and_both_embeds_not_teacher():
    opt = make_opt('crd', beta=0.8)
    distiller = build_distiller('crd', create_model('resnet8', 100), create_model('resnet32x4', 100), opt,
                                make_info())
    crd = distiller.criterion_crd      # s_dim, t_dim: the sizes of the embeds' inputs
    assert (crd.embed_s.linear.in_features, crd.embed_t.linear.in_features) == (64, 256)
    distiller.train()
    x, y = batch()
    index = torch.tensor([0, 5, 9, 30])
    contrast_idx = torch.cat([index[:, None], torch.randint(0, 32, (4, 8))], dim=1)
    logits, losses = distiller.forward_train(x, y, index=index, contrast_idx=contrast_idx)
    assert logits.shape == (4, 100) and set(losses) == {'ce', 'crd'}
    sum(losses.values()).backward()
    assert_grads_reach_student_not_teacher(distiller)
    crd = distiller.criterion_crd
    for embed in (crd.embed_s, crd.embed_t):
        assert embed.linear.weight.grad is not None and embed.linear.weight.grad.abs().sum() > 0
    trainable = {id(p) for p in distiller.trainable_parameters()}
    expected = {id(p) for m in (distiller.student, crd.embed_s, crd.embed_t) for p in m.parameters()}
    assert trainable == expected


def test_crd_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    opt = make_opt('crd', gamma=0.0, beta=1.0, nce_k=6)
    distiller = build_distiller('crd', create_model('resnet8', 10), create_model('resnet8', 10), opt,
                                make_info(n_data=16))
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.05, momentum=0.9)
    x, y = batch(8, 10)
    index = torch.arange(8)
    contrast_idx = torch.stack([torch.cat([index[i:i + 1], torch.randperm(16)[:6]]) for i in range(8)])
    distiller.train()
    history = []
    for _ in range(12):
        _, losses = distiller.forward_train(x, y, index=index, contrast_idx=contrast_idx)
        optimizer.zero_grad()
        losses['crd'].backward()
        optimizer.step()
        history.append(losses['crd'].item())
    assert history[-1] < 0.9 * history[0]


# ---------------------------------------------------------------------------------------------- DKD

def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _tckd_nckd_by_hand(z_s, z_t, target, T):
    tckd = nckd = 0.0
    for zs, zt, g in zip(z_s, z_t, target):
        ps, pt = _softmax([v / T for v in zs]), _softmax([v / T for v in zt])
        tckd += _kl([pt[g], 1 - pt[g]], [ps[g], 1 - ps[g]])
        others = [c for c in range(len(zs)) if c != g]
        qs, qt = _softmax([zs[c] / T for c in others]), _softmax([zt[c] / T for c in others])
        nckd += _kl(qt, qs)
    return T ** 2 * tckd / len(target), T ** 2 * nckd / len(target)


def test_dkd_loss_equals_tckd_and_nckd_computed_by_hand():
    z_s = [[2.0, 0.5, -1.0], [0.1, 1.2, 0.3]]
    z_t = [[3.0, -0.5, 0.2], [-1.0, 2.5, 1.0]]
    target = [0, 2]
    T = 2.0
    tckd, nckd = _tckd_nckd_by_hand(z_s, z_t, target, T)
    args = torch.tensor(z_s), torch.tensor(z_t), torch.tensor(target)
    assert tckd > 0 and nckd > 0
    assert DKDLoss(alpha=1.0, beta=0.0, temperature=T)(*args).item() == pytest.approx(tckd, rel=1e-5)
    assert DKDLoss(alpha=0.0, beta=1.0, temperature=T)(*args).item() == pytest.approx(nckd, rel=1e-5)
    assert DKDLoss(alpha=2.0, beta=3.0, temperature=T)(*args).item() == pytest.approx(2 * tckd + 3 * nckd, rel=1e-5)
    default = DKDLoss()
    assert (default.alpha, default.beta, default.temperature) == (1.0, 8.0, 4.0)


@pytest.mark.parametrize('epoch, factor', [(1, 0.05), (10, 0.5), (20, 1.0), (30, 1.0)])
def test_dkd_distiller_warmup_and_ce_weight(epoch, factor):
    torch.manual_seed(0)
    student, teacher = create_model('resnet8', 100), create_model('resnet14', 100)
    distiller = build_distiller('dkd', student, teacher, make_opt('dkd', gamma=1.0, dkd_alpha=1.0, dkd_beta=2.0),
                                make_info())
    distiller.eval()                       # fixed BN statistics, so the logits can be recomputed below
    x, y = batch()
    distiller.start_epoch(epoch)            # the factor is a buffer set per epoch, not an argument of the step
    logits, losses = distiller.forward_train(x, y)
    assert set(losses) == {'ce', 'dkd'}
    with torch.no_grad():
        logit_t = teacher(x)
    tckd, nckd = _tckd_nckd_by_hand(logits.tolist(), logit_t.tolist(), y.tolist(), 4.0)
    assert losses['dkd'].item() == pytest.approx(factor * (tckd + 2.0 * nckd), rel=1e-4)
    assert losses['ce'].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


def test_dkd_flags_are_checked_and_warmup_zero_means_none():
    student, teacher = create_model('resnet8', 10), create_model('resnet8', 10)
    with pytest.raises(UserError, match='does not use -b'):
        make_opt('dkd', beta=8.0)
    with pytest.raises(UserError, match='--dkd_warmup'):
        make_opt('dkd', dkd_warmup=-1)
    assert build_distiller('dkd', student, teacher, make_opt('dkd', dkd_warmup=0),
                           make_info(num_classes=10)).warmup_factor(1) == 1.0


# ---------------------------------------------------------------------------------------------- SimKD

@pytest.mark.parametrize('s_n, counts', [(256, (214_016, 70_400, 26_240)), (512, (246_784, 86_784, 34_432))])
def test_simkd_projector_parameter_counts_and_keys(s_n, counts):
    for factor, expected in zip((2, 4, 8), counts):
        assert count_params(SimKD(s_n=s_n, t_n=256, factor=factor)) == expected
    keys = {k.rsplit('.', 1)[0] for k in SimKD(s_n=s_n, t_n=256).state_dict()}
    assert keys == {'transfer.0', 'transfer.1', 'transfer.3', 'transfer.4', 'transfer.6', 'transfer.7'}


def test_simkd_projector_pools_the_larger_map():
    projector, cls_t = SimKD(s_n=8, t_n=16), torch.nn.Linear(16, 5)
    small, large = torch.randn(2, 8, 4, 4), torch.randn(2, 16, 8, 8)
    trans_s, trans_t, pred = projector(small, large, cls_t)             # teacher pooled to 4x4
    assert trans_s.shape == trans_t.shape == (2, 16, 4, 4) and pred.shape == (2, 5)
    assert torch.allclose(trans_t, F.avg_pool2d(large, 2))
    trans_s, trans_t, _ = projector(torch.randn(2, 8, 8, 8), large[..., :2, :2], cls_t)   # student pooled to 2x2
    assert trans_s.shape == (2, 16, 2, 2) and torch.equal(trans_t, large[..., :2, :2])


@pytest.mark.parametrize('teacher_name, student_name', [('resnet32x4', 'ShuffleV1'), ('vgg8', 'resnet8')])
def test_simkd_deployable_matches_training_prediction_and_reloads(tmp_path, teacher_name, student_name):
    torch.manual_seed(0)
    student, teacher = create_model(student_name, 100), create_model(teacher_name, 100)
    opt = make_opt('simkd', gamma=0.0, beta=1.0, model_s=student_name, model_t=teacher_name)
    distiller = build_distiller('simkd', student, teacher, opt, make_info())
    distiller.train()
    x, y = batch(4)
    for _ in range(2):     # move BN statistics away from their initial values
        distiller.forward_train(x, y)
    distiller.eval()
    pred, _ = distiller.forward_train(x, y)
    deployed = distiller.deployable().eval()
    assert torch.allclose(deployed(x), pred, atol=1e-5)

    cls_t = teacher.get_submodule(distiller.cls_t_name)
    assert count_params(deployed) == count_params(student) + count_params(distiller.projector) + count_params(cls_t)
    path = tmp_path / 'ckpt.pth'
    save_checkpoint({'model': deployed.state_dict(), 'deploy': distiller.deploy_spec()}, path)
    rebuilt = load_deployed(path)
    assert count_params(rebuilt) == count_params(deployed)
    assert torch.equal(rebuilt(x), deployed(x))


def test_simkd_teacher_classifier_is_frozen_but_passes_gradients_to_the_projector():
    torch.manual_seed(0)
    student, teacher = create_model('resnet8x4', 100), create_model('resnet32x4', 100)
    opt = make_opt('simkd', gamma=0.0, beta=1.0, model_s='resnet8x4', model_t='resnet32x4')
    distiller = build_distiller('simkd', student, teacher, opt, make_info())
    assert distiller.cls_t_name == 'fc' and count_params(distiller.projector) == 214_016
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert trainable == {id(p) for m in (student, distiller.projector) for p in m.parameters()}
    fc_before = teacher.fc.weight.clone()
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    distiller.train()
    x, y = batch(4)
    pred, losses = distiller.forward_train(x, y)
    assert set(losses) == {'ce', 'simkd'} and losses['ce'].item() == 0.0
    F.cross_entropy(pred, y).backward()          # only through the teacher classifier
    assert distiller.projector.transfer[6].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    optimizer.step()
    assert torch.equal(teacher.fc.weight, fc_before)


def test_simkd_refuses_a_teacher_whose_classifier_does_not_fit_its_pooled_map():
    teacher = create_model('resnet14', 100)
    teacher.fc = torch.nn.Linear(32, 100)           # a classifier that cannot read the 64-channel pooled map
    with pytest.raises(UserError, match='cannot be a SimKD teacher'):
        build_distiller('simkd', create_model('resnet8', 100), teacher, make_opt('simkd'), make_info())


@pytest.mark.parametrize('teacher_name', ['MobileNetV2', 'ShuffleV2'])
def test_simkd_accepts_teachers_whose_head_follows_feat_minus_2(teacher_name):
    """Their classifiers read the conv2 / relu2 head, not feat[-2]; SimKD targets that head (the pooled map)."""
    torch.manual_seed(0)
    teacher = create_model(teacher_name, 100).eval()
    distiller = build_distiller('simkd', create_model('resnet8', 100), teacher,
                                make_opt('simkd', model_t=teacher_name, gamma=0.0, beta=1.0), make_info())
    image, target = batch(n=2)
    logits, losses = distiller.forward_train(image, target)
    assert logits.shape == (2, 100) and torch.isfinite(losses['simkd'])


# ---------------------------------------------------------------------------------------------- all three, per pair

@pytest.mark.parametrize('method', ['crd', 'dkd', 'simkd'])
@pytest.mark.parametrize('teacher_name, student_name', PAIRS)
def test_method_builds_and_trains_on_pair(method, teacher_name, student_name):
    torch.manual_seed(0)
    student, teacher = create_model(student_name, 100), create_model(teacher_name, 100)
    opt = make_opt(method, gamma=1.0, alpha=0.0, beta={'crd': 0.8, 'dkd': 0.0, 'simkd': 1.0}[method],
                   model_s=student_name, model_t=teacher_name)
    distiller = build_distiller(method, student, teacher, opt, make_info())
    distiller.train()
    x, y = batch(2)
    index = torch.tensor([3, 7])
    contrast_idx = torch.cat([index[:, None], torch.randint(0, 32, (2, 8))], dim=1)
    logits, losses = distiller.forward_train(x, y, index=index, contrast_idx=contrast_idx)
    assert logits.shape == (2, 100)
    assert method in losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert_grads_reach_student_not_teacher(distiller)


# ---------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope='module')
def teacher_ckpt(vanilla_teacher):
    return vanilla_teacher('resnet14')


def run_student(data_dir, save_dir, teacher, *extra):
    argv = ['--path_t', str(teacher), '--model_s', 'resnet8', '--data_folder', data_dir, '--save_dir', str(save_dir),
            *FAST, *extra]
    assert train_student.cli(argv) == 0
    (run_dir,) = (save_dir / 'student_model').iterdir()
    (record,) = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    return run_dir, record, json.loads((run_dir / 'summary.json').read_text())


@pytest.mark.parametrize('extra, folder, loss_names', [
    (['--distill', 'crd', '--nce_k', '16'], 'crd_r:1.0_a:0.0_b:0.8_1', {'loss_ce', 'loss_crd'}),
    (['--distill', 'crd', '--nce_k', '16', '-a', '1'], 'crd_r:1.0_a:1.0_b:0.8_1', {'loss_ce', 'loss_kd', 'loss_crd'}),
    (['--distill', 'dkd', '--dkd_beta', '2'], 'dkd_r:1.0_a:0.0_b:0.0_1', {'loss_ce', 'loss_dkd'}),
])
def test_cli_one_epoch(tmp_path, data_dir, teacher_ckpt, extra, folder, loss_names):
    run_dir, record, summary = run_student(data_dir, tmp_path, teacher_ckpt, *extra)
    assert run_dir.name == f'S:resnet8_T:resnet14_cifar100_{folder}'
    assert {k for k in record if k.startswith('loss_')} == loss_names
    assert summary['params_deployed'] == count_params(create_model('resnet8', 100))
    if 'crd' in folder:
        state = load_checkpoint(run_dir / 'last.pth')['distiller']
        assert state['criterion_crd.contrast.memory_v1'].shape == (200, 128)
        assert (state['criterion_crd.contrast.params'][2:4] > 0).all()      # Z fixed and saved for resume
    if 'dkd' in folder:
        args = json.loads((run_dir / 'args.json').read_text())
        assert (args['dkd_beta'], args['dkd_warmup']) == (2.0, 20)
        assert record['loss_dkd'] > 0


def test_cli_crd_resume_continues_with_the_same_memory_and_z(tmp_path, data_dir, teacher_ckpt, capsys):
    def metrics(save_dir, epochs, *extra):
        argv = ['--path_t', str(teacher_ckpt), '--model_s', 'resnet8', '--data_folder', data_dir,
                '--save_dir', str(save_dir), *FAST, '--distill', 'crd', '--nce_k', '16',
                '--epochs', str(epochs), *extra]
        assert train_student.cli(argv) == 0
        (run_dir,) = (save_dir / 'student_model').iterdir()
        lines = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != 'time'} for r in lines]

    straight = metrics(tmp_path / 'straight', 2)
    metrics(tmp_path / 'resumed', 1)
    capsys.readouterr()
    resumed = metrics(tmp_path / 'resumed', 2, '--resume')
    assert 'normalization constant' not in capsys.readouterr().out     # Z came back from last.pth
    assert resumed == straight


def test_cli_crd_epoch_never_contrasts_an_anchor_with_its_own_class(tmp_path, data_dir, teacher_ckpt, monkeypatch):
    """The real training path (CLI, loader, Distiller, CRDLoss): every row of memory indices the ContrastMemory
    scores has the anchor itself first (mode 'exact') and K distinct negatives of other classes, and an epoch
    visits every training sample once. Labels are read back from the data file, independently of the loader."""
    from tests.fixtures_data import read_cifar100_split

    labels = torch.tensor(read_cifar100_split(data_dir, train=True)[1])
    seen = []
    real_forward = ContrastMemory.forward

    def spy(self, v1, v2, y, idx=None):
        used = self.sample_indices(y) if idx is None else idx        # whatever the memory would score
        seen.append((y.clone(), used.clone(), idx is None))
        return real_forward(self, v1, v2, y, used)

    monkeypatch.setattr(ContrastMemory, 'forward', spy)
    run_student(data_dir, tmp_path, teacher_ckpt, '--distill', 'crd', '--nce_k', '16')
    assert len(seen) == 7                                              # 200 images, batch 32
    assert not any(fallback for _, _, fallback in seen)               # the loader's negatives, not uniform draws
    anchors = torch.cat([y for y, _, _ in seen])
    rows = torch.cat([idx for _, idx, _ in seen])
    assert sorted(anchors.tolist()) == list(range(len(labels)))
    assert rows.shape == (len(labels), 17)
    assert torch.equal(rows[:, 0], anchors)
    negatives = rows[:, 1:]
    assert (labels[negatives] != labels[anchors][:, None]).all()
    assert all(len(set(row)) == 16 for row in negatives.tolist())   # drawn without replacement from the pool


def test_cli_simkd_saves_a_standalone_student(tmp_path, data_dir, teacher_ckpt):
    run_dir, record, summary = run_student(data_dir, tmp_path, teacher_ckpt, '--distill', 'simkd')
    assert run_dir.name == 'S:resnet8_T:resnet14_cifar100_simkd_r:0.0_a:0.0_b:1.0_1'
    assert {k for k in record if k.startswith('loss_')} == {'loss_ce', 'loss_simkd'}
    projector = SimKD(s_n=64, t_n=64, factor=2)
    assert summary['params_deployed'] == (count_params(create_model('resnet8', 100)) + count_params(projector)
                                          + 64 * 100 + 100)
    ckpt = load_checkpoint(run_dir / 'ckpt_epoch_1.pth')
    assert ckpt['deploy']['kind'] == 'simkd' and ckpt['deploy']['cls_t'] == 'fc'
    model = load_deployed(run_dir / 'ckpt_epoch_1.pth')
    data = get_dataloaders('cifar100', data_dir, batch_size=32, num_workers=0, download=False)
    assert validate(model, data.val_loader, torch.device('cpu'))['acc'] == pytest.approx(summary['last_acc'])
