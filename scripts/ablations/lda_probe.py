"""Supplementary Table 4: how class-separable are the intermediate KD layer's input x and output x_hat?

    python scripts/ablations/lda_probe.py                     # CIFAR-100, resnet56 -> resnet20, 2 students x 5 trials
    python scripts/ablations/lda_probe.py --plot_only         # probe the finished students only
    python scripts/ablations/lda_probe.py --dataset digits --teacher resnet14 --student resnet8 --epochs 5 \
        --trials 1 --k_inter 2 --k_penult 64 --device cpu --num_workers 0        # small, on CPU

Students: letKD-2 with alpha_inter 0 and with the pair's alpha_inter (1 for resnet56 -> resnet20), alpha_penult
as published: Table 5's rows 6 and 8 (the same commands as parts_grid.py, so the runs are shared). For each
trained student (``distiller_zoo.load_deployed`` of its last-epoch checkpoint, or ``--checkpoint best``) a
forward hook on the intermediate KD layer reads its input x and output x_hat = x + alpha * v, globally
average-pooled, over the training split (test transform) and the test split; sklearn's
LinearDiscriminantAnalysis (svd solver) is fitted on the training vectors and its test accuracy reported,
per student, as mean +- std over the trials. With alpha_inter 0, x_hat equals x. Writes <out>/lda_probe.{md,csv}.
"""
from __future__ import annotations

import argparse
import sys
from typing import Iterable


import numpy as np
import torch
import torch.nn as nn

from dataset import DataBundle, get_dataloaders
from scripts.ablations.common import (Run, accuracies, add_arguments, build_grid, finished_runs,
                                      fmt_delta, main_wrapper, finish_report, missing_note, out_dir, paper_value, parse_args,
                                      parser_default, print_commands, run_grid, write_table)
from scripts.ablations.parts_grid import ROWS, variant

PAPER_SETTING = ('cifar100', 'resnet56', 'resnet20')
STUDENTS = (6, 8)      # Table 5's rows: letKD-2 with alpha_inter 0, and with the pair's alpha_inter
PAPER = {(6, 'x'): 52.71, (8, 'x'): 51.71, (8, 'x_hat'): 56.36}
FEATURES = ('x', 'x_hat')


@torch.no_grad()
def kd_layer_io(model: nn.Module, loader: Iterable, device: torch.device, role: str = 'inter'
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Globally average-pooled input x and output x_hat of the letKD student's ``role`` KD layer over ``loader``:
    (N, C) float64, (N, C) float64 and the labels (N,)."""
    pooled: dict[str, torch.Tensor] = {}

    def read(module: nn.Module, inputs: tuple, output: tuple) -> None:
        pooled['x'], pooled['x_hat'] = inputs[0].mean((2, 3)), output[0].mean((2, 3))

    handle = model.kd_layers[role].register_forward_hook(read)
    xs, x_hats, labels = [], [], []
    try:
        model.eval()
        for batch in loader:
            model(batch[0].to(device))
            xs.append(pooled['x'].double().cpu())
            x_hats.append(pooled['x_hat'].double().cpu())
            labels.append(batch[1])
    finally:
        handle.remove()
    return torch.cat(xs).numpy(), torch.cat(x_hats).numpy(), torch.cat(labels).numpy()


def lda_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray) -> float:
    """Test top-1 (%) of sklearn's LinearDiscriminantAnalysis (svd solver) fitted on the training vectors."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    return 100.0 * float(LinearDiscriminantAnalysis(solver='svd').fit(train, train_labels).score(test, test_labels))


def probe_run(run: Run, data: DataBundle, device: torch.device, checkpoint: str) -> dict[str, float]:
    """LDA test accuracy of x and x_hat for one finished letKD-2 run."""
    from distiller_zoo import load_deployed
    name = f"ckpt_epoch_{run.summary['epochs']}.pth" if checkpoint == 'last' else f"{run.summary['model_s']}_best.pth"
    model = load_deployed(run.run_dir / name).to(device)
    train_x, train_x_hat, train_y = kd_layer_io(model, data.train_eval_loader, device)
    test_x, test_x_hat, test_y = kd_layer_io(model, data.val_loader, device)
    return {'x': lda_accuracy(train_x, train_y, test_x, test_y),
            'x_hat': lda_accuracy(train_x_hat, train_y, test_x_hat, test_y)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_arguments(parser, teacher='resnet56', student='resnet20')
    parser.add_argument('--k_inter', type=int, default=parser_default('k_inter'), help='sub-classes per class')
    parser.add_argument('--checkpoint', default='last', choices=('last', 'best'), help='which saved student to probe')
    parser.add_argument('--probe_batch_size', type=int, default=256)
    return parser


def body(argv: list[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    grid = build_grid(args, [variant(row, args.k_inter) for row in STUDENTS])
    if args.dry_run:
        print_commands(grid)
        return 0
    failed = 0 if args.plot_only else run_grid(args, grid)

    from distiller_zoo.letkd import default_alphas
    from helper.util import resolve_device
    runs = {row: finished_runs(grid.runs[str(row)]) for row in STUDENTS}
    probes: dict[int, list[dict[str, float]]] = {row: [] for row in STUDENTS}
    if any(runs.values()):
        device = resolve_device(args.device)
        data = get_dataloaders(args.dataset, args.data_folder, args.probe_batch_size, args.num_workers, mode='plain',
                               download=False, test_batch_size=args.probe_batch_size)
        probes = {row: [probe_run(run, data, device, args.checkpoint) for run in runs[row]] for row in STUDENTS}

    alpha_on = default_alphas(args.teacher, args.student, args.dataset)['inter']
    rows = []
    for row in STUDENTS:
        label = f"letKD-2 (alpha_inter = {alpha_on if ROWS[row - 1].alpha_inter_on else 0:g})"
        top1 = accuracies(runs[row], 'last')
        for feature in FEATURES:
            values = [probe[feature] for probe in probes[row]]
            published = PAPER.get((row, feature))
            paper = None if published is None else paper_value(args, PAPER_SETTING, published)
            rows.append([label, feature, '-' if published is None else f'{published:.2f}', values,
                         fmt_delta(values, paper), top1])
    out = out_dir(args)
    setting = (f'{args.dataset}, {args.teacher} -> {args.student}, {args.epochs} epochs, '
               f'{args.checkpoint}-epoch students')
    text = write_table(out, 'lda_probe', ['student', 'features', 'paper', 'LDA test top-1', 'ours - paper',
                                          'student top-1 (last epoch)'], rows,
                       f'LDA probe of the intermediate KD layer (Table 4; {setting}; mean +- std (trials); the '
                       f'paper measured on cifar100, resnet56 -> resnet20; its alpha_inter 0 number is for x = x_hat)')
    return finish_report(text, missing_note(grid, {str(row): runs[row] for row in STUDENTS}),
                         [out / 'lda_probe.md', out / 'lda_probe.csv'], failed)


def main(argv: list[str] | None = None) -> int:
    return main_wrapper(body, argv)


if __name__ == '__main__':
    sys.exit(main())
