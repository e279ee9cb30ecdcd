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
from helper.util import AverageMeter, accuracy
from helper.util import progress as progress_bar

# batch layout of the training loaders: (image, target[, index[, contrast_idx]])
EXTRA_NAMES = ('index', 'contrast_idx')


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

    Each batch is ``(image, target[, index[, contrast_idx]])``; index/contrast_idx and the epoch
    are passed to ``forward_train`` as keyword arguments.
    """
    distiller.train()
    meters: dict[str, AverageMeter] = {}
    top1, top5, total = AverageMeter(), AverageMeter(), AverageMeter()
    batch_time = AverageMeter()
    n_batches = len(loader)
    bar = progress_bar(loader, f'epoch {epoch}', n_batches, progress)
    end = time.time()
    forward_train = distributed.forward_train_of(distiller)  # inside DistributedDataParallel under torchrun
    for idx, batch in enumerate(bar):
        image, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        extras = {name: t.to(device, non_blocking=True) for name, t in zip(EXTRA_NAMES, batch[2:])}
        logits, losses = forward_train(image, target, epoch=epoch, **extras)
        loss = total_loss(losses)
        if not torch.isfinite(loss):  # a host sync per step; a later fast path checks on the device
            terms = ', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())
            raise LossNotFinite(f"loss became {loss.item()} at epoch {epoch}, iteration {idx + 1}/{n_batches} "
                                f"({terms})", epoch, idx + 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

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
    """Top-1/top-5 accuracy (percent) and mean CE of ``model`` (plain forward, eval mode) on ``loader``."""
    was_training = model.training
    model.eval()
    top1, top5, losses = AverageMeter(), AverageMeter(), AverageMeter()
    for batch in progress_bar(loader, desc, len(loader), progress):
        image, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        logits = model(image)
        n = image.shape[0]
        acc1, acc5 = accuracy(logits, target, topk=(1, 5))
        top1.update(acc1, n)
        top5.update(acc5, n)
        losses.update(F.cross_entropy(logits, target).item(), n)
    model.train(was_training)
    distributed.all_reduce_meters(top1, top5, losses)  # each rank saw its own images of the split, none twice
    return {'acc': top1.avg, 'acc_top5': top5.avg, 'loss': losses.avg, 'images': top1.count}


# ---------------------------------------------------------------------------------------------------
# The fast path: the same step without host syncs (README "Speed")
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

    @classmethod
    def from_opt(cls, opt: Any) -> 'FastOptions':
        """From resolved CLI options (helper/options.py resolve_fast)."""
        return cls(amp=getattr(opt, 'amp', 'none') or 'none', channels_last=bool(getattr(opt, 'channels_last', False)),
                   compile=getattr(opt, 'compile', None) or 'none', tf32=bool(getattr(opt, 'tf32', False)))


def configure_fast_path(distiller: nn.Module, device: torch.device, options: FastOptions) -> None:
    """Process-wide and model settings of the fast path: TF32 on CUDA, channels_last weights.

    UserError for reduce-overhead (CUDA graphs) off CUDA. Call before building the optimizer.
    """
    if options.compile == 'reduce-overhead' and device.type != 'cuda':
        raise UserError("--compile reduce-overhead (CUDA graphs) needs --device cuda; use --compile default")
    if options.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if options.channels_last:
        distiller.to(memory_format=torch.channels_last)


class FastTrainer:
    """One training step with no host sync: meters, accuracy and the NaN/inf check stay on the device.

    ``step(batch)`` queues the step's work; ``read()`` (a sync) returns the running sums and raises
    LossNotFinite when some step's loss was not finite, naming that step (the first bad one).
    What is compiled (``compile != 'none'``): forward_train, the loss sum and the meters' statistics as one
    function, and with it (AOTAutograd) their backward; optimizer.step() stays eager (SGD's multi-tensor
    kernels). A batch of another size than the first (the last partial batch) runs the same code eagerly.
    Unlike the reference loop, the steps after a non-finite loss are still applied until the next check, so the
    weights in memory may be NaN when LossNotFinite is raised; last.pth (written at epoch ends) is not.
    """

    def __init__(self, distiller: Distiller, optimizer: torch.optim.Optimizer, device: torch.device,
                 options: FastOptions = FastOptions()) -> None:
        self.distiller, self.optimizer, self.device, self.options = distiller, optimizer, device, options
        self.forward_train = distributed.forward_train_of(distiller)  # inside DistributedDataParallel under torchrun
        self.names: list[str] | None = None
        self.full_batch: int | None = None
        self.compiled = None
        if options.compile != 'none':
            self.compiled = torch.compile(self._forward, mode=options.compile)
        self.sum_dtype = torch.float64 if device.type in ('cpu', 'cuda') else torch.float32
        self.reset(epoch=0, n_batches=0)

    def reset(self, epoch: int, n_batches: int) -> None:
        """Start an epoch: zero the meters and the NaN record."""
        self.epoch, self.n_batches, self.iteration = epoch, n_batches, 0
        self.sums: torch.Tensor | None = None
        self.bad: torch.Tensor | None = None      # [iteration or -1, loss, terms...] of the first non-finite step
        self.iteration_t = torch.zeros((), device=self.device, dtype=torch.float32)

    def _forward(self, image: torch.Tensor, target: torch.Tensor, epoch: int, extras: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, [loss * n, correct@1, correct@5], {name: term}); the last two without grad."""
        if self.options.amp == 'bf16':
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                logits, losses = self.forward_train(image, target, epoch=epoch, **extras)
        else:
            logits, losses = self.forward_train(image, target, epoch=epoch, **extras)
        loss = total_loss(losses)
        with torch.no_grad():
            k = min(5, logits.shape[1])
            correct = logits.detach().topk(k, dim=1).indices.eq(target.view(-1, 1))
            stats = torch.stack([loss.detach().float() * image.shape[0], correct[:, :1].any(dim=1).sum().float(),
                                 correct.any(dim=1).sum().float()])
        return loss, stats, {name: value.detach() for name, value in losses.items()}

    def step(self, batch: tuple[torch.Tensor, ...]) -> None:
        """One optimisation step on ``batch`` = (image, target[, index[, contrast_idx]]); no host sync."""
        image = batch[0].to(self.device, non_blocking=True)
        if self.options.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        target = batch[1].to(self.device, non_blocking=True)
        extras = {name: t.to(self.device, non_blocking=True) for name, t in zip(EXTRA_NAMES, batch[2:])}
        if self.full_batch is None:
            self.full_batch = image.shape[0]
        use_compiled = self.compiled is not None and image.shape[0] == self.full_batch
        if use_compiled and self.options.compile == 'reduce-overhead':
            torch.compiler.cudagraph_mark_step_begin()
        loss, stats, terms = (self.compiled if use_compiled else self._forward)(image, target, self.epoch, extras)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._account(loss.detach(), stats, terms, image.shape[0])

    def _account(self, loss: torch.Tensor, stats: torch.Tensor, terms: dict[str, torch.Tensor], n: int) -> None:
        """Add the step to the device meters and remember the first non-finite step (all on the device)."""
        self.names = list(terms)
        self.iteration += 1
        self.iteration_t += 1
        dtype = self.sum_dtype
        term_values = torch.stack([v.float() for v in terms.values()]).to(dtype)
        count = torch.full((1,), n, dtype=dtype, device=stats.device)
        row = torch.cat([stats.to(dtype), term_values * n, count])        # [loss*n, c1, c5, terms*n..., n]
        self.sums = row if self.sums is None else self.sums + row
        record = torch.cat([self.iteration_t.view(1).to(dtype), loss.view(1).to(dtype), term_values])
        if self.bad is None:
            self.bad = torch.full_like(record, -1.0)
        newly_bad = ~torch.isfinite(loss) & (self.bad[0] < 0)
        self.bad = torch.where(newly_bad, record, self.bad)

    def read(self) -> dict[str, float]:
        """Sync: the epoch's running averages (train_loss, train_acc, train_acc_top5, loss_<name>);
        LossNotFinite if a step so far had a non-finite loss."""
        if self.sums is None:
            return {'train_loss': 0.0, 'train_acc': 0.0, 'train_acc_top5': 0.0}
        # under torchrun: sums over every rank's images; a bad step on any rank stops every rank (all read here
        # at the same iterations, as their loaders have equal lengths)
        sums = distributed.sum_over_ranks(self.sums).tolist()
        bad = self.bad.tolist() if self.bad is not None else [-1.0]
        if distributed.any_rank(bad[0] >= 0) and bad[0] < 0:
            raise LossNotFinite(f"loss became non-finite on another process at epoch {self.epoch} (found at the "
                                f"check after iteration {self.iteration})", self.epoch, self.iteration)
        if bad[0] >= 0:
            terms = ', '.join(f'{k}={v:.4g}' for k, v in zip(self.names or [], bad[2:]))
            iteration = int(bad[0])
            raise LossNotFinite(f"loss became {bad[1]} at epoch {self.epoch}, iteration {iteration}/{self.n_batches} "
                                f"({terms}; found at the check after iteration {self.iteration})",
                                self.epoch, iteration)
        n = max(sums[-1], 1.0)
        stats = {'train_loss': sums[0] / n, 'train_acc': 100.0 * sums[1] / n, 'train_acc_top5': 100.0 * sums[2] / n}
        stats.update({f'loss_{name}': value / n for name, value in zip(self.names or [], sums[3:-1])})
        return stats


def train_one_epoch_fast(trainer: FastTrainer, loader: Iterable, *, epoch: int, print_freq: int = 100,
                         progress: bool | None = None) -> dict[str, float]:
    """``train_one_epoch`` without per-step host syncs: the meters and the NaN/inf check are read (one sync)
    only at print steps (iteration % print_freq == 0 and the last) and at the epoch end. Same return value.

    A non-finite loss raises LossNotFinite at the first check after it, naming the first bad iteration.
    """
    trainer.distiller.train()
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
