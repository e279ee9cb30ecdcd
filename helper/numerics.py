"""Float32 numerics of a run: TF32 on CUDA, set in both directions, and a float32-accurate matmul under TF32.

torch's defaults on CUDA are TF32 off for matmuls and ON for cuDNN convolutions, so a run that never says
anything convolves in TF32. ``set_tf32(False)`` (the reference path, ``--no-tf32``) turns both off: true
float32; ``set_tf32(True)`` (``--tf32``, on with ``--fast``) turns both on. Only the legacy ``allow_tf32``
flags are written: torch raises when code mixes them with the newer ``fp32_precision`` API, and torch's own
compiler still reads the legacy ones.

Some values must stay float32-accurate whatever the flags say: letKD's codebook distances (tau times a TF32
rounding visibly moves the soft targets) and its LDA projection. ``fp32_matmul`` computes them inside the
compiled step, where a flag cannot be switched locally, as three TF32-exact products (Ozaki-style split).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

# the 13 low mantissa bits TF32 drops (sign, exponent and 10 mantissa bits kept): 0xFFFFE000 as int32
_TF32_HEAD_MASK = -8192


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions, both on or both off (no effect on the CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def tf32_state() -> tuple[bool, bool, str]:
    """(matmul TF32, cuDNN TF32, float32 matmul precision): what ``restore_tf32`` puts back."""
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


def restore_tf32(state: tuple[bool, bool, str]) -> None:
    """Put back a ``tf32_state()``."""
    torch.set_float32_matmul_precision(state[2])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = state[0], state[1]


def matmul_may_round(device: torch.device) -> bool:
    """True when a float32 matmul on ``device`` may run in TF32 (CUDA with TF32 matmuls allowed)."""
    return device.type == 'cuda' and (torch.backends.cuda.matmul.allow_tf32
                                      or torch.get_float32_matmul_precision() != 'highest')


@contextlib.contextmanager
def float32_matmuls() -> Iterator[None]:
    """float32 matrix products in full fp32 (no TF32 on CUDA) for the duration; the caller's setting is
    restored afterwards. torch has two switches that must not be mixed (torch >= 2.9 raises): the legacy one
    (``allow_tf32`` / ``set_float32_matmul_precision``) and ``fp32_precision``; whichever the caller used is
    the one changed, and nothing is touched when TF32 is already off."""
    matmul = torch.backends.cuda.matmul
    try:
        precision = torch.get_float32_matmul_precision()       # raises once the new switch was used
    except RuntimeError:
        precision = None
    if precision is None:
        before = matmul.fp32_precision
        matmul.fp32_precision = 'ieee'
        try:
            yield
        finally:
            matmul.fp32_precision = before
    elif precision != 'highest':
        torch.set_float32_matmul_precision('highest')
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(precision)
    else:
        yield


def tf32_head(x: Tensor) -> Tensor:
    """``x`` (float32) truncated to the bits TF32 keeps: exactly representable in TF32."""
    return (x.view(torch.int32) & _TF32_HEAD_MASK).view(torch.float32)


def split_product(a: Tensor, b: Tensor, mm: Callable[[Tensor, Tensor], Tensor] = torch.matmul) -> Tensor:
    """``a @ b`` from three products of TF32-exact operands: each float32 operand is a head, exactly
    representable in TF32, plus a tail, x = h + t with |t| < 2^-10 |x|, and a @ b = ha @ hb + ha @ tb + ta @ hb
    (the tail product, ~2^-20 relative, is dropped). With TF32 products (exact on the heads, accumulating in
    float32) the result is ~2^-21 relative, float32 accuracy; ``mm`` is the product (tests emulate TF32)."""
    head_a, head_b = tf32_head(a), tf32_head(b)
    return mm(head_a, head_b) + (mm(head_a, b - head_b) + mm(a - head_a, head_b))


class _SplitMatmul(torch.autograd.Function):
    """``split_product`` with gradients that are split products too (2-D operands)."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return split_product(a, b)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        a, b = ctx.saved_tensors
        grad_a = split_product(grad, b.t()) if ctx.needs_input_grad[0] else None
        grad_b = split_product(a.t(), grad) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def fp32_matmul(a: Tensor, b: Tensor, *, split: bool | None = None) -> Tensor:
    """``a @ b`` for 2-D float operands (n, k) @ (k, m), in float32 accuracy even where matmuls run in TF32.

    ``split`` (default: ``matmul_may_round(a.device)``) computes it, and its gradients, as ``split_product``:
    three TF32 products instead of one; without it, one plain float32 matmul. Autocast is the caller's to
    switch off (the operands are cast to float32 here).
    """
    a, b = a.float(), b.float()
    if split is None:
        split = matmul_may_round(a.device)
    return _SplitMatmul.apply(a, b) if split else a @ b
