"""Method-agnostic training and evaluation loops.

The training loop knows nothing about methods: it asks the Distiller for the logits and a dict of
named, already-weighted losses, sums them, and logs each one.
"""
from __future__ import annotations

import functools
import operator
import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from distiller_zoo.base import Distiller
from helper import distributed
from helper.errors import UserError
from helper.meters import DeviceMeters, sum_dtype
from helper.numerics import set_tf32
from helper.optim import apply_update
from helper.util import AverageMeter, accuracy
from helper.util import progress as progress_bar

# batch layout of the training loaders: (image, target[, index[, contrast_idx]]) ('plain', 'instance', 'crd')
EXTRA_NAMES = ('index', 'contrast_idx')
# ... and of the data modes whose third and later items are other extras: (image, target, index, image_strong)
MODE_EXTRA_NAMES = {'weak_strong': ('index', 'image_strong')}


def extra_names(distiller: Any) -> tuple[str, ...]:
    """The keyword names of a batch's items after (image, target), from the Distiller's data mode."""
    return MODE_EXTRA_NAMES.get(getattr(distiller, 'data_mode', None), EXTRA_NAMES)


def batch_extras(batch: tuple[torch.Tensor, ...], names: tuple[str, ...], device: torch.device,
                 channels_last: bool = False) -> dict[str, torch.Tensor]:
    """``batch[2:]`` on ``device`` by name; extra images (``image_*``) in channels_last memory when asked."""
    extras = {name: t.to(device, non_blocking=True) for name, t in zip(names, batch[2:])}
    if channels_last:
        extras = {name: t.contiguous(memory_format=torch.channels_last) if name.startswith('image') else t
                  for name, t in extras.items()}
    return extras


class LossNotFinite(UserError):
    """The training loss became NaN or infinite; raised before the step, so the weights stay finite.

    A UserError: the CLIs print its one line (epoch, iteration, each loss term) and exit with code 2;
    the usual remedy is a smaller learning rate (helper/run.py adds how to resume).
    """

    def __init__(self, message: str, epoch: int, iteration: int) -> None:
        super().__init__(message)
        self.epoch, self.iteration = epoch, iteration


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of the loss terms, left to right. Not ``sum(...)``: under torch.compile its ``0 + term`` with a
    single term, returned next to that term's detached copy, gave a loss without grad_fn (torch 2.14)."""
    return functools.reduce(operator.add, losses.values())


def train_one_epoch(distiller: Distiller, loader: Iterable, optimizer: torch.optim.Optimizer, *,
                    epoch: int, device: torch.device, print_freq: int = 100,
                    progress: bool | None = None) -> dict[str, float]:
    """One epoch over ``loader``. Returns train_loss, train_acc, train_acc_top5 and each named loss.

    Each batch is ``(image, target[, index[, contrast_idx]])`` (data mode 'weak_strong': ``(image, target, index,
    image_strong)``); the items after the target are passed to ``forward_train`` as keyword arguments.
    """
    distiller.train()
    distiller.start_epoch(epoch)
    meters: dict[str, AverageMeter] = {}
    top1, top5, total = AverageMeter(), AverageMeter(), AverageMeter()
    batch_time = AverageMeter()
    n_batches = len(loader)
    bar = progress_bar(loader, f'epoch {epoch}', n_batches, progress)
    end = time.time()
    forward_train = distributed.forward_train_of(distiller)  # inside DistributedDataParallel under torchrun
    names = extra_names(distiller)
    for idx, batch in enumerate(bar):
        image, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        extras = batch_extras(batch, names, device)
        logits, losses = forward_train(image, target, **extras)
        loss = total_loss(losses)
        finite = bool(torch.isfinite(loss))   # a host sync per step (the fast path checks on the device)
        # under torchrun every rank decides together: one rank raising alone would leave the others in DDP's
        # all-reduce of this step's gradients
        if distributed.any_rank(not finite):
            if finite:
                raise LossNotFinite(f"loss became non-finite on another process at epoch {epoch}, iteration "
                                    f"{idx + 1}/{n_batches}", epoch, idx + 1)
            terms = ', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())
            raise LossNotFinite(f"loss became {loss.item()} at epoch {epoch}, iteration {idx + 1}/{n_batches} "
                                f"({terms})", epoch, idx + 1)
        apply_update(optimizer, losses, loss)

        n = image.shape[0]
        acc1, acc5 = accuracy(logits.detach(), target, topk=(1, 5))
        top1.update(acc1, n)
        top5.update(acc5, n)
        total.update(loss.item(), n)
        for name, value in losses.items():
            meters.setdefault(name, AverageMeter()).update(value.item(), n)
        batch_time.update(time.time() - end)
        end = time.time()
        if bar.disable:
            if print_freq and (idx % print_freq == 0 or idx == n_batches - 1):
                print(f'Epoch: [{epoch}][{idx}/{n_batches}]\tTime {batch_time.avg:.3f}\t'
                      f'Loss {total.avg:.4f}\tAcc@1 {top1.avg:.3f}\tAcc@5 {top5.avg:.3f}', flush=True)
        else:
            bar.set_postfix(loss=f'{total.avg:.3f}', acc=f'{top1.avg:.2f}')
    bar.close()
    distributed.all_reduce_meters(top1, top5, total, *meters.values())  # epoch values over all ranks' images
    distributed.sync_batchnorm_stats(distiller)
    stats = {'train_loss': total.avg, 'train_acc': top1.avg, 'train_acc_top5': top5.avg}
    stats.update({f'loss_{name}': m.avg for name, m in meters.items()})
    return stats


@torch.no_grad()
def validate(model: nn.Module, loader: Iterable, device: torch.device, *,
             progress: bool | None = None, desc: str = 'test') -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean CE of ``model`` (plain forward, eval mode) on ``loader``.

    The counts are summed on the device and read once, at the end (no host sync per batch)."""
    was_training = model.training
    model.eval()
    meters = DeviceMeters(['acc', 'acc_top5', 'loss'], device)
    for batch in progress_bar(loader, desc, len(loader), progress):
        image, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        logits = model(image)
        k = min(5, logits.shape[1])
        correct = logits.topk(k, dim=1).indices.eq(target.view(-1, 1))
        meters.add(torch.stack([correct[:, :1].any(dim=1).float().mean() * 100.0,
                                correct.any(dim=1).float().mean() * 100.0,
                                F.cross_entropy(logits, target).float()]), image.shape[0])
    model.train(was_training)
    # each rank saw its own images of the split, none twice
    sums, counts = meters.totals(reduce=distributed.sum_over_ranks)
    n = counts[0]
    return {**{name: (total / n if n else 0.0) for name, total in zip(meters.names, sums)}, 'images': int(round(n))}


# ---------------------------------------------------------------------------------------------------
# The fast path: the same step without host syncs (docs/speed.md)
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FastOptions:
    """What the fast loop changes besides keeping the step on the device (all off: the sync-free loop only).

    amp: 'none' or 'bf16' (torch.autocast around forward_train); channels_last: models and images in that
    memory format; compile: 'none', 'default' or 'reduce-overhead' (CUDA graphs); tf32: TF32 matmuls and
    convolutions on CUDA.
    """
    amp: str = 'none'
    channels_last: bool = False
    compile: str = 'none'
    tf32: bool = False
    compile_backend: str = 'inductor'   # torch.compile's backend; tests count graph breaks with 'aot_eager'

    @classmethod
    def from_opt(cls, opt: Any) -> 'FastOptions':
        """From resolved CLI options (helper/options.py resolve_fast)."""
        return cls(amp=getattr(opt, 'amp', 'none') or 'none', channels_last=bool(getattr(opt, 'channels_last', False)),
                   compile=getattr(opt, 'compile', None) or 'none', tf32=bool(getattr(opt, 'tf32', False)))


def configure_fast_path(distiller: nn.Module, device: torch.device, options: FastOptions) -> None:
    """Process-wide and model settings of the fast path: TF32 on CUDA (on or off: ``options.tf32``),
    channels_last weights. UserError for reduce-overhead (CUDA graphs) off CUDA. Call before building the
    optimizer."""
    if options.compile == 'reduce-overhead' and device.type != 'cuda':
        raise UserError("--compile reduce-overhead (CUDA graphs) needs --device cuda; use --compile default")
    set_tf32(options.tf32)
    if options.channels_last:
        distiller.to(memory_format=torch.channels_last)


class FastTrainer:
    """One training step with no host sync: meters, accuracy and the NaN/inf check stay on the device.

    ``step(batch)`` queues the step's work; ``read()`` (a sync) returns the running sums and raises
    LossNotFinite when some step's loss was not finite, naming that step (the first bad one).

    One graph per step (``compile != 'none'``): forward_train, the loss sum and the bookkeeping (the meters, the
    iteration counter and the first-bad-step record, buffers changed in place) are one compiled function, and
    with it (AOTAutograd) their backward; CUDA graphs replay it with ``reduce-overhead``. The update stays
    outside (``helper.optim.apply_update``: SGD's fused kernel on CUDA, or DOT's two backward passes). The
    first step of a trainer runs eagerly: one-time set-up that methods do lazily (CRD's normalisers, read on
    the host) happens there, never inside the graph; from the second step on the function is compiled, once.
    A batch of another size than the first (the last partial batch) runs the same function eagerly. Unlike the
    reference loop, the steps after a non-finite loss are still applied until the next check, so the weights in
    memory may be NaN when LossNotFinite is raised; last.pth (written at epoch ends) is not.
    """

    def __init__(self, distiller: Distiller, optimizer: torch.optim.Optimizer, device: torch.device,
                 options: FastOptions = FastOptions()) -> None:
        self.distiller, self.optimizer, self.device, self.options = distiller, optimizer, device, options
        self.forward_train = distributed.forward_train_of(distiller)  # inside DistributedDataParallel under torchrun
        self.names: list[str] = []
        self.full_batch: int | None = None
        self.compiled: Any = None
        self.meters: DeviceMeters | None = None    # loss, top1, top5 and each term, weighted by batch size
        self.bad: torch.Tensor | None = None       # [iteration, loss, terms...] of the first non-finite step, or -1s
        self.iteration_t = torch.zeros((), device=device, dtype=sum_dtype(device))
        self.epoch, self.n_batches, self.iteration = 0, 0, 0

    def reset(self, epoch: int, n_batches: int) -> None:
        """Start an epoch: zero the meters and the NaN record (in place: a compiled step keeps their addresses)."""
        self.epoch, self.n_batches, self.iteration = epoch, n_batches, 0
        self.iteration_t.zero_()
        if self.meters is not None:
            self.meters.reset()
            self.bad.fill_(-1.0)

    def _step_function(self, image: torch.Tensor, target: torch.Tensor, extras: dict[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What is compiled: forward (under autocast with --amp bf16), the loss, and the bookkeeping; returns the
        loss and its terms (an update rule such as DOT backpropagates the terms separately)."""
        if self.options.amp == 'bf16':
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                logits, losses = self.forward_train(image, target, **extras)
        else:
            logits, losses = self.forward_train(image, target, **extras)
        loss = total_loss(losses)
        if self.meters is None:                   # the first (eager) step: the terms' names size the buffers
            self._create_meters(list(losses))
        self._account(loss, logits, losses, target)
        return loss, losses

    def _create_meters(self, names: list[str]) -> None:
        self.names = names
        self.meters = DeviceMeters(['loss', 'top1', 'top5', *names], self.device)
        self.bad = torch.full((2 + len(names),), -1.0, device=self.device, dtype=self.iteration_t.dtype)

    @torch.no_grad()
    def _account(self, loss: torch.Tensor, logits: torch.Tensor, losses: dict[str, torch.Tensor],
                 target: torch.Tensor) -> None:
        """Add the step to the device meters and remember the first non-finite step (in place, on the device)."""
        assert self.meters is not None and self.bad is not None
        n = target.shape[0]
        k = min(5, logits.shape[1])
        correct = logits.detach().topk(k, dim=1).indices.eq(target.view(-1, 1))
        terms = torch.stack([v.detach().float() for v in losses.values()])
        loss = loss.detach().float()
        self.meters.add(torch.cat([loss.view(1), correct[:, :1].any(dim=1).float().mean().view(1),
                                   correct.any(dim=1).float().mean().view(1), terms]), n)
        self.iteration_t.add_(1)
        record = torch.cat([self.iteration_t.view(1), loss.view(1).to(self.bad.dtype), terms.to(self.bad.dtype)])
        newly_bad = ~torch.isfinite(loss) & (self.bad[0] < 0)
        self.bad.copy_(torch.where(newly_bad, record, self.bad))

    def _compile(self) -> None:
        """Compile the step function (after the first, eager step). Every buffer it reads or changes keeps its
        address from now on: marked static, so CUDA graphs use them in place instead of copying them."""
        assert self.meters is not None and self.bad is not None
        for tensor in (*self.distiller.buffers(), *self.meters.buffers(), self.bad, self.iteration_t):
            torch._dynamo.mark_static_address(tensor)
        # a mode is inductor's; other backends (tests: 'eager', 'aot_eager'; gpu_check: 'cudagraphs') take none
        mode = self.options.compile if self.options.compile_backend == 'inductor' else None
        self.compiled = torch.compile(self._step_function, mode=mode, backend=self.options.compile_backend)

    def step(self, batch: tuple[torch.Tensor, ...]) -> None:
        """One optimisation step on ``batch`` = (image, target, *extras) (``extra_names``); no host sync."""
        image = batch[0].to(self.device, non_blocking=True)
        if self.options.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        target = batch[1].to(self.device, non_blocking=True)
        extras = batch_extras(batch, extra_names(self.distiller), self.device, self.options.channels_last)
        if self.full_batch is None:
            self.full_batch = image.shape[0]
        function = self._step_function
        if self.options.compile != 'none' and self.meters is not None and image.shape[0] == self.full_batch:
            if self.compiled is None:
                self._compile()
            if self.options.compile == 'reduce-overhead' or self.options.compile_backend == 'cudagraphs':
                torch.compiler.cudagraph_mark_step_begin()     # the previous step's graph outputs are done with
            function = self.compiled
        loss, losses = function(image, target, extras)
        apply_update(self.optimizer, losses, loss)
        self.iteration += 1

    def read(self) -> dict[str, float]:
        """Sync: the epoch's running averages (train_loss, train_acc, train_acc_top5, loss_<name>);
        LossNotFinite if a step so far had a non-finite loss."""
        if self.meters is None or self.bad is None:
            return {'train_loss': 0.0, 'train_acc': 0.0, 'train_acc_top5': 0.0}
        # under torchrun: sums over every rank's images; a bad step on any rank stops every rank (all read here
        # at the same iterations, as their loaders have equal lengths)
        averages = self.meters.averages(reduce=distributed.sum_over_ranks)
        bad = self.bad.tolist()
        if distributed.any_rank(bad[0] >= 0) and bad[0] < 0:
            raise LossNotFinite(f"loss became non-finite on another process at epoch {self.epoch} (found at the "
                                f"check after iteration {self.iteration})", self.epoch, self.iteration)
        if bad[0] >= 0:
            terms = ', '.join(f'{k}={v:.4g}' for k, v in zip(self.names, bad[2:]))
            iteration = int(bad[0])
            raise LossNotFinite(f"loss became {bad[1]} at epoch {self.epoch}, iteration {iteration}/{self.n_batches} "
                                f"({terms}; found at the check after iteration {self.iteration})",
                                self.epoch, iteration)
        stats = {'train_loss': averages['loss'], 'train_acc': 100.0 * averages['top1'],
                 'train_acc_top5': 100.0 * averages['top5']}
        stats.update({f'loss_{name}': averages[name] for name in self.names})
        return stats


def train_one_epoch_fast(trainer: FastTrainer, loader: Iterable, *, epoch: int, print_freq: int = 100,
                         progress: bool | None = None) -> dict[str, float]:
    """``train_one_epoch`` without per-step host syncs: the meters and the NaN/inf check are read (one sync)
    only at print steps (iteration % print_freq == 0 and the last) and at the epoch end. Same return value.

    A non-finite loss raises LossNotFinite at the first check after it, naming the first bad iteration.
    """
    trainer.distiller.train()
    trainer.distiller.start_epoch(epoch)
    n_batches = len(loader)  # type: ignore[arg-type]
    trainer.reset(epoch, n_batches)
    bar = progress_bar(loader, f'epoch {epoch}', n_batches, progress)
    tic = time.time()
    for idx, batch in enumerate(bar):
        trainer.step(batch)
        if print_freq and (idx % print_freq == 0 or idx == n_batches - 1):
            stats = trainer.read()    # the sync: meters and the NaN check
            if bar.disable:
                print(f'Epoch: [{epoch}][{idx}/{n_batches}]\tTime {(time.time() - tic) / (idx + 1):.3f}\t'
                      f'Loss {stats["train_loss"]:.4f}\tAcc@1 {stats["train_acc"]:.3f}\t'
                      f'Acc@5 {stats["train_acc_top5"]:.3f}', flush=True)
            else:
                bar.set_postfix(loss=f'{stats["train_loss"]:.3f}', acc=f'{stats["train_acc"]:.2f}')
    bar.close()
    stats = trainer.read()
    distributed.sync_batchnorm_stats(trainer.distiller)
    return stats
