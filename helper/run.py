"""One training run: its folder, the epoch loop, logging, checkpoints and exact resume.

Both CLIs end in ``fit``. The output contract (docs/design.md) lives here and only here:
``args.json``, ``metrics.jsonl`` (one object per epoch), tensorboard events, ``ckpt_epoch_<E>.pth``,
``<model>_best.pth``, ``last.pth`` (everything needed to resume) and ``summary.json``.

``last.pth`` is first written before epoch 1 (epoch 0: the state after the method's offline and
init stages), so a run that stops in any epoch, including a loss that becomes NaN, can be continued
with ``--resume`` (and, for instance, a smaller ``--learning_rate``: the resumed optimizer follows
the new flags, and ``args.json`` gets a ``resumes`` entry saying what changed).

With a separate test split (``data.test_loader``, Tiny-ImageNet ``--tiny_split letkd``) every epoch
is evaluated on both: ``<model>_best.pth`` is the best epoch on val (the letKD authors' selection),
and ``summary.json`` adds ``best_val_acc``, ``best_val_epoch`` and ``test_acc_at_best_val`` (the
number their protocol reports) to the usual test-split keys.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from dataset import get_dataloaders, set_epoch
from dataset.device_data import device_bundle
from distiller_zoo.base import Distiller
from helper import distributed
from helper.errors import UserError
from helper.optim import DistillationOrientedSGD
from helper.options import data_options
from helper.loops import (FastOptions, FastTrainer, LossNotFinite, configure_fast_path, train_one_epoch,
                          train_one_epoch_fast, validate)
from helper.util import (count_macs, count_params, device_name, git_sha, load_checkpoint, lr_at_epoch, rng_state,
                         save_checkpoint, save_json, set_lr, set_rng_state)

LAST = 'last.pth'
METRICS = 'metrics.jsonl'
# RunConfig fields that may change on --resume; recorded in last.pth and, when changed, in args.json
RESUMABLE_SETTINGS = ('epochs', 'learning_rate', 'lr_decay_epochs', 'lr_decay_rate', 'weight_decay', 'momentum',
                      'nesterov')


def check_run_dir(path: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start before anything is written: a missing run to resume, or an existing one to clobber."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if resume:
        if not (path / LAST).is_file():
            raise UserError(f"--resume: no run to resume in {path} (no {LAST})")
    elif not overwrite and path.exists() and any(path.iterdir()):
        raise UserError(f"run folder {path} already exists; pass --resume to continue it or --overwrite to replace it")


def create_run_dir(path: Path, *, overwrite: bool) -> None:
    """Create (with ``overwrite``: empty first) the run folder. Under torchrun rank 0 does it once every rank has
    checked the folder (``check_run_dir``), and the others wait for it."""
    distributed.barrier()
    if distributed.is_main():
        if overwrite and path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
    distributed.barrier()


def load_data(opt: Any, device: torch.device, mode: str, **loader_options: Any) -> Any:
    """A run's data from its resolved options: the loaders (sharded under torchrun), then moved onto the device
    and augmented there with ``--device_data`` (dataset/device_data.py). ``loader_options``: CRD's ``nce_k`` and
    ``crd_mode``."""
    data = distributed.shard(get_dataloaders(
        opt.dataset, opt.data_folder, opt.batch_size, opt.num_workers, mode=mode, pad_mode=opt.pad_mode,
        download=opt.download, seed=opt.seed, pin_memory=device.type == 'cuda', **loader_options,
        **data_options(opt)), opt.seed)
    if opt.device_data:
        data = device_bundle(data, opt.dataset, device, mode=mode, pad_mode=opt.pad_mode, augment=opt.tiny_aug,
                             seed=opt.seed, channels_last=opt.channels_last)
    return data


@dataclass
class RunConfig:
    """What ``fit`` needs besides the distiller and the data (taken from the parsed CLI flags)."""
    run_dir: Path
    model_name: str                 # used for <model>_best.pth
    epochs: int
    learning_rate: float
    lr_decay_epochs: list[int]
    lr_decay_rate: float
    weight_decay: float
    momentum: float
    nesterov: bool
    seed: int
    save_freq: int = 40
    print_freq: int = 100
    resume: bool = False
    summary_extra: dict[str, Any] = field(default_factory=dict)
    fast_loop: bool = False          # the sync-free loop (helper/loops.py FastTrainer) with the options below
    fast: FastOptions = field(default_factory=FastOptions)
    trainer: str = 'sgd'             # 'sgd' or 'dot' (helper/optim.py), with DOT's momentum split
    dot_delta: float = 0.075

    @classmethod
    def from_opt(cls, opt: Any, run_dir: Path, model_name: str, summary_extra: dict[str, Any]) -> 'RunConfig':
        """Take the optimisation and logging settings from parsed (and finalized) CLI flags."""
        return cls(run_dir=run_dir, model_name=model_name, epochs=opt.epochs, learning_rate=opt.learning_rate,
                   lr_decay_epochs=opt.lr_decay_epochs, lr_decay_rate=opt.lr_decay_rate,
                   weight_decay=opt.weight_decay, momentum=opt.momentum, nesterov=opt.nesterov, seed=opt.seed,
                   save_freq=opt.save_freq, print_freq=opt.print_freq, resume=opt.resume,
                   summary_extra=summary_extra, fast_loop=bool(getattr(opt, 'fast_loop', False)),
                   fast=FastOptions.from_opt(opt), trainer=getattr(opt, 'trainer', 'sgd'),
                   dot_delta=getattr(opt, 'dot_delta', 0.075))


def build_optimizer(distiller: Distiller, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """SGD over the distiller's trainable parameters (never the teacher's); on the fast path on CUDA its fused
    kernel (one launch for every parameter; the same update). ``--trainer dot``: DOT's SGD (helper/optim.py)."""
    params = list(distiller.trainable_parameters())
    if cfg.trainer == 'dot':
        return DistillationOrientedSGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, delta=cfg.dot_delta,
                                       weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov, fused=True if cfg.fast_loop and device.type == 'cuda' else None)


def prepare_training(distiller: Distiller, cfg: RunConfig, device: torch.device
                     ) -> tuple[torch.optim.Optimizer, FastTrainer | None]:
    """The optimizer of a run and, on the fast path, its FastTrainer: after the fast path's model settings
    (channels_last weights come before the optimizer) and, under torchrun, the DDP wrapping."""
    if cfg.fast_loop:
        configure_fast_path(distiller, device, cfg.fast)
    distributed.wrap(distiller, device)   # under torchrun: the step inside DDP, after the weights' final layout
    optimizer = build_optimizer(distiller, cfg, device)
    return optimizer, FastTrainer(distiller, optimizer, device, cfg.fast) if cfg.fast_loop else None


def train_epoch(distiller: Distiller, data: Any, optimizer: torch.optim.Optimizer, trainer: FastTrainer | None,
                cfg: RunConfig, epoch: int, device: torch.device) -> dict[str, float]:
    """One training epoch of a run (the epoch's lr, the data's epoch seed, the reference or the fast loop);
    the training statistics of ``train_one_epoch``."""
    set_lr(optimizer, lr_at_epoch(epoch, cfg.learning_rate, cfg.lr_decay_epochs, cfg.lr_decay_rate))
    set_epoch(data, epoch, cfg.seed)
    if trainer is not None:
        return train_one_epoch_fast(trainer, data.train_loader, epoch=epoch, print_freq=cfg.print_freq)
    return train_one_epoch(distiller, data.train_loader, optimizer, epoch=epoch, device=device,
                           print_freq=cfg.print_freq)


def _settings(cfg: RunConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in RESUMABLE_SETTINGS}


def _apply_settings(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> None:
    """Make a resumed optimizer follow the current flags (load_state_dict restores the saved ones)."""
    for group in optimizer.param_groups:
        group.update(weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _record_resume(run_dir: Path, start_epoch: int, before: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Append {'at_epoch', 'changed': {flag: [old, new]}} to args.json's 'resumes' list and print the changes."""
    changed = {k: [before[k], now[k]] for k in now if before is not None and k in before and before[k] != now[k]}
    if changed:
        print('==> resumed with ' + ', '.join(f'{k} {old} -> {new}' for k, (old, new) in changed.items()))
    args_file = run_dir / 'args.json'
    if args_file.is_file():
        args = json.loads(args_file.read_text())
        args.setdefault('resumes', []).append({'at_epoch': start_epoch, 'changed': changed})
        save_json(args, args_file)


def _read_metrics(path: Path, up_to_epoch: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r['epoch'] <= up_to_epoch]


def fit(distiller: Distiller, data: Any, cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """Train ``distiller`` for ``cfg.epochs`` (continuing from ``last.pth`` when ``cfg.resume``).

    Returns the summary dictionary that is also written to ``summary.json``.
    """
    run_dir = cfg.run_dir
    optimizer, trainer = prepare_training(distiller, cfg, device)
    start_epoch, best_acc, best_epoch, wall_time = 1, -1.0, 0, 0.0
    # model selection on a separate val split (None: selection = the test split, RepDistiller's way)
    test_loader = getattr(data, 'test_loader', None)
    best_val: dict[str, Any] = {'best_val_acc': -1.0, 'best_val_epoch': 0, 'test_acc_at_best_val': None}
    history: list[dict[str, Any]] = []
    if cfg.resume:
        # on the CPU: RNG states must stay CPU tensors; load_state_dict places weights and optimizer state
        ckpt = load_checkpoint(run_dir / LAST, map_location='cpu')
        distiller.load_state_dict_without_teacher(ckpt['distiller'])
        optimizer.load_state_dict(ckpt['optimizer'])
        _apply_settings(optimizer, cfg)
        start_epoch = ckpt['epoch'] + 1
        best_acc, best_epoch, wall_time = ckpt['best_acc'], ckpt['best_epoch'], ckpt['wall_time_s']
        best_val.update(ckpt.get('best_val', {}))
        set_rng_state(ckpt['rng'])
        # drop log lines of an epoch that finished after the last checkpoint was written
        history = _read_metrics(run_dir / METRICS, ckpt['epoch'])
        if distributed.is_main():  # under torchrun rank 0 alone writes
            (run_dir / METRICS).write_text(''.join(json.dumps(r) + '\n' for r in history))
            _record_resume(run_dir, start_epoch, ckpt.get('settings'), _settings(cfg))
        print(f'==> resuming {run_dir} at epoch {start_epoch}')

    writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_epoch if cfg.resume else None) \
        if distributed.is_main() else distributed.NullWriter()
    deployable = distiller.deployable()

    def save_last(epoch: int, accuracy: float | None) -> None:
        save_checkpoint({'epoch': epoch, 'model': deployable.state_dict(), 'accuracy': accuracy,
                         'deploy': distiller.deploy_spec(), 'distiller': distiller.state_dict_without_teacher(),
                         'optimizer': optimizer.state_dict(), 'best_acc': best_acc, 'best_epoch': best_epoch,
                         'best_val': best_val, 'settings': _settings(cfg), 'wall_time_s': wall_time,
                         'rng': rng_state()}, run_dir / LAST)

    if start_epoch == 1:
        save_last(0, None)  # the state before epoch 1: a run that stops in epoch 1 stays resumable
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            tic = time.time()
            try:
                train_stats = train_epoch(distiller, data, optimizer, trainer, cfg, epoch, device)
            except LossNotFinite as err:
                raise LossNotFinite(f"{err}; stopped: {run_dir / LAST} keeps epoch {epoch - 1}, continue with "
                                    f"--resume and a smaller --learning_rate (now {cfg.learning_rate:g})",
                                    err.epoch, err.iteration) from None
            lr = optimizer.param_groups[0]['lr']          # the epoch's, set by train_epoch
            val = validate(deployable, data.val_loader, device)
            test = val if test_loader is None else validate(deployable, test_loader, device)
            epoch_time = time.time() - tic
            wall_time += epoch_time
            split_keys = {} if test_loader is None else {
                'val_loss': val['loss'], 'val_acc': val['acc'], 'val_acc_top5': val['acc_top5']}
            record = {'epoch': epoch, 'lr': lr, **train_stats, 'test_loss': test['loss'], 'test_acc': test['acc'],
                      'test_acc_top5': test['acc_top5'], 'test_images': test['images'], **split_keys, **distiller.epoch_metrics(),
                      'time': epoch_time}
            history.append(record)
            if distributed.is_main():
                with open(run_dir / METRICS, 'a') as f:
                    f.write(json.dumps(record) + '\n')
            for key, value in record.items():
                if key != 'epoch':
                    writer.add_scalar(key, value, epoch)
            writer.flush()
            val_text = '' if test_loader is None else f"val acc {val['acc']:.2f}  "
            print(f"epoch {epoch}/{cfg.epochs}  lr {lr:.4g}  train loss {record['train_loss']:.4f} "
                  f"acc {record['train_acc']:.2f}  {val_text}test acc {test['acc']:.2f} "
                  f"(top5 {test['acc_top5']:.2f})  {epoch_time:.1f}s", flush=True)

            weights, spec = deployable.state_dict(), distiller.deploy_spec()
            if test_loader is None:
                if test['acc'] > best_acc:
                    save_checkpoint({'epoch': epoch, 'model': weights, 'best_acc': test['acc'], 'deploy': spec},
                                    run_dir / f'{cfg.model_name}_best.pth')
            elif val['acc'] > best_val['best_val_acc']:
                best_val = {'best_val_acc': val['acc'], 'best_val_epoch': epoch, 'test_acc_at_best_val': test['acc']}
                save_checkpoint({'epoch': epoch, 'model': weights, 'best_acc': val['acc'], 'test_acc': test['acc'],
                                 'deploy': spec}, run_dir / f'{cfg.model_name}_best.pth')
            if test['acc'] > best_acc:
                best_acc, best_epoch = test['acc'], epoch
            if epoch % cfg.save_freq == 0 or epoch == cfg.epochs:
                save_checkpoint({'epoch': epoch, 'model': weights, 'accuracy': test['acc'], 'deploy': spec},
                                run_dir / f'ckpt_epoch_{epoch}.pth')
            save_last(epoch, test['acc'])
    finally:
        writer.close()

    if not history:
        raise UserError(f"{run_dir} has no finished epoch to summarise")
    last = history[-1]
    # the best top-1 epoch's top-5 (None if its record is gone, as after a resume that lost metrics.jsonl)
    best_top5 = next((r['test_acc_top5'] for r in history if r['epoch'] == best_epoch), None)
    summary = {
        'last_acc': last['test_acc'], 'last_acc_top5': last['test_acc_top5'],
        'best_acc': best_acc, 'best_acc_top5': best_top5, 'best_epoch': best_epoch, 'epochs': last['epoch'],
        'params_deployed': count_params(deployable), 'macs_deployed': count_macs(deployable, data.image_size),
        'seed': cfg.seed,
        **({} if test_loader is None else {**best_val, 'last_val_acc': last['val_acc']}),
        **cfg.summary_extra, **distiller.summary_extras(),
        'git_sha': git_sha(), 'torch_version': torch.__version__, 'device_name': device_name(device),
        'wall_time_s': wall_time,
    }
    save_json(summary, run_dir / 'summary.json')
    print(f'best accuracy: {best_acc:.2f} (epoch {best_epoch}); last: {last["test_acc"]:.2f}')
    if test_loader is not None:
        print(f"best on val: {best_val['best_val_acc']:.2f} (epoch {best_val['best_val_epoch']}); "
              f"test accuracy there: {best_val['test_acc_at_best_val']:.2f}")
    return summary
