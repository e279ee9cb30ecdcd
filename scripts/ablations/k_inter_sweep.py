"""Supplementary Fig. 1: letKD-2 top-1 against K_inter, the sub-classes per class of the intermediate KD layer.

    python scripts/ablations/k_inter_sweep.py                         # CIFAR-100, resnet56 -> resnet20, 5 trials
    python scripts/ablations/k_inter_sweep.py --dry-run > kinter.txt  # the commands (scripts/launch.py runs them)
    python scripts/ablations/k_inter_sweep.py --plot_only             # redraw from the finished runs
    python scripts/ablations/k_inter_sweep.py --dataset digits --teacher resnet14 --student resnet8 --epochs 5 \
        --trials 1 --k_inter 1 2 4 --k_penult 64 --device cpu --num_workers 0      # small, on CPU

Each K_inter is letKD-2 with the published flags (scripts/settings.py) and ``--k_inter K``; the other
settings are the defaults. Writes <out>/k_inter_sweep.{png,md,csv}: mean +- std over the trials of the last-
and best-epoch top-1 per K_inter. The paper draws the curve without printing its values: it reports a stable
accuracy for K_inter > 8 and uses 8, where its Table 1 gives letKD-2's number (73.27 for resnet56 -> resnet20),
drawn here as the reference point.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from scripts.ablations.common import (Run, Variant, accuracies, add_arguments, build_grid, finished_runs,
                                      fmt_delta, main_wrapper, mean_std, method_variant, finish_report, missing_note, out_dir,
                                      parse_args, parser_default, print_commands, run_grid, write_table)
from scripts.compare_with_paper import load_published

K_VALUES = [1, 2, 4, 8, 16, 32]


def variants(k_values: list[int]) -> list[Variant]:
    default = parser_default('k_inter')
    return [method_variant(str(k), 'letKD-2', ('--k_inter', str(k)), '' if k == default else f'kinter{k}')
            for k in k_values]


def plot(path: Path, k_values: list[int], runs: dict[str, list[Run]], paper: float | None, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for metric, marker in (('last', 'o'), ('best', 's')):
        points = [(k, *mean_std(accuracies(runs[str(k)], metric))) for k in k_values if runs[str(k)]]
        if points:
            ks, means, stds = zip(*points)
            ax.errorbar(ks, means, yerr=stds, marker=marker, capsize=3, label=f'ours, {metric} epoch')
    if paper is not None:
        ax.plot([parser_default('k_inter')], [paper], 'k*', markersize=11, label='paper (Table 1)')
    ax.set_xscale('log', base=2)
    ax.set_xticks(k_values, [str(k) for k in k_values])
    ax.set_xlabel('$K_{inter}$ (sub-classes per class)')
    ax.set_ylabel('top-1 (%), mean $\\pm$ std over trials')
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_arguments(parser, teacher='resnet56', student='resnet20')
    parser.add_argument('--k_inter', type=int, nargs='+', default=K_VALUES, help=f'the grid (default {K_VALUES})')
    return parser


def body(argv: list[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    args.k_inter = sorted(set(args.k_inter))
    grid = build_grid(args, variants(args.k_inter))
    if args.dry_run:
        print_commands(grid)
        return 0
    failed = 0 if args.plot_only else run_grid(args, grid)

    runs = {key: finished_runs(commands) for key, commands in grid.runs.items()}
    paper = load_published().get((args.dataset, args.teacher, args.student, 'letKD-2'))
    default = str(parser_default('k_inter'))
    rows = [[key, accuracies(runs[key], 'last'), accuracies(runs[key], 'best'),
             f'{paper:.2f}' if key == default and paper is not None else '-',
             fmt_delta(accuracies(runs[key], 'last'), paper) if key == default else '-']
            for key in grid.runs]
    setting = f'{args.dataset}, {args.teacher} -> {args.student}, {args.epochs} epochs'
    out = out_dir(args)
    text = write_table(out, 'k_inter_sweep', ['K_inter', 'last-epoch top-1', 'best-epoch top-1', 'paper',
                                              'last - paper'], rows,
                       f'letKD-2 top-1 against K_inter ({setting}; mean +- std (trials)); paper: Fig. 1, stable '
                       f'for K_inter > 8')
    plot(out / 'k_inter_sweep.png', args.k_inter, runs, paper, f'letKD-2 vs $K_{{inter}}$ ({setting})')
    return finish_report(text, missing_note(grid, runs),
                         [out / 'k_inter_sweep.png', out / 'k_inter_sweep.md', out / 'k_inter_sweep.csv'], failed)


def main(argv: list[str] | None = None) -> int:
    return main_wrapper(body, argv)


if __name__ == '__main__':
    sys.exit(main())
