"""eval_student.py: any checkpoint this project writes (letKD-2 with its KD layers, SimKD with the projector and
the teacher's classifier, a plain student), a RepDistiller-layout teacher, evaluated end to end on generated
CIFAR-100 data; the numbers equal the training run's own evaluation; wrong data sets and damaged files are one
line."""
from __future__ import annotations

import json

import pytest

import eval_student
import train_student
from helper.util import load_checkpoint

FLAGS = ['--num_workers', '0', '--batch_size', '32', '--device', 'cpu', '--print_freq', '1000', '--epochs', '1']


@pytest.fixture(scope='module')
def runs(tmp_path_factory, data_dir, vanilla_teacher):
    """One epoch of kd, simkd and letkd2 (resnet14 -> resnet8): their run folders."""
    save = tmp_path_factory.mktemp('eval_runs')
    teacher = vanilla_teacher('resnet14')
    folders = {}
    for method, extra in (('kd', []), ('simkd', []), ('letkd2', ['--k_penult', '16', '--k_inter', '2', '--lda_dim', '5'])):
        assert train_student.cli(['--path_t', str(teacher), '--model_s', 'resnet8', '--distill', method,
                                  '--data_folder', data_dir, '--no_download', '--save_dir', str(save), *FLAGS,
                                  *extra]) == 0
        folders[method] = next(p for p in (save / 'student_model').iterdir() if f'_{method}_' in p.name)
    return folders


def evaluate(path, data_dir, *extra):
    return eval_student.main(eval_student.get_args_parser().parse_args(
        [str(path), '--data_folder', data_dir, '--no_download', '--device', 'cpu', '--num_workers', '0',
         '--batch_size', '50', *extra]))


@pytest.mark.parametrize('method', ['kd', 'simkd', 'letkd2'])
def test_a_deployed_student_scores_what_its_run_logged(runs, data_dir, method, tmp_path):
    run = runs[method]
    ckpt = run / 'ckpt_epoch_1.pth'
    out = tmp_path / 'eval.json'
    result = evaluate(ckpt, data_dir, '--json', str(out))
    logged = json.loads((run / 'metrics.jsonl').read_text().splitlines()[-1])
    summary = json.loads((run / 'summary.json').read_text())
    assert result['dataset'] == 'cifar100' and result['images'] == 100
    assert result['top1'] == pytest.approx(logged['test_acc']) and result['top5'] == pytest.approx(logged['test_acc_top5'])
    assert result['loss'] == pytest.approx(logged['test_loss'], rel=1e-4)
    assert result['params'] == summary['params_deployed'] and result['macs'] == summary['macs_deployed']
    assert result['images_per_s'] > 0 and json.loads(out.read_text())['top1'] == result['top1']
    assert result['kind'] == {'kd': 'plain', 'simkd': 'simkd', 'letkd2': 'letkd'}[method]
    assert result['folded'] == (method == 'letkd2')
    if method == 'letkd2':          # as trained: the same accuracy and loss as folded (up to rounding)
        unfolded = evaluate(ckpt, data_dir, '--no_fold')
        assert not unfolded['folded'] and unfolded['top1'] == result['top1']
        assert unfolded['loss'] == pytest.approx(result['loss'], rel=1e-4)


def test_a_repdistiller_teacher_is_built_from_its_folder_name(vanilla_teacher, data_dir):
    result = evaluate(vanilla_teacher('resnet14'), data_dir)
    assert result['model'] == 'resnet14' and result['kind'] == 'plain' and 0 <= result['top1'] <= 100


def test_torchvision_weights_on_imagenet_folders(monkeypatch, tmp_path):
    from dataset.generated import write_imagenet_folders
    from helper import teachers
    from tests.test_imagenet_zoo import fake_torchvision_loader
    monkeypatch.setattr(teachers, 'state_dict_loader', fake_torchvision_loader(3))      # no download here
    write_imagenet_folders(tmp_path, num_classes=3, n_per_class=2)
    result = evaluate('torchvision:ResNet18', str(tmp_path), '--crop_size', '32')
    assert result['kind'] == 'torchvision' and result['dataset'] == 'imagenet' and result['images'] == 6
    assert result['params'] == sum(v.numel() for k, v in fake_torchvision_loader(3)('ResNet18').items()
                                   if 'running' not in k and 'num_batches' not in k)
    assert eval_student.cli(['torchvision:ResNet18', '--dataset', 'cifar100', '--device', 'cpu']) == 2


def test_wrong_data_sets_and_damaged_files_are_one_line_errors(runs, data_dir, tmp_path, capsys):
    ckpt = runs['kd'] / 'ckpt_epoch_1.pth'
    assert eval_student.cli([str(ckpt), '--dataset', 'digits', '--device', 'cpu']) == 2
    assert capsys.readouterr().err.strip() == f'error: {ckpt} was trained on cifar100; evaluate it with --dataset cifar100'
    damaged = tmp_path / 'damaged.pth'
    damaged.write_bytes(ckpt.read_bytes()[:200])
    assert eval_student.cli([str(damaged), '--device', 'cpu']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'error: cannot read checkpoint {damaged}') and '\n' not in err
    no_arch = tmp_path / 'weights' / 'x.pth'
    no_arch.parent.mkdir()
    no_arch.write_bytes(ckpt.read_bytes())
    bare = load_checkpoint(no_arch)
    assert 'deploy' in bare          # ours records it; strip it to look like a file from elsewhere
    import torch
    torch.save({'model': bare['model']}, no_arch)
    assert eval_student.cli([str(no_arch), '--data_folder', data_dir, '--device', 'cpu', '--num_workers', '0']) == 2
    assert 'pass --model' in capsys.readouterr().err
    assert eval_student.cli([str(no_arch), '--model', 'resnet8', '--data_folder', data_dir, '--device', 'cpu',
                             '--num_workers', '0', '--no_download']) == 0
