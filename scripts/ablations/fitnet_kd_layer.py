"""Supplementary Table 6: is the KD layer's gain capacity or supervision? FitNet, FitNet + KD layer without
and with the KD layer's supervision.

    python scripts/ablations/fitnet_kd_layer.py               # CIFAR-100, resnet110 -> resnet32, 3 rows x 5 trials
    python scripts/ablations/fitnet_kd_layer.py --dry-run     # the commands
    python scripts/ablations/fitnet_kd_layer.py --plot_only   # the table from the finished runs
    python scripts/ablations/fitnet_kd_layer.py --dataset digits --teacher resnet14 --student resnet8 --epochs 5 \
        --trials 1 --k_penult 64 --device cpu --num_workers 0                  # small, on CPU

Rows: ``--distill hint`` (FitNet: CE + 100 x MSE of a ConvReg of the stage-2 output, ``--hint_layer 2``);
``--distill fitnet_kdlayer --kd_layer_weight 0`` (the same plus letKD's penultimate KD layer in the network,
its KL loss weighted 0: capacity only); ``--kd_layer_weight 1`` (the KD layer supervised by the teacher's
codebook, as in letKD-1). All three use the letKD code's protocol (Nesterov, reflect padding): the paper's
FitNet here (71.59) is not its Table 1 number for the same pair (71.06, RepDistiller's protocol), so we take
the three rows as one controlled comparison. Writes <out>/fitnet_kd_layer.{md,csv}.
"""
from __future__ import annotations

import argparse
import sys


from scripts.ablations.common import (Variant, accuracies, add_arguments, build_grid, finished_runs,
                                      fmt_delta, main_wrapper, method_variant, finish_report, missing_note, out_dir, paper_value,
                                      parse_args, print_commands, run_grid, write_table)
from scripts.settings import METHODS

PAPER_SETTING = ('cifar100', 'resnet110', 'resnet32')
LETKD_PROTOCOL = ('--nesterov', '--pad_mode', 'reflect')
FITNET_WEIGHTS = METHODS['FitNet'].flags      # -r 1 -a 0 -b 100
# (row, paper's top-1, grid point)
ROWS: list[tuple[str, float, Variant]] = [
    ('FitNet', 71.59, method_variant('FitNet', 'FitNet', LETKD_PROTOCOL)),
    ('FitNet+KD layer without supervision', 71.80,
     Variant('without', 'fitnet_kdlayer', (*FITNET_WEIGHTS, *LETKD_PROTOCOL, '--kd_layer_weight', '0'), 'kl0')),
    ('FitNet+KD layer with supervision', 73.36,
     Variant('with', 'fitnet_kdlayer', (*FITNET_WEIGHTS, *LETKD_PROTOCOL, '--kd_layer_weight', '1'))),
]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_arguments(parser, teacher='resnet110', student='resnet32')
    return parser


def body(argv: list[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    grid = build_grid(args, [v for _, _, v in ROWS])
    if args.dry_run:
        print_commands(grid)
        return 0
    failed = 0 if args.plot_only else run_grid(args, grid)

    runs = {key: finished_runs(commands) for key, commands in grid.runs.items()}
    rows = []
    for name, published, v in ROWS:
        paper = paper_value(args, PAPER_SETTING, published)
        last, best = accuracies(runs[v.key], 'last'), accuracies(runs[v.key], 'best')
        rows.append([name, f'{published:.2f}', last, best, fmt_delta(last, paper)])
    out = out_dir(args)
    setting = f'{args.dataset}, {args.teacher} -> {args.student}, {args.epochs} epochs'
    text = write_table(out, 'fitnet_kd_layer', ['method', 'paper', 'last-epoch top-1', 'best-epoch top-1',
                                                'last - paper'], rows,
                       f'FitNet + KD layer (Table 6; {setting}; mean +- std (trials); the paper measured on '
                       f'cifar100, resnet110 -> resnet32, 5 trials)')
    return finish_report(text, missing_note(grid, runs),
                         [out / 'fitnet_kd_layer.md', out / 'fitnet_kd_layer.csv'], failed)


def main(argv: list[str] | None = None) -> int:
    return main_wrapper(body, argv)


if __name__ == '__main__':
    sys.exit(main())
