"""scripts/compare_with_paper.py and its published numbers: the integrity of scripts/published_results.csv
against the letKD supplementary's Tables 1-3 (literal values, and every cell when the text is at hand), the
teacher row, a Tiny-ImageNet table with Table 3's protocol (best on val, reported on test), and ImageNet's
Table 2 with top-1 and top-5 (and the summary keys it reads, written by a real run)."""
import csv
import json
import re
import statistics
from collections import Counter
from pathlib import Path

import pytest

from scripts import compare_with_paper
from scripts.settings import IMAGENET_METHODS, TABLE1_METHODS, TABLE1_PAIRS, TABLE3_METHODS, TABLE3_PAIRS

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / 'scripts' / 'published_results.csv'
# the paper's text, beside the repository (../shared/paper/); the literal checks below do not need it
SUPPLEMENTARY = ROOT.parent / 'shared' / 'paper' / 'letkd_supplementary.md'


def published_rows():
    with open(PUBLISHED, newline='') as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------- published_results.csv
def test_published_keys_are_unique_and_every_value_is_a_percentage():
    rows = published_rows()
    keys = Counter((r['dataset'], r['teacher'], r['student'], r['method']) for r in rows)
    assert [k for k, n in keys.items() if n > 1] == []
    assert len(rows) == 240
    assert Counter(r['dataset'] for r in rows) == {'cifar100': 164, 'tinyimagenet': 60, 'imagenet': 16}
    for r in rows:
        assert 0 < float(r['top1']) < 100, r
        assert r['source'] == 'letKD supplementary'
    # compare_with_paper reads every row (none is dropped for an empty top1)
    assert len(compare_with_paper.load_published()) == 240


# Cells printed '-' in the supplementary's Table 1: FSP only runs on equal channels (5 pairs), DKD has no
# resnet110 -> resnet20 number, TDD and TDD+CRD only the 5 pairs of the TDD paper.
TABLE1_DASHES = {
    ('wrn_40_2', 'wrn_40_1', 'FSP'), ('wrn_40_2', 'ShuffleV1', 'FSP'), ('resnet32x4', 'ShuffleV1', 'FSP'),
    ('resnet32x4', 'ShuffleV2', 'FSP'), ('ResNet50', 'MobileNetV2', 'FSP'),
    ('resnet110', 'resnet20', 'DKD'),
    *((t, s, m) for m in ('TDD', 'TDD+CRD') for t, s in [('resnet110', 'resnet20'), ('resnet110', 'resnet32'),
                                                         ('resnet32x4', 'resnet8x4'), ('resnet32x4', 'ShuffleV1'),
                                                         ('resnet32x4', 'ShuffleV2')]),
}
# Table 3 has no CRD, CRD+KD, DKD nor SimKD row (our sweep runs them anyway), FitNet is '-' on two pairs, FSP
# has numbers only on the two equal-channel pairs.
TABLE3_ABSENT = {
    *((t, s, m) for m in ('CRD', 'CRD+KD', 'DKD', 'SimKD') for t, s in TABLE3_PAIRS),
    ('wrn_40_2', 'wrn_40_1', 'FitNet'), ('wrn_40_2', 'ShuffleV1', 'FitNet'),
    ('wrn_40_2', 'wrn_40_1', 'FSP'), ('wrn_40_2', 'ShuffleV1', 'FSP'), ('ResNet50', 'MobileNetV2', 'FSP'),
}


@pytest.mark.parametrize('dataset, pairs, methods, absent', [
    ('cifar100', TABLE1_PAIRS, TABLE1_METHODS, TABLE1_DASHES),
    ('tinyimagenet', TABLE3_PAIRS, TABLE3_METHODS, TABLE3_ABSENT),
])
def test_every_published_cell_of_the_table_is_there(dataset, pairs, methods, absent):
    keys = {(r['teacher'], r['student'], r['method']) for r in published_rows() if r['dataset'] == dataset}
    grid = {(t, s, m) for t, s in pairs for m in ['teacher', 'student', *methods]}
    assert absent <= grid
    missing = sorted(grid - absent - keys)
    assert missing == [], f'{dataset}: published cells missing from published_results.csv: {missing}'
    assert sorted(absent & keys) == [], f'{dataset}: rows for cells the paper leaves empty'
    assert sorted(keys - grid) == []      # every published row is a cell of the sweep


# A few numbers copied by hand from the supplementary's text (Tables 1, 2 and 3), with their rows and columns.
@pytest.mark.parametrize('key, top1, std, top5', [
    (('cifar100', 'resnet56', 'resnet20', 'letKD-2'), 73.27, 0.16, None),     # Table 1, RN56 RN20
    (('cifar100', 'ResNet50', 'MobileNetV2', 'student'), 64.60, None, None),  # Table 1 header, RN50 MN2V2
    (('cifar100', 'resnet32x4', 'resnet8x4', 'SimKD'), 78.08, None, None),    # Table 1, RN32x4 RN8x4
    (('cifar100', 'wrn_40_2', 'ShuffleV1', 'CRD+KD'), 76.27, None, None),     # Table 1, "CRD +KD", WRN-40-2 SNV1
    (('tinyimagenet', 'ResNet50', 'MobileNetV2', 'AT'), 50.91, None, None),   # Table 3, RN50 MNV2
    (('tinyimagenet', 'wrn_40_2', 'wrn_40_1', 'letKD-1'), 59.75, 0.50, None),  # Table 3, WRN-40-2 WRN-40-1
    (('imagenet', 'ResNet50', 'MobileNetV2', 'letKD-2'), 73.98, None, 92.00),  # Table 2, setting (b)
])
def test_published_values_match_the_supplementary_text(key, top1, std, top5):
    row = next(r for r in published_rows() if (r['dataset'], r['teacher'], r['student'], r['method']) == key)
    assert float(row['top1']) == top1
    assert (float(row['top1_std']) if row['top1_std'] else None) == std
    assert (float(row['top5']) if row['top5'] else None) == top5
    assert compare_with_paper.load_published()[key] == top1


ARCH = {'WRN-40-2': 'wrn_40_2', 'WRN-16-2': 'wrn_16_2', 'WRN-40-1': 'wrn_40_1', 'RN56': 'resnet56', 'RN20': 'resnet20',
        'RN110': 'resnet110', 'RN32': 'resnet32', 'RN32x4': 'resnet32x4', 'RN8x4': 'resnet8x4', 'SNV1': 'ShuffleV1',
        'SNV2': 'ShuffleV2', 'RN50': 'ResNet50', 'MN2V2': 'MobileNetV2', 'MNV2': 'MobileNetV2'}


def parse_supplementary_table(text, number):
    """{(teacher, student, method): (top1, std or None)} of Table ``number`` (1 or 3) of the supplementary, and
    its column pairs. Columns come from the architecture line, teacher/student rows from the 'Methods' line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f'Table {number}:'))
    arch = next(i for i in range(start, len(lines)) if '\t' in lines[i] and 'Archs' not in lines[i]
                and not lines[i].startswith('Methods'))
    pairs = []
    for cell in lines[arch].split('\t')[1:]:
        names = cell.split()
        pairs.append((ARCH[names[0]], ARCH[names[1]]))
    cells = {}
    i = arch + 1
    assert lines[i].startswith('Methods')
    for col, cell in enumerate(lines[i].split('\t')[1:]):
        teacher, student = cell.split()
        cells[(*pairs[col], 'teacher')] = (float(teacher), None)
        cells[(*pairs[col], 'student')] = (float(student), None)
    for line in lines[i + 1:]:
        if not line.strip() or line.startswith(('Table', '1.2')):
            break
        label, *values = line.split('\t')
        label = label.replace(' +', '+')
        assert len(values) == len(pairs), line
        for col, value in enumerate(values):
            if value.strip() == '-':
                continue
            match = re.fullmatch(r'(\d+\.\d+)(?: ±(\d+\.\d+))?', value.strip())
            assert match, value
            cells[(*pairs[col], label)] = (float(match[1]), float(match[2]) if match[2] else None)
    return cells, pairs


@pytest.mark.skipif(not SUPPLEMENTARY.is_file(), reason=f'{SUPPLEMENTARY} is not here')
@pytest.mark.parametrize('number, dataset, pairs', [(1, 'cifar100', TABLE1_PAIRS), (3, 'tinyimagenet', TABLE3_PAIRS)])
def test_published_csv_is_the_supplementarys_table_cell_by_cell(number, dataset, pairs):
    cells, columns = parse_supplementary_table(SUPPLEMENTARY.read_text(), number)
    assert columns == pairs                                  # settings.py's columns are the paper's, in order
    rows = {(r['teacher'], r['student'], r['method']): (float(r['top1']), float(r['top1_std']) if r['top1_std'] else None)
            for r in published_rows() if r['dataset'] == dataset}
    assert rows == cells
    assert len(cells) == {1: 164, 3: 60}[number]


# ------------------------------------------------------------------------- compare_with_paper.py
def write_summary(root, name, **fields):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / 'summary.json').write_text(json.dumps(fields))


COST = dict(params_deployed=278324, macs_deployed=40818944)


def test_teacher_row_comes_from_the_teachers_own_runs(tmp_path, capsys):
    save = tmp_path / 'save'
    # train_teacher.py's summaries (model_t null, distill 'ce'): two resnet56 teachers and one resnet20 from scratch
    for i, (last, best) in enumerate([(72.0, 72.6), (72.5, 73.0)]):
        write_summary(save, f'teacher{i}', dataset='cifar100', model_t=None, model_s='resnet56', distill='ce',
                      last_acc=last, best_acc=best, params_deployed=861620, macs_deployed=125485706)
    write_summary(save, 'scratch', dataset='cifar100', model_t=None, model_s='resnet20', distill='ce', last_acc=69.0,
                  best_acc=69.4, **COST)
    write_summary(save, 'kd', dataset='cifar100', model_t='resnet56', model_s='resnet20', distill='kd', alpha=0.9,
                  last_acc=70.0, best_acc=70.5, **COST)
    assert compare_with_paper.main([str(save), '--out', str(tmp_path / 'out')]) == 0
    out = capsys.readouterr().out
    tables = out.split('## ')
    last_table = next(t for t in tables if t.startswith('cifar100: last-epoch'))
    best_table = next(t for t in tables if t.startswith('cifar100: best-epoch'))
    mean, std = statistics.fmean([72.0, 72.5]), statistics.stdev([72.0, 72.5])
    # the only column with runs is resnet56 -> resnet20; the teacher's published number there is 72.34
    assert '| method | resnet56 -> resnet20 |' in last_table
    assert f'| teacher | {mean:.2f} +- {std:.2f} (2) / 72.34 / {mean - 72.34:+.2f} |' in last_table
    assert '| teacher | 72.25 +- 0.35 (2) / 72.34 / -0.09 |' in last_table
    assert '| teacher | 72.80 +- 0.28 (2) / 72.34 / +0.46 |' in best_table
    assert '| student | 69.00 +- 0.00 (1) / 69.06 / -0.06 |' in last_table
    # the reference rows are never the best of a column: the teacher is above KD, KD is the one in bold
    assert '| KD | **70.00 +- 0.00 (1) / 70.66 / -0.66** |' in last_table
    assert '**72.25' not in out
    # the teacher is not a deployed student: no row of the size table
    size = next(t for t in tables if t.startswith('cifar100: deployed')).split('\n\n')[1]
    assert '| student | 0.28 / 40.8 |' in size and 'teacher' not in size
    assert 'from scratch' not in out                  # both models of the column have their own runs
    with open(tmp_path / 'out' / 'comparison.csv') as f:
        rows = {(r['student'], r['method']): r for r in csv.DictReader(f)}
    assert rows[('resnet56', 'vanilla')]['n'] == '2'
    assert float(rows[('resnet56', 'vanilla')]['last_mean']) == pytest.approx(mean, abs=1e-4)

    # without the teacher's runs its row shows only the published number, and the runs are listed as missing
    for i in range(2):
        (save / f'teacher{i}' / 'summary.json').unlink()
    assert compare_with_paper.main([str(save), '--out', str(tmp_path / 'out')]) == 0
    out = capsys.readouterr().out
    assert '| teacher | - / 72.34 |' in out
    assert '- cifar100 resnet56 from scratch: 0 runs' in out and 'resnet20 from scratch' not in out


def tiny_runs(save):
    """Tiny-ImageNet runs made with --tiny_split letkd (summary.json has test_acc_at_best_val) and one without."""
    letkd = dict(dataset='tinyimagenet', model_t='wrn_40_2', model_s='wrn_16_2', **COST)
    # KD: best on test 60.0 (epoch 230) but the best on val was epoch 200, where test said 59.5
    write_summary(save, 'kd', distill='kd', alpha=0.9, last_acc=58.0, best_acc=60.0, best_val_acc=61.0,
                  best_val_epoch=200, test_acc_at_best_val=59.5, last_val_acc=60.0, **letkd)
    for i, (last, best, at_val) in enumerate([(61.0, 62.0, 61.8), (62.0, 63.0, 62.4), (63.0, 63.5, 62.7)]):
        write_summary(save, f'letkd2_{i}', distill='letkd2', alpha=0.0, last_acc=last, best_acc=best,
                      best_val_acc=at_val + 1, best_val_epoch=220, test_acc_at_best_val=at_val,
                      last_val_acc=last + 1, **letkd)
    # AT on the val50 split: no val part, so no test_acc_at_best_val; its best-epoch number stays best_acc
    write_summary(save, 'at', distill='attention', alpha=0.0, last_acc=57.0, best_acc=57.7,
                  **{**letkd, 'model_t': 'resnet56', 'model_s': 'resnet20'})
    write_summary(save, 'scratch', dataset='tinyimagenet', model_t=None, model_s='wrn_16_2', distill='ce',
                  last_acc=56.0, best_acc=57.0, best_val_acc=58.0, best_val_epoch=150, test_acc_at_best_val=56.6,
                  last_val_acc=57.0, **COST)


def test_tinyimagenet_table_has_table_3s_columns_rows_published_numbers_and_trials(tmp_path, capsys):
    save = tmp_path / 'save'
    tiny_runs(save)
    assert compare_with_paper.main([str(save), '--out', str(tmp_path / 'out')]) == 0
    out = capsys.readouterr().out
    assert '## cifar100' not in out
    tables = out.split('## ')
    last_table = next(t for t in tables if t.startswith('tinyimagenet: last-epoch'))
    lines = last_table.splitlines()
    # the columns of Table 3 that have runs, in its order; the rows: teacher, student, then TABLE3_METHODS
    assert '| method | wrn_40_2 -> wrn_16_2 | resnet56 -> resnet20 |' in lines
    labels = [line.split('|')[1].strip() for line in lines if line.startswith('| ') and not line.startswith('| method')]
    assert labels == ['teacher', 'student', *TABLE3_METHODS]
    mean, std = statistics.fmean([61.0, 62.0, 63.0]), statistics.stdev([61.0, 62.0, 63.0])
    assert f'| letKD-2 | **{mean:.2f} +- {std:.2f} (3) / 62.21 / {mean - 62.21:+.2f}** | - / 57.35 |' in lines
    assert '| KD | 58.00 +- 0.00 (1) / 59.16 / -1.16 | - / 53.04 |' in lines
    assert '| AT | - / 58.71 | **57.00 +- 0.00 (1) / 54.01 / +2.99** |' in lines
    assert '| teacher | - / 61.26 | - / 58.34 |' in lines
    assert '| student | 56.00 +- 0.00 (1) / 57.17 / -1.17 | - / 52.66 |' in lines
    assert '| CRD | - / - | - / - |' in lines                      # run by the sweep, not in the paper's Table 3
    # 3 trials per cell on Tiny-ImageNet
    assert '- tinyimagenet wrn_40_2 -> wrn_16_2 KD: 1/3 runs' in out
    assert '- tinyimagenet wrn_40_2 -> wrn_16_2 letKD-2' not in out
    assert '- tinyimagenet resnet56 -> resnet20 letKD-2: 0/3 runs' in out
    assert 'ResNet50 -> MobileNetV2' not in last_table                 # columns without runs are left out
    assert (tmp_path / 'out' / 'comparison_tinyimagenet.png').read_bytes()[:4] == b'\x89PNG'


def test_tinyimagenet_best_epoch_is_the_test_accuracy_at_the_best_val_epoch(tmp_path, capsys):
    """docs/models-and-data.md, 'Tiny-ImageNet: which split reproduces Table 3': for runs with --tiny_split letkd the best-epoch
    number is test_acc_at_best_val (selected on val, reported on test); runs without it keep best_acc."""
    save = tmp_path / 'save'
    tiny_runs(save)
    assert compare_with_paper.main([str(save), '--out', str(tmp_path / 'out')]) == 0
    out = capsys.readouterr().out
    best_table = next(t for t in out.split('## ') if t.startswith('tinyimagenet: best-epoch'))
    lines = best_table.splitlines()
    at_val = [61.8, 62.4, 62.7]
    mean, std = statistics.fmean(at_val), statistics.stdev(at_val)
    with open(tmp_path / 'out' / 'comparison.csv') as f:
        rows = {(r['student'], r['method']): r for r in csv.DictReader(f)}
    why = ("compare_with_paper.py must report test_acc_at_best_val (Table 3's protocol) as the best-epoch number of "
           "Tiny-ImageNet runs made with --tiny_split letkd, not best_acc (the best epoch chosen on test)")
    assert float(rows[('wrn_16_2', 'letKD-2')]['best_mean']) == pytest.approx(mean, abs=1e-4), why
    assert float(rows[('wrn_16_2', 'KD')]['best_mean']) == pytest.approx(59.5, abs=1e-4), why
    assert float(rows[('wrn_16_2', 'vanilla')]['best_mean']) == pytest.approx(56.6, abs=1e-4), why
    assert f'| letKD-2 | **{mean:.2f} +- {std:.2f} (3) / 62.21 / {mean - 62.21:+.2f}** | - / 57.35 |' in lines, why
    assert '| KD | 59.50 +- 0.00 (1) / 59.16 / +0.34 | - / 53.04 |' in lines, why
    assert '| student | 56.60 +- 0.00 (1) / 57.17 / -0.57 | - / 52.66 |' in lines, why
    # a run without a val part (--tiny_split val50) keeps its best_acc
    assert float(rows[('resnet20', 'AT')]['best_mean']) == pytest.approx(57.7, abs=1e-4)
    assert '| AT | - / 58.71 | **57.70 +- 0.00 (1) / 54.01 / +3.69** |' in lines
    # the last-epoch numbers are last_acc either way
    assert float(rows[('wrn_16_2', 'KD')]['last_mean']) == pytest.approx(58.0, abs=1e-4)


# ------------------------------------------------------------------------- ImageNet (Table 2): top-1 and top-5
def imagenet_runs(save):
    """Student runs of both Table-2 pairs (students carry the torchvision teacher's teacher_acc), one from an
    older summary without top-5 keys, a ResNet18 from scratch, and a CIFAR-100 run beside them."""
    a = dict(dataset='imagenet', model_t='ResNet34', model_s='ResNet18', distill='letkd2', alpha=0.0,
             teacher_acc=73.30, teacher_acc_top5=91.40)
    write_summary(save, 'a_letkd2_0', last_acc=72.0, last_acc_top5=90.8, best_acc=72.4, best_acc_top5=91.0, **a)
    write_summary(save, 'a_letkd2_1', last_acc=72.4, last_acc_top5=91.2, best_acc=72.6, best_acc_top5=91.4, **a)
    b = dict(dataset='imagenet', model_t='ResNet50', model_s='MobileNetV1', alpha=0.0)
    # settings.IMAGENET_METHODS' 'AT+KD' runs --distill attention
    write_summary(save, 'b_at', distill='attention', last_acc=69.0, last_acc_top5=89.0, best_acc=69.3,
                  best_acc_top5=89.5, teacher_acc=76.10, teacher_acc_top5=92.90, **b)
    write_summary(save, 'b_kd_old', distill='kd', last_acc=68.0, best_acc=68.2, teacher_acc=76.20,
                  **{**b, 'alpha': 0.5})       # written before the top-5 keys existed
    write_summary(save, 'r18', dataset='imagenet', model_t=None, model_s='ResNet18', distill='ce', last_acc=69.5,
                  last_acc_top5=89.0, best_acc=69.8, best_acc_top5=89.2)
    write_summary(save, 'cifar_kd', dataset='cifar100', model_t='resnet56', model_s='resnet20', distill='kd', alpha=0.9,
                  last_acc=70.0, last_acc_top5=91.0, best_acc=70.5, best_acc_top5=91.5, **COST)


def test_imagenet_tables_have_top1_and_top5_next_to_table_2(tmp_path, capsys):
    save = tmp_path / 'save'
    imagenet_runs(save)
    assert compare_with_paper.main([str(save), '--out', str(tmp_path / 'out')]) == 0
    out = capsys.readouterr().out
    tables = out.split('## ')
    last = next(t for t in tables if t.startswith('imagenet: last-epoch top-1 and top-5')).splitlines()
    best = next(t for t in tables if t.startswith('imagenet: best-epoch top-1 and top-5')).splitlines()
    # a top-1 and a top-5 column per pair; our MobileNetV1 student is the paper's "MobileNetV2" column
    b = 'ResNet50 -> MobileNetV1 (paper: "MobileNetV2")'
    assert f'| method | ResNet34 -> ResNet18 top-1 | ResNet34 -> ResNet18 top-5 | {b} top-1 | {b} top-5 |' in last
    labels = [line.split('|')[1].strip() for line in last if line.startswith('| ') and not line.startswith('| method')]
    assert labels == ['teacher', 'student', *IMAGENET_METHODS]
    # letKD-2 (a): published 72.38 / 91.15; last epoch 72.0, 72.4 (top-5 90.8, 91.2)
    assert ('| letKD-2 | **72.20 +- 0.28 (2) / 72.38 / -0.18** | **91.00 +- 0.28 (2) / 91.15 / -0.15** '
            '| - / 73.98 | - / 92.00 |') in last
    # the attention run is the AT+KD row, against the paper's MobileNetV2 numbers 69.56 / 89.33
    assert ('| AT+KD | - / 70.70 | - / 90.00 | **69.00 +- 0.00 (1) / 69.56 / -0.56** '
            '| **89.00 +- 0.00 (1) / 89.33 / -0.33** |') in last
    assert not any(line.startswith('| AT |') for line in last)
    # a summary without top-5 keys: its top-1 counts, its top-5 is missing
    assert '| KD | - / 70.66 | - / 89.88 | 68.00 +- 0.00 (1) / 68.58 / -0.58 | - / 88.98 |' in last
    # the teacher row is the students' teacher_acc (torchvision weights, no run of their own)
    assert ('| teacher | 73.30 +- 0.00 (2) / 73.31 / -0.01 | 91.40 +- 0.00 (2) / 91.42 / -0.02 '
            '| 76.15 +- 0.07 (2) / 76.13 / +0.02 | 92.90 +- 0.00 (1) / 92.86 / +0.04 |') in last
    assert ('| student | 69.50 +- 0.00 (1) / 69.75 / -0.25 | 89.00 +- 0.00 (1) / 89.07 / -0.07 '
            '| - / 68.87 | - / 88.76 |') in last
    # best epoch: best_acc and best_acc_top5 (the top-5 of the best top-1 epoch)
    assert ('| letKD-2 | **72.50 +- 0.14 (2) / 72.38 / +0.12** | **91.20 +- 0.28 (2) / 91.15 / +0.05** '
            '| - / 73.98 | - / 92.00 |') in best
    assert ('| AT+KD | - / 70.70 | - / 90.00 | **69.30 +- 0.00 (1) / 69.56 / -0.26** '
            '| **89.50 +- 0.00 (1) / 89.33 / +0.17** |') in best
    assert ('| student | 69.80 +- 0.00 (1) / 69.75 / +0.05 | 89.20 +- 0.00 (1) / 89.07 / +0.13 '
            '| - / 68.87 | - / 88.76 |') in best
    # CIFAR-100 keeps its top-1 tables
    assert '| method | resnet56 -> resnet20 |' in out and 'top-5' not in next(t for t in tables if t.startswith('cifar100'))
    # one trial per ImageNet cell; the teachers are not trained here, the students from scratch are
    assert '- imagenet ResNet34 -> ResNet18 AT+KD: 0/1 runs' in out
    assert '- imagenet ResNet50 -> MobileNetV1 letKD-2: 0/1 runs' in out
    assert 'imagenet ResNet34 -> ResNet18 letKD-2:' not in out and 'MobileNetV1 AT+KD:' not in out
    assert '- imagenet MobileNetV1 from scratch: 0 runs' in out
    assert 'imagenet ResNet18 from scratch' not in out and 'ResNet34 from scratch' not in out
    assert 'ResNet50 from scratch' not in out

    with open(tmp_path / 'out' / 'comparison.csv') as f:
        rows = {(r['dataset'], r['teacher'], r['student'], r['method']): r for r in csv.DictReader(f)}
    top5 = ['last_top5_mean', 'last_top5_std', 'best_top5_mean', 'best_top5_std', 'published_top5',
            'delta_last_top5', 'delta_best_top5']

    def numbers(key, columns):
        return [rows[key][c] and round(float(rows[key][c]), 4) for c in columns]

    assert numbers(('imagenet', 'ResNet34', 'ResNet18', 'letKD-2'), ['n', 'last_mean', 'published', *top5]) == \
        [2, 72.2, 72.38, 91.0, 0.2828, 91.2, 0.2828, 91.15, -0.15, 0.05]
    assert numbers(('imagenet', 'ResNet50', 'MobileNetV1', 'AT+KD'), ['last_mean', 'published', *top5]) == \
        [69.0, 69.56, 89.0, 0.0, 89.5, 0.0, 89.33, -0.33, 0.17]
    assert numbers(('imagenet', 'ResNet50', 'MobileNetV1', 'KD'), ['last_mean', 'published', *top5]) == \
        [68.0, 68.58, '', '', '', '', 88.98, '', '']
    assert numbers(('imagenet', 'ResNet34', '', 'teacher'), ['n', 'last_mean', 'published', *top5]) == \
        [2, 73.3, 73.31, 91.4, 0.0, 91.4, 0.0, 91.42, -0.02, -0.02]
    assert numbers(('imagenet', '', 'ResNet18', 'vanilla'), ['last_mean', *top5]) == \
        [69.5, 89.0, 0.0, 89.2, 0.0, '', '', '']
    # no top-5 in Table 1: CIFAR-100's top-5 columns stay empty
    assert numbers(('cifar100', 'resnet56', 'resnet20', 'KD'), ['last_mean', 'published', *top5]) == \
        [70.0, 70.66, '', '', '', '', '', '', '']


def test_a_run_writes_the_best_epochs_top5_and_the_teachers_top5(tmp_path, vanilla_teacher, monkeypatch):
    """summary.json's best_acc_top5 is the top-5 of the best top-1 epoch (here epoch 1 of 2, while epoch 2 has
    the higher top-5), and teacher_acc_top5 is the teacher's top-5 on the val split. Real training on one image
    per class (one batch per epoch); only the student's scores are scripted."""
    import torch

    import helper.run
    import train_student
    from dataset import get_dataloaders
    from helper.loops import validate
    from helper.util import load_checkpoint
    from models import create_model
    from tests.fixtures_data import write_cifar100

    data_dir = str(tmp_path / 'data')
    write_cifar100(data_dir, n_train_per_class=1, n_test_per_class=1)

    scripted = iter([(30.0, 60.0), (20.0, 70.0)])      # (top-1, top-5) the two epochs report

    def scripted_validate(*args, **kwargs):
        acc, acc_top5 = next(scripted)
        return {**validate(*args, **kwargs), 'acc': acc, 'acc_top5': acc_top5}

    monkeypatch.setattr(helper.run, 'validate', scripted_validate)
    teacher_path = vanilla_teacher('resnet8')
    assert train_student.cli(['--path_t', str(teacher_path), '--model_s', 'resnet8', '--distill', 'kd', '--epochs', '2',
                              '--data_folder', data_dir, '--save_dir', str(tmp_path), '--num_workers', '0',
                              '--batch_size', '100', '--device', 'cpu', '--print_freq', '1000']) == 0
    (path,) = tmp_path.rglob('summary.json')
    summary = json.loads(path.read_text())
    assert (summary['best_acc'], summary['best_epoch'], summary['best_acc_top5']) == (30.0, 1, 60.0)
    assert (summary['last_acc'], summary['last_acc_top5']) == (20.0, 70.0)

    teacher = create_model('resnet8', 100)
    teacher.load_state_dict(load_checkpoint(teacher_path)['model'])
    val_loader = get_dataloaders('cifar100', data_dir, batch_size=100, num_workers=0).val_loader
    expected = validate(teacher, val_loader, torch.device('cpu'))
    assert summary['teacher_acc'] == pytest.approx(expected['acc'])
    assert summary['teacher_acc_top5'] == pytest.approx(expected['acc_top5'])
    assert expected['acc_top5'] > expected['acc']           # a random teacher: the two are told apart


# ------------------------------------------------------------------------- every published number (issue 20)
def new_method_runs(save):
    """A few cells of the new methods (and two baselines), with their summary.json keys (logit_stand, trainer)."""
    r8 = dict(dataset='cifar100', model_t='resnet32x4', model_s='resnet8x4', **COST)
    for i, (last, best) in enumerate([(76.02, 76.22), (76.12, 76.32), (76.22, 76.42)]):
        # KD+LS: best 76.32 +- 0.10, 3 std below the LS README's 76.62 (a best-epoch source): flagged
        write_summary(save, f'kdls{i}', distill='kd', alpha=9.0, logit_stand=True, trainer='sgd', last_acc=last,
                      best_acc=best, **r8)
    for i, (last, best) in enumerate([(75.9, 76.2), (76.0, 76.3), (76.1, 76.4)]):
        # DKD: best 76.30 +- 0.10 next to mdistiller's best-epoch 76.32: within; the letKD paper (epoch not stated):
        # last is 0.32 off but best is within, so not flagged; the LS README's baseline row (not stated) the same
        write_summary(save, f'dkd{i}', distill='dkd', alpha=0.0, logit_stand=False, trainer='sgd', last_acc=last,
                      best_acc=best, **r8)
        # DIST: 76.20 +- 0.10 next to DIST's 76.31 +- 0.19 (epoch not stated): within
        write_summary(save, f'dist{i}', distill='dist', alpha=0.0, last_acc=last + 0.2, best_acc=best + 0.2, **r8)
    # KD+DOT on vgg13 -> vgg8, 2 runs (fewer than 3: the 1-point rule): best 73.70 next to mdistiller's 73.77
    for i, best in enumerate([73.5, 73.9]):
        write_summary(save, f'dot{i}', dataset='cifar100', model_t='vgg13', model_s='vgg8', distill='kd', alpha=0.9,
                      trainer='dot', last_acc=best - 0.3, best_acc=best, **COST)
    # KD resnet56 -> resnet20, one run: last 69.50, 1.16 below RepDistiller's last-epoch 70.66: flagged (> 1 point)
    write_summary(save, 'kd56', dataset='cifar100', model_t='resnet56', model_s='resnet20', distill='kd', alpha=0.9,
                  last_acc=69.5, best_acc=70.0, **COST)


def test_every_published_number_sits_next_to_ours_with_its_source_rule_and_flag(tmp_path, capsys):
    save = tmp_path / 'save'
    new_method_runs(save)
    assert compare_with_paper.main([str(save), '--out', str(tmp_path / 'out')]) == 0
    out = capsys.readouterr().out
    # the new methods are rows of the grid (labels as in published_elsewhere.csv), vgg13 -> vgg8 a column after
    # Table 1's; the letKD paper has no number for them
    last = next(t for t in out.split('## ') if t.startswith('cifar100: last-epoch'))
    assert '| method | resnet56 -> resnet20 | resnet32x4 -> resnet8x4 | vgg13 -> vgg8 |' in last
    assert '| KD+LS | - / - | 76.12 +- 0.10 (3) / - / - | - / - |' in last
    assert '| DIST | - / - | **76.20 +- 0.10 (3) / - / -** | - / - |' in last
    assert '| KD+DOT | - / - | - / - | **73.40 +- 0.28 (2) / - / -** |' in last
    long = next(t for t in out.split('## ') if t.startswith('cifar100: all published numbers'))
    assert long.splitlines()[0].endswith(': 3 of 11 flagged')
    rows = [line for line in long.splitlines() if line.startswith('| ') and not line.startswith('| teacher -> student')]
    assert len(rows) == 11
    expected = [
        '| resnet56 -> resnet20 | KD | 69.50 +- 0.00 (1) | 70.00 +- 0.00 (1) | 70.66 | letKD | epoch not stated, '
        'mean of 5 runs | last, best | last -1.16 / best -0.66 |  |',
        '| resnet56 -> resnet20 | KD | 69.50 +- 0.00 (1) | 70.00 +- 0.00 (1) | 70.66 | RepDistiller | last epoch, 1 run '
        '| last | last -1.16 | FLAG (> 1 pt, n < 3) |',
        # mdistiller's KD row reprints RepDistiller's last-epoch numbers; CTKD's README reports the best epoch
        '| resnet56 -> resnet20 | KD | 69.50 +- 0.00 (1) | 70.00 +- 0.00 (1) | 70.66 | mdistiller (DKD tables) | last '
        "epoch, RepDistiller's number reprinted | last | last -1.16 | FLAG (> 1 pt, n < 3) |",
        '| resnet56 -> resnet20 | KD | 69.50 +- 0.00 (1) | 70.00 +- 0.00 (1) | 70.66 | CTKD (CIFAR-100 table) | best '
        'epoch | best | best -0.66 |  |',
        '| resnet32x4 -> resnet8x4 | DKD | 76.00 +- 0.10 (3) | 76.30 +- 0.10 (3) | 76.32 | mdistiller (DKD tables) | '
        'best epoch, mean of 5 runs | best | best -0.02 |  |',
        '| resnet32x4 -> resnet8x4 | DKD | 76.00 +- 0.10 (3) | 76.30 +- 0.10 (3) | 76.32 | letKD | epoch not stated, '
        'mean of 5 runs | last, best | last -0.32 / best -0.02 |  |',
        '| resnet32x4 -> resnet8x4 | KD+LS | 76.12 +- 0.10 (3) | 76.32 +- 0.10 (3) | 76.62 | logit-standardization-KD | '
        'best epoch, mean of 4 runs | best | best -0.30 | FLAG (> 2 std) |',
        '| resnet32x4 -> resnet8x4 | DIST | 76.20 +- 0.10 (3) | 76.50 +- 0.10 (3) | 76.31 +- 0.19 | DIST_KD (CIFAR-100 '
        'table) | epoch not stated, mean +- std over runs | last, best | last -0.11 / best +0.19 |  |',
        '| vgg13 -> vgg8 | KD+DOT | 73.40 +- 0.28 (2) | 73.70 +- 0.28 (2) | 73.77 | mdistiller (DOT tables) | best epoch '
        '| best | best -0.07 |  |',
    ]
    for row in expected:
        assert row in rows, row
    # the DKD cell has a number from the letKD paper, mdistiller and the LS README: one row each
    assert sum('| DKD |' in row for row in rows) == 3
    # the 1-point rule applies below 3 runs: KD+DOT is 0.07 off with 2 runs
    assert not any('KD+DOT' in row and 'FLAG' in row for row in rows)

    with open(tmp_path / 'out' / 'comparison.csv') as f:
        table = {(r['teacher'], r['student'], r['method']): r for r in csv.DictReader(f)}
    kdls = table[('resnet32x4', 'resnet8x4', 'KD+LS')]
    assert kdls['protocol'] == 'published' and kdls['published'] == ''            # no letKD-paper number
    assert kdls['published_all'] == '76.62 (logit-standardization-KD, best epoch, mean of 4 runs)'
    assert kdls['flagged'] == '76.62 (logit-standardization-KD)'
    dkd = table[('resnet32x4', 'resnet8x4', 'DKD')]
    assert dkd['published_all'].split('; ')[0] == '76.32 (letKD, epoch not stated, mean of 5 runs)'
    assert '76.32 (mdistiller (DKD tables), best epoch, mean of 5 runs)' in dkd['published_all'] and dkd['flagged'] == ''
    assert table[('resnet56', 'resnet20', 'KD')]['flagged'] == '70.66 (RepDistiller); 70.66 (mdistiller (DKD tables))'
    with open(tmp_path / 'out' / 'comparison_published.csv') as f:
        long_rows = list(csv.DictReader(f))
    assert len(long_rows) == 11 and sum(r['flagged'] == '1' for r in long_rows) == 3
    flagged = next(r for r in long_rows if r['method'] == 'KD+LS')
    assert (flagged['epoch_rule'], flagged['compared_with'], flagged['diff_best'], flagged['threshold']) == \
        ('best', 'best', '-0.3000', '0.2000')
    assert flagged['source'] == 'logit-standardization-KD README.md @f6e5aa5'
    assert flagged['reporting'].startswith('best epoch (LS issue #23), mean of 4 runs')


@pytest.mark.parametrize('reporting, rule', [
    ('last epoch (RepDistiller issue #16); one run as stated in modern-baselines.md', 'last'),
    ('best epoch, mean of 5 runs (CIFAR-100) / 3 runs (ImageNet): mdistiller issues #30 and #42; the KD row reprints '
     'RepDistiller README values (last epoch)', 'last'),
    ('best epoch, mean of 5 runs (CIFAR-100) / 3 runs (ImageNet): mdistiller issues #30 and #42', 'best'),
    ('not stated in the README (DOT paper not readable here); mdistiller rule per modern-baselines.md', 'best'),
    ('best model on ImageNet (overhaul-distillation issue #9)', 'best'),
    ('mean +- std over runs (README; number of runs not stated)', 'unstated'),
    ('baseline row as printed in the LS README (where it comes from is not stated there)', 'unstated'),
])
def test_the_epoch_rule_is_read_from_the_reporting_text(reporting, rule):
    assert compare_with_paper.epoch_rule(reporting) == rule


def test_every_row_of_both_csvs_gets_a_rule_and_the_runs_it_averages():
    every = compare_with_paper.load_all_published()
    numbers = [n for ns in every.values() for n in ns]
    assert len(numbers) == 240 + 389
    rules = {n.rule for n in numbers}
    assert rules == {'last', 'best', 'unstated'}
    mdistiller = next(n for n in every[('imagenet', 'ResNet34', 'ResNet18', 'DKD')] if n.source.startswith('mdistiller'))
    assert mdistiller.rule_text == 'best epoch, mean of 3 runs'               # ImageNet: 3 runs, CIFAR-100: 5
    # the letKD paper's ImageNet "MobileNetV2" column is our MobileNetV1
    assert every[('imagenet', 'ResNet50', 'MobileNetV1', 'letKD-2')][0].value == 73.98


# ------------------------------------------------------------------------- recipe effect (issue 23)
def test_recipe_effect_between_two_protocols_with_the_noise_rule(tmp_path, capsys):
    save = tmp_path / 'save'
    cell = dict(dataset='cifar100', model_t='resnet32x4', model_s='resnet8x4', **COST)
    values = {  # protocol -> label -> last-epoch accuracies (best = last + 0.2)
        'repdistiller': {'kd': [73.0, 73.1, 73.2], 'dkd': [76.0, 76.2, 76.4], 'ce': [72.0, 72.1, 72.2]},
        'letkd': {'kd': [73.5, 73.6, 73.7], 'dkd': [76.1, 76.3, 76.5], 'ce': [72.4, 72.5, 72.6]},
    }
    for protocol, by in values.items():
        for distill, lasts in by.items():
            for i, last in enumerate(lasts):
                fields = {**cell, 'model_t': 'none'} if distill == 'ce' else cell
                write_summary(save, f'{protocol}_{distill}{i}', distill=distill, alpha=0.9 if distill == 'kd' else 0.0,
                              last_acc=last, best_acc=last + 0.2, protocol=protocol, **fields)
    write_summary(save, 'published_kd', distill='kd', alpha=0.9, last_acc=73.3, best_acc=73.5, **cell)
    assert compare_with_paper.main([str(save), '--out', str(tmp_path / 'out')]) == 0
    out = capsys.readouterr().out
    # the published numbers sit beside the published protocol only
    grid = next(t for t in out.split('## ') if t.startswith('[protocol letkd] cifar100: last-epoch'))
    assert '| KD | 73.60 +- 0.10 (3) |' in grid and '73.33' not in grid
    assert '| KD | **73.30 +- 0.00 (1) / 73.33 / -0.03** |' in out
    pairs = next(t for t in out.split('## ') if t.startswith('cifar100: recipe effect, protocol letkd - repdistiller'))
    # KD: +0.50 against 2 sqrt(0.1^2/3 + 0.1^2/3) = 0.16; DKD: +0.10 against 0.33
    assert '| resnet32x4 -> resnet8x4 | KD | 73.10 +- 0.10 (3) | 73.60 +- 0.10 (3) | +0.50 | 0.16 | yes | +0.50 * |' \
        in pairs
    assert '| resnet32x4 -> resnet8x4 | DKD | 76.20 +- 0.20 (3) | 76.30 +- 0.20 (3) | +0.10 | 0.33 | no | +0.10 |' \
        in pairs
    assert '| resnet8x4 | student | 72.10 +- 0.10 (3) | 72.50 +- 0.10 (3) | +0.40 | 0.16 | yes | +0.40 * |' in pairs
    effect = next(t for t in out.split('## ') if t.startswith('cifar100: recipe effect per method'))
    # per method: the recipe's effect next to the method's own (method - student from scratch, each protocol)
    assert '| student | 1 | +0.40 | +0.40 | 1/1 | - | - |' in effect
    assert '| KD | 1 | +0.50 | +0.50 | 1/1 | +1.00 (1) | +1.10 (1) |' in effect
    assert '| DKD | 1 | +0.10 | +0.10 | 0/1 | +4.10 (1) | +3.80 (1) |' in effect
    with open(tmp_path / 'out' / 'protocol_comparison.csv') as f:
        rows = {r['method']: r for r in csv.DictReader(f)}
    assert (rows['KD']['diff_last'], rows['KD']['noise_last'], rows['KD']['beyond_noise_last']) == \
        ('0.5000', '0.1633', '1')
    assert rows['DKD']['beyond_noise_last'] == '0' and rows['student']['teacher'] == ''
    # --protocol keeps only some protocols' runs; --versus names the pair of the recipe tables
    assert compare_with_paper.main([str(save), '--out', str(tmp_path / 'out2'), '--protocol', 'letkd']) == 0
    only = capsys.readouterr().out
    assert '[protocol letkd]' in only and '[protocol repdistiller]' not in only and 'recipe effect' not in only
    assert compare_with_paper.main([str(save), '--out', str(tmp_path / 'out3'), '--versus', 'published', 'letkd']) == 0
    assert '## cifar100: recipe effect, protocol letkd - published' in capsys.readouterr().out
