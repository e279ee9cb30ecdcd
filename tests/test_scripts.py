"""The table scripts: command generation (every --dry-run line parses), the launcher, compare_with_paper."""
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import train_student
import train_teacher
from distiller_zoo.registry import canonical_name
from scripts import compare_with_paper, launch
from tests.fixtures_data import write_cifar100

ROOT = Path(__file__).resolve().parents[1]


def run_script(script, *flags):
    env = {**os.environ, 'PYTHON': sys.executable}     # the interpreter running the tests, venv or not
    return subprocess.run(['bash', str(ROOT / 'scripts' / script), *flags], capture_output=True, text=True,
                          check=True, cwd=ROOT, env=env).stdout


def dry_run_lines(script, *flags):
    out = run_script(script, '--dry-run', *flags)
    return [line for line in out.splitlines() if line and not line.startswith('#')]


# Line counts of the sweeps at their default trials (5 on CIFAR-100, 3 on Tiny-ImageNet; vanilla: 1):
# - run_cifar_vanilla.sh: 6 teachers + 9 students from scratch, 1 trial = 15.
# - run_cifar_distill.sh: (16 Table-1 methods + 6 other RepDistiller criteria) x 10 pairs = 220 cells, minus the
#   pairs FSP and KDSVD cannot run (unequal channels: wrn_40_2->wrn_40_1, wrn_40_2->ShuffleV1,
#   resnet32x4->ShuffleV1, resnet32x4->ShuffleV2, ResNet50->MobileNetV2; 5 each) = 210 per trial, x 5 = 1,050.
# - run_tinyimagenet.sh: 3 teachers (1 trial) + 5 students from scratch x 3 + (14 Table-3 methods x 5 pairs + FSP on
#   its 2 equal-channel pairs) x 3 = 3 + 15 + 216 = 234 (the '# barrier' line is not a command).
# - run_cifar_extended.sh: (22 + 10 new methods) x 13 pairs = 416 cells, minus FSP and KDSVD on the 7 pairs with unequal
#   channels (the 5 above, vgg13->MobileNetV2, ResNet50->vgg8) = 402 per trial, x 5 = 2,010.
# Offline stages (helper/letkd_offline.py, one command per teacher and student map size, before the runs):
# - CIFAR-100: 10 pairs, minus resnet110->resnet32 (resnet110->resnet20's maps), wrn_40_2->wrn_40_1 (wrn_16_2's) and
#   resnet32x4->ShuffleV2 (ShuffleV1's) = 7; the extended sweep adds vgg13->vgg8, vgg13->MobileNetV2, ResNet50->vgg8
#   (each its own teacher or map size) = 10; Tiny-ImageNet: 5 pairs minus wrn_40_2->wrn_40_1 = 4; ImageNet: 2.
@pytest.mark.parametrize('script, flags, expected, offline, dataset', [
    ('run_cifar_vanilla.sh', [], 6 + 9, 0, 'cifar100'),
    ('run_cifar_distill.sh', [], (22 * 10 - 2 * 5) * 5, 7, 'cifar100'),
    ('run_cifar_extended.sh', [], (32 * 13 - 2 * 7) * 5, 10, 'cifar100'),
    ('run_tinyimagenet.sh', [], 3 + 5 * 3 + (14 * 5 + 2) * 3, 4, 'tinyimagenet'),
    # Table 2: 2 students from scratch + 6 methods x 2 pairs, 1 trial (teachers are torchvision's weights)
    ('run_imagenet.sh', [], 2 + 6 * 2, 2, 'imagenet'),
])
def test_every_dry_run_line_parses_with_the_cli_parsers(script, flags, expected, offline, dataset):
    from helper import letkd_offline
    lines = dry_run_lines(script, *flags)
    assert len(lines) == expected + offline, f'{script}: {len(lines)} command lines, expected {expected + offline}'
    counts = {'train_teacher.py': 0, 'train_student.py': 0, 'helper/letkd_offline.py': 0}
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == 'python'
        counts[argv[1]] += 1
        if argv[1] == 'helper/letkd_offline.py':
            assert letkd_offline.get_args_parser().parse_args(argv[2:]).dataset == dataset, line
            continue
        cli = train_student if argv[1] == 'train_student.py' else train_teacher
        opt = cli.get_args_parser().parse_args(argv[2:])      # argparse exits on an unknown flag
        assert opt.dataset == dataset, line
        if dataset == 'tinyimagenet':
            assert opt.tiny_split == 'letkd', line          # Table 3's protocol on every run, teachers included
        if cli is train_student:
            canonical_name(opt.distill)                        # raises on an unknown method
        cli.resolve_run_dir(opt)
    assert counts == {'run_cifar_vanilla.sh': {'train_teacher.py': 15, 'train_student.py': 0},
                      'run_cifar_distill.sh': {'train_teacher.py': 0, 'train_student.py': 1050},
                      'run_cifar_extended.sh': {'train_teacher.py': 0, 'train_student.py': 2010},
                      'run_tinyimagenet.sh': {'train_teacher.py': 18, 'train_student.py': 216},
                      'run_imagenet.sh': {'train_teacher.py': 2, 'train_student.py': 12}}[script] \
        | {'helper/letkd_offline.py': offline}


def test_imagenet_sweep_uses_each_methods_protocol_and_pair_settings():
    """letKD/QUEST on their authors' protocol (batch 256, lr 0.1, Nesterov), baselines on mdistiller's (batch 512,
    lr 0.2), torchvision teachers, MobileNetV1 as student (b), DKD's beta per pair, KD at T 1 with 0.5/0.5."""
    runs = {}
    for line in dry_run_lines('run_imagenet.sh'):
        argv = shlex.split(line)
        if argv[1] == 'helper/letkd_offline.py':
            continue
        if argv[1] != 'train_student.py':
            opt = train_teacher.get_args_parser().parse_args(argv[2:])
            assert (opt.batch_size, opt.learning_rate, opt.nesterov) == (512, 0.2, False), line
            continue
        opt = train_student.get_args_parser().parse_args(argv[2:])
        runs[(opt.path_t, opt.model_s, opt.distill)] = opt
    assert {(p, s) for p, s, _ in runs} == {('torchvision:ResNet34', 'ResNet18'), ('torchvision:ResNet50', 'MobileNetV1')}
    for (path_t, student, distill), opt in runs.items():
        quantized = distill in ('letkd1', 'letkd2', 'quest')
        expected = (256, 0.1, True) if quantized else (512, 0.2, False)
        assert (opt.batch_size, opt.learning_rate, opt.nesterov) == expected, (path_t, distill)
        assert (opt.epochs, opt.lr_decay_epochs, opt.weight_decay) == (100, '30,60,90', 1e-4)
    assert runs[('torchvision:ResNet34', 'ResNet18', 'dkd')].dkd_beta == 0.5
    assert runs[('torchvision:ResNet50', 'MobileNetV1', 'dkd')].dkd_beta == 2.0
    kd = runs[('torchvision:ResNet34', 'ResNet18', 'kd')]
    assert (kd.gamma, kd.alpha, kd.kd_T) == (0.5, 0.5, 1)
    letkd2 = runs[('torchvision:ResNet50', 'MobileNetV1', 'letkd2')]
    assert (letkd2.k_penult, letkd2.k_inter) == (4096, 8)


# Every per-dataset published value the sweeps rely on, as resolved by train_student.py (explicit flags and the
# methods' defaults together), with its source (docs/reference/*.md; docs/distributed.md).
IMAGENET_PUBLISHED = {
    # mdistiller configs/imagenet/r34_r18/kd.yaml (and r50_mv1): CE 0.5, KD 0.5, T 1
    'kd': {'gamma': 0.5, 'alpha': 0.5, 'beta': 0.0, 'kd_T': 1.0},
    # mdistiller imagenet at.yaml: CE 1, AT 1000 (p 2), no KD term
    'attention': {'gamma': 1.0, 'alpha': 0.0, 'beta': 1000.0},
    # mdistiller imagenet dkd.yaml: CE 1, alpha 1, T 1, WARMUP 1 (no ramp with 1-based epochs); beta per pair
    'dkd': {'gamma': 1.0, 'alpha': 0.0, 'dkd_alpha': 1.0, 'dkd_T': 1.0, 'dkd_warmup': 1},
    # QuEST Config_ImageNet: CE + 1.0 KL, K 4096, beta (tau) 5
    'quest': {'gamma': 1.0, 'alpha': 0.0, 'beta': 1.0, 'quest_tau': 5.0, 'k_penult': 4096},
    # letKD supplementary: K_penult 4096, K_inter 8, alpha (1, 1), LDA 60 components
    'letkd1': {'gamma': 1.0, 'alpha': 0.0, 'beta': 1.0, 'k_penult': 4096, 'alpha_penult': 1.0},
    'letkd2': {'gamma': 1.0, 'alpha': 0.0, 'beta': 1.0, 'k_penult': 4096, 'k_inter': 8, 'lda_dim': 60,
               'alpha_penult': 1.0, 'alpha_inter': 1.0},
}
# letKD supplementary / QuEST Config_ImageNet (100 epochs, lr 0.1 /10 at 30/60/90, batch 256, wd 1e-4, Nesterov);
# mdistiller configs/imagenet (batch 512 global, lr 0.2, wd 1e-4, momentum 0.9 without Nesterov)
QUANTIZED_PROTOCOL = {'epochs': 100, 'batch_size': 256, 'learning_rate': 0.1, 'lr_decay_epochs': [30, 60, 90],
                      'lr_decay_rate': 0.1, 'weight_decay': 1e-4, 'momentum': 0.9, 'nesterov': True, 'sync_bn': True}
BASELINE_PROTOCOL = {**QUANTIZED_PROTOCOL, 'batch_size': 512, 'learning_rate': 0.2, 'nesterov': False,
                     'sync_bn': False}


def test_imagenet_sweep_resolves_every_published_setting():
    """What each Table-2 run resolves to (flags and the methods' defaults), against the reference configs."""
    seen = set()
    for line in dry_run_lines('run_imagenet.sh'):
        argv = shlex.split(line)
        if argv[1] != 'train_student.py':
            continue
        opt = train_student.resolve_options(train_student.get_args_parser().parse_args(argv[2:]))
        seen.add(opt.distill)
        expected = {**IMAGENET_PUBLISHED[opt.distill],
                    **(QUANTIZED_PROTOCOL if opt.distill in ('quest', 'letkd1', 'letkd2') else BASELINE_PROTOCOL)}
        if opt.distill == 'dkd':
            expected['dkd_beta'] = {'ResNet18': 0.5, 'MobileNetV1': 2.0}[opt.model_s]
        assert {k: getattr(opt, k) for k in expected} == expected, line
    assert seen == set(IMAGENET_PUBLISHED)


def test_cifar_dkd_and_kd_settings_resolve_as_mdistiller_and_repdistiller():
    lines = [line for line in dry_run_lines('run_cifar_distill.sh', '--trials', '1') if ' --distill ' in line]
    for line in lines:
        opt = train_student.resolve_options(train_student.get_args_parser().parse_args(shlex.split(line)[2:]))
        if opt.distill == 'dkd':     # mdistiller configs/cifar100/dkd: CE 1, alpha 1, T 4, WARMUP 20
            assert (opt.gamma, opt.alpha, opt.dkd_alpha, opt.dkd_T, opt.dkd_warmup) == (1, 0, 1, 4, 20), line
        if opt.distill == 'kd':      # RepDistiller run_cifar_distill.sh: -r 0.1 -a 0.9, T 4
            assert (opt.gamma, opt.alpha, opt.beta, opt.kd_T) == (0.1, 0.9, 0, 4), line
        assert not opt.sync_bn


def stages_of(text: str) -> list[list[list[str]]]:
    stages: list[list[list[str]]] = [[]]
    for line in text.splitlines():
        if line.strip() == '# barrier':
            stages.append([])
        elif line.strip() and not line.startswith('#'):
            stages[-1].append(shlex.split(line))
    return stages


def test_imagenet_sweep_builds_the_quantizers_in_a_stage_of_their_own():
    """Stage 1: one helper/letkd_offline.py per teacher (letKD-1, letKD-2 and QUEST of a pair share the files:
    both layers, their settings); stage 2: the 14 runs."""
    from helper import letkd_offline
    offline, runs = stages_of(run_script('run_imagenet.sh', '--dry-run'))
    assert len(runs) == 14 and all(argv[1] != 'helper/letkd_offline.py' for argv in runs)
    built = {}
    for argv in offline:
        assert argv[1] == 'helper/letkd_offline.py'
        opt = letkd_offline.get_args_parser().parse_args(argv[2:])
        assert opt.path_t not in built                                     # one build per teacher
        built[opt.path_t] = opt
    for argv in runs:
        opt = train_student.get_args_parser().parse_args(argv[2:]) if argv[1] == 'train_student.py' else None
        if opt is None or opt.distill not in ('letkd1', 'letkd2', 'quest'):
            continue
        build = built[opt.path_t]
        assert (build.model_s, build.dataset, build.save_dir, build.data_folder) == \
            (opt.model_s, opt.dataset, opt.save_dir, opt.data_folder)
        assert (build.k_penult, build.k_inter, build.lda_dim, build.quantizer_seed, build.max_positions) == \
            (opt.k_penult, opt.k_inter, opt.lda_dim, opt.quantizer_seed, opt.max_positions)
        assert set(build.layers) == {'inter', 'penult'}
    assert set(built) == {'torchvision:ResNet34', 'torchvision:ResNet50'}


def test_distill_sweep_covers_every_method_and_pair_with_published_settings():
    lines = [line for line in dry_run_lines('run_cifar_distill.sh', '--trials', '2')
             if line.startswith('python train_student.py')]
    parsed = [train_student.get_args_parser().parse_args(shlex.split(line)[2:]) for line in lines]
    methods = {(o.distill, o.alpha) for o in parsed}
    assert ('crd', 0.0) in methods and ('crd', 1.0) in methods       # CRD and CRD+KD
    for name in ('kd', 'hint', 'attention', 'abound', 'fsp', 'similarity', 'vid', 'dkd', 'simkd', 'tdd', 'quest',
                 'letkd1', 'letkd2', 'correlation', 'rkd', 'pkt', 'factor', 'nst', 'kdsvd'):
        assert any(m == name for m, _ in methods), name
    by = {(o.distill, o.model_s, o.path_t.split('/')[-2], o.trial): o for o in parsed}
    kd = by[('kd', 'resnet20', 'resnet56_vanilla', '1')]
    assert (kd.gamma, kd.alpha, kd.beta) == (0.1, 0.9, 0.0)
    assert by[('dkd', 'resnet20', 'resnet56_vanilla', '2')].dkd_beta == 2.0
    assert by[('dkd', 'resnet8x4', 'resnet32x4_vanilla', '1')].dkd_beta == 8.0
    simkd = by[('simkd', 'resnet8x4', 'resnet32x4_vanilla', '1')]
    assert (simkd.gamma, simkd.alpha, simkd.beta) == (0.0, 0.0, 1.0)
    assert by[('letkd2', 'resnet20', 'resnet56_vanilla', '1')].nesterov
    # FSP needs equal channels: not on wrn_40_2 -> wrn_40_1 nor on the heterogeneous pairs
    fsp_students = {o.model_s for o in parsed if o.distill == 'fsp'}
    assert 'wrn_40_1' not in fsp_students and 'ShuffleV1' not in fsp_students and 'resnet20' in fsp_students
    assert all(o.learning_rate is None for o in parsed)           # 0.01 for Shuffle/MobileNet by default
    assert {o.trial for o in parsed} == {'1', '2'}


def test_fetch_teachers_dry_run_names_the_release():
    out = run_script('fetch_pretrained_teachers.sh', '--dry-run')
    assert 'cifar_teachers.tar' in out and 'curl' in out


def test_fetch_teachers_expects_every_teacher_of_the_13_pairs():
    """The fetch script checks that the archive gave every teacher the sweeps load (vgg13 and ResNet50 included: the
    extended sweep's vgg13 -> vgg8 / MobileNetV2 and ResNet50 -> vgg8 / MobileNetV2) and says so in its dry run."""
    from scripts.settings import CIFAR_TEACHERS, EXTENDED_PAIRS
    text = (ROOT / 'scripts' / 'fetch_pretrained_teachers.sh').read_text()
    listed = next(line for line in text.splitlines() if line.startswith('TEACHERS=')).split('=', 1)[1].strip('"').split()
    assert listed == CIFAR_TEACHERS
    assert {t for t, _ in EXTENDED_PAIRS} <= set(listed)
    out = run_script('fetch_pretrained_teachers.sh', '--dry-run')
    for teacher in listed:
        assert f'models/{teacher}_vanilla/ckpt_epoch_240.pth' in out, teacher


# ------------------------------------------------------------------ the extended sweep (issue 20)
NEW_PAIRS = [('vgg13', 'vgg8'), ('vgg13', 'MobileNetV2'), ('ResNet50', 'vgg8')]


def resolved(line):
    return train_student.resolve_options(train_student.get_args_parser().parse_args(shlex.split(line)[2:]))


@pytest.fixture(scope='module')
def extended_runs():
    """(label, teacher, student) -> resolved options of the extended sweep's trial-1 runs (published protocol)."""
    from scripts.settings import method_label
    runs = {}
    for line in dry_run_lines('run_cifar_extended.sh', '--trials', '1'):
        if not line.startswith('python train_student.py'):
            continue
        opt = resolved(line)
        label = method_label(opt.distill, opt.alpha, bool(getattr(opt, 'logit_stand', False)), opt.trainer)
        key = (label, opt.model_t, opt.model_s)
        assert key not in runs, line
        runs[key] = opt
    return runs


def test_extended_sweep_covers_every_method_on_the_13_pairs(extended_runs):
    from scripts.settings import EXTENDED_METHODS, EXTENDED_PAIRS
    assert len(EXTENDED_PAIRS) == 13 and len(EXTENDED_METHODS) == 32
    unequal = {('wrn_40_2', 'wrn_40_1'), ('wrn_40_2', 'ShuffleV1'), ('resnet32x4', 'ShuffleV1'),
               ('resnet32x4', 'ShuffleV2'), ('ResNet50', 'MobileNetV2'), ('vgg13', 'MobileNetV2'), ('ResNet50', 'vgg8')}
    expected = {(label, t, s) for label in EXTENDED_METHODS for t, s in EXTENDED_PAIRS
                if not (label in ('FSP', 'KDSVD') and (t, s) in unequal)}
    assert set(extended_runs) == expected
    assert ('FSP', 'vgg13', 'vgg8') in extended_runs          # vgg13 and vgg8 have the same stage channels


def test_extended_sweep_lists_the_cells_it_leaves_out_with_the_reason():
    out = run_script('run_cifar_extended.sh', '--dry-run', '--trials', '1')
    left = [line for line in out.splitlines() if line.startswith('# left out: ')]
    assert len(left) == 14
    assert all(line.split()[3] in ('FSP', 'KDSVD') and 'needs equal channel counts per stage' in line for line in left)
    assert '# left out: FSP on ResNet50 -> vgg8: FSP needs equal channel counts per stage' in out
    # the Table-1 sweep's output stays as it was: no comment lines
    assert not any(line.startswith('# left out') for line in run_script('run_cifar_distill.sh', '--dry-run',
                                                                         '--trials', '1').splitlines())


# Each new method's published values, copied by hand from the official files (scripts/settings.py names them):
# ReviewKD CIFAR-100/script/reviewKD.sh --kd-loss-weight; MLKD configs/cifar100/ours/*.yaml (EPOCHS, LR);
# logit-standardization-KD logs/<KD|DKD|MLKD|CTKD>/<method>,<T>,<S>,<base_temp>,<kd_weight>[,<beta>].txt and
# configs/cifar100/mlkd/*.yaml; DIST dist_cifar.yaml; CTKD scripts/run_cifar_distill.sh; mdistiller cfg.py (OFD,
# ReviewKD defaults) and configs/cifar100/dot/*.yaml.
REVIEWKD_B = {('wrn_40_2', 'wrn_16_2'): 5.0, ('wrn_40_2', 'wrn_40_1'): 5.0, ('wrn_40_2', 'ShuffleV1'): 5.0,
              ('resnet32x4', 'resnet8x4'): 5.0, ('resnet32x4', 'ShuffleV1'): 5.0, ('resnet32x4', 'ShuffleV2'): 8.0,
              ('resnet56', 'resnet20'): 0.6, ('resnet110', 'resnet32'): 1.0}
MLKD_EPOCHS_LR = {('resnet32x4', 'resnet8x4'): (240, 0.025), ('wrn_40_2', 'wrn_40_1'): (240, 0.025),
                  ('vgg13', 'vgg8'): (240, 0.025), ('vgg13', 'MobileNetV2'): (480, 0.01),
                  ('ResNet50', 'MobileNetV2'): (480, 0.01), ('wrn_40_2', 'ShuffleV1'): (480, 0.01),
                  ('resnet32x4', 'ShuffleV1'): (960, 0.01), ('resnet32x4', 'ShuffleV2'): (960, 0.01)}
MLKD_LS_EPOCHS_LR = {('resnet32x4', 'resnet8x4'): (480, 0.025), ('vgg13', 'vgg8'): (480, 0.01),
                     ('ResNet50', 'MobileNetV2'): (480, 0.01), ('resnet32x4', 'ShuffleV2'): (960, 0.01)}
KD_LS = {('ResNet50', 'MobileNetV2'): (3.0, 1.0), ('resnet110', 'resnet20'): (4.0, 12.0), ('vgg13', 'vgg8'): (3.0, 9.0),
         ('resnet32x4', 'resnet8x4'): (2.0, 9.0), ('resnet32x4', 'ShuffleV1'): (2.0, 9.0)}     # no log: 2, 9
DKD_LS = {('vgg13', 'vgg8'): (2.0, 15.0, 2.0), ('resnet56', 'resnet20'): (3.0, 18.0, 2.0),
          ('resnet32x4', 'resnet8x4'): (2.0, 9.0, 8.0), ('vgg13', 'MobileNetV2'): (3.0, 9.0, 2.0),
          ('wrn_40_2', 'ShuffleV1'): (2.0, 9.0, 8.0)}                                      # no log: 2, 9, DKD's 8
MLKD_LS = {('vgg13', 'vgg8'): (2.0, 6.0), ('resnet32x4', 'ShuffleV2'): (2.0, 6.0), ('wrn_40_2', 'wrn_16_2'): (2.0, 9.0)}


def test_extended_sweep_resolves_the_new_methods_published_settings(extended_runs):
    def weights(opt):
        return (opt.gamma, opt.alpha, opt.beta)

    for (label, t, s), opt in extended_runs.items():
        pair = (t, s)
        mlkd_family = label in ('MLKD', 'MLKD+LS')
        if not mlkd_family:     # every other method: RepDistiller's lr (0.05, 0.01 for MobileNet/ShuffleNet), 240 epochs
            assert opt.epochs == 240 and opt.learning_rate == (0.01 if s in ('MobileNetV2', 'ShuffleV1', 'ShuffleV2')
                                                               else 0.05), (label, pair)
        assert opt.nesterov == (label in ('QUEST', 'letKD-1', 'letKD-2')), (label, pair)
        if label == 'ReviewKD':
            assert weights(opt) == (1.0, 0.0, REVIEWKD_B.get(pair, 1.0)) and opt.reviewkd_warmup == 20, pair
        elif label == 'OFD':
            assert weights(opt) == (1.0, 0.0, 0.001), pair
        elif label == 'DIST':
            assert weights(opt) == (1.0, 0.0, 2.0) and (opt.dist_beta, opt.dist_gamma, opt.dist_T) == (1, 1, 4)
        elif label in ('CTKD', 'CTKD+LS'):
            ls = label == 'CTKD+LS'
            assert weights(opt) == (0.1, 9.0 if ls else 0.9, 0.0), pair
            assert (opt.ctkd_t_start, opt.ctkd_t_end) == (2.0 if ls else 1.0, 20.0)
            assert (opt.ctkd_lambda_min, opt.ctkd_lambda_max, opt.ctkd_lambda_epochs) == (0, 1, 10)
            assert opt.logit_stand == ls and (opt.kd_weight == 9.0 if ls else opt.kd_weight is None)
        elif mlkd_family:
            ls = label == 'MLKD+LS'
            assert weights(opt) == (0.1, 0.0, opt.kd_weight if ls else 0.9) and opt.logit_stand == ls, pair
            if ls and pair in MLKD_LS:
                assert (opt.base_temp, opt.kd_weight) == MLKD_LS[pair], pair
            if not ls:
                assert (opt.base_temp, opt.kd_weight, opt.mlkd_T) == (None, None, 4.0), pair
            table = MLKD_LS_EPOCHS_LR if ls else MLKD_EPOCHS_LR
            if pair in table:
                assert (opt.epochs, opt.learning_rate) == table[pair], (label, pair)
            assert opt.lr_decay_epochs == [150, 180, 210] and opt.batch_size == 64
        elif label == 'KD+LS':
            if pair in KD_LS:
                assert (opt.base_temp, opt.kd_weight) == KD_LS[pair], pair
            assert opt.logit_stand and opt.alpha == opt.kd_weight and (opt.gamma, opt.beta) == (0.1, 0.0)
        elif label == 'DKD+LS':
            if pair in DKD_LS:
                assert (opt.base_temp, opt.kd_weight, opt.dkd_beta) == DKD_LS[pair], pair
            assert opt.logit_stand and (opt.gamma, opt.alpha, opt.dkd_alpha, opt.dkd_warmup) == (1, 0, 1, 20)
        elif label == 'KD+DOT':
            assert weights(opt) == (0.1, 0.9, 0.0) and (opt.trainer, opt.dot_delta, opt.kd_T) == ('dot', 0.075, 4)
        else:
            assert opt.trainer == 'sgd' and not getattr(opt, 'logit_stand', False), (label, pair)
    assert extended_runs[('DKD', 'ResNet50', 'vgg8')].dkd_beta == 8.0      # no mdistiller config: its default BETA


def test_reviewkd_per_pair_table_is_the_distillers_default():
    """settings.py passes ReviewKD's -b explicitly; the Distiller resolves the same values when -b is left out."""
    from distiller_zoo import reviewkd
    from scripts.settings import REVIEWKD_BETA, REVIEWKD_DEFAULT_BETA
    assert REVIEWKD_BETA == reviewkd.REVIEWKD_WEIGHTS == REVIEWKD_B
    assert REVIEWKD_DEFAULT_BETA == reviewkd.DEFAULT_WEIGHT == 1.0


@pytest.mark.parametrize('pair', NEW_PAIRS, ids=lambda p: f'{p[0]}->{p[1]}')
def test_every_method_of_the_extended_sweep_builds_on_the_new_pairs(pair):
    """vgg13 -> vgg8, vgg13 -> MobileNetV2, ResNet50 -> vgg8 (the 13 pairs beyond Table 1's 10): every method the sweep
    runs there builds from its command line's options with the real CIFAR-100 models and evaluates its deployed
    student; those without an offline stage also take a training step (a backward pass); the methods the sweep
    leaves out (FSP, KDSVD on unequal channels) refuse the pair."""
    import copy

    import torch

    from distiller_zoo.registry import DISTILLERS
    from helper.errors import UserError
    from helper.options import updated
    from models import create_model
    from scripts import commands
    from scripts.settings import EXTENDED_METHODS, METHODS
    from tests.options import data_info

    torch.manual_seed(0)
    nets = {name: create_model(name, 100) for name in pair}
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    extras = dict(index=torch.arange(4), contrast_idx=torch.randint(32, (4, 5)), image_strong=x, epoch=1)
    needs_offline = ('tdd', 'tdd_crd', 'quest', 'letkd1', 'letkd2')      # their prepare() needs the data
    built = set()
    for line in commands.distill_lines(EXTENDED_METHODS, [pair], 'cifar100', 1, './save', []):
        parsed = train_student.get_args_parser().parse_args(shlex.split(line)[2:])
        opt = train_student.resolve_options(updated(parsed, k_penult=8, k_inter=2, nce_k=4))   # small, same shapes
        distiller = DISTILLERS[opt.distill](copy.deepcopy(nets[pair[1]]), copy.deepcopy(nets[pair[0]]), opt,
                                            data_info(100, n_data=32))
        distiller.eval()
        with torch.no_grad():
            assert distiller.deployable()(x).shape == (4, 100), line
        if opt.distill not in needs_offline:
            distiller.train()
            _, losses = distiller.forward_train(x, y, **extras)
            sum(losses.values()).backward()
        built.add(opt.distill)
    assert {METHODS[label].distill for label in EXTENDED_METHODS} - built <= {'fsp', 'kdsvd'}
    for label in ('FSP', 'KDSVD'):
        if commands.exclusion(label, *pair) is None:
            continue
        opt = train_student.resolve_options(train_student.get_args_parser().parse_args(
            ['--distill', METHODS[label].distill, '--model_s', pair[1], '--model_t', pair[0]]))
        with pytest.raises((UserError, RuntimeError, ValueError)):
            distiller = DISTILLERS[opt.distill](copy.deepcopy(nets[pair[1]]), copy.deepcopy(nets[pair[0]]), opt,
                                                data_info(100, n_data=32))
            distiller.train()
            _, losses = distiller.forward_train(x, y, **extras)
            sum(losses.values()).backward()


def write_summary(root, name, **fields):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / 'summary.json').write_text(json.dumps(fields))


def test_compare_with_paper_means_stds_deltas_csv_and_png(tmp_path, capsys):
    save = tmp_path / 'save'
    lasts, bests = [70.0, 71.0, 73.0], [70.5, 71.5, 73.5]
    for i, (last, best) in enumerate(zip(lasts, bests)):
        write_summary(save, f'kd{i}', dataset='cifar100', model_t='resnet56', model_s='resnet20', distill='kd',
                      alpha=0.9, last_acc=last, best_acc=best, params_deployed=278324, macs_deployed=40818944)
    write_summary(save, 'crdkd', dataset='cifar100', model_t='resnet56', model_s='resnet20', distill='crd',
                  alpha=1.0, last_acc=75.0, best_acc=75.5, params_deployed=278324, macs_deployed=40818944)
    write_summary(save, 'crd', dataset='cifar100', model_t='resnet56', model_s='resnet20', distill='crd',
                  alpha=0.0, last_acc=60.0, best_acc=61.0, params_deployed=278324, macs_deployed=40818944)
    write_summary(save, 'scratch', dataset='cifar100', model_t=None, model_s='resnet20', distill='ce', alpha=0.0,
                  last_acc=69.0, best_acc=69.4, params_deployed=278324, macs_deployed=40818944)
    assert compare_with_paper.main([str(save), '--out', str(tmp_path / 'out')]) == 0
    out = capsys.readouterr().out
    mean, std = statistics.fmean(lasts), statistics.stdev(lasts)
    published_kd = 70.66
    assert f'{mean:.2f} +- {std:.2f} (3) / {published_kd:.2f} / {mean - published_kd:+.2f}' in out
    assert '**75.00 +- 0.00 (1) / 71.63 / +3.37**' in out         # CRD+KD, the best of its column, in bold
    assert '60.00 +- 0.00 (1) / 71.16 / -11.16' in out            # CRD without KD is its own row
    assert '69.00 +- 0.00 (1) / 69.06 / -0.06' in out             # the student-from-scratch row
    assert '0.28 / 40.8' in out                                    # params (M) / MACs (M)
    assert 'resnet56 -> resnet20 FitNet: 0/5 runs' in out          # missing runs are listed
    with open(tmp_path / 'out' / 'comparison.csv') as f:
        rows = {(r['method']): r for r in csv.DictReader(f)}
    assert rows['KD']['n'] == '3'
    assert float(rows['KD']['last_mean']) == pytest.approx(mean, abs=1e-4)     # CSV keeps 4 decimals
    assert float(rows['KD']['best_std']) == pytest.approx(statistics.stdev(bests), abs=1e-4)
    assert float(rows['KD']['delta_last']) == pytest.approx(mean - published_kd, abs=1e-4)
    png = tmp_path / 'out' / 'comparison_cifar100.png'
    assert png.is_file() and png.read_bytes()[:4] == b'\x89PNG'


@pytest.fixture(scope='module')
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp('cifar_launch')
    write_cifar100(root, n_train_per_class=1, n_test_per_class=1)
    return str(root)


def metrics_without_time(run_dir):
    """metrics.jsonl's records without the wall-clock field."""
    return [{k: v for k, v in json.loads(line).items() if k != 'time'}
            for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


def assert_same_state(resumed, uninterrupted, path='last.pth'):
    """Every tensor of ``resumed`` equals the one at the same place in ``uninterrupted`` (integer tensors such as
    RNG states bit for bit; floating ones to float32 rounding accumulated over an epoch (rtol 1e-4), since the
    two runs may sum in another thread order: the uninterrupted run is a launcher child, the killed one runs
    in this process); other values are
    equal. The path of the first difference is in the message."""
    import torch
    if isinstance(uninterrupted, dict):
        assert isinstance(resumed, dict) and resumed.keys() == uninterrupted.keys(), path
        for key in uninterrupted:
            assert_same_state(resumed[key], uninterrupted[key], f'{path}[{key!r}]')
    elif isinstance(uninterrupted, (list, tuple)):
        assert type(resumed) is type(uninterrupted) and len(resumed) == len(uninterrupted), path
        for i, (a, b) in enumerate(zip(resumed, uninterrupted)):
            assert_same_state(a, b, f'{path}[{i}]')
    elif isinstance(uninterrupted, torch.Tensor):
        assert isinstance(resumed, torch.Tensor) and resumed.dtype == uninterrupted.dtype, path
        same = (torch.allclose(resumed, uninterrupted, rtol=1e-4, atol=1e-6) if uninterrupted.is_floating_point()
                else torch.equal(resumed, uninterrupted))
        assert same, f'{path} differs between the resumed and the uninterrupted run'
    else:
        assert resumed == uninterrupted, f'{path}: {resumed!r} != {uninterrupted!r}'


def test_launcher_runs_skips_and_resumes(tmp_path, cifar, monkeypatch):
    import torch
    save = tmp_path / 'save'
    common = f'--data_folder {cifar} --save_dir {save} --num_workers 0 --batch_size 50 --device cpu'
    teacher = f'python train_teacher.py --model resnet8 --epochs 1 {common}'
    student = (f'python train_student.py --path_t {save}/models/resnet8_cifar100_lr_0.05_decay_0.0005_trial_0/'
               f'ckpt_epoch_1.pth --distill kd --model_s resnet8 --epochs 2 {common}')
    commands = tmp_path / 'commands.txt'
    commands.write_text(f'{teacher}\n# barrier\n{student}\n')

    # the uninterrupted run: teacher, then the student's 2 epochs (2 steps each: 100 images, batch 50)
    assert launch.main([str(commands), '--gpus', '', '--poll', '0.1']) == 0
    student_dir = launch.run_dir_of(shlex.split(student))
    summary = json.loads((student_dir / 'summary.json').read_text())
    (student_dir / 'summary.json').unlink()
    metrics = metrics_without_time(student_dir)
    last = torch.load(student_dir / 'last.pth', weights_only=True)
    assert last['epoch'] == 2 and [m['epoch'] for m in metrics] == [1, 2]
    assert last['optimizer']['state'], 'SGD momentum buffers are part of what a resume must restore'

    plan = {job.action for job in (launch.plan(shlex.split(teacher)), launch.plan(shlex.split(student)))}
    assert plan == {'skip', 'resume'}
    # rewind the student to the end of its first epoch, as if killed during the second
    import helper.run as run_module
    real = run_module.train_one_epoch

    def dies_in_epoch_2(*args, epoch, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(run_module, 'train_one_epoch', dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_student.cli(shlex.split(student)[2:] + ['--overwrite'])
    monkeypatch.setattr(run_module, 'train_one_epoch', real)
    assert not (student_dir / 'summary.json').exists()
    assert torch.load(student_dir / 'last.pth', weights_only=True)['epoch'] == 1
    assert [m['epoch'] for m in metrics_without_time(student_dir)] == [1]

    log = tmp_path / 'logs'
    assert launch.main([str(commands), '--gpus', '', '--poll', '0.1', '--log_dir', str(log)]) == 0
    assert '--resume' in (log / f'{student_dir.name}.log').read_text()
    assert not (log / f'{launch.run_dir_of(shlex.split(teacher)).name}.log').exists()   # finished: skipped
    resumed = json.loads((student_dir / 'summary.json').read_text())
    assert resumed['epochs'] == 2
    # the resumed run is the uninterrupted one: every logged number of both epochs (losses, accuracies, lr)
    # and every tensor of last.pth (weights, BN statistics, SGD momentum, RNG states) are equal
    resumed_metrics = metrics_without_time(student_dir)
    assert [sorted(m) for m in resumed_metrics] == [sorted(m) for m in metrics]
    for got, expected in zip(resumed_metrics, metrics):
        # rel 1e-4: float rounding only (measured up to 3e-6 after an epoch); a broken resume differs by ~3e-3
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-9), (got, expected)
    resumed_last = torch.load(student_dir / 'last.pth', weights_only=True)
    assert resumed_last['epoch'] == 2
    drop = ('wall_time_s',)
    assert_same_state({k: v for k, v in resumed_last.items() if k not in drop},
                      {k: v for k, v in last.items() if k not in drop})
    assert {k: resumed[k] for k in ('last_acc', 'best_acc', 'best_epoch')} == \
        {k: summary[k] for k in ('last_acc', 'best_acc', 'best_epoch')}


def test_bench_kd_layer_reports_parameters_and_time_ratios(capsys, monkeypatch):
    from types import SimpleNamespace

    from distiller_zoo.letkd import KDLayer, LetKDStudent
    from helper.util import count_params
    from models import create_model
    from scripts import bench_kd_layer

    # A scripted clock: each forward of a model advances it by that model's next duration; round 0 is the warm-up
    # (500 ms each, to be ignored), rounds 1-3 are timed. Medians (ms): plain 20; letKD-1/2 at K 16: 25, 30; at
    # K 4096: 23, 46; their folded copies: 16, 18, 21, 31. Forwards after the timing (the logit check) cost nothing.
    ms = {'plain': [500, 10, 30, 20], '1-16': [500, 25, 21, 26], '2-16': [500, 30, 31, 29],
          '1-4096': [500, 24, 22, 23], '2-4096': [500, 46, 50, 40],
          '1-16-folded': [500, 15, 16, 17], '2-16-folded': [500, 18, 18, 18],
          '1-4096-folded': [500, 21, 22, 20], '2-4096-folded': [500, 30, 32, 31]}
    now, forwards = [100.0], {key: 0 for key in ms}

    def timed(model, key):
        def advance(*_):
            schedule = ms[key]
            now[0] += (schedule[forwards[key]] if forwards[key] < len(schedule) else 0) / 1e3
            forwards[key] += 1
        model._forward_hooks.clear()
        model.register_forward_hook(advance)
        return model

    real_student, real_model, real_folded = bench_kd_layer.letkd_student, bench_kd_layer.create_model, bench_kd_layer.folded
    keys: dict[int, str] = {}

    def student(name, num_classes, image_size, words):
        with monkeypatch.context() as m:               # its backbone is not the plain model: no clock on it
            m.setattr(bench_kd_layer, 'create_model', real_model)
            model = real_student(name, num_classes, image_size, words)
        keys[id(model)] = f"{len(words)}-{words['penult']}"
        return timed(model, keys[id(model)])

    monkeypatch.setattr(bench_kd_layer, 'create_model', lambda *a, **kw: timed(real_model(*a, **kw), 'plain'))
    monkeypatch.setattr(bench_kd_layer, 'letkd_student', student)
    monkeypatch.setattr(bench_kd_layer, 'folded', lambda model: timed(real_folded(model), keys[id(model)] + '-folded'))
    monkeypatch.setattr(bench_kd_layer, 'time', SimpleNamespace(perf_counter=lambda: now[0]))
    assert bench_kd_layer.main(['--students', 'resnet20', '--k_penult', '16', '4096', '--k_inter', '2',
                                '--batch_size', '2', '--repeats', '3', '--warmup', '1', '--device', 'cpu']) == 0
    assert all(count >= 4 for count in forwards.values()), forwards      # 1 warm-up + 3 timed rounds each
    out = capsys.readouterr().out
    rows = {}
    for k in (16, 4096):
        row = next(line for line in out.splitlines() if line.startswith(f'| resnet20 | {k} |'))
        rows[k] = [c.strip() for c in row.strip('|').split('|')]

    # parameters: the deployed students built here; resnet20's KD places (layer3.0 and layer3) have 64 channels.
    # A KD layer with C channels and K words: predictor K x C + scale, BN 2K, value C x K + scale = 2KC + 2K + 2.
    plain = count_params(create_model('resnet20', 100))
    for k, (one_cell, two_cell) in {16: ('+0.002 M', '+0.028 M'), 4096: ('+0.532 M', '+0.558 M')}.items():
        one = count_params(LetKDStudent(create_model('resnet20', 100), 'resnet20', {'penult': KDLayer(64, k)}))
        two = count_params(LetKDStudent(create_model('resnet20', 100), 'resnet20',
                                        {'inter': KDLayer(64, 100 * 2), 'penult': KDLayer(64, k)}))
        assert one - plain == 2 * k * 64 + 2 * k + 2                        # 2,082 for K = 16
        assert two - one == 2 * 200 * 64 + 2 * 200 + 2                     # the inter layer: 100 classes x 2 words
        assert rows[k][2] == f'{plain / 1e6:.3f} M' == '0.278 M'
        assert rows[k][3:5] == [f'+{(one - plain) / 1e6:.3f} M', f'+{(two - plain) / 1e6:.3f} M'] == [one_cell, two_cell]

    # times: the plain median in ms, then letKD-1, folded letKD-1, letKD-2, folded letKD-2 over plain (medians)
    assert rows[16][5:] == ['20.0', '1.250', '0.800', '1.500', '0.900']
    assert rows[4096][5:] == ['20.0', '1.150', '1.050', '2.300', '1.550']


def test_offline_stage_runs_first_and_the_runs_reuse_its_files(tmp_path, cifar):
    """A sweep with letKD-1 runs: the launcher runs the offline stage (one build), then the runs, which reuse
    the files; relaunched after everything finished, it skips the offline stage too."""
    from scripts import commands
    save = tmp_path / 'save'
    common = f'--data_folder {cifar} --save_dir {save} --num_workers 0 --batch_size 50 --device cpu'
    teacher = f'python train_teacher.py --model resnet8 --epochs 1 {common}'
    path_t = f'{save}/models/resnet8_cifar100_lr_0.05_decay_0.0005_trial_0/ckpt_epoch_1.pth'
    students = [f'python train_student.py --path_t {path_t} --distill letkd1 --model_s resnet8 --epochs 1 '
                f'--k_penult 8 --trial {t} {common}' for t in (1, 2)]
    lines = [teacher, '# barrier', *commands.with_offline_stages(students)]
    assert sum('letkd_offline.py' in line for line in lines) == 1       # two trials, one build
    text = '\n'.join(lines) + '\n'
    (tmp_path / 'commands.txt').write_text(text)
    log = tmp_path / 'logs'
    assert launch.main([str(tmp_path / 'commands.txt'), '--gpus', '', '--poll', '0.1', '--log_dir', str(log)]) == 0
    offline_logs = list(log.glob('offline_*.log'))
    assert len(offline_logs) == 1 and 'building penult' in offline_logs[0].read_text()
    for line in students:
        run_log = (log / f'{launch.run_dir_of(shlex.split(line)).name}.log').read_text()
        assert 'reusing' in run_log and 'building' not in run_log
    assert launch.main([str(tmp_path / 'commands.txt'), '--gpus', '', '--poll', '0.1', '--log_dir', str(log),
                        '--dry-run']) == 0
    assert launch.main([str(tmp_path / 'commands.txt'), '--gpus', '', '--poll', '0.1', '--log_dir', str(log)]) == 0
    assert offline_logs[0].read_text().count('\n$ ') == 1                # not run again


def test_two_launchers_on_one_command_file_train_every_run_once(tmp_path, cifar):
    """Two launchers started together on the same sweep (a teacher, a barrier, its student and two more
    teachers): each run is trained by one process, each epoch logged once, and the student waits for the
    teacher that the other launcher trains."""
    save = tmp_path / 'save'
    common = f'--data_folder {cifar} --save_dir {save} --num_workers 0 --batch_size 50 --device cpu --epochs 2'
    teacher = f'python train_teacher.py --model resnet8 {common}'
    student = (f'python train_student.py --path_t {save}/models/resnet8_cifar100_lr_0.05_decay_0.0005_trial_0/'
               f'ckpt_epoch_2.pth --distill kd --model_s resnet8 {common}')
    others = [f'python train_teacher.py --model {m} {common}' for m in ('resnet14', 'resnet20')]
    commands_file = tmp_path / 'commands.txt'
    commands_file.write_text('\n'.join([teacher, '# barrier', student, *others]) + '\n')
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    procs = [subprocess.Popen([sys.executable, str(ROOT / 'scripts' / 'launch.py'), str(commands_file), '--gpus', '',
                               '--jobs', '2', '--poll', '0.1', '--log_dir', str(tmp_path / f'logs{i}')],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (0, 1)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    for line in (teacher, student, *others):
        run_dir = launch.run_dir_of(shlex.split(line))
        starts = sum((tmp_path / f'logs{i}' / f'{run_dir.name}.log').read_text().count('\n$ ')
                     for i in (0, 1) if (tmp_path / f'logs{i}' / f'{run_dir.name}.log').is_file())
        assert starts == 1, (run_dir.name, outputs)
        assert [m['epoch'] for m in metrics_without_time(run_dir)] == [1, 2], run_dir.name
        assert json.loads((run_dir / 'summary.json').read_text())['epochs'] == 2
