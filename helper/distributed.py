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
  ranks). ``find_unused_parameters`` is the Distiller's class attribute of that name (default False: every
  registered method gives every trainable parameter a gradient in every step, tests/test_distributed.py);
  ``static_graph`` is on where that holds and the step is not compiled (DDPOptimizer and static graphs are
  reported not to mix). Buffers are not broadcast each step (CRD's memory bank would be sent every step);
  instead ``sync_batchnorm_stats`` averages BatchNorm running statistics over ranks at the end of every epoch,
  so all ranks evaluate and save identical models. BN batch statistics are per process (as under
  mdistiller's DataParallel) unless ``--sync_bn`` converts the trainable modules' BatchNorm layers to
  SyncBatchNorm (``convert_sync_batchnorm``; CUDA only, the teacher is left as it is).
- CRD's memory bank (crd/memory.py) is updated with the batches of all ranks (``all_gather_cat``) and its
  normalisation constants are averaged over ranks, so every rank keeps an identical bank.
- Offline stages that write caches (letKD/QUEST quantizers, TDD trees) run in ``main_first``: rank 0 builds
  and writes the cache under the existing file lock, then a done-marker; the others poll for the marker
  (no collective is pending while they wait, so the collective timeout does not apply), then load the cache.
  Build the caches beforehand at ImageNet scale (the sweeps' offline stage, helper/letkd_offline.py).
- Init stages (AB/FT/FSP) run on every rank together, each on its shard, with gradients averaged over ranks
  (``average_gradients``, helper/pretrain.py); ``wrap`` then broadcasts rank 0's parameters and buffers once.
- Collectives time out after ``TIMEOUT`` (30 minutes): a rank that died or hangs ends the run instead of
  holding the GPUs for hours.
- Only rank 0 writes files (``is_main``; helper/util.py's checkpoint and JSON writers check it).
- Resume: every rank loads ``last.pth``; the global RNG states saved by rank 0 are every rank's (all ranks
  share the seed and draw the same amounts), and the samplers are pure functions of (seed, epoch).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
import weakref
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sized

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from helper.errors import UserError

# The timeout of every collective. No rank waits in a collective while another builds a cache (``main_first``
# polls a marker file instead), so a collective that takes this long means a dead or hung rank.
TIMEOUT = timedelta(minutes=30)
MAIN_FIRST_POLL_S = 5.0                 # how often the other ranks look for rank 0's done-marker
MAIN_FIRST_LIMIT = timedelta(hours=24)  # ... and how long they look before giving up
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


def _shared_token() -> str:
    """A random token drawn by rank 0 and broadcast to every rank (a short collective: every rank calls it at
    the same point of the run)."""
    box = [uuid.uuid4().hex if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f'.{os.getpid()}.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)


def _wait_for_marker(done: Path, failed: Path, poll_s: float, limit: timedelta) -> None:
    deadline, pause = time.monotonic() + limit.total_seconds(), 0.05
    while not done.exists():
        if failed.exists():
            raise UserError(f"rank 0 failed while building the caches: {failed.read_text().strip()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank()}: rank 0 wrote no {done} within {limit}; is it still running?")
        time.sleep(pause)
        pause = min(2 * pause, poll_s)     # quick when the caches exist already, then every poll_s


@contextlib.contextmanager
def main_first(marker_dir: str | Path, poll_s: float | None = None) -> Iterator[None]:
    """Rank 0 runs the block first (building caches under their file locks), the others run it afterwards
    (finding the caches).

    The others do not wait in a collective (which would time out after ``TIMEOUT``): rank 0 writes a
    done-marker (or a failed-marker with its error) under ``marker_dir/.main_first/`` when its block ends, and
    they poll for it every ``poll_s`` seconds (default ``MAIN_FIRST_POLL_S``). ``marker_dir`` must be on a file
    system every rank sees (the run's save folder is). Single process: just runs the block.
    """
    if not is_distributed():
        yield
        return
    folder = Path(marker_dir) / '.main_first'
    token = _shared_token()
    done, failed = folder / f'{token}.done', folder / f'{token}.failed'
    if is_main():
        folder.mkdir(parents=True, exist_ok=True)
        try:
            yield
        except BaseException as err:
            _write_atomically(failed, f'{type(err).__name__}: {err}')
            raise
        _write_atomically(done, 'done\n')
    else:
        _wait_for_marker(done, failed, MAIN_FIRST_POLL_S if poll_s is None else poll_s, MAIN_FIRST_LIMIT)
        yield
    barrier()   # every rank has run its block (the others only load files): the marker can go
    if is_main():
        done.unlink(missing_ok=True)


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
    evaluation loaders sharded without padding; unchanged in a single process. A training loader that tags its
    indices with the epoch's seed (dataset/sampling.py ``EpochKeyedSampler``, persistent workers) keeps doing so."""
    if not is_distributed():
        return data
    from dataset.sampling import EpochKeyedSampler
    n, r = world_size(), rank()
    train = data.train_loader
    sampler: Sampler = DistributedSampler(train.dataset, num_replicas=n, rank=r, shuffle=True, seed=seed,
                                          drop_last=train.drop_last)
    if isinstance(train.sampler, EpochKeyedSampler):
        sampler = EpochKeyedSampler(sampler)
    data.train_loader = _reloaded(train, sampler, per_process_batch(train.batch_size), train.drop_last)
    for name in ('val_loader', 'test_loader'):
        loader = getattr(data, name, None)
        if loader is not None:
            setattr(data, name, _reloaded(loader, ShardWithoutPadding(loader.dataset, n, r), loader.batch_size,
                                          False))
    return data


def trainable_children(distiller: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The distiller's direct submodules except the frozen teacher (student, KD layers, method modules)."""
    for name, child in distiller.named_children():
        if name != 'teacher':
            yield name, child


def convert_sync_batchnorm(distiller: nn.Module) -> int:
    """Replace every BatchNorm layer of the distiller's trainable part (``trainable_children``: the student,
    letKD's KD layers, method modules) by a SyncBatchNorm with the same parameters and buffers (the same
    tensors, so an optimizer built before still holds them); the teacher is left as it is. A layer reachable
    from several parents becomes one SyncBatchNorm. The state_dict keys do not change, so checkpoints load
    into the plain model. Returns the number of layers converted."""
    converted: dict[int, nn.Module] = {}

    def convert(module: nn.Module) -> nn.Module:
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
            if id(module) not in converted:
                converted[id(module)] = nn.SyncBatchNorm.convert_sync_batchnorm(module)
            return converted[id(module)]
        for name, child in list(module.named_children()):
            new = convert(child)
            if new is not child:
                setattr(module, name, new)
        return module

    for name, child in list(trainable_children(distiller)):
        new = convert(child)
        if new is not child:
            setattr(distiller, name, new)
    return len(converted)


def wrap(distiller: nn.Module, device: torch.device) -> None:
    """Run ``distiller.forward_train`` inside DistributedDataParallel from now on (no-op in one process).

    ``find_unused_parameters``: the Distiller's class attribute of that name (default False). ``static_graph``:
    on unless the method has unused parameters or the step is compiled (``--compile``). ``--sync_bn``
    (``distiller.opt.sync_bn``) first converts the trainable BatchNorm layers to SyncBatchNorm on CUDA; on the
    CPU and in one process it prints a note and changes nothing.
    """
    opt = getattr(distiller, 'opt', None)
    if getattr(opt, 'sync_bn', False):
        if not is_distributed():
            print('note: --sync_bn has no effect in a single process (BatchNorm already sees the whole batch)')
        elif device.type != 'cuda':
            print('note: --sync_bn needs CUDA (PyTorch\'s SyncBatchNorm trains on GPUs only); BatchNorm stays per '
                  'process on the CPU')
        else:
            count = convert_sync_batchnorm(distiller)
            print(f'==> --sync_bn: {count} BatchNorm layers synchronised over {world_size()} processes')
    if not is_distributed():
        return
    step = _TrainStep(distiller)
    ids = [device.index] if device.type == 'cuda' else None
    unused = bool(getattr(distiller, 'find_unused_parameters', False))
    compiled = getattr(opt, 'compile', 'none') not in (None, 'none')
    _WRAPPED[distiller] = nn.parallel.DistributedDataParallel(step, device_ids=ids, broadcast_buffers=False,
                                                              find_unused_parameters=unused,
                                                              static_graph=not unused and not compiled)


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


def broadcast_module(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers of ``module`` (in place); no-op in one process."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks in place (one all_reduce of their concatenation), as DDP
    would; a parameter without a gradient (on every rank: the ranks run the same graph) keeps none. No-op in
    one process."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world_size())
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


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
