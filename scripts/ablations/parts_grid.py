"""Supplementary Table 5: which parts of letKD-2 matter: each KD layer on or off, and its alpha 0 or on.

    python scripts/ablations/parts_grid.py                       # CIFAR-100, resnet56 -> resnet20, 8 rows x 5 trials
    python scripts/ablations/parts_grid.py --rows 1 2 --dry-run  # the commands of some rows
    python scripts/ablations/parts_grid.py --plot_only           # the table from the finished runs
    python scripts/ablations/parts_grid.py --dataset digits --teacher resnet14 --student resnet8 --epochs 5 \
        --trials 1 --k_inter 2 --k_penult 64 --device cpu --num_workers 0         # small, on CPU

Rows (the paper's order): the intermediate layer alone (``--distill letkd_inter``), the penultimate layer
alone (``letkd1``), both (``letkd2``); alpha "1" is the pair's alpha (1, except ResNet50 -> MobileNetV2),
alpha 0 keeps the layer and its KL loss but adds nothing to the feature (``F_hat = F``): the student imitates
the teacher's assignments instead of using them. Every row has letKD's published flags (scripts/settings.py).
Writes <out>/parts_grid.{md,csv}: mean +- std over the trials of the last- and best-epoch top-1 next to the
paper's numbers (measured on CIFAR-100 with resnet56 -> resnet20, 5 trials).
"""
from __future__ import annotations

import argparse
import sys
from typing import NamedTuple


from scripts.ablations.common import (Variant, accuracies, add_arguments, build_grid, finished_runs,
                                      fmt_delta, main_wrapper, finish_report, missing_note, out_dir, paper_value, parse_args,
                                      parser_default, print_commands, run_grid, write_table)
from scripts.settings import METHODS

PAPER_SETTING = ('cifar100', 'resnet56', 'resnet20')


class Row(NamedTuple):
    inter: bool
    alpha_inter_on: bool
    penult: bool
    alpha_penult_on: bool
    paper: float


# supplementary Table 5, in its order
ROWS = [Row(True, False, False, False, 70.64), Row(True, True, False, False, 70.80),
        Row(False, False, True, False, 71.84), Row(False, False, True, True, 72.44),
        Row(True, False, True, False, 71.70), Row(True, False, True, True, 72.13),
        Row(True, True, True, False, 72.78), Row(True, True, True, True, 73.27)]
DISTILL = {(True, False): 'letkd_inter', (False, True): 'letkd1', (True, True): 'letkd2'}


def variant(number: int, k_inter: int) -> Variant:
    """Row ``number`` (1-based) as a grid point: letKD-2's published flags, ``--alpha_<layer> 0`` for alpha off,
    and ``--k_inter`` when the row has the intermediate layer (tagged when not the default, as in k_inter_sweep.py)."""
    row = ROWS[number - 1]
    extra: list[str] = ['--k_inter', str(k_inter)] if row.inter else []
    tag = [f'kinter{k_inter}'] if row.inter and k_inter != parser_default('k_inter') else []
    for layer, present, on in (('inter', row.inter, row.alpha_inter_on), ('penult', row.penult, row.alpha_penult_on)):
        if present and not on:
            extra += [f'--alpha_{layer}', '0']
            tag.append(f'{layer}0')
    return Variant(str(number), DISTILL[(row.inter, row.penult)], (*METHODS['letKD-2'].published_flags, *extra), '_'.join(tag))


def alpha_text(present: bool, on: bool, value: float) -> str:
    return '-' if not present else (f'{value:g}' if on else '0')


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_arguments(parser, teacher='resnet56', student='resnet20')
    parser.add_argument('--rows', type=int, nargs='+', default=list(range(1, len(ROWS) + 1)),
                        choices=range(1, len(ROWS) + 1), help='rows of Table 5 to run (default all 8)')
    parser.add_argument('--k_inter', type=int, default=parser_default('k_inter'), help='sub-classes per class')
    return parser


def body(argv: list[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    numbers = sorted(set(args.rows))
    grid = build_grid(args, [variant(n, args.k_inter) for n in numbers])
    if args.dry_run:
        print_commands(grid)
        return 0
    failed = 0 if args.plot_only else run_grid(args, grid)

    from distiller_zoo.letkd import default_alphas
    alphas = default_alphas(args.teacher, args.student, args.dataset)
    runs = {key: finished_runs(commands) for key, commands in grid.runs.items()}
    rows = []
    for n in numbers:
        row, key = ROWS[n - 1], str(n)
        paper = paper_value(args, PAPER_SETTING, row.paper)
        last, best = accuracies(runs[key], 'last'), accuracies(runs[key], 'best')
        rows.append([key, 'yes' if row.inter else '-', alpha_text(row.inter, row.alpha_inter_on, alphas['inter']),
                     'yes' if row.penult else '-', alpha_text(row.penult, row.alpha_penult_on, alphas['penult']),
                     f'{row.paper:.2f}', last, best, fmt_delta(last, paper)])
    out = out_dir(args)
    setting = f'{args.dataset}, {args.teacher} -> {args.student}, {args.epochs} epochs'
    text = write_table(out, 'parts_grid', ['row', 'Inter.', 'alpha_inter', 'Penult.', 'alpha_penult', 'paper',
                                           'last-epoch top-1', 'best-epoch top-1', 'last - paper'], rows,
                       f'letKD-2 parts (Table 5; {setting}; mean +- std (trials); the paper measured on '
                       f'cifar100, resnet56 -> resnet20, 5 trials)')
    return finish_report(text, missing_note(grid, runs), [out / 'parts_grid.md', out / 'parts_grid.csv'], failed)


def main(argv: list[str] | None = None) -> int:
    return main_wrapper(body, argv)


if __name__ == '__main__':
    sys.exit(main())
