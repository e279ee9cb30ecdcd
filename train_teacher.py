"""Train a model from scratch with cross-entropy (RepDistiller's train_teacher.py, with our additions).

    python train_teacher.py --model resnet56                      # CIFAR-100, 240 epochs
    python train_teacher.py --model resnet8 --dataset digits --epochs 5 --device cpu

Writes save/models/<model>_<dataset>_lr_<lr>_decay_<wd>_trial_<trial>/ (see docs/outputs-and-resume.md).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from distiller_zoo.logit_kd import Vanilla
from helper import distributed
from helper.errors import UserError
from helper.numerics import set_tf32
from helper.options import (ResolvedOptions, add_common_arguments, freeze, resolve_common, run_cli,
                            teacher_folder_name, updated)
from helper.run import RunConfig, check_run_dir, create_run_dir, fit, load_data
from helper.util import resolve_device, save_json, seed_everything
from models import create_model, model_names


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Train a teacher (or any model) with cross-entropy.')
    parser.add_argument('--model', type=str, default='resnet110',
                        help=f"one of: {', '.join(model_names())} (with --dataset imagenet ResNet18/34/50 and "
                        "MobileNetV1 are the ImageNet architectures)")
    parser.add_argument('-t', '--trial', type=str, default='0', help='experiment id (folder name, default seed)')
    add_common_arguments(parser)
    return parser


def resolve_options(parsed: argparse.Namespace) -> ResolvedOptions:
    """The run's options, checked and complete (lr, seed; CE alone: -r 1 -a 0 -b 0); reads no file."""
    if parsed.model not in model_names():
        raise UserError(f"unknown --model {parsed.model!r}; choose one of: {', '.join(model_names())}")
    opt = resolve_common(parsed, parsed.model)
    return freeze(updated(opt, gamma=1.0, alpha=0.0, beta=0.0, kd_T=4.0))


def run_folder(opt: argparse.Namespace) -> Path:
    """The run folder of resolved options: <save_dir>/models/<model>_<dataset>_lr_<lr>_decay_<wd>_trial_<trial>."""
    return Path(opt.save_dir) / 'models' / teacher_folder_name(opt)


def resolve_run_dir(parsed: argparse.Namespace) -> Path:
    """The run folder of a parsed command line (resolves a copy of the options; reads no file)."""
    return run_folder(resolve_options(parsed))


def main(parsed: argparse.Namespace) -> dict:
    """Validate everything, then create the run folder and train. Returns the run summary."""
    opt = resolve_options(parsed)
    run_dir = run_folder(opt)
    device = distributed.setup(resolve_device(opt.device))  # joins torchrun's process group, if any
    check_run_dir(run_dir, resume=opt.resume, overwrite=opt.overwrite)

    seed_everything(opt.seed, opt.deterministic)
    set_tf32(opt.tf32)   # both directions: without --tf32 CUDA convolves in true float32, not cuDNN's default TF32
    data = load_data(opt, device, 'plain')
    model = create_model(opt.model, num_classes=data.num_classes, dataset=opt.dataset)
    distiller = Vanilla(model, None, opt, data.info).to(device)

    create_run_dir(run_dir, overwrite=opt.overwrite)   # rank 0 under torchrun
    if not opt.resume:
        save_json({**vars(opt), **asdict(data.info)}, run_dir / 'args.json')
    print(f'==> training {opt.model} on {opt.dataset} ({data.n_data} images, {data.num_classes} classes) '
          f'on {device}; run folder {run_dir}')
    summary = {'distill': 'ce', 'model_s': opt.model, 'model_t': None, 'dataset': opt.dataset, 'trial': opt.trial}
    cfg = RunConfig.from_opt(opt, run_dir, opt.model, summary)
    return fit(distiller, data, cfg, device)


def cli(argv: list[str] | None = None) -> int:
    return run_cli(get_args_parser(), main, argv)


if __name__ == '__main__':
    sys.exit(cli())
