"""End to end: train_teacher.py and train_student.py on tiny data in the real CIFAR-100 format.

Covers the output contract, a RepDistiller-layout teacher file, exact resume, and every user error
the CLIs promise to report as one line on stderr with exit code 2 and nothing written.
"""
import hashlib
import json
import re

import pytest
import torch
import torch.nn.functional as F

import train_student
import train_teacher
from dataset import get_dataloaders
from distiller_zoo import load_deployed
from helper.loops import validate
from helper.util import load_checkpoint
from models import create_model

FAST = ['--num_workers', '0', '--batch_size', '32', '--device', 'cpu', '--print_freq', '1000']
SUMMARY_KEYS = {'last_acc', 'best_acc', 'best_epoch', 'epochs', 'params_deployed', 'seed', 'distill', 'model_s',
                'model_t', 'dataset', 'git_sha', 'torch_version', 'device_name', 'wall_time_s'}
METRIC_KEYS = {'epoch', 'lr', 'train_loss', 'train_acc', 'test_loss', 'test_acc', 'test_acc_top5', 'time'}


@pytest.fixture(scope='module')
def teacher_ckpt(tmp_path_factory, data_dir):
    """A resnet14 teacher trained here for 1 epoch, in our own run-folder layout."""
    save = tmp_path_factory.mktemp('teacher_save')
    assert train_teacher.cli(['--model', 'resnet14', '--epochs', '1', '--data_folder', data_dir,
                              '--save_dir', str(save), *FAST]) == 0
    return save / 'models' / 'resnet14_cifar100_lr_0.05_decay_0.0005_trial_0' / 'ckpt_epoch_1.pth'


def student_args(data_dir, save_dir, teacher, *extra):
    return ['--path_t', str(teacher), '--model_s', 'resnet8', '--data_folder', data_dir,
            '--save_dir', str(save_dir), *FAST, *extra]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


def test_teacher_run_writes_the_output_contract(teacher_ckpt):
    run_dir = teacher_ckpt.parent
    names = {p.name for p in run_dir.iterdir()}
    assert {'args.json', 'metrics.jsonl', 'summary.json', 'ckpt_epoch_1.pth', 'resnet14_best.pth', 'last.pth'} <= names
    assert any(n.startswith('events.out.tfevents') for n in names)
    (record,) = read_metrics(run_dir)
    assert METRIC_KEYS <= set(record) and 'loss_ce' in record and record['epoch'] == 1
    summary = json.loads((run_dir / 'summary.json').read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary['params_deployed'] == 181_108 and summary['epochs'] == 1
    ckpt = load_checkpoint(teacher_ckpt)                 # weights_only load works for our files
    assert set(ckpt) == {'epoch', 'model', 'accuracy', 'deploy'} and ckpt['epoch'] == 1
    model = create_model('resnet14', 100)
    model.load_state_dict(ckpt['model'], strict=True)
    best = load_checkpoint(run_dir / 'resnet14_best.pth')
    assert set(best) == {'epoch', 'model', 'best_acc', 'deploy'}
    # the checkpoint alone is enough to rebuild and evaluate the model
    rebuilt = load_deployed(teacher_ckpt)
    assert not rebuilt.training
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(rebuilt(x), model.eval()(x))


def test_student_kd_trains_from_a_teacher_trained_here(tmp_path, data_dir, teacher_ckpt, capsys):
    assert train_student.cli(student_args(data_dir, tmp_path, teacher_ckpt, '--distill', 'kd', '--epochs', '1')) == 0
    out = capsys.readouterr().out
    assert 'teacher accuracy:' in out
    run_dir = tmp_path / 'student_model' / 'S:resnet8_T:resnet14_cifar100_kd_r:0.1_a:0.9_b:0.0_1'
    summary = json.loads((run_dir / 'summary.json').read_text())
    assert summary['distill'] == 'kd' and summary['model_t'] == 'resnet14' and summary['params_deployed'] == 83_892
    (record,) = read_metrics(run_dir)
    assert {'loss_ce', 'loss_kd'} <= set(record)
    args = json.loads((run_dir / 'args.json').read_text())
    assert args['gamma'] == 0.1 and args['alpha'] == 0.9          # KD's published weights by default


@torch.no_grad()
def nearest_mean_teacher(data_dir, seed=3):
    """A resnet8 whose weights matter: random convs, random BN running statistics, and an fc whose row c is the
    unit feature of the test image of class c (one per class), so in eval mode it classifies the test split
    perfectly by Cauchy-Schwarz, while a fresh random init scores about 1%."""
    torch.manual_seed(seed)
    model = create_model('resnet8', 100)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    val_loader = get_dataloaders('cifar100', data_dir, batch_size=32, num_workers=0, download=False).val_loader
    feats, labels = zip(*[(model(image, is_feat=True)[0][-1], target) for image, target in val_loader])
    feats, labels = torch.cat(feats), torch.cat(labels)
    assert sorted(labels.tolist()) == list(range(100))
    model.fc.weight.zero_()
    model.fc.weight[labels] = F.normalize(feats, dim=1)
    model.fc.bias.zero_()
    return model, val_loader


def test_repdistiller_layout_teacher_loads_strictly(tmp_path, data_dir, capsys):
    """A file laid out like RepDistiller's published ckpt_epoch_240.pth (epoch, model, accuracy, optimizer). The
    printed teacher accuracy is validate() of the file's weights loaded here independently, and those weights
    score far from a random init, so a teacher left at random init (or loaded without its BN buffers) fails."""
    model, val_loader = nearest_mean_teacher(data_dir)
    folder = tmp_path / 'models' / 'resnet8_vanilla'
    folder.mkdir(parents=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.save({'epoch': 240, 'model': model.state_dict(), 'accuracy': torch.tensor(70.0),
                'optimizer': optimizer.state_dict()}, folder / 'ckpt_epoch_240.pth')

    independent = create_model('resnet8', 100)
    independent.load_state_dict(torch.load(folder / 'ckpt_epoch_240.pth', weights_only=True)['model'], strict=True)
    expected = validate(independent, val_loader, torch.device('cpu'))['acc']
    torch.manual_seed(4)
    fresh = validate(create_model('resnet8', 100), val_loader, torch.device('cpu'))['acc']
    assert expected == pytest.approx(100.0) and fresh < 10.0

    code = train_student.cli(student_args(data_dir, tmp_path, folder / 'ckpt_epoch_240.pth',
                                          '--distill', 'kd', '--epochs', '1'))
    assert code == 0
    (printed,) = re.findall(r'^teacher accuracy: (\S+)$', capsys.readouterr().out, flags=re.M)
    assert printed == f'{expected:.2f}'
    summary = json.loads((tmp_path / 'student_model' / 'S:resnet8_T:resnet8_cifar100_kd_r:0.1_a:0.9_b:0.0_1' /
                          'summary.json').read_text())
    assert summary['teacher_acc'] == pytest.approx(expected)


def test_optimizer_flags_and_deterministic_reach_the_run(tmp_path, data_dir, teacher_ckpt, monkeypatch):
    """--nesterov, --momentum and --weight_decay reach the SGD that trains (seen at construction and in last.pth's
    optimizer state); --deterministic is in force while the epochs run."""
    import helper.run as run_module
    built, during_epochs = [], []
    real_sgd, real_epoch = torch.optim.SGD, run_module.train_one_epoch

    def spy_sgd(params, *args, **kwargs):
        optimizer = real_sgd(params, *args, **kwargs)
        built.append(optimizer)
        return optimizer

    def spy_epoch(*args, **kwargs):
        during_epochs.append((torch.are_deterministic_algorithms_enabled(), built[-1].param_groups[0].copy()))
        return real_epoch(*args, **kwargs)

    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                torch.backends.cudnn.benchmark)
    monkeypatch.setenv('CUBLAS_WORKSPACE_CONFIG', ':4096:8')     # restored afterwards; the run may set it
    monkeypatch.setattr(run_module.torch.optim, 'SGD', spy_sgd)
    monkeypatch.setattr(run_module, 'train_one_epoch', spy_epoch)
    try:
        torch.use_deterministic_algorithms(False)
        code = train_student.cli(student_args(data_dir, tmp_path, teacher_ckpt, '--distill', 'kd', '--epochs', '1',
                                              '--nesterov', '--momentum', '0.8', '--weight_decay', '0.003',
                                              '--deterministic'))
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[1:]
    assert code == 0
    (optimizer,) = built
    ((deterministic, group),) = during_epochs
    assert deterministic
    assert (group['nesterov'], group['momentum'], group['weight_decay']) == (True, 0.8, 0.003)
    saved = load_checkpoint(tmp_path / 'student_model' / 'S:resnet8_T:resnet14_cifar100_kd_r:0.1_a:0.9_b:0.0_1' /
                            'last.pth')['optimizer']['param_groups']
    assert [(g['nesterov'], g['momentum'], g['weight_decay']) for g in saved] == [(True, 0.8, 0.003)]


def test_teacher_far_from_its_published_accuracy_is_flagged(tmp_path, data_dir, vanilla_teacher, capsys, monkeypatch):
    """A resnet56 teacher (published: 72.34 on CIFAR-100) at random init scores about 1%: one warning line on
    stderr naming both numbers. Training is skipped (the warning comes before it); resnet14 has no published
    number and gets no warning."""
    monkeypatch.setattr(train_student, 'fit', lambda *args, **kwargs: {})
    for name in ('resnet56', 'resnet14'):
        code = train_student.cli(student_args(data_dir, tmp_path / name, vanilla_teacher(name), '--distill', 'kd',
                                              '--epochs', '1'))
        assert code == 0
        captured = capsys.readouterr()
        (acc,) = re.findall(r'^teacher accuracy: (\S+)$', captured.out, flags=re.M)
        warnings = [line for line in captured.err.splitlines() if line.startswith('warning:')]
        if name == 'resnet56':
            assert float(acc) < 70.34
            assert warnings == [f'warning: teacher resnet56 scores {acc}, the published checkpoint 72.34; '
                                'check that this is the checkpoint you meant']
        else:
            assert warnings == []


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, data_dir, teacher_ckpt, monkeypatch):
    flags = ['--distill', 'kd', '--epochs', '3', '--lr_decay_epochs', '1,2', '--seed', '5']
    full, killed = tmp_path / 'full', tmp_path / 'killed'
    assert train_student.cli(student_args(data_dir, full, teacher_ckpt, *flags)) == 0

    import helper.run as run_module
    real_epoch = run_module.train_one_epoch

    def dies_in_epoch_3(*args, epoch, **kwargs):
        if epoch == 3:
            raise KeyboardInterrupt('killed')
        return real_epoch(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(run_module, 'train_one_epoch', dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_student.cli(student_args(data_dir, killed, teacher_ckpt, *flags))
    monkeypatch.setattr(run_module, 'train_one_epoch', real_epoch)
    assert train_student.cli(student_args(data_dir, killed, teacher_ckpt, *flags, '--resume')) == 0

    name = 'S:resnet8_T:resnet14_cifar100_kd_r:0.1_a:0.9_b:0.0_1'
    a, b = full / 'student_model' / name, killed / 'student_model' / name
    strip = lambda records: [{k: v for k, v in r.items() if k != 'time'} for r in records]  # noqa: E731
    assert strip(read_metrics(a)) == strip(read_metrics(b))
    assert [r['epoch'] for r in read_metrics(b)] == [1, 2, 3]
    wa, wb = load_checkpoint(a / 'last.pth')['model'], load_checkpoint(b / 'last.pth')['model']
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (json.loads((d / 'summary.json').read_text()) for d in (a, b))
    assert (sa['last_acc'], sa['best_acc'], sa['best_epoch']) == (sb['last_acc'], sb['best_acc'], sb['best_epoch'])


def test_quickstart_runs_its_whole_table_for_one_epoch(tmp_path, monkeypatch, capsys):
    """scripts/quickstart.py: `--help` as a script, then main() at its smallest settings (1 epoch, resnet8 teacher
    and student, 1 thread). A full quickstart epoch on the 1437 digits takes minutes on 2 shared cores, so the
    digits splits are cut to their first 150 train / 50 test images here (monkeypatched); every row still runs."""
    import subprocess
    import sys
    from pathlib import Path

    import faiss

    import dataset.digits as digits
    from scripts import quickstart

    root = Path(__file__).resolve().parents[1]
    help_run = subprocess.run([sys.executable, str(root / 'scripts' / 'quickstart.py'), '--help'],
                              capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and '--epochs' in help_run.stdout

    images, labels, train_idx, test_idx = digits._digits_arrays()
    monkeypatch.setattr(digits, '_digits_arrays', lambda: (images, labels, train_idx[:150], test_idx[:50]))
    save = tmp_path / 'quickstart'
    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        code = quickstart.main(['--epochs', '1', '--teacher', 'resnet8', '--student', 'resnet8', '--device', 'cpu',
                                '--threads', '1', '--save_dir', str(save)])
    finally:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(faiss_threads)
    assert code == 0
    out = capsys.readouterr().out
    rows = [[cell.strip() for cell in line.strip('|').split('|')] for line in out.splitlines()
            if line.startswith('| ') and not line.startswith('| run ')]
    assert [(r[0], r[1]) for r in rows] == [('teacher', 'resnet8'), ('student from scratch', 'resnet8'),
                                            ('KD', 'resnet8'), ('CRD', 'resnet8'), ('letKD-1', 'resnet8'),
                                            ('letKD-2', 'resnet8')]
    (teacher,) = [json.loads(p.read_text()) for p in (save / 'models').glob('*/summary.json')]
    students = [json.loads(p.read_text()) for p in (save / 'student_model').glob('*/summary.json')]
    assert sorted(s['distill'] for s in students) == ['ce', 'crd', 'kd', 'letkd1', 'letkd2']
    assert all(s['epochs'] == 1 and s['dataset'] == 'digits' for s in [teacher, *students])
    for row in rows:
        assert 0 <= float(row[2]) <= float(row[3]) <= 100              # last <= best accuracy


def _tree_digest(root):
    if not root.exists():
        return None
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file()}


def assert_user_error(capsys, code, match):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith('error: '), err
    assert match in err[0]


@pytest.mark.parametrize('case, match', [
    ('missing_teacher', 'teacher checkpoint not found'),
    ('wrong_architecture', 'does not match architecture resnet20'),
    ('unknown_student', "unknown --model_s 'resnet9'"),
    ('unknown_method', "unknown --distill 'fitnett'"),
    ('missing_data', 'CIFAR-100'),
    ('resume_without_run', 'no run to resume'),
    ('no_teacher_given', 'pass --path_t'),
    ('bad_method_option', '--nce_k must be at least 1'),
])
def test_student_user_errors_write_nothing(tmp_path, data_dir, teacher_ckpt, capsys, case, match):
    save = tmp_path / 'save'
    args = student_args(data_dir, save, teacher_ckpt, '--distill', 'kd', '--epochs', '1')
    if case == 'missing_teacher':
        args[1] = str(tmp_path / 'nope' / 'ckpt.pth')
    elif case == 'wrong_architecture':
        folder = tmp_path / 'resnet20_vanilla'        # the folder name says resnet20, the weights are resnet14
        folder.mkdir()
        (folder / 'ckpt_epoch_240.pth').write_bytes(teacher_ckpt.read_bytes())
        args[1] = str(folder / 'ckpt_epoch_240.pth')
    elif case == 'unknown_student':
        args[3] = 'resnet9'
    elif case == 'unknown_method':
        args += ['--distill', 'fitnett']
    elif case == 'missing_data':
        args += ['--data_folder', str(tmp_path / 'no_data'), '--no_download']
    elif case == 'resume_without_run':
        args += ['--resume']
    elif case == 'no_teacher_given':
        args = args[2:]
    elif case == 'bad_method_option':          # checked by the method before any data is read
        args += ['--distill', 'crd', '--nce_k', '0']
    assert_user_error(capsys, train_student.cli(args), match)
    assert not save.exists()
    assert not (tmp_path / 'no_data').exists()


def test_existing_run_folder_is_refused_and_left_untouched(tmp_path, data_dir, teacher_ckpt, capsys):
    args = student_args(data_dir, tmp_path, teacher_ckpt, '--distill', 'kd', '--epochs', '1')
    assert train_student.cli(args) == 0
    before = _tree_digest(tmp_path / 'student_model')
    capsys.readouterr()
    assert_user_error(capsys, train_student.cli(args), 'already exists')
    assert _tree_digest(tmp_path / 'student_model') == before
    assert train_student.cli(args + ['--overwrite']) == 0          # the explicit way to replace it


def test_teacher_cli_user_errors(tmp_path, data_dir, capsys):
    save = tmp_path / 'save'
    code = train_teacher.cli(['--model', 'resnet9000', '--data_folder', data_dir, '--save_dir', str(save), *FAST])
    assert_user_error(capsys, code, "unknown --model 'resnet9000'")
    code = train_teacher.cli(['--model', 'resnet8', '--data_folder', data_dir, '--save_dir', str(save),
                              '--resume', *FAST])
    assert_user_error(capsys, code, 'no run to resume')
    assert not save.exists()
