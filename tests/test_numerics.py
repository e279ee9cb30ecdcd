"""helper/numerics.py: TF32 set in both directions, and a matmul that stays float32-accurate where the products
run in TF32 (emulated here: the CPU has no TF32)."""
from __future__ import annotations

import torch

from helper import numerics
from helper.numerics import fp32_matmul, set_tf32, split_product, tf32_head, tf32_state


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to nearest (ties away) at TF32's 10 mantissa bits, as a TF32 tensor core reads its inputs."""
    bits = x.view(torch.int32)
    return ((bits + 0x1000) & -8192).view(torch.float32)


def tf32_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """An emulated TF32 GEMM: inputs rounded to TF32, products and sums exact (float64), result float32."""
    return (tf32_round(a).double() @ tf32_round(b).double()).float()


def operands(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 48, generator=g) * 3, torch.rand(48, 80, generator=g) + 0.5


def test_the_head_is_tf32_exact_and_the_tail_small():
    a, _ = operands()
    head = tf32_head(a)
    assert torch.equal(tf32_round(head), head)                 # representable in TF32: rounding leaves it
    tail = a - head
    assert (tail.abs() <= a.abs() * 2 ** -10).all() and tail.abs().max() > 0


def test_split_product_is_float32_accurate_under_emulated_tf32_and_the_plain_product_is_not():
    a, b = operands()
    exact = a.double() @ b.double()
    scale = (a.abs().double() @ b.abs().double())             # the size of the sums: error relative to it
    plain_error = ((tf32_mm(a, b) - exact).abs() / scale).max()
    split_error = ((split_product(a, b, mm=tf32_mm) - exact).abs() / scale).max()
    fp32_error = ((a @ b - exact).abs() / scale).max()
    assert plain_error > 2e-4                                  # TF32: ~2^-11
    assert split_error < 2e-6 and split_error < 8 * fp32_error + 1e-7   # float32 territory


def test_fp32_matmul_values_and_gradients_match_the_plain_product():
    a, b = operands(1)
    a.requires_grad_(True)
    b.requires_grad_(True)
    for split in (False, True):
        out = fp32_matmul(a, b, split=split)
        grad = torch.randn_like(out)
        ga, gb = torch.autograd.grad(out, (a, b), grad)
        # sums of 48-64 terms of size ~3: float32 rounding of the sums is ~1e-5 absolute
        torch.testing.assert_close(out, a @ b, rtol=1e-5, atol=5e-5)
        torch.testing.assert_close(ga, grad @ b.t(), rtol=1e-5, atol=5e-5)
        torch.testing.assert_close(gb, a.t() @ grad, rtol=1e-5, atol=5e-5)


def test_split_is_chosen_only_where_a_matmul_may_run_in_tf32(monkeypatch):
    cuda, cpu = torch.device('cuda'), torch.device('cpu')
    state = tf32_state()
    try:
        set_tf32(False)
        assert not numerics.matmul_may_round(cuda) and not numerics.matmul_may_round(cpu)
        set_tf32(True)
        assert numerics.matmul_may_round(cuda) and not numerics.matmul_may_round(cpu)
        set_tf32(False)
        torch.set_float32_matmul_precision('high')             # TF32 through the other switch
        assert numerics.matmul_may_round(cuda)
    finally:
        numerics.restore_tf32(state)


def test_set_tf32_sets_both_switches_in_both_directions():
    state = tf32_state()
    try:
        set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32(False)       # cuDNN's TF32 is on by default in torch: off here too
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        numerics.restore_tf32(state)
