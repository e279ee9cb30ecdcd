"""letKD's fused paths: the log-sum-exp KL and fp32 targets (equal to the reference formulas, fewer
(N, K) buffers, fp32 under bf16 autocast) and the deployed network with BN folded (same logits)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distiller_zoo import build_distiller, load_deployed
from distiller_zoo.letkd import (CodebookQuantizer, FusedKDLayer, KDLayer, LetKDStudent, SubclassQuantizer,
                                 position_kl, position_kl_lse)
from helper import numerics
from helper.letkd_offline import codebook_targets, flatten_positions
from helper.util import save_checkpoint
from models import create_model
from tests.fixtures_data import load_random_quantizers
from tests.options import data_info, student_options


def codebook(k: int = 96, dim: int = 16, tau: float = 5.0, seed: int = 0) -> CodebookQuantizer:
    g = torch.Generator().manual_seed(seed)
    q = CodebookQuantizer(k, dim, tau)
    q.load({'centroids': torch.rand(k, dim, generator=g)})
    return q


class NewBuffers(TorchDispatchMode):
    """Counts op outputs of at least ``numel`` elements in fresh storage (views and in-place results excluded)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor) and o.numel() >= self.numel and o.untyped_storage().data_ptr() not in inputs:
                self.ops.append(func.overloadpacket.__name__)
        return out


# ---------------------------------------------------------------------------------------------- loss and targets

@pytest.mark.parametrize('tau', [1.0, 5.0])
def test_codebook_targets_and_lse_kl_equal_the_reference_values_and_gradients(tau):
    q = codebook(tau=tau)
    g = torch.Generator().manual_seed(1)
    t, scores = torch.rand(300, 16, generator=g), (3 * torch.randn(300, 96, generator=g)).requires_grad_()
    reference_p = codebook_targets(t, q.centroids, tau)
    reference = position_kl(scores, reference_p)
    reference_grad, = torch.autograd.grad(reference, scores)

    targets = q.targets(t, labels=None)
    kl = position_kl_lse(scores, targets.probs, targets.neg_entropy)
    grad, = torch.autograd.grad(kl, scores)
    assert torch.allclose(targets.probs, reference_p, rtol=1e-5, atol=1e-6)
    assert torch.allclose(targets.neg_entropy, torch.xlogy(reference_p, reference_p).sum(1), rtol=1e-5, atol=1e-5)
    assert torch.equal(targets.hard, reference_p.argmax(1))
    assert torch.allclose(kl, reference, rtol=1e-5) and torch.allclose(grad, reference_grad, rtol=1e-5, atol=1e-9)


def test_subclass_targets_and_lse_kl_equal_the_reference():
    g = torch.Generator().manual_seed(2)
    q = SubclassQuantizer(num_classes=4, k_inter=3, dim=8)
    scores_t = torch.rand(12, 12, generator=g).softmax(1)
    scores_t[0, 5] = 0.0                                  # zero probabilities: 0 log 0 = 0
    scores_t /= scores_t.sum(1, keepdim=True)             # rows of s_T are distributions
    q.load({'scalings': torch.randn(8, 3, generator=g), 'xbar': torch.rand(8, generator=g),
            'centroids': torch.randn(12, 3, generator=g), 'scores': scores_t})
    t, labels = torch.rand(50, 8, generator=g), torch.randint(0, 4, (50,), generator=g)
    scores = torch.randn(50, 12, generator=g).requires_grad_()
    reference_p, chosen = q(t, labels)
    reference = position_kl(scores, reference_p)
    targets = q.targets(t, labels)
    kl = position_kl_lse(scores, targets.probs, targets.neg_entropy)
    assert torch.equal(targets.hard, chosen) and torch.equal(targets.probs, reference_p)
    assert torch.allclose(kl, reference, rtol=1e-5)
    assert torch.allclose(torch.autograd.grad(kl, scores)[0], torch.autograd.grad(reference, scores)[0], atol=1e-8)


def test_targets_and_kl_make_fewer_position_by_word_buffers_than_the_reference():
    q, n, k = codebook(k=128), 256, 128
    t, scores = torch.rand(n, 16), torch.randn(n, k, requires_grad=True)
    with NewBuffers(n * k) as reference:
        position_kl(scores, codebook_targets(t, q.centroids, q.tau)).backward()
    with NewBuffers(n * k) as fused:
        targets = q.targets(t, None)
        position_kl_lse(scores, targets.probs, targets.neg_entropy).backward()
    # the logits (made into the probabilities in place), the softmax of the scores' backward, and at
    # most one temporary; the kl_div / log_softmax reference makes about eleven
    assert len(fused.ops) <= 3, fused.ops
    assert len(reference.ops) >= 2 * len(fused.ops), (reference.ops, fused.ops)


def test_targets_and_kl_stay_fp32_under_bf16_autocast():
    q = codebook(tau=5.0)
    g = torch.Generator().manual_seed(3)
    t, scores = torch.rand(200, 16, generator=g), torch.randn(200, 96, generator=g)
    exact = q.targets(t, None)
    exact_kl = position_kl_lse(scores, exact.probs, exact.neg_entropy)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        reference_bf16 = codebook_targets(t, q.centroids, q.tau)     # what autocast does to the plain formula
        under = q.targets(t, None)
        kl = position_kl_lse(scores.bfloat16(), under.probs, under.neg_entropy)
    assert under.probs.dtype == torch.float32 and kl.dtype == torch.float32
    assert torch.equal(under.probs, exact.probs) and torch.equal(under.hard, exact.hard)
    assert torch.allclose(kl, exact_kl, rtol=1e-2)                    # only the scores were rounded to bf16
    assert (reference_bf16.float() - exact.probs).abs().max() > 1e-2   # tau 5 x bf16 error: visibly shifted


def test_distiller_losses_are_fp32_and_match_under_autocast():
    torch.manual_seed(0)
    opt = student_options('letkd2', model_s='resnet8', model_t='resnet14', k_penult=32, k_inter=2, lda_dim=5,
                          dataset='cifar100', path_t=None)
    d = build_distiller('letkd2', create_model('resnet8', 10), create_model('resnet14', 10), opt, data_info(10))
    load_random_quantizers(d, n_comp=3)
    d.eval()                                                          # BN statistics fixed: same forward twice
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, losses = d.forward_train(x, y)
    assert all(losses[f'kl_{role}'].dtype == torch.float32 for role in ('inter', 'penult'))
    maps, _ = d.teacher_maps(x)
    _, fp32_losses = d.forward_train(x, y)
    for role in ('inter', 'penult'):
        p, _ = d.quantizers[role](flatten_positions(maps[role]),
                                  y.view(-1, 1).expand(-1, maps[role].shape[2] * maps[role].shape[3]).reshape(-1))
        expected = position_kl(flatten_positions(d.student.scores[role]), p)
        assert torch.allclose(fp32_losses[f'kl_{role}'], expected, rtol=1e-5)


def test_the_targets_gemms_are_split_where_tf32_may_round(monkeypatch):
    """Where a float32 matmul may run in TF32 (CUDA with TF32 on) the codebook distances and the LDA projection
    go through the split product (float32 accuracy; tests/test_numerics.py); the targets are the same."""
    q = codebook(tau=5.0)
    g = torch.Generator().manual_seed(5)
    sub = SubclassQuantizer(3, 2, 16)
    sub.load({'scalings': torch.randn(16, 4, generator=g), 'xbar': torch.rand(16, generator=g),
              'centroids': torch.randn(6, 4, generator=g), 'scores': torch.rand(6, 6, generator=g).softmax(1)})
    t, labels = torch.rand(200, 16, generator=g), torch.randint(0, 3, (200,), generator=g)
    plain, plain_sub = q.targets(t, None), sub.targets(t, labels)
    calls = []
    real = numerics.split_product
    monkeypatch.setattr(numerics, 'matmul_may_round', lambda device: True)
    monkeypatch.setattr(numerics, 'split_product', lambda a, b: calls.append(tuple(b.shape)) or real(a, b))
    split, split_sub = q.targets(t, None), sub.targets(t, labels)
    assert calls == [(16, 96), (16, 4)]                     # the distance GEMM, then the LDA projection
    # logits up to ~tau * 2 * 16: float32 rounding of the sums moves the probabilities by ~1e-5 relative
    torch.testing.assert_close(split.probs, plain.probs, rtol=5e-5, atol=1e-5)
    assert torch.equal(split.hard, plain.hard) and torch.equal(split_sub.hard, plain_sub.hard)


# ---------------------------------------------------------------------------------------------- folded BN

def trained_looking(student: LetKDStudent) -> LetKDStudent:
    """Random BN statistics and affine parameters in the KD layers (a fresh BN would make folding trivial)."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in student.kd_layers.values():
            k = layer.num_words
            layer.bn.running_mean.copy_(torch.rand(k, generator=g) * 2 - 1)
            layer.bn.running_var.copy_(torch.rand(k, generator=g) + 0.5)
            layer.bn.weight.copy_(torch.rand(k, generator=g) + 0.5)
            layer.bn.bias.copy_(torch.rand(k, generator=g) - 0.5)
            layer.predictor.scale.fill_(2.5)
            layer.value.scale.fill_(0.7)
    return student.eval()


@pytest.mark.parametrize('words', [{'penult': 4096}, {'inter': 200, 'penult': 64}])
def test_folded_kd_layers_give_the_same_logits(words):
    torch.manual_seed(0)
    layers = {role: KDLayer(64 if role == 'penult' else 64, k, alpha=0.5) for role, k in words.items()}
    student = trained_looking(LetKDStudent(create_model('resnet8', 100), 'resnet8', layers))
    x = torch.randn(4, 3, 32, 32)                   # 4 x 8 x 8 positions: several CPU chunks at K = 4096
    with torch.no_grad():
        expected = student(x)
        got = student.fold_bn()(x)
    assert all(isinstance(layer, FusedKDLayer) for layer in student.kd_layers.values())
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, create_model('resnet8', 100).eval()(x), atol=1e-3)   # the layers act
    with pytest.raises(RuntimeError, match='inference'):
        student.train()


def test_load_deployed_folds_after_loading_the_unfolded_checkpoint(tmp_path):
    torch.manual_seed(0)
    opt = student_options('letkd1', model_s='resnet8', model_t='resnet8', k_penult=512, dataset='cifar100',
                          path_t=None)
    d = build_distiller('letkd1', create_model('resnet8', 100), create_model('resnet8', 100), opt, data_info(100))
    trained_looking(d.student)
    save_checkpoint({'model': d.deployable().state_dict(), 'deploy': d.deploy_spec()}, tmp_path / 'ckpt.pth')
    x = torch.randn(3, 3, 32, 32)
    plain = load_deployed(tmp_path / 'ckpt.pth')
    folded = load_deployed(tmp_path / 'ckpt.pth', fold_bn=True)
    assert isinstance(folded.kd_layers['penult'], FusedKDLayer) and isinstance(plain.kd_layers['penult'], KDLayer)
    with torch.no_grad():
        assert torch.allclose(folded(x), plain(x), rtol=1e-5, atol=1e-5)
        assert torch.allclose(plain(x), d.student.eval()(x), atol=0)
