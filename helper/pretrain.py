"""The init stage of AB, FT and FSP (RepDistiller's helper/pretrain.py), run before the main training.

The teacher and the student are in eval mode, only ``init_modules`` train (their BN layers update their
running statistics), with a fresh SGD at a constant learning rate for ``--init_epochs`` epochs over the
training loader. The method supplies the loss of one batch; ``InitStageMethod`` gives AB/FT/FSP the
``--init_epochs`` flag and the stage's learning rate.

The stage draws its own data stream (``set_epoch(data, e, seed, INIT_STREAM)``): its epoch e neither replays
the order nor the augmentation of the main stage's epoch e, and it is still a pure function of (seed, e).
A resumed run does not repeat the stage: ``last.pth`` (written from epoch 0 on) holds its result.

Under torchrun the stage runs on every rank at once, each on its shard of the training split (the sharded
training loader), as DDP runs the main stage: the ranks start from rank 0's init modules, their gradients
are averaged over ranks every step (``distributed.average_gradients``) and the modules' BatchNorm running
statistics at the end of every epoch, so all ranks end the stage with identical modules after one pass over
the split per epoch. ``InitStageMethod.collective_prepare`` tells train_student.py to call ``prepare`` on all
ranks together (not rank 0 first, as for the methods that build caches).
"""
from __future__ import annotations

import time
from argparse import ArgumentParser, Namespace
from typing import Any, Callable

import torch
import torch.nn as nn

from dataset import INIT_STREAM, set_epoch
from helper import distributed
from helper.errors import UserError
from helper.util import AverageMeter
from helper.util import progress as progress_bar

def add_init_stage_arguments(parser: ArgumentParser) -> None:
    """The init stage's flag (RepDistiller's)."""
    g = parser.add_argument_group('init stage (abound, factor, fsp)')
    g.add_argument('--init_epochs', type=int, default=30, help='init-stage epochs of abound, factor, fsp')


class InitStageMethod:
    """Mixin of the Distillers with an init stage (AB, FT, FSP): its flag, its check and its learning rate."""

    option_groups = (add_init_stage_arguments,)
    # train_student.py: prepare (the init stage) runs on every rank together under torchrun, not rank 0 first
    collective_prepare = True

    @classmethod
    def resolve_options(cls, opt: Namespace) -> Namespace:
        if opt.init_epochs < 0:
            raise UserError(f"--init_epochs must be >= 0, got {opt.init_epochs}")
        return super().resolve_options(opt)  # type: ignore[misc]

    @classmethod
    def init_learning_rate(cls, opt: Namespace) -> float:
        """The init stage's constant lr: ``--learning_rate`` (FT overrides it)."""
        return float(opt.learning_rate)


def run_init_stage(distiller: nn.Module, init_modules: nn.Module, batch_loss: Callable[[torch.Tensor], torch.Tensor],
                   data: Any, opt: Namespace, device: torch.device, lr: float, progress: bool | None = None
                   ) -> list[float]:
    """Train ``init_modules`` alone for ``opt.init_epochs`` epochs at the constant ``lr``; returns the
    average loss of each epoch.

    ``batch_loss(image)`` maps a (B, 3, H, W) batch on ``device`` to the scalar init loss.
    ``data`` is a DataBundle (its ``train_loader`` is reseeded per epoch with
    ``set_epoch(data, e, opt.seed, INIT_STREAM)``, a stream apart from the main stage's).
    The modules' ``requires_grad`` flags are switched on for the stage and restored afterwards, so modules
    that are frozen in the main stage can be trained here. Under torchrun every rank must call this together
    (module docstring); the printed loss is the mean over all ranks' images.
    """
    params = list(init_modules.parameters())
    distributed.broadcast_module(init_modules)   # every rank starts from rank 0's modules
    was_trainable = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    history = []
    try:
        for epoch in range(1, opt.init_epochs + 1):
            distiller.eval()
            init_modules.train()
            set_epoch(data, epoch, opt.seed, INIT_STREAM)
            loader = data.train_loader
            meter, tic = AverageMeter(), time.time()
            bar = progress_bar(loader, f'init {epoch}', len(loader), progress)
            for batch in bar:
                image = batch[0].to(device, non_blocking=True)
                loss = batch_loss(image)
                # zero every gradient, not only the init modules': the loss also reaches student parts
                # outside them (e.g. WRN's final BN under preact), which must not carry it into the main stage
                distiller.zero_grad(set_to_none=True)
                loss.backward()
                distributed.average_gradients(params)
                optimizer.step()
                meter.update(loss.item(), image.shape[0])
                bar.set_postfix(loss=f'{meter.avg:.4f}')
            bar.close()
            distributed.sync_batchnorm_stats(init_modules)
            distributed.all_reduce_meters(meter)
            history.append(meter.avg)
            print(f'init epoch [{epoch}/{opt.init_epochs}]  lr {lr:g}  loss {meter.avg:.4f}  '
                  f'{time.time() - tic:.1f}s', flush=True)
    finally:
        distiller.zero_grad(set_to_none=True)
        for p, flag in zip(params, was_trainable):
            p.requires_grad_(flag)
    return history
