"""Weighted running means kept on the device: updated inside a training step without a host sync, read once.

    meters = DeviceMeters(['kl', 'agree'], device)
    meters.add(torch.stack([kl, agree]), torch.tensor([n, n]))   # in place, no sync (fine inside torch.compile)
    meters.averages()                                            # {'kl': ..., 'agree': ...}: one read

The sums are registered buffers changed in place (non-persistent: never in a checkpoint), so a compiled step
that updates them has them as static inputs, as CUDA graphs need. One class serves the fast loop's loss and
accuracy sums, letKD's per-site metrics and TDD's head accuracies.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor


def sum_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (CPU, CUDA), else float32 (MPS)."""
    return torch.float32 if device.type == 'mps' else torch.float64


class DeviceMeters(nn.Module):
    """Weighted sums ``sums[i] = sum w_i * v_i`` and weights ``counts[i] = sum w_i`` of named values.

    ``add(values (n,), weight)`` adds in place with the same ``weight`` (a number or 0-dim tensor, e.g. the
    batch size) for every name, except the names in ``per_call``, which get weight 1 (a mean over calls);
    ``averages()`` reads sums / counts (0 where nothing was added) in one host read; ``reset()`` zeroes both.
    """

    def __init__(self, names: Sequence[str], device: torch.device | str | None = None,
                 per_call: Sequence[str] = ()) -> None:
        super().__init__()
        self.names = list(names)
        device = torch.device(device or 'cpu')
        dtype = sum_dtype(device)
        zeros = torch.zeros(len(self.names), dtype=dtype, device=device)
        self.register_buffer('sums', zeros.clone(), persistent=False)
        self.register_buffer('counts', zeros.clone(), persistent=False)
        weighted = torch.tensor([name not in per_call for name in self.names], dtype=dtype, device=device)
        self.register_buffer('weighted', weighted, persistent=False)

    def add(self, values: Tensor, weight: Tensor | float = 1.0) -> None:
        """Add ``w * values`` to the sums and ``w`` to the counts, w = ``weight`` (1 for ``per_call`` names);
        tensor arithmetic only: no host sync, no host-to-device copy."""
        w = self.weighted * weight + (1.0 - self.weighted)
        self.sums.add_(values.detach().to(self.sums.dtype) * w)
        self.counts.add_(w)

    def totals(self, reduce: Callable[[Tensor], Tensor] | None = None) -> tuple[list[float], list[float]]:
        """(sums, counts) as Python floats: one host read; ``reduce`` (e.g. a sum over ranks) applies first."""
        both = torch.stack([self.sums, self.counts])
        if reduce is not None:
            both = reduce(both)
        sums, counts = both.tolist()
        return sums, counts

    def averages(self, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """name -> sum / count (0.0 for a name never added), in one host read."""
        sums, counts = self.totals(reduce)
        return {name: (s / c if c else 0.0) for name, s, c in zip(self.names, sums, counts)}

    def take_averages(self) -> dict[str, float]:
        """The averages of the names added to since the last reset (one host read), then a reset."""
        sums, counts = self.totals()
        self.reset()
        return {name: s / c for name, s, c in zip(self.names, sums, counts) if c}

    def reset(self) -> None:
        """Zero the sums and counts in place (the buffers keep their addresses)."""
        self.sums.zero_()
        self.counts.zero_()
