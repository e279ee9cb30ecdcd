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

ImageNet (Table 2) adds top-5 columns (``last_acc_top5``, ``best_acc_top5``; a summary without them
shows top-5 as missing). Its teachers are torchvision weights, not runs of ours: the teacher row is
the ``teacher_acc`` (``teacher_acc_top5``) the students' runs measured. Our student of pair (b) is
MobileNetV1, compared with the row the paper calls "MobileNetV2" (see scripts/settings.py).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


from scripts.settings import (IMAGENET_METHODS, IMAGENET_PAIRS, METHODS, TABLE1_METHODS, TABLE1_PAIRS, TABLE3_METHODS,
                              TABLE3_PAIRS, TRIALS_CIFAR, TRIALS_TINYIMAGENET, method_label)

PUBLISHED = Path(__file__).with_name('published_results.csv')
REFERENCE_ROWS = ('teacher', 'student')
LAYOUT = {'cifar100': (TABLE1_PAIRS, TABLE1_METHODS, TRIALS_CIFAR),
          'tinyimagenet': (TABLE3_PAIRS, TABLE3_METHODS, TRIALS_TINYIMAGENET),
          'imagenet': (list(IMAGENET_PAIRS.values()), list(IMAGENET_METHODS), 1)}
TOP5_DATASETS = ('imagenet',)          # tables that publish top-5 as well
PRETRAINED_TEACHERS = ('imagenet',)    # teachers not trained here: their row is the students' teacher_acc
# the row of a --distill where a dataset's table names it otherwise (ImageNet's attention runs are 'AT+KD')
DATASET_LABELS = {'imagenet': {m.distill: label for label, m in IMAGENET_METHODS.items()}}
# the paper's name of our student where it differs: Table 2's "MobileNetV2" column is MobileNetV1's
PAPER_STUDENT = {('imagenet', 'MobileNetV1'): 'MobileNetV2'}
# Group attribute -> (published_results.csv column, name in the tables)
METRICS = {'last': ('top1', 'top-1'), 'best': ('top1', 'top-1'), 'last5': ('top5', 'top-5'), 'best5': ('top5', 'top-5')}
CSV_HEADER = ['dataset', 'teacher', 'student', 'method', 'n', 'last_mean', 'last_std', 'best_mean', 'best_std',
              'published', 'delta_last', 'delta_best', 'last_top5_mean', 'last_top5_std', 'best_top5_mean',
              'best_top5_std', 'published_top5', 'delta_last_top5', 'delta_best_top5', 'params_deployed',
              'macs_deployed', 'tdd_degenerate_runs']

Published = dict[str, dict[tuple[str, str, str, str], float]]   # column ('top1', 'top5') -> key -> number


@dataclass
class Group:
    last: list[float] = field(default_factory=list)
    best: list[float] = field(default_factory=list)
    last5: list[float | None] = field(default_factory=list)   # top-5; None for a summary without it
    best5: list[float | None] = field(default_factory=list)
    params: int | None = None
    macs: int | None = None
    degenerate: int = 0      # runs whose TDD class trees had one group per class at every stage

    def add(self, summary: dict) -> None:
        """One run: its last-epoch accuracy and its best epoch's; a run with a validation split (Tiny-ImageNet
        ``--tiny_split letkd``) chooses its best epoch on val and reports it on test, as Table 3 does (its
        top-5 there is not recorded)."""
        at_val = summary.get('test_acc_at_best_val')
        self.append(summary['last_acc'], summary['best_acc'] if at_val is None else at_val,
                    summary.get('last_acc_top5'), summary.get('best_acc_top5') if at_val is None else None)
        self.degenerate += bool(summary.get('tdd_degenerate'))
        self.params = summary.get('params_deployed', self.params)
        self.macs = summary.get('macs_deployed', self.macs)

    def append(self, last: float, best: float, last5: float | None, best5: float | None) -> None:
        self.last.append(float(last))
        self.best.append(float(best))
        self.last5.append(None if last5 is None else float(last5))
        self.best5.append(None if best5 is None else float(best5))

    def values(self, metric: str) -> list[float]:
        """The runs' numbers of ``metric`` (a key of METRICS), without the missing ones."""
        return [v for v in getattr(self, metric) if v is not None]


@dataclass
class Runs:
    """Every run under SAVE_DIR, grouped."""
    # (dataset, teacher, student, label)
    students: dict[tuple[str, str, str, str], Group] = field(default_factory=lambda: defaultdict(Group))
    vanilla: dict[tuple[str, str], Group] = field(default_factory=lambda: defaultdict(Group))   # (dataset, model)
    teachers: dict[tuple[str, str], Group] = field(default_factory=lambda: defaultdict(Group))  # (dataset, teacher)

    def row(self, dataset: str, teacher: str, student: str, label: str) -> Group | None:
        """The runs of one cell: rows 'teacher' and 'student' are models of the column on their own."""
        if label == 'teacher':
            return (self.teachers if dataset in PRETRAINED_TEACHERS else self.vanilla).get((dataset, teacher))
        if label == 'student':
            return self.vanilla.get((dataset, student))
        return self.students.get((dataset, teacher, student, label))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single run)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def load_published(path: Path = PUBLISHED, column: str = 'top1') -> dict[tuple[str, str, str, str], float]:
    """{(dataset, teacher, student, method): number} of one column of published_results.csv ('top1', 'top5')."""
    with open(path, newline='') as f:
        return {(r['dataset'], r['teacher'], r['student'], r['method']): float(r[column])
                for r in csv.DictReader(f) if r[column]}


def paper_number(published: Published, column: str, dataset: str, teacher: str, student: str,
                 label: str) -> float | None:
    """The published number ('top1' or 'top5' column) of one of our cells (our student under the paper's name)."""
    return published[column].get((dataset, teacher, PAPER_STUDENT.get((dataset, student), student), label))


def column_title(dataset: str, teacher: str, student: str) -> str:
    """'ResNet50 -> MobileNetV1 (paper: "MobileNetV2")' where the paper names our student otherwise."""
    paper = PAPER_STUDENT.get((dataset, student))
    return f'{teacher} -> {student}' + (f' (paper: "{paper}")' if paper else '')


def run_label(summary: dict) -> str:
    """The row of a student run: the paper's label of its --distill, as its dataset's table names it."""
    distill = summary['distill']
    return (DATASET_LABELS.get(summary['dataset'], {}).get(distill)
            or method_label(distill, float(summary.get('alpha') or 0)))


def collect(save_dir: Path) -> Runs:
    """Every summary.json under ``save_dir``: student runs by (dataset, teacher, student, label), vanilla runs
    by (dataset, model).

    Vanilla runs are those of train_teacher.py (model_t null) and train_student.py --distill ce; they
    fill the 'teacher' and 'student' rows, except pretrained teachers (ImageNet), whose row collects the
    teacher_acc of the student runs.
    """
    runs = Runs()
    for path in sorted(save_dir.rglob('summary.json')):
        summary = json.loads(path.read_text())
        dataset = summary['dataset']
        if summary.get('model_t') in (None, 'none') or summary.get('distill') == 'ce':
            runs.vanilla[(dataset, summary['model_s'])].add(summary)
            continue
        runs.students[(dataset, summary['model_t'], summary['model_s'], run_label(summary))].add(summary)
        if dataset in PRETRAINED_TEACHERS and summary.get('teacher_acc') is not None:
            top1, top5 = summary['teacher_acc'], summary.get('teacher_acc_top5')
            runs.teachers[(dataset, summary['model_t'])].append(top1, top1, top5, top5)
    return runs


def cell(group: Group | None, metric: str, published: float | None) -> tuple[str, float | None]:
    """'72.44 +- 0.21 (5) / 72.44 / +0.00' and the mean (None when there is no run with the number)."""
    pub = f'{published:.2f}' if published is not None else '-'
    values = group.values(metric) if group else []
    if not values:
        return f'- / {pub}', None
    mean, std = mean_std(values)
    delta = f'{mean - published:+.2f}' if published is not None else '-'
    mark = f' [degenerate trees {group.degenerate}/{len(group.last)}]' if group.degenerate else ''
    return f'{mean:.2f} +- {std:.2f} ({len(values)}) / {pub} / {delta}{mark}', mean


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])


def accuracy_table(runs: Runs, published: Published, dataset: str, pairs, labels: list[str],
                   metrics: Sequence[str]) -> str:
    """One column per pair and metric (a top-1 and a top-5 column per pair where ``metrics`` has both)."""
    columns = [(t, s, metric) for t, s in pairs for metric in metrics]
    rows = list(REFERENCE_ROWS) + labels
    cells = {(label, col): cell(runs.row(dataset, t, s, label), metric,
                                paper_number(published, METRICS[metric][0], dataset, t, s, label))
             for label in rows for col, (t, s, metric) in enumerate(columns)}
    for col in range(len(columns)):
        means = [(cells[(label, col)][1], label) for label in labels if cells[(label, col)][1] is not None]
        if means:
            best_label = max(means)[1]
            text, value = cells[(best_label, col)]
            cells[(best_label, col)] = (f'**{text}**', value)
    header = ['method'] + [column_title(dataset, t, s) + (f' {METRICS[metric][1]}' if len(metrics) > 1 else '')
                           for t, s, metric in columns]
    return markdown(header, [[label] + [cells[(label, col)][0] for col in range(len(columns))] for label in rows])


def cost_table(runs: Runs, dataset: str, pairs, labels: list[str]) -> str:
    students = list(dict.fromkeys(s for _, s in pairs))
    header = ['method'] + [f'{s}: params (M) / MACs (M)' for s in students]
    rows = []
    for label in ['student'] + labels:
        row = [label]
        for student in students:
            groups = (runs.row(dataset, t, s, label) for t, s in pairs if s == student)
            group = next((g for g in groups if g is not None), None)
            if group is None or group.params is None:
                row.append('-')
            else:
                macs = f'{group.macs / 1e6:.1f}' if group.macs is not None else '-'
                row.append(f'{group.params / 1e6:.2f} / {macs}')
        rows.append(row)
    return markdown(header, rows)


def missing_runs(runs: Runs, dataset: str, pairs, labels: list[str], trials: int) -> list[str]:
    out = []
    for t, s in pairs:
        for label in labels:
            group = runs.students.get((dataset, t, s, label))
            n = len(group.last) if group else 0
            if n < trials:
                out.append(f'{dataset} {t} -> {s} {label}: {n}/{trials} runs')
    scratch = {s for _, s in pairs} if dataset in PRETRAINED_TEACHERS else {m for pair in pairs for m in pair}
    for model in sorted(scratch):
        if (dataset, model) not in runs.vanilla:
            out.append(f'{dataset} {model} from scratch: 0 runs')
    return out


def csv_numbers(group: Group, metrics: tuple[str, str], published: float | None) -> list:
    """Mean and std of the last and the best epoch, the published number and our deltas to it."""
    out: list = []
    means: list[float | None] = []
    for metric in metrics:
        values = group.values(metric)
        mean, std = mean_std(values) if values else (None, None)
        out += ['' if mean is None else f'{mean:.4f}', '' if std is None else f'{std:.4f}']
        means.append(mean)
    out.append('' if published is None else published)
    return out + ['' if published is None or mean is None else f'{mean - published:.4f}' for mean in means]


def csv_row(key: tuple[str, str, str, str], group: Group, top1: float | None, top5: float | None) -> list:
    """A line of comparison.csv; the top-5 columns are empty on a dataset whose table has no top-5."""
    top5_numbers = csv_numbers(group, ('last5', 'best5'), top5) if key[0] in TOP5_DATASETS else [''] * 7
    return [*key, len(group.last), *csv_numbers(group, ('last', 'best'), top1), *top5_numbers,
            group.params, group.macs, group.degenerate]


def write_csv(path: Path, runs: Runs, published: Published) -> None:
    def teacher_number(column: str, dataset: str, teacher: str) -> float | None:
        return next((v for (d, t, _, label), v in published[column].items()
                     if (d, t, label) == (dataset, teacher, 'teacher')), None)

    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        for key, group in sorted(runs.students.items()):
            writer.writerow(csv_row(key, group, paper_number(published, 'top1', *key),
                                    paper_number(published, 'top5', *key)))
        for (dataset, model), group in sorted(runs.vanilla.items()):
            writer.writerow(csv_row((dataset, '', model, 'vanilla'), group, None, None))
        for (dataset, model), group in sorted(runs.teachers.items()):
            writer.writerow(csv_row((dataset, model, '', 'teacher'), group, teacher_number('top1', dataset, model),
                                    teacher_number('top5', dataset, model)))


def plot(path: Path, runs: Runs, published: Published, dataset: str, pairs, labels: list[str]) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    pairs = [(t, s) for t, s in pairs if any((dataset, t, s, label) in runs.students for label in labels)]
    if not pairs:
        return
    fig, axes = plt.subplots(1, len(pairs), figsize=(max(5.0, 3.2 * len(pairs)), 0.32 * len(labels) + 1.8), sharey=True,
                             squeeze=False)
    for ax, (t, s) in zip(axes[0], pairs):
        ys = range(len(labels))
        means, errs = [], []
        for label in labels:
            group = runs.students.get((dataset, t, s, label))
            mean, std = mean_std(group.last) if group else (float('nan'), 0.0)
            means.append(mean)
            errs.append(std)
        ax.barh(list(ys), means, xerr=errs, color='tab:blue', alpha=0.8, label='ours (last epoch)')
        pub = [paper_number(published, 'top1', dataset, t, s, label) for label in labels]
        pub = [float('nan') if v is None else v for v in pub]
        ax.plot(pub, list(ys), 'kx', label='published')
        finite = [v for v in means + pub if v == v]
        if finite:
            ax.set_xlim(min(finite) - 2, max(finite) + 1)
        ax.set_title(column_title(dataset, t, s).replace(' -> ', '\n-> '), fontsize=9)
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
    parser.add_argument('--trials', type=int, default=None,
                        help='expected trials per cell (default 5 / 3 / 1 on CIFAR-100 / Tiny-ImageNet / ImageNet)')
    parser.add_argument('--all_methods', action='store_true', help="also rows for methods outside the paper's table")
    args = parser.parse_args(argv)
    if not args.save_dir.is_dir():
        print(f'error: {args.save_dir} is not a folder', file=sys.stderr)
        return 2
    out = args.out or args.save_dir
    out.mkdir(parents=True, exist_ok=True)
    runs = collect(args.save_dir)
    published = {column: load_published(column=column) for column in ('top1', 'top5')}
    datasets = sorted({k[0] for k in runs.students} | {k[0] for k in runs.vanilla})
    missing: list[str] = []
    for dataset in datasets:
        pairs, labels, trials = LAYOUT.get(dataset, (sorted({(k[1], k[2]) for k in runs.students if k[0] == dataset}),
                                                      list(METHODS), 1))
        if args.all_methods:
            labels = labels + [m for m in METHODS if m not in labels]
        pairs = [p for p in pairs if any(k[0] == dataset and (k[1], k[2]) == p for k in runs.students)] or pairs
        top5 = dataset in TOP5_DATASETS
        for epoch in ('last', 'best'):
            metrics = (epoch, epoch + '5') if top5 else (epoch,)
            print(f'## {dataset}: {epoch}-epoch top-1{" and top-5" if top5 else ""} '
                  '(mean +- std (n) / published / ours - published)\n')
            print(accuracy_table(runs, published, dataset, pairs, labels, metrics) + '\n')
        print(f'## {dataset}: deployed student size\n')
        print(cost_table(runs, dataset, pairs, labels) + '\n')
        plot(out / f'comparison_{dataset}.png', runs, published, dataset, pairs, labels)
        missing += missing_runs(runs, dataset, pairs, labels, args.trials or trials)
    write_csv(out / 'comparison.csv', runs, published)
    print(f'wrote {out / "comparison.csv"}' + ''.join(f', {out / f"comparison_{d}.png"}' for d in datasets))
    if missing:
        print(f'\nmissing runs ({len(missing)}):')
        print('\n'.join(f'- {m}' for m in missing))
    return 0


if __name__ == '__main__':
    sys.exit(main())
