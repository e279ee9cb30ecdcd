"""Method-agnostic training and evaluation loops.

The training loop knows nothing about methods: it asks the Distiller for the logits and a dict of
named, already-weighted losses, sums them, and logs each one.
"""
from __future__ import annotations

import time
from typing import Iterable

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
        loss = sum(losses.values())
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
