"""Count host syncs (the operations that make the CPU wait for the device) in a block of code.

    with SyncCounter() as syncs:
        trainer.step(batch)
    assert syncs.count == 0, syncs.summary()

Counted, on any device (so CPU tests see what would stall a GPU):
- aten ops that copy a value to the host: ``_local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``,
  ``if t:``), ``equal``, ``is_nonzero``;
- aten ops whose output size depends on the data (the host must read it): ``nonzero``, ``masked_select``,
  ``unique`` and its variants, ``repeat_interleave`` without ``output_size``, ``bincount``;
- copies from a non-CPU device to the CPU (``_to_copy`` / ``copy_``), i.e. ``.cpu()`` / ``.to('cpu')`` on CUDA;
- the Python methods ``Tensor.tolist``, ``Tensor.numpy`` and ``Tensor.cpu``, which read device memory on a GPU
  but never reach the dispatcher for CPU tensors (so they are patched for the duration of the block).

With ``kernel_syncs=True`` it also counts the ops that sync inside their CUDA kernel, invisible on CPU tensors:
linalg's SVD / eigen-decompositions (cuSOLVER's info is checked on the host) and ``histc`` (its range is read).

Not seen: code that a compiled graph (torch.compile / inductor) runs without dispatching aten ops; count an
eager step. A dispatch mode is thread-local: work in other threads is not counted.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
SYNC_OPS = {
    _aten._local_scalar_dense.default, _aten.equal.default, _aten.is_nonzero.default,
    _aten.nonzero.default, _aten.masked_select.default, _aten.bincount.default,
    _aten.unique_dim.default, _aten.unique_consecutive.default, _aten._unique.default, _aten._unique2.default,
    _aten.repeat_interleave.Tensor,
}
SYNC_PACKETS = {op.overloadpacket for op in SYNC_OPS}
KERNEL_SYNC_PACKETS = {_aten._linalg_svd, _aten.linalg_svd, _aten._linalg_eigh, _aten.linalg_eig, _aten.histc}
PATCHED_METHODS = ('tolist', 'numpy', 'cpu')


def _devices(values: Any) -> set[str]:
    found: set[str] = set()
    for value in values if isinstance(values, (list, tuple)) else [values]:
        if isinstance(value, torch.Tensor):
            found.add(value.device.type)
        elif isinstance(value, (list, tuple)):
            found |= _devices(value)
    return found


class SyncCounter(TorchDispatchMode):
    """A dispatch mode (plus a few patched Tensor methods) counting host syncs; ``count``, ``ops``, ``summary()``."""

    def __init__(self, kernel_syncs: bool = False) -> None:
        super().__init__()
        self.kernel_syncs = kernel_syncs
        self.ops: Counter[str] = Counter()
        self._saved: dict[str, Any] = {}

    @property
    def count(self) -> int:
        """Host syncs seen so far."""
        return sum(self.ops.values())

    def summary(self) -> str:
        """'op x n, ...' of what was counted."""
        return ', '.join(f'{name} x{n}' for name, n in self.ops.most_common()) or 'no syncs'

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.kernel_syncs and func.overloadpacket in KERNEL_SYNC_PACKETS:
            self.ops[str(func.overloadpacket)] += 1
        elif func in SYNC_OPS or func.overloadpacket in SYNC_PACKETS:
            if not (func.overloadpacket is _aten.repeat_interleave and kwargs.get('output_size') is not None):
                self.ops[str(func.overloadpacket)] += 1
        elif func.overloadpacket in (_aten._to_copy, _aten.copy_):
            source = _devices(args[1] if func.overloadpacket is _aten.copy_ else args[0])
            target = (kwargs.get('device') or (args[0].device if func.overloadpacket is _aten.copy_ else None))
            target_type = torch.device(target).type if target is not None else None
            if target_type == 'cpu' and source - {'cpu', 'meta'}:
                self.ops[f'{func.overloadpacket} to cpu'] += 1
        return func(*args, **kwargs)

    def __enter__(self) -> 'SyncCounter':
        for name in PATCHED_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor: torch.Tensor, *a: Any, _name: str = name, _original: Any = original, **k: Any) -> Any:
                self.ops[f'Tensor.{_name}'] += 1
                return _original(tensor, *a, **k)

            setattr(torch.Tensor, name, counted)
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
