"""scripts/published_elsewhere.csv: the numbers other repositories publish on RepDistiller's CIFAR-100 pairs (and
on the ImageNet pairs), one row per (cell, source). The file parses, every value is a percentage, every pair is
one of the project's pairs, no (cell, source) repeats, and a sample of cells, copied by hand from each source,
is there with the same value."""
import csv
from collections import Counter
from pathlib import Path

import pytest

from scripts.settings import METHODS

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / 'scripts' / 'published_elsewhere.csv'
HEADER = ['dataset', 'teacher', 'student', 'method', 'top1', 'top1_std', 'top5', 'source', 'reporting']

# RepDistiller's 13 CIFAR-100 pairs, the 4 extra pairs of the logit-standardization README, the 2 ImageNet pairs
REPDISTILLER_PAIRS = {
    ('wrn_40_2', 'wrn_16_2'), ('wrn_40_2', 'wrn_40_1'), ('resnet56', 'resnet20'), ('resnet110', 'resnet20'),
    ('resnet110', 'resnet32'), ('resnet32x4', 'resnet8x4'), ('vgg13', 'vgg8'), ('vgg13', 'MobileNetV2'),
    ('ResNet50', 'MobileNetV2'), ('ResNet50', 'vgg8'), ('resnet32x4', 'ShuffleV1'), ('resnet32x4', 'ShuffleV2'),
    ('wrn_40_2', 'ShuffleV1'),
}
LS_EXTRA_PAIRS = {('resnet32x4', 'wrn_16_2'), ('resnet32x4', 'wrn_40_2'), ('wrn_40_2', 'resnet8x4'),
                  ('wrn_40_2', 'MobileNetV2')}
PAIRS = {'cifar100': REPDISTILLER_PAIRS | LS_EXTRA_PAIRS,
         'imagenet': {('ResNet34', 'ResNet18'), ('ResNet50', 'MobileNetV1')}}
# the labels of this file: the project's labels where it has the method, the new methods' names otherwise
NEW_LABELS = {'teacher', 'student', 'ReviewKD', 'OFD', 'KD+DOT', 'DIST', 'CTKD', 'MLKD', 'KD+LS', 'DKD+LS',
              'MLKD+LS', 'CTKD+LS', 'DKD+CTKD'}
SOURCES = {  # source prefix -> number of rows
    'RepDistiller README.md @b84f547': 188,
    'mdistiller README.md @a08d46f (DOT tables)': 10,
    'mdistiller README.md @a08d46f (DKD tables)': 26,
    'logit-standardization-KD README.md @f6e5aa5': 112,
    'DIST_KD README.md @2418f18 (CIFAR-100 table)': 18,
    'DIST_KD README.md @2418f18 (ImageNet baseline table)': 6,
    'DIST_KD README.md @2418f18 (ImageNet stronger-teachers table)': 4,
    'CTKD README.md @7d52522 (CIFAR-100 table)': 12,
    'CTKD README.md @7d52522 (ImageNet table)': 6,
    'ReviewKD ImageNet/README.md @cede6ea': 4,
    'overhaul-distillation README.md @76344a8': 3,
}


def rows():
    with open(CSV, newline='') as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == HEADER
        return list(reader)


def test_every_row_is_a_percentage_on_a_known_pair_with_a_known_label():
    table = rows()
    assert len(table) == sum(SOURCES.values())
    assert Counter(r['source'] for r in table) == SOURCES
    for r in table:
        assert r['dataset'] in PAIRS, r
        assert (r['teacher'], r['student']) in PAIRS[r['dataset']], r
        assert r['method'] in set(METHODS) | NEW_LABELS, r
        assert 0 < float(r['top1']) < 100, r
        if r['top1_std']:
            assert 0 < float(r['top1_std']) < 5, r
        if r['top5']:
            assert float(r['top1']) < float(r['top5']) < 100, r
        assert r['reporting'].strip(), r


def test_no_cell_repeats_within_a_source():
    keys = Counter((r['dataset'], r['teacher'], r['student'], r['method'], r['source']) for r in rows())
    assert [k for k, n in keys.items() if n > 1] == []


def test_repdistiller_has_every_cell_of_its_readme():
    """13 pairs x (teacher, student, 13 methods), less FSP on the 6 cross-architecture pairs (no row) and on
    wrn_40_2 -> wrn_40_1 ('N/A'). The README has no CRD+KD row."""
    cells = {(r['teacher'], r['student'], r['method']) for r in rows() if r['source'].startswith('RepDistiller')}
    methods = ['teacher', 'student', 'KD', 'FitNet', 'AT', 'SP', 'CC', 'VID', 'RKD', 'PKT', 'AB', 'FT', 'FSP', 'NST',
               'CRD']
    same = {('wrn_40_2', 'wrn_16_2'), ('wrn_40_2', 'wrn_40_1'), ('resnet56', 'resnet20'), ('resnet110', 'resnet20'),
            ('resnet110', 'resnet32'), ('resnet32x4', 'resnet8x4'), ('vgg13', 'vgg8')}
    expected = {(t, s, m) for t, s in REPDISTILLER_PAIRS for m in methods
                if m != 'FSP' or ((t, s) in same and (t, s) != ('wrn_40_2', 'wrn_40_1'))}
    assert cells == expected


def test_logit_standardization_table_is_complete():
    cells = {(r['teacher'], r['student'], r['method']) for r in rows() if r['source'].startswith('logit')}
    ls_pairs = {('resnet32x4', 'resnet8x4'), ('vgg13', 'vgg8'), ('wrn_40_2', 'wrn_40_1'), ('wrn_40_2', 'wrn_16_2'),
                ('resnet56', 'resnet20'), ('resnet110', 'resnet32'), ('resnet110', 'resnet20'),
                ('resnet32x4', 'ShuffleV2'), ('vgg13', 'MobileNetV2'), ('ResNet50', 'MobileNetV2')} | LS_EXTRA_PAIRS
    methods = ['KD', 'KD+LS', 'CTKD', 'CTKD+LS', 'DKD', 'DKD+LS', 'MLKD', 'MLKD+LS']
    assert cells == {(t, s, m) for t, s in ls_pairs for m in methods}


R = 'RepDistiller README.md @b84f547'
MD_DKD = 'mdistiller README.md @a08d46f (DKD tables)'
MD_DOT = 'mdistiller README.md @a08d46f (DOT tables)'
LS = 'logit-standardization-KD README.md @f6e5aa5'
DIST_C = 'DIST_KD README.md @2418f18 (CIFAR-100 table)'
DIST_I = 'DIST_KD README.md @2418f18 (ImageNet baseline table)'
DIST_S = 'DIST_KD README.md @2418f18 (ImageNet stronger-teachers table)'
CT_C = 'CTKD README.md @7d52522 (CIFAR-100 table)'
CT_I = 'CTKD README.md @7d52522 (ImageNet table)'
RV = 'ReviewKD ImageNet/README.md @cede6ea'
OFD = 'overhaul-distillation README.md @76344a8'


# Cells copied by hand from each source (HobbitLong/RepDistiller README.md @b84f547; megvii-research/mdistiller
# README.md @a08d46f; sunshangquan/logit-standardization-KD README.md @f6e5aa5; hunto/DIST_KD README.md @2418f18;
# zhengli97/CTKD README.md @7d52522; dvlab-research/ReviewKD ImageNet/README.md @cede6ea;
# clovaai/overhaul-distillation README.md @76344a8), with the row and column they sit in.
@pytest.mark.parametrize('dataset, teacher, student, method, source, top1, std, top5', [
    # RepDistiller, table 1 row "Teacher <br> Student", column resnet32x4/resnet8x4: "79.42 <br> 72.50"
    ('cifar100', 'resnet32x4', 'resnet8x4', 'teacher', R, 79.42, None, None),
    ('cifar100', 'resnet32x4', 'resnet8x4', 'student', R, 72.50, None, None),
    # RepDistiller, table 1 row CRD, column resnet110/resnet20
    ('cifar100', 'resnet110', 'resnet20', 'CRD', R, 71.46, None, None),
    # RepDistiller, table 2 row AT, column vgg13/MobileNetV2
    ('cifar100', 'vgg13', 'MobileNetV2', 'AT', R, 59.40, None, None),
    # RepDistiller, table 2 row NST, column ResNet50/vgg8
    ('cifar100', 'ResNet50', 'vgg8', 'NST', R, 71.28, None, None),
    # mdistiller, DKD CIFAR-100 table 2 row DKD, column WRN-40-2/ShuffleNet-V1
    ('cifar100', 'wrn_40_2', 'ShuffleV1', 'DKD', MD_DKD, 76.70, None, None),
    # mdistiller, DKD CIFAR-100 table 1 row DKD, column WRN-40-2/WRN-16-2 (the LS README prints 76.24)
    ('cifar100', 'wrn_40_2', 'wrn_16_2', 'DKD', MD_DKD, 76.23, None, None),
    # mdistiller, DKD CIFAR-100 table 2, last column (header "ResNet32x4 MobileNet-V2", read as ShuffleV2)
    ('cifar100', 'resnet32x4', 'ShuffleV2', 'DKD', MD_DKD, 77.07, None, None),
    # mdistiller, DKD ImageNet table row DKD, column ResNet50/MobileNet-V1
    ('imagenet', 'ResNet50', 'MobileNetV1', 'DKD', MD_DKD, 72.05, None, None),
    # mdistiller, DOT CIFAR-100 table row KD+DOT, column VGG13/VGG8; DOT ImageNet row KD, ResNet34/ResNet18
    ('cifar100', 'vgg13', 'vgg8', 'KD+DOT', MD_DOT, 73.77, None, None),
    ('imagenet', 'ResNet34', 'ResNet18', 'KD', MD_DOT, 71.03, None, None),
    # LS README, table 1 row "MLKD+Ours", column ResNet110/ResNet20
    ('cifar100', 'resnet110', 'resnet20', 'MLKD+LS', LS, 72.27, None, None),
    # LS README, table 2 row "KD+Ours", column Wrn_40_2/ResNet8x4
    ('cifar100', 'wrn_40_2', 'resnet8x4', 'KD+LS', LS, 77.11, None, None),
    # LS README, table 2 row CTKD, column ResNet50/MN-V2
    ('cifar100', 'ResNet50', 'MobileNetV2', 'CTKD', LS, 68.67, None, None),
    # LS README, table 1 row "DKD+Ours", column VGG13/VGG8
    ('cifar100', 'vgg13', 'vgg8', 'DKD+LS', LS, 74.81, None, None),
    # DIST_KD README, CIFAR-100 table row ShuffleNetV2 / ResNet-32x4: "77.35±0.25", student "(71.82)"
    ('cifar100', 'resnet32x4', 'ShuffleV2', 'DIST', DIST_C, 77.35, 0.25, None),
    ('cifar100', 'resnet32x4', 'ShuffleV2', 'student', DIST_C, 71.82, None, None),
    # DIST_KD README, CIFAR-100 table row MobileNetV2 / ResNet-50: "68.66±0.23"
    ('cifar100', 'ResNet50', 'MobileNetV2', 'DIST', DIST_C, 68.66, 0.23, None),
    # DIST_KD README, ImageNet baseline table row MobileNet V1 (70.13) / ResNet-50 (76.16): DIST 73.24
    ('imagenet', 'ResNet50', 'MobileNetV1', 'DIST', DIST_I, 73.24, None, None),
    ('imagenet', 'ResNet50', 'MobileNetV1', 'teacher', DIST_I, 76.16, None, None),
    # DIST_KD README, stronger-teachers table row ResNet-18 / ResNet-34: "KD (T=4)" 71.21
    ('imagenet', 'ResNet34', 'ResNet18', 'KD', DIST_S, 71.21, None, None),
    # CTKD README, CIFAR-100 row KD, column RN-110/RN-20 (RepDistiller and LS print 70.67)
    ('cifar100', 'resnet110', 'resnet20', 'KD', CT_C, 70.66, None, None),
    # CTKD README, CIFAR-100 row +CTKD, column WRN-40-2/WRN-16-2
    ('cifar100', 'wrn_40_2', 'wrn_16_2', 'CTKD', CT_C, 75.45, None, None),
    # CTKD README, ImageNet table: Top-1 / Top-5 of "+CTKD" after KD, and of the teacher (RN-34)
    ('imagenet', 'ResNet34', 'ResNet18', 'CTKD', CT_I, 71.32, None, 90.27),
    ('imagenet', 'ResNet34', 'ResNet18', 'teacher', CT_I, 73.96, None, 91.58),
    # CTKD README, ImageNet table: the second "+CTKD" column, after DKD
    ('imagenet', 'ResNet34', 'ResNet18', 'DKD+CTKD', CT_I, 71.51, None, 90.47),
    # ReviewKD ImageNet/README.md: row MobileNet / ResNet50, Baseline 68.87, Ours 72.56
    ('imagenet', 'ResNet50', 'MobileNetV1', 'ReviewKD', RV, 72.56, None, None),
    ('imagenet', 'ResNet34', 'ResNet18', 'student', RV, 69.75, None, None),
    # overhaul-distillation README, ImageNet "MobileNet" table, row Proposed: top-1 error 28.75, top-5 error 9.66
    ('imagenet', 'ResNet50', 'MobileNetV1', 'OFD', OFD, 100 - 28.75, None, 100 - 9.66),
])
def test_cells_read_from_the_sources(dataset, teacher, student, method, source, top1, std, top5):
    [row] = [r for r in rows() if (r['dataset'], r['teacher'], r['student'], r['method'], r['source'])
             == (dataset, teacher, student, method, source)]
    assert float(row['top1']) == pytest.approx(top1, abs=1e-9)
    assert (float(row['top1_std']) if row['top1_std'] else None) == std
    assert (float(row['top5']) if row['top5'] else None) == (pytest.approx(top5, abs=1e-9) if top5 else None)


def test_sources_that_print_the_same_cell_keep_one_row_each():
    """KD on resnet32x4 -> resnet8x4 is printed by RepDistiller, both mdistiller tables and the LS README."""
    sources = {r['source'] for r in rows()
               if (r['dataset'], r['teacher'], r['student'], r['method']) == ('cifar100', 'resnet32x4', 'resnet8x4', 'KD')}
    assert sources == {R, MD_DKD, MD_DOT, LS}
