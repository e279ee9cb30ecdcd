"""Graph breaks and compilations of torch.compile, counted over a block (torch._dynamo's own counters).

    with CompileCounter() as compiled:
        train_one_epoch_fast(trainer, loader, epoch=1)
    compiled.graph_breaks, compiled.frames, compiled.reasons

``frames`` is the number of frames dynamo compiled in the block. One compiled training step without graph breaks
compiles one frame the first time and another each time a guard fails, so ``frames - 1`` are its recompiles.
The fast path's promise (docs/speed.md, "One graph per step"): every method's step has ``graph_breaks == 0`` and
``frames <= 2`` over a run.
"""
from __future__ import annotations

from collections import Counter
from typing import Any


def _snapshot() -> tuple[Counter, int]:
    from torch._dynamo.utils import counters
    return Counter(counters['graph_break']), int(counters['frames']['total'])


class CompileCounter:
    """Counts graph breaks (with their reasons) and compiled frames between ``__enter__`` and ``__exit__``."""

    def __init__(self) -> None:
        self.graph_breaks = 0
        self.frames = 0
        self.reasons: list[str] = []

    def __enter__(self) -> 'CompileCounter':
        self._breaks, self._frames = _snapshot()
        return self

    def __exit__(self, *exc: Any) -> None:
        breaks, frames = _snapshot()
        new = breaks - self._breaks
        self.graph_breaks = sum(new.values())
        self.reasons = [reason.splitlines()[0] for reason in new]
        self.frames = frames - self._frames

    @property
    def recompiles(self) -> int:
        """Compilations beyond the first (for a block that runs one compiled function)."""
        return max(0, self.frames - 1)

    def summary(self) -> str:
        return f"{self.graph_breaks} graph breaks, {self.frames} frames compiled" + \
            (f"; breaks: {'; '.join(self.reasons[:3])}" if self.reasons else '')
