"""letKD's teacher targets recomputed by explicit loops, away from the defaults of test_letkd.py: --letkd_tau
other than 1, and the pooled ResNet50 -> MobileNetV2 pair (the teacher's 4x4 maps averaged over 2x2 windows to
the student's 2x2). The teacher maps are read by plain torch hooks on the modules named here, the codebooks
are placed near the teacher's rows so that the soft assignments are far from one-hot (a wrong tau or a wrong
pooling changes them), and every expectation is computed position by position in float64."""
import pytest
import torch

from distiller_zoo import build_distiller
from models import create_model
from tests.options import data_info, student_options


def options(distill, model_t, model_s, **kw):
    base = dict(gamma=1.0, alpha=0.0, beta=1.0, k_penult=8, k_inter=2, letkd_tau=2.5, quantizer_seed=0,
                dataset='cifar100', path_t=None, model_s=model_s, model_t=model_t)
    base.update(kw)
    return student_options(distill, **base)


@torch.no_grad()
def module_outputs(model, names, x):
    """name -> the output of ``model``'s submodule ``name`` in one forward of ``x``, read by plain forward hooks."""
    seen = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda m, args, out, name=name: seen.__setitem__(name, out.clone())) for name in names]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def avg_pool_windows(t, size):
    """Explicit average over the (H/h) x (W/w) windows of t (B, C, H, W) -> (B, C, h, w)."""
    b, c, height, width = t.shape
    fh, fw = height // size[0], width // size[1]
    assert (fh * size[0], fw * size[1]) == (height, width)
    out = torch.empty(b, c, *size, dtype=t.dtype)
    for i in range(size[0]):
        for j in range(size[1]):
            out[:, :, i, j] = t[:, :, i * fh:(i + 1) * fh, j * fw:(j + 1) * fw].mean((2, 3))
    return out


def rows_of(t):
    """[(b, i, j, t[b, :, i, j] as float64)] in the image, row, column order."""
    return [(b, i, j, t[b, :, i, j].double()) for b in range(t.shape[0]) for i in range(t.shape[2])
            for j in range(t.shape[3])]


def soft_codebook(t, k, tau, seed=0):
    """k centroids around the mean row of t, offset (one common norm, which cancels in the softmax) within the
    span of the centred rows, so that the soft assignments at ``tau`` are far from one-hot and from uniform."""
    rows = torch.stack([r for *_, r in rows_of(t)])
    centred = rows - rows.mean(0)
    radius = centred.norm(dim=1).mean()
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randn(k, len(rows), generator=g, dtype=torch.float64) @ centred
    offsets = offsets / offsets.norm(dim=1, keepdim=True) * 1.5 / (tau * radius)
    return (rows.mean(0) + offsets).float()


def loop_codebook_kl(t, centroids, tau, scores):
    """Mean over positions of KL(softmax_k(-tau * sum_c (t - rho_k)^2) || softmax(scores)); also the targets."""
    total, targets = 0.0, []
    for b, i, j, tv in rows_of(t):
        d2 = torch.stack([((tv - centroids[k].double()) ** 2).sum() for k in range(len(centroids))])
        p = torch.exp(-tau * (d2 - d2.min()))
        p = p / p.sum()
        logq = scores[b, :, i, j].double().log_softmax(0)
        total += float((p * (p.log() - logq)).sum())
        targets.append(p)
    return total / len(targets), torch.stack(targets)


def test_penultimate_target_uses_letkd_tau():
    """--letkd_tau 2.5, resnet8 -> resnet8 (no pooling): target = softmax(-2.5 * squared distance) per position."""
    torch.manual_seed(0)
    o = options('letkd1', 'resnet8', 'resnet8')
    teacher = create_model('resnet8', 10)
    d = build_distiller('letkd1', create_model('resnet8', 10), teacher, o, data_info(num_classes=10))
    assert d.quantizers['penult'].tau == 2.5
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    t = module_outputs(teacher, ['layer3'], x)['layer3']             # (2, 64, 8, 8)
    centroids = soft_codebook(t, 8, 2.5)
    d.quantizers['penult'].load({'centroids': centroids})
    _, losses = d.forward_train(x, y)
    scores = d.student.scores['penult'].detach()
    expected, p = loop_codebook_kl(t, centroids, 2.5, scores)
    assert 0.2 < p.max(1).values.mean() < 0.9                        # soft targets: tau matters
    assert abs(loop_codebook_kl(t, centroids, 1.0, scores)[0] - expected) > 0.05 * expected
    assert losses['kl_penult'].item() == pytest.approx(expected, rel=1e-4)
    # the quantizer's targets themselves, rows in image, row, column order
    rows = torch.stack([r for *_, r in rows_of(t)]).float()
    target, hard = d.quantizers['penult'](rows, y.repeat_interleave(64))
    torch.testing.assert_close(target.double(), p, rtol=1e-4, atol=1e-6)
    assert hard.tolist() == p.argmax(1).tolist()


def test_resnet50_to_mobilenetv2_targets_come_from_the_average_pooled_teacher_map():
    """The teacher's layer4.0 / layer4 maps (2048 x 4 x 4) are 2x2-window averages at the student's 2x2 positions
    before both quantizers; --letkd_tau 2.5; 5 classes x 2 sub-classes."""
    torch.manual_seed(0)
    num_classes, k_inter, n_comp = 5, 2, 4
    # the random-init ResNet50 in eval mode is positively homogeneous up to layer4 (no conv biases, BN at its
    # initial identity): 1e-3 x the usual inputs gives maps of norm ~1 instead of ~1e3, where float32 keeps
    # the targets' precision
    x, y = 1e-3 * torch.randn(2, 3, 32, 32), torch.tensor([4, 1])
    teacher = create_model('ResNet50', num_classes)
    o = options('letkd2', 'ResNet50', 'MobileNetV2', k_inter=k_inter)
    d = build_distiller('letkd2', create_model('MobileNetV2', num_classes), teacher, o,
                        data_info(num_classes=num_classes))
    assert d.teacher_shapes == {'inter': (2048, 4, 4), 'penult': (2048, 4, 4)}
    assert d.pool_sizes == {'inter': (2, 2), 'penult': (2, 2)}
    maps = module_outputs(teacher, ['layer4.0', 'layer4'], x)
    pooled = {role: avg_pool_windows(maps[name], (2, 2)) for role, name in (('inter', 'layer4.0'), ('penult', 'layer4'))}

    centroids = soft_codebook(pooled['penult'], 8, 2.5)
    d.quantizers['penult'].load({'centroids': centroids})
    # intermediate: random LDA; each image's class gets the projections of two of its own positions as centroids
    g = torch.Generator().manual_seed(1)
    scalings, xbar = torch.randn(2048, n_comp, generator=g) / 45, pooled['inter'].mean((0, 2, 3))
    z = {(b, i, j): (tv - xbar.double()) @ scalings.double() for b, i, j, tv in rows_of(pooled['inter'])}
    sub_centroids = torch.randn(num_classes * k_inter, n_comp, generator=g)
    for b in range(2):
        sub_centroids[k_inter * y[b]] = z[(b, 0, 0)].float()
        sub_centroids[k_inter * y[b] + 1] = z[(b, 1, 1)].float()
    s_t = (3 * torch.rand(num_classes * k_inter, num_classes * k_inter, generator=g)).softmax(1)
    d.quantizers['inter'].load({'scalings': scalings, 'xbar': xbar, 'centroids': sub_centroids, 'scores': s_t})

    _, losses = d.forward_train(x, y)
    scores = {role: s.detach() for role, s in d.student.scores.items()}
    assert scores['penult'].shape == (2, 8, 2, 2) and scores['inter'].shape == (2, 10, 2, 2)
    expected, p = loop_codebook_kl(pooled['penult'], centroids, 2.5, scores['penult'])
    assert 0.2 < p.max(1).values.mean() < 0.9
    assert losses['kl_penult'].item() == pytest.approx(expected, rel=1e-4)

    total, chosen = 0.0, []
    for b, i, j, _ in rows_of(pooled['inter']):
        own = [k_inter * y[b].item() + m for m in range(k_inter)]
        k_star = min(own, key=lambda k: float(((z[(b, i, j)] - sub_centroids[k].double()) ** 2).sum()))
        chosen.append(k_star)
        p = s_t[k_star].double()
        total += float((p * (p.log() - scores['inter'][b, :, i, j].double().log_softmax(0))).sum())
    assert sorted(set(chosen)) == [2, 3, 8, 9]        # both sub-classes of both images' classes are used
    assert losses['kl_inter'].item() == pytest.approx(total / 8, rel=1e-4)
