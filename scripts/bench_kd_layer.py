"""Inference cost of the letKD layers: time and parameters of the deployed letKD-1 / letKD-2 students
against the plain student, for each Table-1 student and K_penult in {64, 4096} (random weights).

    python scripts/bench_kd_layer.py                          # CPU, batch 64, prints a Markdown table
    python scripts/bench_kd_layer.py --device cuda --batch_size 128

Each variant's time is the median, over ``--repeats`` rounds after ``--warmup`` rounds, of one forward of a
random (B, 3, S, S) batch in eval mode without grad; within a round the variants run one after another,
so slow drifts of the machine hit all of them alike. Ratios are taken within the same run. The deployed
letKD students are timed as trained (``KDLayer``) and folded for inference (``LetKDStudent.fold_bn()``:
BN folded into the predictor, one chunked fused pass); the largest logit difference between the two is
printed under the table (random BN statistics, so the fold is exercised). ``--clock process`` times CPU seconds of this
process instead of wall seconds (steadier when other jobs share the cores).
The supplementary reports about +2% time for the intermediate layer and +2-20% for the penultimate one
(K from 64 to 4096; its hardware is not stated).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time


import torch
import torch.nn as nn

from distiller_zoo.letkd import KDLayer, LetKDStudent
from helper.letkd_offline import kd_sites
from models import site_shapes
from helper.errors import UserError
from helper.util import count_params, resolve_device
from models import create_model

TABLE1_STUDENTS = ('resnet20', 'resnet32', 'resnet8x4', 'wrn_16_2', 'wrn_40_1', 'ShuffleV1', 'ShuffleV2', 'MobileNetV2')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--students', nargs='+', default=list(TABLE1_STUDENTS))
    parser.add_argument('--k_penult', type=int, nargs='+', default=[64, 4096])
    parser.add_argument('--k_inter', type=int, default=8,
                        help='sub-classes per class (letKD-2 has classes x k_inter words)')
    parser.add_argument('--num_classes', type=int, default=100)
    parser.add_argument('--image_size', type=int, default=32)
    parser.add_argument('--batch_size', type=int, default=64)
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--device', default='cpu', choices=('auto', 'cpu', 'cuda'))
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
    parser.add_argument('--clock', default='wall', choices=('wall', 'process'),
                        help='wall seconds, or CPU seconds of this process (CPU only)')
    return parser.parse_args(argv)


def letkd_student(name: str, num_classes: int, image_size: int, words: dict[str, int]) -> LetKDStudent:
    """A deployed letKD student with KD layers of ``words[role]`` words at ``roles`` (random weights; the
    KD layers' BN gets random statistics and affine parameters, as after training)."""
    backbone = create_model(name, num_classes)
    shapes = site_shapes(backbone, kd_sites(name, tuple(words)), image_size)
    student = LetKDStudent(backbone, name, {role: KDLayer(shapes[role][0], k) for role, k in words.items()})
    with torch.no_grad():
        for layer in student.kd_layers.values():
            layer.bn.running_mean.uniform_(-1.0, 1.0)
            layer.bn.running_var.uniform_(0.5, 2.0)
            layer.bn.weight.uniform_(0.5, 1.5)
            layer.bn.bias.uniform_(-0.5, 0.5)
    return student


def folded(student: LetKDStudent) -> LetKDStudent:
    """A copy of ``student`` with its KD layers folded for inference."""
    return copy.deepcopy(student).fold_bn()


@torch.no_grad()
def median_times(models: dict[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int,
                 clock: str = 'wall') -> dict[str, float]:
    """Median seconds per forward of each model, timed round-robin (``clock``: 'wall' or 'process')."""
    now = time.process_time if clock == 'process' else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(warmup + repeats):
        for name, model in models.items():
            if x.device.type == 'cuda':
                torch.cuda.synchronize()
            tic = now()
            model(x)
            if x.device.type == 'cuda':
                torch.cuda.synchronize()
            if round_ >= warmup:
                times[name].append(now() - tic)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if args.clock == 'process' and device.type != 'cpu':
        raise UserError('--clock process measures CPU time; use it with --device cpu')
    print(f'device {device} ({torch.get_num_threads()} CPU threads), batch {args.batch_size}, '
          f'{args.image_size}x{args.image_size}, median {args.clock} time of {args.repeats} after {args.warmup} '
          f'warm-up rounds; "folded": LetKDStudent.fold_bn()\n')
    print('| student | K_penult | params | letKD-1 params | letKD-2 params | plain ms/batch '
          '| letKD-1 / plain time | folded letKD-1 / plain | letKD-2 / plain time | folded letKD-2 / plain |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
    largest_diff = 0.0
    inter_words = args.num_classes * args.k_inter
    for name in args.students:
        models: dict[str, nn.Module] = {'plain': create_model(name, args.num_classes)}
        for k in args.k_penult:
            models[f'1-{k}'] = letkd_student(name, args.num_classes, args.image_size, {'penult': k})
            models[f'2-{k}'] = letkd_student(name, args.num_classes, args.image_size,
                                             {'inter': inter_words, 'penult': k})
        models = {key: model.to(device).eval() for key, model in models.items()}
        for k in args.k_penult:
            models[f'1-{k}-folded'], models[f'2-{k}-folded'] = folded(models[f'1-{k}']), folded(models[f'2-{k}'])
        secs = median_times(models, x, args.repeats, args.warmup, args.clock)
        plain_params = count_params(models['plain'])
        for k in args.k_penult:
            one, two = models[f'1-{k}'], models[f'2-{k}']
            with torch.no_grad():
                largest_diff = max(largest_diff, float((one(x) - models[f'1-{k}-folded'](x)).abs().max()),
                                   float((two(x) - models[f'2-{k}-folded'](x)).abs().max()))
            t0, t1, t2 = secs['plain'], secs[f'1-{k}'], secs[f'2-{k}']
            f1, f2 = secs[f'1-{k}-folded'], secs[f'2-{k}-folded']
            print(f'| {name} | {k} | {plain_params / 1e6:.3f} M | +{(count_params(one) - plain_params) / 1e6:.3f} M '
                  f'| +{(count_params(two) - plain_params) / 1e6:.3f} M | {t0 * 1e3:.1f} | {t1 / t0:.3f} '
                  f'| {f1 / t0:.3f} | {t2 / t0:.3f} | {f2 / t0:.3f} |', flush=True)
    print(f'\nlargest |logit difference| between a folded and an as-trained student: {largest_diff:.1e}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
