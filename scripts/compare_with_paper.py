"""Our runs next to the letKD paper's published numbers, every other source's, and across protocols.

    python scripts/compare_with_paper.py save/                  # Markdown to stdout, CSV + PNG beside it
    python scripts/compare_with_paper.py save/ --out results/ --trials 5
    python scripts/compare_with_paper.py save/ --protocol repdistiller letkd     # only these protocols' runs

Reads every summary.json under SAVE_DIR and groups runs by protocol (summary.json's ``protocol``, 'published' for
runs without it: scripts/settings.py PROTOCOLS) and (dataset, teacher, student, method). Per protocol and dataset
it prints tables laid out like the paper's (rows: methods, columns: teacher -> student): mean +- std over trials (n)
of the last-epoch and of the best-epoch accuracy; for the 'published' protocol also the letKD paper's number and our
difference to it; the best method of each column in bold. A second table gives the deployed student's parameters
and multiply-adds per method (letKD and SimKD students keep extra modules at test time). Writes comparison.csv and
comparison_<dataset>.png (other protocols: comparison_<dataset>_<protocol>.png) to --out and lists the runs that are
missing. A TDD cell some of whose runs had degenerate class trees (``tdd_degenerate`` in summary.json: one group
per class at every distilled stage, i.e. KD plus per-class heads) is marked ``[degenerate trees k/n]``.

All published numbers (published protocol only): for each of our cells, every number that published_results.csv
(the letKD paper) and published_elsewhere.csv (RepDistiller, mdistiller, LS, DIST, CTKD, ReviewKD, OFD) give for it,
one row each, with the source and its reporting rule, in a long table per dataset (and comparison_published.csv).
Ours is compared with the number by the source's epoch rule: our last-epoch mean with a last-epoch source, our
best-epoch mean with a best-epoch source, both with a source that does not say (flagged only when both are off).
A comparison is flagged when ours is more than 2 std (ours, over trials) from the published number, or more than 1
point when the cell has fewer than 3 runs.

Recipe effect (``--versus A B``, default repdistiller and letkd when both have runs): per method and pair, the mean
+- std under A and under B, the difference B - A, and whether it exceeds the run-to-run noise, 2 sqrt(s_A^2 / n_A +
s_B^2 / n_B) (1 point when either side has fewer than 3 runs); then per method the mean difference over the pairs
next to the method's own effect (method - student from scratch) under A and under B (protocol_comparison.csv).

ImageNet (Table 2) adds top-5 columns (``last_acc_top5``, ``best_acc_top5``; a summary without them
shows top-5 as missing). Its teachers are torchvision weights, not runs of ours: the teacher row is
the ``teacher_acc`` (``teacher_acc_top5``) the students' runs measured. Our student of pair (b) is
MobileNetV1, compared with the row the paper calls "MobileNetV2" (see scripts/settings.py).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


from scripts.settings import (DEFAULT_PROTOCOL, EXTENDED_PAIRS, IMAGENET_METHODS, IMAGENET_PAIRS, METHODS,
                              PROTOCOLS, TABLE1_METHODS, TABLE1_PAIRS, TABLE3_METHODS, TABLE3_PAIRS, TRIALS_CIFAR,
                              TRIALS_TINYIMAGENET, method_label)

PUBLISHED = Path(__file__).with_name('published_results.csv')
ELSEWHERE = Path(__file__).with_name('published_elsewhere.csv')
REFERENCE_ROWS = ('teacher', 'student')
LAYOUT = {'cifar100': (TABLE1_PAIRS, TABLE1_METHODS, TRIALS_CIFAR),
          'tinyimagenet': (TABLE3_PAIRS, TABLE3_METHODS, TRIALS_TINYIMAGENET),
          'imagenet': (list(IMAGENET_PAIRS.values()), list(IMAGENET_METHODS), 1)}
# columns after a layout's own, in this order, when they have runs (the extended sweep's other pairs)
MORE_PAIRS = {'cifar100': EXTENDED_PAIRS}
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
              'macs_deployed', 'tdd_degenerate_runs', 'protocol', 'published_all', 'flagged']
PUBLISHED_CSV_HEADER = ['dataset', 'teacher', 'student', 'method', 'protocol', 'n', 'last_mean', 'last_std',
                        'best_mean', 'best_std', 'published', 'published_std', 'source', 'reporting', 'epoch_rule',
                        'compared_with', 'diff_last', 'diff_best', 'threshold', 'flagged']
VERSUS_CSV_HEADER = ['dataset', 'teacher', 'student', 'method', 'protocol_a', 'protocol_b', 'n_a', 'n_b',
                     'last_mean_a', 'last_std_a', 'last_mean_b', 'last_std_b', 'best_mean_a', 'best_std_a',
                     'best_mean_b', 'best_std_b', 'diff_last', 'noise_last', 'beyond_noise_last', 'diff_best',
                     'noise_best', 'beyond_noise_best']
# how far ours may be from a published number: 2 std over our trials, or 1 point below 3 trials (single-run CIFAR-100
# noise is about 0.3-0.5, docs/reference/users-needs.md §3.3, so a 1-point gap with one or two runs stands out)
FLAG_STDS, FLAG_MIN_RUNS, FLAG_POINTS = 2.0, 3, 1.0
# the letKD paper's numbers: 5 trials on CIFAR-100, 3 on Tiny-ImageNet, 1 on ImageNet (supplementary); its code
# reloads the best-on-test checkpoint by default, but neither the code nor the text says which one the tables report
LETKD_REPORTING = ('mean of {n} runs (letKD supplementary); the epoch rule is not stated (its evaluation reloads the '
                   'best-on-test checkpoint by default: docs/reference/letkd-official.md §5); the other methods\' '
                   'numbers are copied from their papers')
LETKD_RUNS = {'cifar100': 5, 'tinyimagenet': 3, 'imagenet': 1}

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
    """Every run of one protocol under SAVE_DIR, grouped."""
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


# ------------------------------------------------------------------------------------- every published number
@dataclass(frozen=True)
class PublishedNumber:
    """One published top-1 of one cell, from one source, with how that source reports."""
    value: float
    std: float | None
    source: str        # the CSV's source column
    reporting: str     # the CSV's reporting column (published_results.csv: LETKD_REPORTING)
    dataset: str

    @property
    def rule(self) -> str:
        """The epoch the number is of: 'last', 'best' or 'unstated' (read from the reporting rule)."""
        return epoch_rule(self.reporting)

    @property
    def short_source(self) -> str:
        """'mdistiller (DKD tables)' from 'mdistiller README.md @a08d46f (DKD tables)'."""
        name = self.source.split()[0]
        table = re.search(r'\(([^)]*tables?)\)', self.source)
        return f'{name} ({table[1]})' if table else name

    @property
    def rule_text(self) -> str:
        """'best epoch, mean of 5 runs', 'last epoch, 1 run', 'epoch not stated, mean +- std over runs'."""
        epoch = {'last': 'last epoch', 'best': 'best epoch', 'unstated': 'epoch not stated'}[self.rule]
        runs = runs_of(self.reporting, self.dataset)
        return f'{epoch}, {runs}' if runs else epoch

    def label(self) -> str:
        """'76.32 (mdistiller (DKD tables), best epoch, mean of 5 runs)'."""
        std = f' +- {self.std:.2f}' if self.std is not None else ''
        return f'{self.value:.2f}{std} ({self.short_source}, {self.rule_text})'


def epoch_rule(reporting: str) -> str:
    """'last', 'best' or 'unstated' from a reporting text of the CSVs: a KD row that reprints RepDistiller's numbers
    is last-epoch whatever its table's rule; 'last epoch ...' is last; 'best epoch', 'best model' and the mdistiller
    rule are best; everything else does not say."""
    text = reporting.lower()
    if 'reprints repdistiller' in text or text.startswith('last epoch'):
        return 'last'
    if 'best epoch' in text or 'best model' in text or 'mdistiller rule' in text:
        return 'best'
    return 'unstated'


def runs_of(reporting: str, dataset: str) -> str:
    """How many runs a number averages, as the reporting text says ('' when it does not)."""
    if 'reprints repdistiller' in reporting.lower():
        return "RepDistiller's number reprinted"
    names = {'cifar-100': 'cifar100', 'imagenet': 'imagenet', 'tiny-imagenet': 'tinyimagenet'}
    for n, where in re.findall(r'(\d+) runs \(([^)]+)\)', reporting):
        if names.get(where.strip().lower()) == dataset:
            return f'mean of {n} runs'
    match = re.search(r'mean of (\d+) runs', reporting)
    if match:
        return f'mean of {match[1]} runs'
    if re.search(r'\bone run\b', reporting):
        return '1 run'
    if 'mean +- std' in reporting:
        return 'mean +- std over runs'
    return ''


AllPublished = dict[tuple[str, str, str, str], list[PublishedNumber]]


def load_all_published(letkd: Path = PUBLISHED, elsewhere: Path = ELSEWHERE) -> AllPublished:
    """{(dataset, teacher, student, method): [numbers]} from both CSVs, the letKD paper's first; keys use our model
    names (the paper's ImageNet "MobileNetV2" column is our MobileNetV1)."""
    ours = {(dataset, paper): student for (dataset, student), paper in PAPER_STUDENT.items()}
    out: AllPublished = defaultdict(list)
    with open(letkd, newline='') as f:
        for r in csv.DictReader(f):
            if not r['top1']:
                continue
            student = ours.get((r['dataset'], r['student']), r['student'])
            out[(r['dataset'], r['teacher'], student, r['method'])].append(PublishedNumber(
                float(r['top1']), float(r['top1_std']) if r['top1_std'] else None, r['source'],
                LETKD_REPORTING.format(n=LETKD_RUNS.get(r['dataset'], '?')), r['dataset']))
    with open(elsewhere, newline='') as f:
        for r in csv.DictReader(f):
            out[(r['dataset'], r['teacher'], r['student'], r['method'])].append(PublishedNumber(
                float(r['top1']), float(r['top1_std']) if r['top1_std'] else None, r['source'], r['reporting'],
                r['dataset']))
    return out


@dataclass(frozen=True)
class Check:
    """Our cell against one published number."""
    compared_with: str                 # 'last', 'best' or 'last, best'
    diff_last: float | None            # ours - published, by epoch
    diff_best: float | None
    threshold: float
    flagged: bool

    def diff_text(self) -> str:
        parts = [f'{name} {diff:+.2f}' for name, diff in (('last', self.diff_last), ('best', self.diff_best))
                 if name in self.compared_with and diff is not None]
        return ' / '.join(parts) if parts else '-'

    def flag_text(self, n: int) -> str:
        if not self.flagged:
            return ''
        return f'FLAG (> {FLAG_STDS:g} std)' if n >= FLAG_MIN_RUNS else f'FLAG (> {FLAG_POINTS:g} pt, n < {FLAG_MIN_RUNS})'


def check(group: Group, number: PublishedNumber) -> Check | None:
    """Ours against ``number`` by its epoch rule; None without runs. Flagged when |ours - published| exceeds
    2 std of ours (1 point with fewer than 3 runs) for the compared epoch (both epochs, for a source that does
    not say)."""
    if not group.last:
        return None
    n = len(group.last)
    last_mean, last_std = mean_std(group.last)
    best_mean, best_std = mean_std(group.best)
    epochs = {'last': ('last',), 'best': ('best',)}.get(number.rule, ('last', 'best'))
    stds = {'last': last_std, 'best': best_std}
    diffs = {'last': last_mean - number.value, 'best': best_mean - number.value}
    tolerance = {e: FLAG_STDS * stds[e] if n >= FLAG_MIN_RUNS else FLAG_POINTS for e in epochs}
    flagged = all(abs(diffs[e]) > tolerance[e] for e in epochs)
    return Check(', '.join(epochs), diffs['last'] if 'last' in epochs else None,
                 diffs['best'] if 'best' in epochs else None, max(tolerance.values()), flagged)


def paper_number(published: Published, column: str, dataset: str, teacher: str, student: str,
                 label: str) -> float | None:
    """The published number ('top1' or 'top5' column) of one of our cells (our student under the paper's name)."""
    return published[column].get((dataset, teacher, PAPER_STUDENT.get((dataset, student), student), label))


def column_title(dataset: str, teacher: str, student: str) -> str:
    """'ResNet50 -> MobileNetV1 (paper: "MobileNetV2")' where the paper names our student otherwise."""
    paper = PAPER_STUDENT.get((dataset, student))
    return f'{teacher} -> {student}' + (f' (paper: "{paper}")' if paper else '')


def run_label(summary: dict) -> str:
    """The row of a student run: the tables' label of its --distill as its dataset names it, with '+LS' for logit
    standardization and '+DOT' for the DOT trainer (published_elsewhere.csv's labels)."""
    distill = summary['distill']
    named = DATASET_LABELS.get(summary['dataset'], {}).get(distill)
    if named and not summary.get('logit_stand') and summary.get('trainer', 'sgd') == 'sgd':
        return named
    return method_label(distill, float(summary.get('alpha') or 0), bool(summary.get('logit_stand')),
                        summary.get('trainer') or 'sgd')


def collect(save_dir: Path) -> dict[str, Runs]:
    """Every summary.json under ``save_dir`` by protocol: student runs by (dataset, teacher, student, label),
    vanilla runs by (dataset, model).

    Vanilla runs are those of train_teacher.py (model_t null; the published protocol) and train_student.py
    --distill ce; they fill the 'teacher' and 'student' rows, except pretrained teachers (ImageNet), whose row
    collects the teacher_acc of the student runs.
    """
    protocols: dict[str, Runs] = defaultdict(Runs)
    for path in sorted(save_dir.rglob('summary.json')):
        summary = json.loads(path.read_text())
        runs = protocols[summary.get('protocol') or DEFAULT_PROTOCOL]
        dataset = summary['dataset']
        if summary.get('model_t') in (None, 'none') or summary.get('distill') == 'ce':
            runs.vanilla[(dataset, summary['model_s'])].add(summary)
            continue
        runs.students[(dataset, summary['model_t'], summary['model_s'], run_label(summary))].add(summary)
        if dataset in PRETRAINED_TEACHERS and summary.get('teacher_acc') is not None:
            top1, top5 = summary['teacher_acc'], summary.get('teacher_acc_top5')
            runs.teachers[(dataset, summary['model_t'])].append(top1, top1, top5, top5)
    return dict(protocols)


def protocol_order(names) -> list[str]:
    """'published' first, then settings.PROTOCOLS' order, then any other name."""
    known = [p for p in PROTOCOLS if p in names]
    return known + sorted(set(names) - set(known))


# ------------------------------------------------------------------------------------------------- tables
def mean_text(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f'{mean:.2f} +- {std:.2f} ({len(values)})'


def cell(group: Group | None, metric: str, published: float | None, with_published: bool = True
         ) -> tuple[str, float | None]:
    """'72.44 +- 0.21 (5) / 72.44 / +0.00' and the mean (None when there is no run with the number); without the
    published columns (a protocol other than 'published'), '72.44 +- 0.21 (5)'."""
    pub = f'{published:.2f}' if published is not None else '-'
    values = group.values(metric) if group else []
    if not values:
        return (f'- / {pub}' if with_published else '-'), None
    mean, _ = mean_std(values)
    mark = f' [degenerate trees {group.degenerate}/{len(group.last)}]' if group.degenerate else ''
    if not with_published:
        return f'{mean_text(values)}{mark}', mean
    delta = f'{mean - published:+.2f}' if published is not None else '-'
    return f'{mean_text(values)} / {pub} / {delta}{mark}', mean


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])


def accuracy_table(runs: Runs, published: Published, dataset: str, pairs, labels: list[str],
                   metrics: Sequence[str], with_published: bool = True) -> str:
    """One column per pair and metric (a top-1 and a top-5 column per pair where ``metrics`` has both)."""
    columns = [(t, s, metric) for t, s in pairs for metric in metrics]
    rows = list(REFERENCE_ROWS) + labels
    cells = {(label, col): cell(runs.row(dataset, t, s, label), metric,
                                paper_number(published, METRICS[metric][0], dataset, t, s, label), with_published)
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


def published_rows(runs: Runs, every: AllPublished, dataset: str, pairs, labels: list[str]
                   ) -> list[tuple[tuple[str, str, str, str], Group, PublishedNumber, Check]]:
    """(cell, our group, published number, check) for every published number of every cell with our runs."""
    out = []
    for t, s in pairs:
        for label in list(REFERENCE_ROWS) + labels:
            group = runs.row(dataset, t, s, label)
            if group is None or not group.last:
                continue
            for number in every.get((dataset, t, s, label), []):
                result = check(group, number)
                if result is not None:
                    out.append(((dataset, t, s, label), group, number, result))
    return out


def published_table(rows) -> str:
    """The long table of every published number next to ours, one row per (cell, source)."""
    header = ['teacher -> student', 'method', 'ours last', 'ours best', 'published', 'source', 'reporting',
              'compared', 'ours - published', 'flag']
    lines = []
    for (_, t, s, label), group, number, result in rows:
        pub = f'{number.value:.2f}' + (f' +- {number.std:.2f}' if number.std is not None else '')
        lines.append([f'{t} -> {s}', label, mean_text(group.last), mean_text(group.best), pub, number.short_source,
                      number.rule_text, result.compared_with, result.diff_text(), result.flag_text(len(group.last))])
    return markdown(header, lines)


def missing_runs(runs: Runs, dataset: str, pairs, labels: list[str], trials: int,
                 teachers_here: bool = True) -> list[str]:
    """Cells with fewer than ``trials`` runs and models without a run from scratch (teachers only where this
    protocol trains them: the published one; the other protocols share its teachers)."""
    out = []
    for t, s in pairs:
        for label in labels:
            group = runs.students.get((dataset, t, s, label))
            n = len(group.last) if group else 0
            if n < trials:
                out.append(f'{dataset} {t} -> {s} {label}: {n}/{trials} runs')
    scratch = ({s for _, s in pairs} if dataset in PRETRAINED_TEACHERS or not teachers_here
               else {m for pair in pairs for m in pair})
    for model in sorted(scratch):
        if (dataset, model) not in runs.vanilla:
            out.append(f'{dataset} {model} from scratch: 0 runs')
    return out


# --------------------------------------------------------------------------------------------- CSV and plot
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
    """A line of comparison.csv (without the protocol and all-published columns); the top-5 columns are empty on a
    dataset whose table has no top-5."""
    top5_numbers = csv_numbers(group, ('last5', 'best5'), top5) if key[0] in TOP5_DATASETS else [''] * 7
    return [*key, len(group.last), *csv_numbers(group, ('last', 'best'), top1), *top5_numbers,
            group.params, group.macs, group.degenerate]


def all_published_columns(group: Group, numbers: list[PublishedNumber]) -> list[str]:
    """comparison.csv's 'published_all' (every published number of the cell with its source and rule) and
    'flagged' (the sources ours is too far from)."""
    flagged = []
    for number in numbers:
        result = check(group, number)
        if result is not None and result.flagged:
            flagged.append(f'{number.value:.2f} ({number.short_source})')
    return ['; '.join(number.label() for number in numbers), '; '.join(flagged)]


def write_csv(path: Path, by_protocol: dict[str, Runs], published: Published, every: AllPublished) -> None:
    def teacher_number(column: str, dataset: str, teacher: str) -> float | None:
        return next((v for (d, t, _, label), v in published[column].items()
                     if (d, t, label) == (dataset, teacher, 'teacher')), None)

    def teacher_numbers(dataset: str, teacher: str) -> list[PublishedNumber]:
        seen: dict[tuple, PublishedNumber] = {}
        for (d, t, _, label), numbers in every.items():
            if (d, t, label) == (dataset, teacher, 'teacher'):
                for n in numbers:
                    seen.setdefault((n.source, n.value), n)
        return list(seen.values())

    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        for protocol in protocol_order(by_protocol):
            runs = by_protocol[protocol]
            here = protocol == DEFAULT_PROTOCOL      # published numbers sit beside the published protocol only

            def extra(group: Group, numbers: list[PublishedNumber]) -> list[str]:
                return [protocol, *(all_published_columns(group, numbers) if here else ['', ''])]

            for key, group in sorted(runs.students.items()):
                top1 = paper_number(published, 'top1', *key) if here else None
                top5 = paper_number(published, 'top5', *key) if here else None
                writer.writerow([*csv_row(key, group, top1, top5), *extra(group, every.get(key, []))])
            for (dataset, model), group in sorted(runs.vanilla.items()):
                numbers = list({(n.source, n.value): n for (d, _, s, label), ns in every.items()
                                if (d, s, label) == (dataset, model, 'student') for n in ns}.values())
                writer.writerow([*csv_row((dataset, '', model, 'vanilla'), group, None, None), *extra(group, numbers)])
            for (dataset, model), group in sorted(runs.teachers.items()):
                top1 = teacher_number('top1', dataset, model) if here else None
                top5 = teacher_number('top5', dataset, model) if here else None
                writer.writerow([*csv_row((dataset, model, '', 'teacher'), group, top1, top5),
                                 *extra(group, teacher_numbers(dataset, model))])


def write_published_csv(path: Path, rows) -> None:
    """comparison_published.csv: one row per (cell, published number), as the long table."""
    def number(value: float | None) -> str:
        return '' if value is None else f'{value:.4f}'

    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(PUBLISHED_CSV_HEADER)
        for key, group, pub, result in rows:
            last_mean, last_std = mean_std(group.last)
            best_mean, best_std = mean_std(group.best)
            writer.writerow([*key, DEFAULT_PROTOCOL, len(group.last), number(last_mean), number(last_std),
                             number(best_mean), number(best_std), pub.value, '' if pub.std is None else pub.std,
                             pub.source, pub.reporting, pub.rule, result.compared_with, number(result.diff_last),
                             number(result.diff_best), number(result.threshold), int(result.flagged)])


def plot(path: Path, runs: Runs, published: Published, dataset: str, pairs, labels: list[str],
         with_published: bool = True) -> None:
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
        pub = [paper_number(published, 'top1', dataset, t, s, label) if with_published else None for label in labels]
        pub = [float('nan') if v is None else v for v in pub]
        if with_published:
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


# ----------------------------------------------------------------------------------------- recipe effect
@dataclass(frozen=True)
class Versus:
    """One cell under protocols A and B."""
    key: tuple[str, str, str, str]
    a: Group
    b: Group

    def diff(self, metric: str) -> float:
        return mean_std(getattr(self.b, metric))[0] - mean_std(getattr(self.a, metric))[0]

    def noise(self, metric: str) -> float:
        """2 sqrt(s_A^2 / n_A + s_B^2 / n_B); 1 point when either side has fewer than 3 runs."""
        a, b = getattr(self.a, metric), getattr(self.b, metric)
        if min(len(a), len(b)) < FLAG_MIN_RUNS:
            return FLAG_POINTS
        return FLAG_STDS * math.sqrt(mean_std(a)[1] ** 2 / len(a) + mean_std(b)[1] ** 2 / len(b))

    def beyond(self, metric: str) -> bool:
        return abs(self.diff(metric)) > self.noise(metric)


def versus_cells(a: Runs, b: Runs, dataset: str, pairs, labels: list[str]) -> list[Versus]:
    """The cells (teacher -> student, method) with runs under both protocols ('student': the student from scratch,
    once per student model)."""
    out, students_seen = [], set()
    for t, s in pairs:
        for label in ['student', *labels]:
            ga, gb = a.row(dataset, t, s, label), b.row(dataset, t, s, label)
            if not ga or not gb or not ga.last or not gb.last:
                continue
            if label == 'student':
                if s in students_seen:
                    continue
                students_seen.add(s)
            out.append(Versus((dataset, t if label != 'student' else '', s, label), ga, gb))
    return out


def versus_table(cells: list[Versus], name_a: str, name_b: str) -> str:
    header = ['teacher -> student', 'method', f'{name_a} last', f'{name_b} last', f'{name_b} - {name_a}', 'noise',
              'beyond noise', f'{name_b} - {name_a} (best epoch)']
    rows = []
    for c in cells:
        _, t, s, label = c.key
        rows.append([f'{t} -> {s}' if t else s, label, mean_text(c.a.last), mean_text(c.b.last),
                     f'{c.diff("last"):+.2f}', f'{c.noise("last"):.2f}', 'yes' if c.beyond('last') else 'no',
                     f'{c.diff("best"):+.2f}' + (' *' if c.beyond('best') else '')])
    return markdown(header, rows)


def method_effect(runs: Runs, dataset: str, t: str, s: str, label: str) -> float | None:
    """The method's last-epoch mean minus the student from scratch's under one protocol (None without both)."""
    group, scratch = runs.row(dataset, t, s, label), runs.row(dataset, t, s, 'student')
    if not group or not scratch or not group.last or not scratch.last:
        return None
    return mean_std(group.last)[0] - mean_std(scratch.last)[0]


def recipe_effect_table(cells: list[Versus], a: Runs, b: Runs, name_a: str, name_b: str, labels: list[str]) -> str:
    """Per method: the mean over pairs of B - A (last and best epoch), how many pairs, how many beyond the noise, and
    the method's own effect (method - student from scratch) under A and under B over the same pairs."""
    header = ['method', 'pairs', f'recipe effect {name_b} - {name_a} (last)', '(best)', 'beyond noise',
              f'method - student, {name_a}', f'method - student, {name_b}']
    rows = []
    for label in ['student', *labels]:
        mine = [c for c in cells if c.key[3] == label]
        if not mine:
            continue
        effects: dict[str, list[float]] = {name_a: [], name_b: []}
        if label != 'student':
            for c in mine:
                for name, runs in ((name_a, a), (name_b, b)):
                    value = method_effect(runs, *c.key)
                    if value is not None:
                        effects[name].append(value)

        def average(values: list[float]) -> str:
            return f'{statistics.fmean(values):+.2f} ({len(values)})' if values else '-'

        rows.append([label, str(len(mine)), f'{statistics.fmean(c.diff("last") for c in mine):+.2f}',
                     f'{statistics.fmean(c.diff("best") for c in mine):+.2f}',
                     f'{sum(c.beyond("last") for c in mine)}/{len(mine)}', average(effects[name_a]),
                     average(effects[name_b])])
    return markdown(header, rows)


def write_versus_csv(path: Path, cells: list[Versus], name_a: str, name_b: str) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(VERSUS_CSV_HEADER)
        for c in cells:
            numbers = []
            for metric in ('last', 'best'):
                (ma, sa), (mb, sb) = mean_std(getattr(c.a, metric)), mean_std(getattr(c.b, metric))
                numbers.append([f'{ma:.4f}', f'{sa:.4f}', f'{mb:.4f}', f'{sb:.4f}'])
            writer.writerow([*c.key, name_a, name_b, len(c.a.last), len(c.b.last), *numbers[0], *numbers[1],
                             f'{c.diff("last"):.4f}', f'{c.noise("last"):.4f}', int(c.beyond('last')),
                             f'{c.diff("best"):.4f}', f'{c.noise("best"):.4f}', int(c.beyond('best'))])


# ------------------------------------------------------------------------------------------------------ main
def layout(runs_of_dataset: list[tuple[str, str, str, str]], dataset: str, all_methods: bool
           ) -> tuple[list[tuple[str, str]], list[str], int]:
    """The columns, rows and expected trials of a dataset's tables: the paper's table, then the pairs and methods
    that have runs beyond it (the extended sweep's), in the settings' order."""
    pairs, labels, trials = LAYOUT.get(dataset, (sorted({(k[1], k[2]) for k in runs_of_dataset}), list(METHODS), 1))
    with_runs = {(k[1], k[2]) for k in runs_of_dataset}
    more = [p for p in MORE_PAIRS.get(dataset, []) if p not in pairs and p in with_runs]
    more += sorted(p for p in with_runs if p not in pairs and p not in more)
    pairs = [p for p in pairs if p in with_runs] + more or pairs
    run_labels = {k[3] for k in runs_of_dataset}
    extra = [m for m in METHODS if m not in labels and (all_methods or m in run_labels)]
    extra += sorted(m for m in run_labels if m not in labels and m not in extra)
    return pairs, labels + extra, trials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('save_dir', type=Path)
    parser.add_argument('--out', type=Path, default=None, help='folder for comparison.csv and PNGs (default SAVE_DIR)')
    parser.add_argument('--trials', type=int, default=None,
                        help='expected trials per cell (default 5 / 3 / 1 on CIFAR-100 / Tiny-ImageNet / ImageNet)')
    parser.add_argument('--all_methods', action='store_true', help="also rows for methods without runs outside the "
                        "paper's table")
    parser.add_argument('--protocol', nargs='+', default=None, metavar='NAME',
                        help='only the runs of these protocols (default: every protocol with runs)')
    parser.add_argument('--versus', nargs=2, default=None, metavar=('A', 'B'),
                        help='the two protocols of the recipe-effect tables (default: repdistiller letkd, when both '
                             'have runs)')
    args = parser.parse_args(argv)
    if not args.save_dir.is_dir():
        print(f'error: {args.save_dir} is not a folder', file=sys.stderr)
        return 2
    out = args.out or args.save_dir
    out.mkdir(parents=True, exist_ok=True)
    by_protocol = collect(args.save_dir)
    if args.protocol:
        by_protocol = {p: r for p, r in by_protocol.items() if p in args.protocol}
    published = {column: load_published(column=column) for column in ('top1', 'top5')}
    every = load_all_published()
    missing: list[str] = []
    pngs: list[Path] = []
    published_long: list = []
    for protocol in protocol_order(by_protocol):
        runs = by_protocol[protocol]
        here = protocol == DEFAULT_PROTOCOL
        title = '' if here else f'[protocol {protocol}] '
        datasets = sorted({k[0] for k in runs.students} | {k[0] for k in runs.vanilla})
        for dataset in datasets:
            pairs, labels, trials = layout([k for k in runs.students if k[0] == dataset], dataset, args.all_methods)
            if not pairs:        # a data set without a table of the paper and without student runs (teachers only)
                continue
            top5 = dataset in TOP5_DATASETS
            for epoch in ('last', 'best'):
                metrics = (epoch, epoch + '5') if top5 else (epoch,)
                what = '(mean +- std (n) / published / ours - published)' if here else '(mean +- std (n))'
                print(f'## {title}{dataset}: {epoch}-epoch top-1{" and top-5" if top5 else ""} {what}\n')
                print(accuracy_table(runs, published, dataset, pairs, labels, metrics, with_published=here) + '\n')
            print(f'## {title}{dataset}: deployed student size\n')
            print(cost_table(runs, dataset, pairs, labels) + '\n')
            if here:
                rows = published_rows(runs, every, dataset, pairs, labels)
                published_long += rows
                if rows:
                    flagged = sum(r[3].flagged for r in rows)
                    print(f'## {dataset}: all published numbers (ours next to every source; flagged: ours more than '
                          f'{FLAG_STDS:g} std from the number by its epoch rule, or {FLAG_POINTS:g} point with fewer '
                          f'than {FLAG_MIN_RUNS} runs): {flagged} of {len(rows)} flagged\n')
                    print(published_table(rows) + '\n')
            png = out / (f'comparison_{dataset}.png' if here else f'comparison_{dataset}_{protocol}.png')
            plot(png, runs, published, dataset, pairs, labels, with_published=here)
            pngs.append(png)
            missing += [(f'[protocol {protocol}] ' if not here else '') + m
                        for m in missing_runs(runs, dataset, pairs, labels, args.trials or trials, teachers_here=here)]
    write_csv(out / 'comparison.csv', by_protocol, published, every)
    write_published_csv(out / 'comparison_published.csv', published_long)
    written = [out / 'comparison.csv', out / 'comparison_published.csv']

    versus = tuple(args.versus) if args.versus else ('repdistiller', 'letkd')
    if all(p in by_protocol for p in versus):
        name_a, name_b = versus
        a, b = by_protocol[name_a], by_protocol[name_b]
        cells_all: list[Versus] = []
        datasets = sorted({k[0] for k in a.students} & {k[0] for k in b.students})
        for dataset in datasets:
            keys = [k for k in [*a.students, *b.students] if k[0] == dataset]
            pairs, labels, _ = layout(keys, dataset, False)
            cells = versus_cells(a, b, dataset, pairs, labels)
            if not cells:
                continue
            cells_all += cells
            print(f'## {dataset}: recipe effect, protocol {name_b} - {name_a} (last-epoch mean +- std (n); noise = '
                  f'{FLAG_STDS:g} sqrt(s_a^2/n_a + s_b^2/n_b), {FLAG_POINTS:g} point with fewer than {FLAG_MIN_RUNS} '
                  'runs on a side; best epoch: * beyond its noise)\n')
            print(versus_table(cells, name_a, name_b) + '\n')
            print(f'## {dataset}: recipe effect per method ({name_b} - {name_a}, mean over pairs) next to the method\'s '
                  'effect (method - student from scratch, mean over the same pairs)\n')
            print(recipe_effect_table(cells, a, b, name_a, name_b, labels) + '\n')
        write_versus_csv(out / 'protocol_comparison.csv', cells_all, name_a, name_b)
        written.append(out / 'protocol_comparison.csv')
    elif args.versus:
        print(f'no recipe effect: the runs have no protocol {" / ".join(p for p in versus if p not in by_protocol)}')

    print('wrote ' + ', '.join(str(p) for p in written + pngs))
    if missing:
        print(f'\nmissing runs ({len(missing)}):')
        print('\n'.join(f'- {m}' for m in missing))
    return 0


if __name__ == '__main__':
    sys.exit(main())
