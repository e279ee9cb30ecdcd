"""Evaluate any checkpoint this project writes, or torchvision's ImageNet weights, on a data set's test split.

    python eval_student.py save/student_model/S:resnet20_T:resnet56_cifar100_letkd2_.../resnet20_best.pth
    python eval_student.py save/models/resnet56_vanilla/ckpt_epoch_240.pth            # RepDistiller's teacher
    python eval_student.py torchvision:ResNet18 --dataset imagenet --data_folder /data --json r18.json

Prints top-1, top-5, the mean cross-entropy, parameters and multiply-adds of the network as trained (torch's
FlopCounter, one image) and inference images/s on the device. Every deployed student rebuilds from the checkpoint alone
(distiller_zoo.load_deployed): letKD students keep their KD layers (BN folded for inference unless
``--no_fold``: same logits up to rounding, faster), SimKD students their projector and the teacher's classifier,
plain students and teachers are the plain model. A RepDistiller checkpoint (no ``deploy`` entry) is built from
the architecture in its folder name, as train_student.py parses a teacher's, or from ``--model``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dataset import DATASETS, get_dataloaders
from distiller_zoo.deploy import deployed_from_checkpoint
from helper.errors import UserError
from helper.loops import validate
from helper.options import run_cli, teacher_name_from_path
from helper.teachers import is_torchvision_teacher
from helper.util import count_macs, count_params, device_name, load_checkpoint, load_teacher, resolve_device
from models import model_names


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Evaluate a checkpoint (a deployed student, a teacher, or '
                                                 'torchvision:<name>) on a test split.')
    parser.add_argument('checkpoint', help='a .pth this project wrote, a RepDistiller checkpoint, or torchvision:<name>')
    parser.add_argument('--dataset', default=None, choices=DATASETS,
                        help="default: the checkpoint's own (recorded in it), else cifar100")
    parser.add_argument('--data_folder', default='./data')
    parser.add_argument('--no_download', dest='download', action='store_false', help='never download CIFAR-100')
    parser.add_argument('--model', default=None, help='architecture of a checkpoint that does not record it')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    parser.add_argument('--batch_size', type=int, default=256, help='evaluation and throughput batch')
    parser.add_argument('--num_workers', type=int, default=8)
    parser.add_argument('--no_fold', dest='fold', action='store_false',
                        help="evaluate letKD's KD layers as trained (default: BN folded for inference)")
    parser.add_argument('--tiny_split', default=None, choices=('val50', 'letkd'),
                        help="Tiny-ImageNet: the evaluation split ('letkd': its test half, Table 3's)")
    parser.add_argument('--crop_size', type=int, default=None, help='ImageNet test centre crop (default 224)')
    parser.add_argument('--json', default=None, help='also write the results to this JSON file')
    parser.add_argument('--trust_checkpoint', action='store_true',
                        help='allow checkpoints that need arbitrary pickled objects')
    return parser


def load_model(opt: argparse.Namespace, num_classes_of: Any) -> tuple[nn.Module, str, dict[str, Any]]:
    """(model in eval mode, its dataset, what it is) for the checkpoint argument; UserError for a wrong one.

    ``num_classes_of(dataset)`` gives a data set's class count (for checkpoints that do not record theirs)."""
    path = opt.checkpoint
    if is_torchvision_teacher(path):
        name = teacher_name_from_path(path)
        dataset = opt.dataset or 'imagenet'
        if dataset != 'imagenet':
            raise UserError(f"{path} holds ImageNet weights; it cannot be evaluated on --dataset {dataset}")
        model = load_teacher(path, name, num_classes_of(dataset), dataset='imagenet')
        return model.eval(), dataset, {'kind': 'torchvision', 'model': name}
    ckpt = load_checkpoint(path, trust=opt.trust_checkpoint)
    spec = ckpt.get('deploy')
    if spec is not None:
        recorded = spec.get('dataset')
        if opt.dataset is not None and recorded is not None and opt.dataset != recorded:
            raise UserError(f"{path} was trained on {recorded}; evaluate it with --dataset {recorded}")
        dataset = opt.dataset or recorded or 'cifar100'
        return deployed_from_checkpoint(ckpt, path, spec), dataset, spec
    # RepDistiller's layout: {'model': state_dict, ...} without our 'deploy' record
    name = opt.model or teacher_name_from_path(path)
    if name not in model_names():
        raise UserError(f"{path} does not record its architecture and its folder names none ({name!r}); pass "
                        f"--model with one of: {', '.join(model_names())}")
    dataset = opt.dataset or 'cifar100'
    model = load_teacher(path, name, num_classes_of(dataset), opt.trust_checkpoint, dataset=dataset)
    return model.eval(), dataset, {'kind': 'plain', 'model': name}


@torch.no_grad()
def images_per_second(model: nn.Module, image_size: int, batch_size: int, device: torch.device,
                      repeats: int = 10) -> float:
    """Inference throughput: median time of ``repeats`` forwards of a (batch, 3, S, S) batch after 3 warm-ups."""
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    times = []
    for i in range(3 + repeats):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        model(x)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - tic)
    return batch_size / statistics.median(times)


def main(opt: argparse.Namespace) -> dict[str, Any]:
    """Evaluate; returns (and prints, and with --json writes) the results."""
    if opt.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {opt.batch_size}")
    device = resolve_device(opt.device)
    bundles: dict[str, Any] = {}

    def data_of(dataset: str) -> Any:
        if dataset not in bundles:
            split = opt.tiny_split or 'val50'
            if opt.tiny_split is not None and dataset != 'tinyimagenet':
                raise UserError(f"--tiny_split applies to --dataset tinyimagenet only, not {dataset}")
            bundles[dataset] = get_dataloaders(dataset, opt.data_folder, opt.batch_size, opt.num_workers,
                                               download=opt.download, test_batch_size=opt.batch_size,
                                               pin_memory=device.type == 'cuda', split=split,
                                               crop_size=opt.crop_size)
        return bundles[dataset]

    model, dataset, what = load_model(opt, lambda name: data_of(name).num_classes)
    data = data_of(dataset)
    params, macs = count_params(model), count_macs(model, data.image_size)     # the network as trained
    folded = bool(opt.fold and callable(getattr(model, 'fold_bn', None)))
    if folded:
        model.fold_bn()
    model = model.to(device)
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, data.image_size, data.image_size, device=device))
    if logits.shape[1] != data.num_classes:
        raise UserError(f"{opt.checkpoint} predicts {logits.shape[1]} classes, {dataset} has {data.num_classes}; "
                        "pass the --dataset it was trained on")
    loader = data.test_loader if data.test_loader is not None else data.val_loader
    tic = time.perf_counter()
    result = validate(model, loader, device)
    seconds = time.perf_counter() - tic
    summary = {'checkpoint': str(opt.checkpoint), 'dataset': dataset, **{k: v for k, v in what.items() if k in
               ('kind', 'model', 'model_s', 'model_t')}, 'folded': folded, 'top1': result['acc'],
               'top5': result['acc_top5'], 'loss': result['loss'], 'images': result['images'], 'params': params,
               'macs': macs,
               'images_per_s': images_per_second(model, data.image_size, opt.batch_size, device),
               'eval_seconds': seconds, 'device': device_name(device)}
    print(f"{summary['checkpoint']}\n  {dataset} test: top-1 {summary['top1']:.2f}  top-5 {summary['top5']:.2f}  "
          f"loss {summary['loss']:.4f}  ({summary['images']} images)\n  {summary['params']:,} params  "
          f"{summary['macs'] / 1e6:.1f} M MACs  {summary['images_per_s']:.0f} images/s at batch {opt.batch_size} "
          f"on {summary['device']}" + ('  (letKD layers folded)' if folded else ''))
    if opt.json:
        Path(opt.json).write_text(json.dumps(summary, indent=1))
    return summary


def cli(argv: list[str] | None = None) -> int:
    return run_cli(get_args_parser(), main, argv)


if __name__ == '__main__':
    sys.exit(cli())
