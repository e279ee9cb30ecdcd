"""Our runs next to the letKD paper's published numbers.

    python scripts/compare_with_paper.py save/                  # Markdown to stdout, CSV + PNG beside it
    python scripts/compare_with_paper.py save/ --out results/ --trials 5

Reads every summary.json under SAVE_DIR, groups runs by (dataset, teacher, student, method) and
prints, per dataset, tables laid out like the paper's (rows: methods, columns: teacher -> student):
mean +- std over trials (n) of the last-epoch and of the best-epoch accuracy, the published number
and our difference to it; the best method of each column in bold. A second table gives the
deployed student's parameters and multiply-adds per method (letKD and SimKD students keep extra
modules at test time). Writes comparison.csv and comparison_<dataset>.png to --out and lists the
runs that are missing. A TDD cell some of whose runs had degenerate class trees (``tdd_degenerate``
in summary.json: one group per class at every distilled stage, i.e. KD plus per-class heads) is
marked ``[degenerate trees k/n]``.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


from scripts.settings import (METHODS, TABLE1_METHODS, TABLE1_PAIRS, TABLE3_METHODS, TABLE3_PAIRS,
                              TRIALS_CIFAR, TRIALS_TINYIMAGENET, method_label)

PUBLISHED = Path(__file__).with_name('published_results.csv')
REFERENCE_ROWS = ('teacher', 'student')
LAYOUT = {'cifar100': (TABLE1_PAIRS, TABLE1_METHODS, TRIALS_CIFAR),
          'tinyimagenet': (TABLE3_PAIRS, TABLE3_METHODS, TRIALS_TINYIMAGENET)}


@dataclass
class Group:
    last: list[float] = field(default_factory=list)
    best: list[float] = field(default_factory=list)
    params: int | None = None
    macs: int | None = None
    degenerate: int = 0      # runs whose TDD class trees had one group per class at every stage

    def add(self, summary: dict) -> None:
        """One run: its last-epoch accuracy and its best epoch's; a run with a validation split (Tiny-ImageNet
        ``--tiny_split letkd``) chooses its best epoch on val and reports it on test, as Table 3 does."""
        self.last.append(float(summary['last_acc']))
        self.best.append(float(summary.get('test_acc_at_best_val', summary['best_acc'])))
        self.degenerate += bool(summary.get('tdd_degenerate'))
        self.params = summary.get('params_deployed', self.params)
        self.macs = summary.get('macs_deployed', self.macs)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single run)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def load_published(path: Path = PUBLISHED) -> dict[tuple[str, str, str, str], float]:
    with open(path, newline='') as f:
        return {(r['dataset'], r['teacher'], r['student'], r['method']): float(r['top1'])
                for r in csv.DictReader(f) if r['top1']}


def collect(save_dir: Path) -> tuple[dict[tuple, Group], dict[tuple[str, str], Group]]:
    """Student runs keyed by (dataset, teacher, student, label); vanilla runs keyed by (dataset, model).

    Vanilla runs are those of train_teacher.py (model_t null) and train_student.py --distill ce; they
    fill the 'teacher' and 'student' rows.
    """
    runs: dict[tuple, Group] = defaultdict(Group)
    vanilla: dict[tuple[str, str], Group] = defaultdict(Group)
    for path in sorted(save_dir.rglob('summary.json')):
        summary = json.loads(path.read_text())
        if summary.get('model_t') in (None, 'none') or summary.get('distill') == 'ce':
            vanilla[(summary['dataset'], summary['model_s'])].add(summary)
        else:
            label = method_label(summary['distill'], float(summary.get('alpha') or 0))
            runs[(summary['dataset'], summary['model_t'], summary['model_s'], label)].add(summary)
    return runs, vanilla


def row_group(runs, vanilla, dataset: str, teacher: str, student: str, label: str) -> Group | None:
    if label == 'teacher':
        return vanilla.get((dataset, teacher))
    if label == 'student':
        return vanilla.get((dataset, student))
    return runs.get((dataset, teacher, student, label))


def cell(group: Group | None, metric: str, published: float | None) -> tuple[str, float | None]:
    """'72.44 +- 0.21 (5) / 72.44 / +0.00' and the mean (None when there is no run)."""
    pub = f'{published:.2f}' if published is not None else '-'
    if group is None:
        return f'- / {pub}', None
    mean, std = mean_std(getattr(group, metric))
    delta = f'{mean - published:+.2f}' if published is not None else '-'
    mark = f' [degenerate trees {group.degenerate}/{len(group.last)}]' if group.degenerate else ''
    return f'{mean:.2f} +- {std:.2f} ({len(group.last)}) / {pub} / {delta}{mark}', mean


def accuracy_table(runs, vanilla, published, dataset: str, pairs, labels, metric: str) -> str:
    header = ['method'] + [f'{t} -> {s}' for t, s in pairs]
    rows = []
    cells: dict[tuple[str, int], tuple[str, float | None]] = {}
    for label in list(REFERENCE_ROWS) + labels:
        for col, (t, s) in enumerate(pairs):
            group = row_group(runs, vanilla, dataset, t, s, label)
            cells[(label, col)] = cell(group, metric, published.get((dataset, t, s, label)))
    for col in range(len(pairs)):
        means = [(cells[(label, col)][1], label) for label in labels if cells[(label, col)][1] is not None]
        if means:
            best_label = max(means)[1]
            text, value = cells[(best_label, col)]
            cells[(best_label, col)] = (f'**{text}**', value)
    for label in list(REFERENCE_ROWS) + labels:
        rows.append([label] + [cells[(label, col)][0] for col in range(len(pairs))])
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
    return '\n'.join(lines)


def cost_table(runs, vanilla, dataset: str, pairs, labels) -> str:
    students = list(dict.fromkeys(s for _, s in pairs))
    header = ['method'] + [f'{s}: params (M) / MACs (M)' for s in students]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for label in ['student'] + labels:
        row = [label]
        for student in students:
            group = next((row_group(runs, vanilla, dataset, t, s, label) for t, s in pairs
                          if s == student and row_group(runs, vanilla, dataset, t, s, label) is not None), None)
            if group is None or group.params is None:
                row.append('-')
            else:
                macs = f'{group.macs / 1e6:.1f}' if group.macs is not None else '-'
                row.append(f'{group.params / 1e6:.2f} / {macs}')
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def missing_runs(runs, vanilla, dataset: str, pairs, labels, trials: int) -> list[str]:
    out = []
    for t, s in pairs:
        for label in labels:
            group = runs.get((dataset, t, s, label))
            n = len(group.last) if group else 0
            if n < trials:
                out.append(f'{dataset} {t} -> {s} {label}: {n}/{trials} runs')
    for model in sorted({m for pair in pairs for m in pair}):
        if (dataset, model) not in vanilla:
            out.append(f'{dataset} {model} from scratch: 0 runs')
    return out


def write_csv(path: Path, runs, vanilla, published) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['dataset', 'teacher', 'student', 'method', 'n', 'last_mean', 'last_std', 'best_mean',
                         'best_std', 'published', 'delta_last', 'delta_best', 'params_deployed', 'macs_deployed',
                         'tdd_degenerate_runs'])
        for (dataset, t, s, label), group in sorted(runs.items()):
            last_mean, last_std = mean_std(group.last)
            best_mean, best_std = mean_std(group.best)
            pub = published.get((dataset, t, s, label))
            writer.writerow([dataset, t, s, label, len(group.last), f'{last_mean:.4f}', f'{last_std:.4f}',
                             f'{best_mean:.4f}', f'{best_std:.4f}', '' if pub is None else pub,
                             '' if pub is None else f'{last_mean - pub:.4f}',
                             '' if pub is None else f'{best_mean - pub:.4f}', group.params, group.macs,
                             group.degenerate])
        for (dataset, model), group in sorted(vanilla.items()):
            last_mean, last_std = mean_std(group.last)
            best_mean, best_std = mean_std(group.best)
            writer.writerow([dataset, '', model, 'vanilla', len(group.last), f'{last_mean:.4f}', f'{last_std:.4f}',
                             f'{best_mean:.4f}', f'{best_std:.4f}', '', '', '', group.params, group.macs, 0])


def plot(path: Path, runs, published, dataset: str, pairs, labels) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    pairs = [(t, s) for t, s in pairs if any((dataset, t, s, label) in runs for label in labels)]
    if not pairs:
        return
    fig, axes = plt.subplots(1, len(pairs), figsize=(max(5.0, 3.2 * len(pairs)), 0.32 * len(labels) + 1.8), sharey=True,
                             squeeze=False)
    for ax, (t, s) in zip(axes[0], pairs):
        ys = range(len(labels))
        means, errs = [], []
        for label in labels:
            group = runs.get((dataset, t, s, label))
            mean, std = mean_std(group.last) if group else (float('nan'), 0.0)
            means.append(mean)
            errs.append(std)
        ax.barh(list(ys), means, xerr=errs, color='tab:blue', alpha=0.8, label='ours (last epoch)')
        pub = [published.get((dataset, t, s, label), float('nan')) for label in labels]
        ax.plot(pub, list(ys), 'kx', label='published')
        finite = [v for v in means + pub if v == v]
        if finite:
            ax.set_xlim(min(finite) - 2, max(finite) + 1)
        ax.set_title(f'{t}\n-> {s}', fontsize=9)
        ax.set_yticks(list(ys), labels, fontsize=8)
        ax.invert_yaxis()
    axes[0][-1].legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f'{dataset}: last-epoch top-1, mean +- std over trials')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('save_dir', type=Path)
    parser.add_argument('--out', type=Path, default=None, help='folder for comparison.csv and PNGs (default SAVE_DIR)')
    parser.add_argument('--trials', type=int, default=None, help='expected trials per cell (default 5 / 3)')
    parser.add_argument('--all_methods', action='store_true', help="also rows for methods outside the paper's table")
    args = parser.parse_args(argv)
    if not args.save_dir.is_dir():
        print(f'error: {args.save_dir} is not a folder', file=sys.stderr)
        return 2
    out = args.out or args.save_dir
    out.mkdir(parents=True, exist_ok=True)
    runs, vanilla = collect(args.save_dir)
    published = load_published()
    datasets = sorted({k[0] for k in runs} | {k[0] for k in vanilla})
    missing: list[str] = []
    for dataset in datasets:
        pairs, labels, trials = LAYOUT.get(dataset, (sorted({(k[1], k[2]) for k in runs if k[0] == dataset}),
                                                      list(METHODS), 1))
        if args.all_methods:
            labels = labels + [m for m in METHODS if m not in labels]
        pairs = [p for p in pairs if any(k[0] == dataset and (k[1], k[2]) == p for k in runs)] or pairs
        print(f'## {dataset}: last-epoch top-1 (mean +- std (n) / published / ours - published)\n')
        print(accuracy_table(runs, vanilla, published, dataset, pairs, labels, 'last') + '\n')
        print(f'## {dataset}: best-epoch top-1 (mean +- std (n) / published / ours - published)\n')
        print(accuracy_table(runs, vanilla, published, dataset, pairs, labels, 'best') + '\n')
        print(f'## {dataset}: deployed student size\n')
        print(cost_table(runs, vanilla, dataset, pairs, labels) + '\n')
        plot(out / f'comparison_{dataset}.png', runs, published, dataset, pairs, labels)
        missing += missing_runs(runs, vanilla, dataset, pairs, labels, args.trials or trials)
    write_csv(out / 'comparison.csv', runs, vanilla, published)
    print(f'wrote {out / "comparison.csv"}' + ''.join(f', {out / f"comparison_{d}.png"}' for d in datasets))
    if missing:
        print(f'\nmissing runs ({len(missing)}):')
        print('\n'.join(f'- {m}' for m in missing))
    return 0


if __name__ == '__main__':
    sys.exit(main())
