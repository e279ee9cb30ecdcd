"""CRD's memory bank of embeddings (RepDistiller's ``ContrastMemory``; buffers keep its names)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from helper import distributed
from helper.numerics import fp32_matmul
from models.util import Normalize

# layout of the ``params`` buffer (RepDistiller's): K, T, Z_v1, Z_v2, momentum; Z < 0 means "not fixed yet"
_K, _T, _Z_V1, _Z_V2, _MOMENTUM = range(5)


class ContrastMemory(nn.Module):
    """Two memory banks of ``outputSize`` (= n_data) unit-norm embeddings of size ``inputSize``.

    ``memory_v1`` holds the student's embeddings, ``memory_v2`` the teacher's. forward(v1, v2, y, idx)
    scores each anchor against K+1 rows of the *other* network's memory (column 0 of ``idx`` is the
    positive), divides by the normalisers Z fixed at the first call, then moves rows ``y`` towards the
    new embeddings with ``momentum`` and renormalises them. The banks live wherever the module is moved.
    """

    def __init__(self, inputSize: int, outputSize: int, K: int, T: float = 0.07, momentum: float = 0.5,
                 *, seed: int = 0) -> None:
        super().__init__()
        self.n_data = int(outputSize)
        self.register_buffer('params', torch.tensor([K, T, -1.0, -1.0, momentum]))
        bound = 1.0 / math.sqrt(inputSize / 3)   # uniform in [-bound, bound] has variance 1 / inputSize
        self.register_buffer('memory_v1', torch.rand(outputSize, inputSize).mul_(2 * bound).add_(-bound))
        self.register_buffer('memory_v2', torch.rand(outputSize, inputSize).mul_(2 * bound).add_(-bound))
        self.l2norm = Normalize(2)
        self.K = int(K)
        self.seed = int(seed)
        # whether Z has been checked on the host since construction or the last load_state_dict: after
        # that first (syncing) call, the normalisers are only read as tensors, without a host sync
        self._z_checked = False
        self._generator: torch.Generator | None = None

    def sample_indices(self, y: Tensor) -> Tensor:
        """(B,) own indices -> (B, K+1) memory rows: column 0 = ``y``, then K uniform draws (with replacement).

        Only used when the loader gives no contrast indices; the draws come from a generator seeded
        with ``seed`` on the memory's device.
        """
        device = self.memory_v1.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        idx = torch.randint(self.n_data, (y.shape[0], self.K + 1), generator=self._generator, device=device)
        idx[:, 0] = y
        return idx

    def _scores(self, memory: Tensor, idx: Tensor, anchor: Tensor) -> Tensor:
        """exp(<memory[idx], anchor> / T): (B, K+1, 1); no gradient into the memory.

        The anchors are scored against the whole bank in one product (B x n_data floats, 13 MB for CIFAR-100
        at batch 64), then the (B, K+1) scores are gathered; gathering the rows first would copy B x (K+1) x
        feat_dim floats (0.5 GB at the defaults). The product's backward needs the bank as it was here, and the
        memory update changes it in place before the backward runs: so it reads a copy (n_data x feat_dim
        floats, 26 MB for CIFAR-100). In float32 (``fp32_matmul``, autocast off): after the division by
        T = 0.07 a bf16 or TF32 rounding of the score moves exp() by percents.
        """
        with torch.autocast(anchor.device.type, enabled=False):
            scores = fp32_matmul(anchor, memory.clone().t()).gather(1, idx)          # (B, K+1)
            return torch.exp(scores / self.params[_T].clone()).unsqueeze(2)

    # eager: the first step of a run (the fast path runs it uncompiled) reads Z on the host and prints it once
    @torch.no_grad()
    def _set_constants_once(self, out_v1: Tensor, out_v2: Tensor) -> None:
        """Z := mean(out) * n_data from the first batch (under torchrun: the mean over all ranks' first batches),
        for each Z not set yet (a loaded checkpoint has them)."""
        params = self.params.clone()
        for slot, out, name in ((_Z_V1, out_v1, 'Z_v1'), (_Z_V2, out_v2, 'Z_v2')):
            if params[slot].item() < 0:
                params[slot] = distributed.mean_over_ranks(out.mean().detach()) * self.n_data
                print(f'normalization constant {name} is set to {params[slot].item():.1f}', flush=True)
        # a new tensor, not an in-place write: a compiled step may have saved the old one (T's division) for backward
        self.params = params
        self._z_checked = True

    @torch.no_grad()
    def _update(self, memory: Tensor, y: Tensor, v: Tensor) -> None:
        momentum = self.params[_MOMENTUM]          # a tensor: no host read
        # under torchrun every rank applies every rank's batch, so all ranks keep an identical bank
        y, v = distributed.all_gather_cat(y), distributed.all_gather_cat(v.detach())
        rows = memory.index_select(0, y).mul_(momentum).add_(v * (1 - momentum))
        memory.index_copy_(0, y, self.l2norm(rows))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._z_checked = False        # the loaded Z may still be unset (< 0)

    def forward(self, v1: Tensor, v2: Tensor, y: Tensor, idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """v1, v2: (B, D) student / teacher embeddings; y: (B,) their dataset indices; idx: (B, K+1).

        Returns (out_v1, out_v2), each (B, K+1, 1): out_v1 = student anchor vs teacher memory,
        out_v2 = teacher anchor vs student memory, both divided by their Z.
        """
        if idx is None:
            idx = self.sample_indices(y)
        out_v1, out_v2 = self._scores(self.memory_v2, idx, v1), self._scores(self.memory_v1, idx, v2)
        if not self._z_checked:
            self._set_constants_once(out_v1, out_v2)
        # copies: autograd keeps them, and the constants are tensors (no host read per step)
        out_v1, out_v2 = out_v1 / self.params[_Z_V1].clone(), out_v2 / self.params[_Z_V2].clone()
        self._update(self.memory_v1, y, v1)
        self._update(self.memory_v2, y, v2)
        return out_v1.contiguous(), out_v2.contiguous()
