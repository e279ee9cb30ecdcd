"""Issue 23: one protocol for every method. The sweeps' --protocol (scripts/settings.py PROTOCOLS): every line of a
protocol carries exactly its recipe, the method flags are the same under every protocol, no two protocols share a run
folder, the launcher skips and resumes each protocol's runs on their own, and a small two-protocol sweep on digits
runs end to end into compare_with_paper.py's recipe-effect tables."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import train_student
from helper.util import default_learning_rate
from scripts import commands, compare_with_paper, launch
from scripts.settings import METHODS, PROTOCOLS, method_label

ROOT = Path(__file__).resolve().parents[1]
# what a protocol sets: everything else a run resolves is the method's and must not depend on the protocol
RECIPE_KEYS = {'epochs', 'batch_size', 'learning_rate', 'lr_decay_epochs', 'lr_decay_rate', 'weight_decay',
               'momentum', 'nesterov', 'pad_mode', 'drop_last', 'tiny_aug', 'sync_bn', 'protocol'}
LETKD_FLAGS = ('--nesterov', 'reflect', '--drop_last')


def sweep(*argv: str) -> list[str]:
    """The command lines of ``scripts/commands.py ARGV`` (comments and barriers dropped)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert commands.main(list(argv)) == 0
    return [line for line in out.getvalue().splitlines() if line.startswith('python ')]


def script_lines(script: str, *flags: str) -> list[str]:
    env = {**os.environ, 'PYTHON': sys.executable, 'OMP_NUM_THREADS': '1'}
    out = subprocess.run(['bash', str(ROOT / 'scripts' / script), '--dry-run', *flags], capture_output=True, text=True,
                         check=True, cwd=ROOT, env=env).stdout
    return [line for line in out.splitlines() if line.startswith('python ')]


def parse(line: str):
    return train_student.get_args_parser().parse_args(shlex.split(line)[2:])


def parse_model(line: str) -> str:
    argv = shlex.split(line)
    return argv[argv.index('--model') + 1]


def students(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith('python train_student.py')]


@pytest.fixture(scope='module')
def extended():
    """The extended sweep (every method x 13 pairs), trial 1, under each protocol."""
    return {protocol: sweep('extended', '--trials', '1', '--protocol', protocol) for protocol in PROTOCOLS}


def test_the_protocol_table():
    assert list(PROTOCOLS) == ['published', 'repdistiller', 'letkd']
    assert PROTOCOLS['published'].small is None and PROTOCOLS['published'].imagenet is None
    rd, lk = PROTOCOLS['repdistiller'], PROTOCOLS['letkd']
    assert (rd.small.nesterov, rd.small.pad_mode, rd.small.drop_last, rd.small.tiny_aug) == (False, 'zero', False, 'crop')
    assert (lk.small.nesterov, lk.small.pad_mode, lk.small.drop_last, lk.small.tiny_aug) == (True, 'reflect', True,
                                                                                          'rotate')
    for recipe in (rd.small, lk.small):       # the rest of both CIFAR recipes is RepDistiller's (and letKD's LUT_lr)
        assert (recipe.epochs, recipe.batch_size, recipe.learning_rate, recipe.lr_decay_epochs, recipe.lr_decay_rate,
                recipe.weight_decay, recipe.momentum) == ('240', '64', '', '150,180,210', '0.1', '5e-4', '0.9')
    assert (rd.imagenet.batch_size, rd.imagenet.learning_rate, rd.imagenet.nesterov, rd.imagenet.sync_bn) == \
        ('512', '0.2', False, False)
    assert (lk.imagenet.batch_size, lk.imagenet.learning_rate, lk.imagenet.nesterov, lk.imagenet.sync_bn) == \
        ('256', '0.1', True, True)
    assert all(p.source for p in PROTOCOLS.values())


@pytest.mark.parametrize('protocol', list(PROTOCOLS))
def test_every_line_of_a_protocol_has_exactly_its_recipe(extended, protocol):
    """published: today's lines (no --protocol; Nesterov/reflect/drop_last for QUEST and letKD only). repdistiller: no
    line has --nesterov, reflect or --drop_last. letkd: every line has all three, but DOT's lines have no --nesterov
    (its momentum update is the method). Both: RepDistiller's lr (0.01 for MobileNet/ShuffleNet students), 240 epochs
    and schedule on every line, the students from scratch included."""
    lines = students(extended[protocol])
    assert lines
    for line in lines:
        argv = shlex.split(line)
        opt = train_student.resolve_options(parse(line))
        label = 'student' if opt.distill == 'ce' else method_label(opt.distill, opt.alpha,
                                                                   bool(getattr(opt, 'logit_stand', False)), opt.trainer)
        has = {flag: flag in argv for flag in LETKD_FLAGS}
        if protocol == 'published':
            assert '--protocol' not in argv and opt.protocol == 'published'
            assert opt.distill != 'ce'                         # from scratch: run_cifar_vanilla.sh (train_teacher.py)
            assert set(has.values()) == {label in ('QUEST', 'letKD-1', 'letKD-2')}, line
            continue
        assert argv[argv.index('--protocol') + 1] == protocol and opt.protocol == protocol, line
        if protocol == 'repdistiller':
            assert not any(has.values()) and opt.pad_mode == 'zero' and not opt.nesterov and not opt.drop_last, line
        else:
            dot = opt.trainer == 'dot'
            assert has == {'--nesterov': not dot, 'reflect': True, '--drop_last': True}, line
            assert (opt.nesterov, opt.pad_mode, opt.drop_last) == (not dot, 'reflect', True), line
        assert (opt.epochs, opt.batch_size, opt.lr_decay_epochs, opt.lr_decay_rate, opt.weight_decay, opt.momentum) == \
            (240, 64, [150, 180, 210], 0.1, 5e-4, 0.9), line
        assert opt.learning_rate == default_learning_rate(opt.model_s), line
    if protocol != 'published':    # one student from scratch per student model of the 13 pairs
        assert sorted(parse(line).model_s for line in lines if ' --distill ce ' in line) == sorted(
            ['wrn_16_2', 'wrn_40_1', 'resnet20', 'resnet32', 'resnet8x4', 'ShuffleV1', 'ShuffleV2', 'MobileNetV2', 'vgg8'])


def test_the_method_flags_are_the_same_under_every_protocol(extended):
    """Resolved options without the recipe's keys, run by run: identical sets under the three protocols (DKD's beta,
    letKD's alphas, LS's base temperatures, MLKD's weights... all stay the method's)."""
    def methods(lines):
        out = []
        for line in students(lines):
            opt = train_student.resolve_options(parse(line))
            if opt.distill != 'ce':
                out.append(json.dumps({k: v for k, v in vars(opt).items() if k not in RECIPE_KEYS}, sort_keys=True,
                                      default=str))
        return sorted(out)

    published = methods(extended['published'])
    assert len(published) == 402
    assert methods(extended['repdistiller']) == published
    assert methods(extended['letkd']) == published


def test_no_two_protocols_share_a_run_folder(extended):
    """published keeps RepDistiller's layout (<save>/student_model/S:...); another protocol's runs live in
    <save>/student_model/protocol_<name>/, under the same run-folder names."""
    folders = {}
    for protocol, lines in extended.items():
        folders[protocol] = {launch.run_dir_of(shlex.split(line)) for line in students(lines)}
        assert len(folders[protocol]) == len(students(lines))
        parent = Path('./save/student_model') / ('' if protocol == 'published' else f'protocol_{protocol}')
        assert {folder.parent for folder in folders[protocol]} == {parent}
    names = {p: {f.name for f in folders[p]} for p in folders}
    assert names['published'] < names['letkd'] == names['repdistiller']        # + the students from scratch (ce)
    assert not folders['published'] & folders['repdistiller']
    assert not folders['published'] & folders['letkd']
    assert not folders['repdistiller'] & folders['letkd']


def test_the_table_1_script_passes_the_protocol_through():
    """bash scripts/run_cifar_distill.sh --protocol letkd: commands.py's lines for that protocol (the offline stage
    first, as the published sweep)."""
    lines = script_lines('run_cifar_distill.sh', '--trials', '1', '--protocol', 'letkd', '--methods', 'KD', 'letKD-2',
                         '--pairs', 'resnet56:resnet20')
    assert lines[0].startswith('python helper/letkd_offline.py')
    runs = students(lines)
    assert [parse(line).distill for line in runs] == ['ce', 'kd', 'letkd2']
    assert all('--protocol letkd' in line and all(flag in line for flag in LETKD_FLAGS) for line in runs)
    # the published sweep: unchanged (letKD-2 with its authors' recipe, KD with RepDistiller's)
    published = students(script_lines('run_cifar_distill.sh', '--trials', '1', '--methods', 'KD', 'letKD-2',
                                      '--pairs', 'resnet56:resnet20'))
    assert [('--nesterov' in line, '--protocol' in line) for line in published] == [(False, False), (True, False)]


def test_tinyimagenet_protocols_share_the_teachers_and_set_the_augmentation():
    published = sweep('tinyimagenet', '--trials', '1', '--methods', 'KD')
    for protocol, tiny_aug in (('repdistiller', 'crop'), ('letkd', 'rotate')):
        lines = sweep('tinyimagenet', '--trials', '1', '--methods', 'KD', '--protocol', protocol)
        teachers = [line for line in lines if 'train_teacher.py' in line]
        # the teachers' lines are the published sweep's (one teacher per model for all protocols); the students from
        # scratch, train_teacher.py lines there, are train_student.py --distill ce lines of the protocol here
        assert sorted(parse_model(line) for line in teachers) == ['ResNet50', 'resnet56', 'wrn_40_2']
        assert set(teachers) <= {line for line in published if 'train_teacher.py' in line}
        runs = students(lines)
        assert {parse(line).distill for line in runs} == {'ce', 'kd'}
        for line in runs:
            opt = train_student.resolve_options(parse(line))
            assert (opt.tiny_aug, opt.tiny_split, opt.protocol) == (tiny_aug, 'letkd', protocol), line


@pytest.mark.parametrize('protocol, batch, lr, nesterov', [('repdistiller', 512, 0.2, False), ('letkd', 256, 0.1, True)])
def test_imagenet_protocols_give_every_run_one_recipe(protocol, batch, lr, nesterov):
    """ImageNet: repdistiller = mdistiller's baseline recipe for every run (per-replica BN), letkd = the letKD/QUEST
    recipe for every run (with --sync_bn); the students from scratch are train_student.py --distill ce runs of the
    protocol; the method flags (DKD's beta per pair, KD's T 1) are the published protocol's."""
    lines = [line for line in sweep('imagenet', '--protocol', protocol) if 'letkd_offline' not in line]
    published = {(o.distill, o.model_s): o for o in (train_student.resolve_options(parse(line))
                                                     for line in students(sweep('imagenet')))}
    assert not any('train_teacher.py' in line for line in lines)
    seen = set()
    for line in lines:
        opt = train_student.resolve_options(parse(line))
        assert (opt.batch_size, opt.learning_rate, opt.nesterov, opt.sync_bn, opt.epochs, opt.weight_decay) == \
            (batch, lr, nesterov, nesterov, 100, 1e-4), line
        assert opt.lr_decay_epochs == [30, 60, 90] and opt.protocol == protocol
        seen.add((opt.distill, opt.model_s))
        if opt.distill != 'ce':
            ref = published[(opt.distill, opt.model_s)]
            assert (opt.gamma, opt.alpha, opt.beta, opt.kd_T, opt.dkd_beta) == \
                (ref.gamma, ref.alpha, ref.beta, ref.kd_T, ref.dkd_beta), line
    assert ('ce', 'ResNet18') in seen and ('ce', 'MobileNetV1') in seen and len(seen) == 14


def test_the_vanilla_sweep_has_no_protocol(capsys):
    with pytest.raises(SystemExit):
        commands.main(['vanilla', '--protocol', 'letkd'])
    assert 'every protocol shares' in capsys.readouterr().err


def test_a_protocol_name_is_checked(capsys):
    code = train_student.cli(['--distill', 'ce', '--model_s', 'resnet8', '--protocol', '../elsewhere'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and '--protocol must be a name' in err[0]


def test_the_launcher_skips_and_resumes_each_protocol_on_its_own(tmp_path, capsys):
    """The same KD run under three protocols: finished under repdistiller (summary.json), interrupted under letkd
    (last.pth), not started under published; the launcher skips, resumes and runs them accordingly."""
    save = tmp_path / 'save'
    lines = {protocol: students(sweep('distill', '--trials', '1', '--methods', 'KD', '--pairs', 'resnet56:resnet20',
                                      '--save_dir', str(save), '--protocol', protocol))[-1] for protocol in PROTOCOLS}
    dirs = {p: launch.run_dir_of(shlex.split(line)) for p, line in lines.items()}
    dirs['repdistiller'].mkdir(parents=True)
    (dirs['repdistiller'] / 'summary.json').write_text('{}')
    dirs['letkd'].mkdir(parents=True)
    (dirs['letkd'] / 'last.pth').write_bytes(b'')
    actions = {p: launch.plan(shlex.split(line)).action for p, line in lines.items()}
    assert actions == {'published': 'run', 'repdistiller': 'skip', 'letkd': 'resume'}
    (tmp_path / 'commands.txt').write_text('\n'.join(lines.values()) + '\n')
    assert launch.main([str(tmp_path / 'commands.txt'), '--gpus', '', '--dry-run']) == 0
    out = capsys.readouterr().out
    assert '2 to run, 1 finished already' in out
    assert any(line.startswith('[resume]') and '--protocol letkd' in line for line in out.splitlines())
    assert any(line.startswith('[skip]') and '--protocol repdistiller' in line for line in out.splitlines())


def test_a_two_protocol_sweep_on_digits_and_the_recipe_effect(tmp_path, monkeypatch, capsys):
    """KD and DKD (and the student from scratch) under repdistiller and letkd, 1 epoch on digits, through
    scripts/launch.py: each run in its protocol's folder, args.json and summary.json record the protocol and its
    recipe; compare_with_paper.py reads both protocols into the recipe-effect tables; relaunched, every run is
    skipped."""
    import torch

    from models import create_model
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    save = tmp_path / 'save'
    teacher = Path(commands.teacher_path(str(save), 'digits', 'resnet8'))
    teacher.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({'model': create_model('resnet8', 10).state_dict()}, teacher)     # a random digits teacher
    common = ['--num_workers', '0', '--epochs', '1', '--batch_size', '128', '--print_freq', '1000']
    lines = []
    for protocol in ('repdistiller', 'letkd'):
        lines += commands.scratch_lines(['resnet8'], 'digits', 1, str(save), common, protocol)
        lines += commands.distill_lines(['KD', 'DKD'], [('resnet8', 'resnet8')], 'digits', 1, str(save), common,
                                        protocol)
    assert len(lines) == 6
    (tmp_path / 'commands.txt').write_text('\n'.join(lines) + '\n')
    log = tmp_path / 'logs'
    assert launch.main([str(tmp_path / 'commands.txt'), '--gpus', '', '--jobs', '2', '--poll', '0.2', '--log_dir',
                        str(log)]) == 0

    for protocol in ('repdistiller', 'letkd'):
        runs = sorted(p for p in (save / 'student_model' / f'protocol_{protocol}').iterdir() if p.is_dir())
        assert [r.name.split('_digits_')[1].split('_r:')[0] for r in runs] == ['ce', 'dkd', 'kd']
        for run in runs:
            args = json.loads((run / 'args.json').read_text())
            summary = json.loads((run / 'summary.json').read_text())
            assert args['protocol'] == summary['protocol'] == protocol
            assert (args['nesterov'], args['pad_mode'], args['drop_last']) == \
                ((True, 'reflect', True) if protocol == 'letkd' else (False, 'zero', False))
            assert args['epochs'] == 1 and args['learning_rate'] == 0.05
    assert sorted(p.name for p in (save / 'student_model').iterdir()) == ['protocol_letkd', 'protocol_repdistiller']

    capsys.readouterr()
    assert launch.main([str(tmp_path / 'commands.txt'), '--gpus', '', '--jobs', '2', '--poll', '0.2', '--log_dir',
                        str(log)]) == 0
    assert '0 to run, 6 finished already' in capsys.readouterr().out

    out_dir = tmp_path / 'out'
    assert compare_with_paper.main([str(save), '--out', str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert '## [protocol repdistiller] digits: last-epoch top-1 (mean +- std (n))' in out
    assert '## [protocol letkd] digits: last-epoch top-1 (mean +- std (n))' in out
    effect = out.split('## digits: recipe effect per method')[1].split('\n\n')[1]
    rows = [line.split('|')[1].strip() for line in effect.splitlines()[2:]]
    assert rows == ['student', 'KD', 'DKD']
    assert effect.splitlines()[0] == ('| method | pairs | recipe effect letkd - repdistiller (last) | (best) | beyond noise '
                                      '| method - student, repdistiller | method - student, letkd |')
    per_pair = out.split('## digits: recipe effect, protocol letkd - repdistiller')[1].split('\n\n')[1]
    assert len(per_pair.splitlines()) == 2 + 3
    with open(out_dir / 'protocol_comparison.csv') as f:
        cells = {r['method']: r for r in csv.DictReader(f)}
    assert set(cells) == {'student', 'KD', 'DKD'}
    for row in cells.values():
        # one run a side: the noise rule is the fixed 1 point
        assert (row['protocol_a'], row['protocol_b'], row['n_a'], row['n_b'], row['noise_last']) == \
            ('repdistiller', 'letkd', '1', '1', '1.0000')
        diff = float(row['last_mean_b']) - float(row['last_mean_a'])
        assert float(row['diff_last']) == pytest.approx(diff, abs=1e-3)
        assert row['beyond_noise_last'] == str(int(abs(diff) > 1.0))
    with open(out_dir / 'comparison.csv') as f:
        protocols = {(r['protocol'], r['method']) for r in csv.DictReader(f)}
    assert protocols == {(p, m) for p in ('repdistiller', 'letkd') for m in ('KD', 'DKD', 'vanilla')}
    assert not (out_dir / 'comparison_digits.png').exists()      # no published-protocol runs of digits students
    assert METHODS['KD'].distill == 'kd'


def test_the_docs_list_every_protocol_and_new_method():
    """docs/reproducing.md: the protocols table has a column per protocol of the settings table, the new methods'
    settings table a row per new method."""
    from scripts.settings import NEW_METHODS
    section = (ROOT / 'docs' / 'reproducing.md').read_text()
    header = next(line for line in section.splitlines() if line.startswith('| setting |'))
    assert [c.split('`')[1] for c in header.strip().strip('|').split('|')[1:]] == list(PROTOCOLS)
    rows = {line.split('|')[1].strip() for line in section.splitlines() if line.startswith('| ')}
    assert set(NEW_METHODS) <= rows
    assert 'run_cifar_extended.sh' in section and 'protocol_<name>' in section
