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


@pytest.mark.parametrize('script, expected', [
    ('run_cifar_vanilla.sh', 15),          # 6 teachers + 9 students, 1 trial
    ('run_cifar_distill.sh', None),
    ('run_tinyimagenet.sh', None),
])
def test_every_dry_run_line_parses_with_the_cli_parsers(script, expected):
    lines = dry_run_lines(script, '--trials', '1')
    assert lines, script
    if expected is not None:
        assert len(lines) == expected
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == 'python'
        cli = train_student if argv[1] == 'train_student.py' else train_teacher
        opt = cli.get_args_parser().parse_args(argv[2:])      # argparse exits on an unknown flag
        if cli is train_student:
            canonical_name(opt.distill)                        # raises on an unknown method
        cli.resolve_run_dir(opt)


def test_distill_sweep_covers_every_method_and_pair_with_published_settings():
    lines = dry_run_lines('run_cifar_distill.sh', '--trials', '2')
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


def test_launcher_runs_skips_and_resumes(tmp_path, cifar, monkeypatch):
    save = tmp_path / 'save'
    common = f'--data_folder {cifar} --save_dir {save} --num_workers 0 --batch_size 50 --device cpu'
    teacher = f'python train_teacher.py --model resnet8 --epochs 1 {common}'
    student = (f'python train_student.py --path_t {save}/models/resnet8_cifar100_lr_0.05_decay_0.0005_trial_0/'
               f'ckpt_epoch_1.pth --distill kd --model_s resnet8 --epochs 2 {common}')
    commands = tmp_path / 'commands.txt'
    commands.write_text(f'{teacher}\n# barrier\n{student}\n')

    # a student run killed during its 2nd epoch, to be resumed by the launcher
    assert launch.main([str(commands), '--gpus', '', '--poll', '0.1']) == 0
    student_dir = launch.run_dir_of(shlex.split(student))
    summary = json.loads((student_dir / 'summary.json').read_text())
    (student_dir / 'summary.json').unlink()
    metrics = (student_dir / 'metrics.jsonl').read_text().splitlines()
    import torch
    last = torch.load(student_dir / 'last.pth', weights_only=True)
    assert last['epoch'] == 2

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

    log = tmp_path / 'logs'
    assert launch.main([str(commands), '--gpus', '', '--poll', '0.1', '--log_dir', str(log)]) == 0
    resumed = json.loads((student_dir / 'summary.json').read_text())
    assert resumed['epochs'] == 2
    assert resumed['last_acc'] == summary['last_acc']              # same as the uninterrupted run
    assert len((student_dir / 'metrics.jsonl').read_text().splitlines()) == len(metrics) == 2
    assert '--resume' in (log / f'{student_dir.name}.log').read_text()
    assert not (log / f'{launch.run_dir_of(shlex.split(teacher)).name}.log').exists()   # finished: skipped


def test_bench_kd_layer_reports_parameters_and_time_ratios(capsys):
    from scripts import bench_kd_layer
    assert bench_kd_layer.main(['--students', 'resnet20', '--k_penult', '16', '--k_inter', '2', '--batch_size', '2',
                                '--repeats', '1', '--warmup', '0', '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith('| resnet20 | 16 |'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    # letKD-1 adds predictor (16x64 + scale), BN(16) and value (64x16 + scale): 2,082 parameters
    assert cells[2] == '0.278 M' and cells[3] == '+0.002 M'
    assert all(float(c) > 0 for c in cells[5:])          # ms per batch and the three time ratios
