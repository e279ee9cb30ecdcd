"""Several processes (torchrun) on one or more machines: DistributedDataParallel for both CLIs.

    torchrun --nproc_per_node 8 train_student.py --dataset imagenet ...        # one machine, 8 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 train_student.py ...

Without torchrun's environment (``WORLD_SIZE`` unset or 1) nothing here does anything: the single-process
path is the default and unchanged. Under torchrun:

- ``setup``: ``init_process_group`` through ``env://`` (nccl on CUDA, gloo on the CPU), one GPU per process
  (``cuda:LOCAL_RANK``); ranks other than 0 print nothing (stdout goes to /dev/null; errors still reach stderr).
- ``--batch_size`` is the **global** batch (mdistiller's convention; torchvision's ``-b`` is per GPU): each of
  N processes loads ``batch_size / N`` images, so a run's optimisation does not depend on the GPU count.
- ``shard``: the training loader gets a ``DistributedSampler`` (seeded with ``--seed``; ``dataset.set_epoch``
  calls its ``set_epoch`` and gives each rank its own augmentation stream); the evaluation loaders get
  ``ShardWithoutPadding`` (rank r takes images r, r+N, ...), so every test image is counted exactly once
  (DistributedSampler would repeat images to even out the shards), and ``all_reduce_meters`` sums
  correct counts and totals over ranks, never per-rank averages.
- ``wrap``: the distiller's training step runs inside ``DistributedDataParallel`` (gradients averaged over
  ranks; ``find_unused_parameters`` since some methods leave parameters unused in a step). Buffers are not
  broadcast each step (CRD's memory bank would be sent every step); instead ``sync_batchnorm_stats``
  averages BatchNorm running statistics over ranks at the end of every epoch, so all ranks evaluate and save
  identical models. BN batch statistics are per process (as under mdistiller's DataParallel).
- CRD's memory bank (crd/memory.py) is updated with the batches of all ranks (``all_gather_cat``) and its
  normalisation constants are averaged over ranks, so every rank keeps an identical bank.
- Offline stages (letKD/QUEST quantizers, TDD trees, AB/FT/FSP init) run in ``main_first``: rank 0 builds
  and writes the cache under the existing file lock while the others wait at a barrier, then load it;
  ``wrap`` then broadcasts rank 0's parameters and buffers once.
- Only rank 0 writes files (``is_main``; helper/util.py's checkpoint and JSON writers check it).
- Resume: every rank loads ``last.pth``; the global RNG states saved by rank 0 are every rank's (all ranks
  share the seed and draw the same amounts), and the samplers are pure functions of (seed, epoch).
"""
from __future__ import annotations

import contextlib
import os
import sys
import weakref
from datetime import timedelta
from typing import Any, Callable, Iterator, Sized

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from helper.errors import UserError

# long enough for rank 0 to build quantizers while the others wait at a barrier (build them beforehand at
# ImageNet scale: helper/letkd_offline.py)
TIMEOUT = timedelta(hours=3)
_WRAPPED: 'weakref.WeakKeyDictionary[nn.Module, nn.Module]' = weakref.WeakKeyDictionary()


def launched_by_torchrun() -> bool:
    """True when torchrun (or an equivalent launcher, e.g. Slurm via scripts/launch.py) set WORLD_SIZE > 1."""
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and logs."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group when launched by torchrun; returns the device this process trains on.

    Single process: returns ``device`` unchanged. Under torchrun: nccl with ``cuda:LOCAL_RANK`` when
    ``device`` is CUDA, else gloo on the CPU.
    """
    if not launched_by_torchrun():
        return device
    if is_distributed():  # already joined (several runs in one process, e.g. tests/ddp_worker.py)
        return torch.device('cuda', local_rank()) if device.type == 'cuda' else device
    if device.type == 'cuda':
        if torch.cuda.device_count() <= local_rank():
            raise UserError(f"process {local_rank()} of this machine has no GPU (only {torch.cuda.device_count()} "
                            "visible); use --nproc_per_node <= the GPU count")
        torch.cuda.set_device(local_rank())
        device = torch.device('cuda', local_rank())
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', init_method='env://', timeout=TIMEOUT)
    if not is_main():
        sys.stdout = open(os.devnull, 'w')
    return device


def local_rank() -> int:
    return int(os.environ.get('LOCAL_RANK', '0'))


def cleanup() -> None:
    """Leave the process group (end of a run)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (building caches under their file locks); the others wait, then run it
    (finding the caches)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def per_process_batch(batch_size: int) -> int:
    """The per-process share of the global ``--batch_size``; UserError unless the world size divides it."""
    n = world_size()
    if batch_size % n:
        raise UserError(f"--batch_size {batch_size} is the global batch and must be divisible by the "
                        f"{n} processes")
    return batch_size // n


class ShardWithoutPadding(Sampler[int]):
    """Rank r of N takes indices r, r+N, r+2N, ... in order: a partition of the data set with no repeats."""

    def __init__(self, data: Sized, num_replicas: int, rank: int) -> None:
        self.n, self.num_replicas, self.rank = len(data), num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


def _reloaded(loader: DataLoader, sampler: Sampler, batch_size: int, drop_last: bool) -> DataLoader:
    return DataLoader(loader.dataset, batch_size=batch_size, sampler=sampler, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, drop_last=drop_last, worker_init_fn=loader.worker_init_fn,
                      persistent_workers=loader.persistent_workers, generator=torch.Generator())


def shard(data: Any, seed: int) -> Any:
    """The DataBundle with its training loader sharded (DistributedSampler, global batch split) and its
    evaluation loaders sharded without padding; unchanged in a single process."""
    if not is_distributed():
        return data
    n, r = world_size(), rank()
    train = data.train_loader
    data.train_loader = _reloaded(train, DistributedSampler(train.dataset, num_replicas=n, rank=r, shuffle=True,
                                                            seed=seed, drop_last=train.drop_last),
                                  per_process_batch(train.batch_size), train.drop_last)
    for name in ('val_loader', 'test_loader'):
        loader = getattr(data, name, None)
        if loader is not None:
            setattr(data, name, _reloaded(loader, ShardWithoutPadding(loader.dataset, n, r), loader.batch_size,
                                          False))
    return data


def wrap(distiller: nn.Module, device: torch.device) -> None:
    """Run ``distiller.forward_train`` inside DistributedDataParallel from now on (no-op in one process)."""
    if not is_distributed():
        return
    step = _TrainStep(distiller)
    ids = [device.index] if device.type == 'cuda' else None
    _WRAPPED[distiller] = nn.parallel.DistributedDataParallel(step, device_ids=ids, broadcast_buffers=False,
                                                              find_unused_parameters=True)


class _TrainStep(nn.Module):
    """The distiller's training step as a module ``forward``, so DDP can hook its parameters' gradients."""

    def __init__(self, distiller: nn.Module) -> None:
        super().__init__()
        self.distiller = distiller

    def forward(self, image: torch.Tensor, target: torch.Tensor, **extras: Any) -> Any:
        return self.distiller.forward_train(image, target, **extras)


def forward_train_of(distiller: nn.Module) -> Callable[..., Any]:
    """What the training loop calls for a step: the DDP-wrapped step, or the distiller's own forward_train."""
    wrapped = _WRAPPED.get(distiller)
    return distiller.forward_train if wrapped is None else wrapped


def all_reduce_meters(*meters: Any) -> None:
    """Sum the totals and counts of AverageMeters (fields sum and count) over ranks, in place."""
    if not is_distributed() or not meters:
        return
    totals = torch.tensor([[float(m.sum), float(m.count)] for m in meters], dtype=torch.float64)
    backend_device = 'cuda' if dist.get_backend() == 'nccl' else 'cpu'
    totals = totals.to(backend_device)
    dist.all_reduce(totals)
    for meter, (total, count) in zip(meters, totals.tolist()):
        meter.sum, meter.count = total, int(round(count))


@torch.no_grad()
def sync_batchnorm_stats(module: nn.Module) -> None:
    """Average BatchNorm running means/variances over ranks (batch counters are equal already); a frozen
    teacher (submodule ``teacher``) is identical on every rank and skipped."""
    if not is_distributed():
        return
    for name, m in module.named_modules():
        if name == 'teacher' or name.startswith('teacher.'):
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
            for buffer in (m.running_mean, m.running_var):
                dist.all_reduce(buffer)
                buffer.div_(world_size())


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """The concatenation over ranks (in rank order) of equally shaped tensors ``t``; ``t`` in one process."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a tensor (a copy on the tensor's device); ``t`` in one process."""
    if not is_distributed():
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on some rank (a collective: every rank must call it)."""
    if not is_distributed():
        return flag
    device = 'cuda' if dist.get_backend() == 'nccl' else 'cpu'
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor (a copy); ``t`` in one process."""
    if not is_distributed():
        return t
    return sum_over_ranks(t) / world_size()


class NullWriter:
    """A SummaryWriter stand-in for ranks other than 0."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
