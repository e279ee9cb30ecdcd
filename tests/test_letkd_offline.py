"""letKD/QUEST offline quantizers (helper/letkd_offline.py): the sub-class score matrix by its counting
definition, reproducible files, the cache and its refusals, and letkd1 / letkd2 / quest end to end
through train_student.cli on generated CIFAR-format data."""
import json
import shutil

import numpy as np
import pytest
import torch

import train_student
from distiller_zoo import load_deployed
from distiller_zoo.letkd import LetKDStudent
from helper import letkd_offline
from helper.letkd_offline import build_subclasses, subclass_prototypes, subclass_score_matrix
from helper.util import count_params, load_checkpoint
from models import create_model

FAST = ['--num_workers', '0', '--batch_size', '32', '--device', 'cpu', '--print_freq', '1000']
SMALL_K = ['--k_penult', '16', '--k_inter', '2']


@pytest.fixture(scope='module')
def teacher_ckpt(vanilla_teacher):
    """A random resnet8 'published' teacher: <name>_vanilla/ckpt_epoch_240.pth holding {'model': state_dict}."""
    return vanilla_teacher('resnet8')


def offline_args(data_dir, teacher, save_dir, *extra):
    return ['--path_t', str(teacher), '--model_s', 'resnet8', '--data_folder', data_dir, '--save_dir', str(save_dir),
            '--num_workers', '0', '--device', 'cpu', *SMALL_K, *extra]


# ---------------------------------------------------------------------------------------------- the math

def test_score_matrix_follows_the_counting_definition():
    # sub-class 0: 4 points, nearest prototypes 0, 0, 1, 2; sub-class 1: 1 point -> 1; sub-class 2: 2 -> 0, 2;
    # sub-class 3: no point -> its own one-hot row
    subclass = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    nearest = torch.tensor([0, 0, 1, 2, 1, 0, 2])
    expected = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(subclass_score_matrix(subclass, nearest, 4), expected)


def test_prototypes_are_sub_class_means_and_an_empty_one_keeps_its_centroid():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]])
    centroids = torch.tensor([[1.0, 1.0], [9.0, 9.0], [4.0, 4.0]])
    protos, counts = subclass_prototypes(z, torch.tensor([0, 0, 2]), centroids)
    torch.testing.assert_close(protos, torch.tensor([[1.0, 0.0], [9.0, 9.0], [5.0, 5.0]]))
    assert counts.tolist() == [2, 0, 1]


def test_build_subclasses_matches_an_independent_recomputation():
    rng = np.random.default_rng(0)
    num_classes, k_inter = 3, 2
    labels = np.repeat(np.arange(num_classes), 60)
    features = (rng.normal(size=(180, 5)) + labels[:, None] * 0.8).astype(np.float32)
    tensors, extra = build_subclasses(features, labels, num_classes, k_inter, lda_dim=60, seed=0,
                                      device=torch.device('cpu'))
    assert extra == {'n_comp': 2, 'lda_rank': 2}             # rank = classes - 1 < lda_dim
    z = (features.astype(np.float64) - tensors['xbar'].numpy()) @ tensors['scalings'].numpy()
    centroids = tensors['centroids'].numpy()
    sub = np.array([k_inter * y + np.argmin([np.sum((z[n] - centroids[k_inter * y + j]) ** 2) for j in range(k_inter)])
                    for n, y in enumerate(labels)])
    protos = np.stack([z[sub == s].mean(0) for s in range(num_classes * k_inter)])
    np.testing.assert_allclose(tensors['prototypes'].numpy(), protos, atol=1e-4)
    nearest = np.array([np.argmin(np.sum((protos - z[n]) ** 2, 1)) for n in range(len(z))])
    expected = np.zeros((6, 6))
    for s, t in zip(sub, nearest):
        expected[s, t] += 1
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(tensors['scores'].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(tensors['scores'].sum(1).numpy(), np.ones(6), atol=1e-6)
    assert tensors['counts'].tolist() == np.bincount(sub, minlength=6).tolist()


# ---------------------------------------------------------------------------------------------- files and cache

def test_offline_cli_is_reproducible_and_samples_positions(tmp_path, data_dir, teacher_ckpt):
    paths = {}
    for run in ('a', 'b'):
        assert letkd_offline.cli(offline_args(data_dir, teacher_ckpt, tmp_path / run, '--max_positions', '6000')) == 0
        paths[run] = sorted((tmp_path / run / 'cache' / 'letkd').glob('*.pth'))
    assert [p.name for p in paths['a']] == [p.name for p in paths['b']] and len(paths['a']) == 2
    for a, b in zip(paths['a'], paths['b']):
        assert a.read_bytes() == b.read_bytes()
    inter, penult = (load_checkpoint(p) for p in paths['a'])   # names sort 'inter' before 'penult'
    assert penult['meta']['layer'] == 'penult' and inter['meta']['layer'] == 'inter'
    assert penult['tensors']['centroids'].shape == (16, 64) and penult['tensors']['counts'].sum() == 6000
    assert penult['meta']['n_positions'] == 6000 and penult['meta']['pool_size'] == [8, 8]
    assert penult['meta']['teacher_sha256'] == letkd_offline.file_sha256(teacher_ckpt)
    assert inter['tensors']['scores'].shape == (200, 200) and inter['meta']['n_comp'] == 60
    torch.testing.assert_close(inter['tensors']['scores'].sum(1), torch.ones(200))


def test_mismatching_or_foreign_cache_files_are_refused(tmp_path, data_dir, teacher_ckpt, capsys):
    save = tmp_path / 'save'
    assert letkd_offline.cli(offline_args(data_dir, teacher_ckpt, save, '--layers', 'penult', '--seed', '0')) == 0
    (built,) = (save / 'cache' / 'letkd').glob('*.pth')
    # what the seed-1 file would be called: the seed-0 file put there must be refused, not used
    expected_name = letkd_offline.main(letkd_offline.get_args_parser().parse_args(
        offline_args(data_dir, teacher_ckpt, tmp_path / 'other', '--layers', 'penult', '--seed', '1')))['penult'].name
    shutil.copy(built, built.parent / expected_name)
    capsys.readouterr()
    assert letkd_offline.cli(offline_args(data_dir, teacher_ckpt, save, '--layers', 'penult', '--seed', '1')) == 2
    err = capsys.readouterr().err
    assert 'does not match (seed: file 0, expected 1)' in err and err.count('\n') == 1
    torch.save({'something': torch.zeros(1)}, built)
    assert letkd_offline.cli(offline_args(data_dir, teacher_ckpt, save, '--layers', 'penult', '--seed', '0')) == 2
    assert 'not a letKD quantizer file' in capsys.readouterr().err


def test_too_many_clusters_is_a_user_error(tmp_path, data_dir, teacher_ckpt, capsys):
    # 2 images x 8x8 positions = 128 per class
    args = offline_args(data_dir, teacher_ckpt, tmp_path, '--layers', 'inter', '--k_inter', '200')
    assert letkd_offline.cli(args) == 2
    assert 'fewer than --k_inter 200' in capsys.readouterr().err
    assert not list(tmp_path.rglob('*.pth'))


# ---------------------------------------------------------------------------------------------- end to end

def student_args(data_dir, teacher, save_dir, distill, *extra):
    return ['--path_t', str(teacher), '--model_s', 'resnet8', '--data_folder', data_dir, '--save_dir', str(save_dir),
            '--distill', distill, '--epochs', '1', *SMALL_K, *FAST, *extra]


def run_folder(save_dir, distill):
    return save_dir / 'student_model' / f'S:resnet8_T:resnet8_cifar100_{distill}_r:1.0_a:0.0_b:1.0_1'


def test_letkd1_letkd2_and_quest_train_end_to_end(tmp_path, data_dir, teacher_ckpt, capsys):
    plain = count_params(create_model('resnet8', 100))
    kd_penult, kd_inter = 2 * 16 * 64 + 2 * 16 + 2, 2 * 200 * 64 + 2 * 200 + 2
    expected_params = {'letkd1': plain + kd_penult, 'letkd2': plain + kd_penult + kd_inter, 'quest': plain}
    for distill, roles in (('letkd1', ['penult']), ('letkd2', ['inter', 'penult']), ('quest', ['penult'])):
        assert train_student.cli(student_args(data_dir, teacher_ckpt, tmp_path, distill)) == 0
        out = capsys.readouterr().out
        run_dir = run_folder(tmp_path, distill)
        (record,) = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
        for role in roles:
            assert {f'loss_kl_{role}', f'kl_{role}', f'agree_{role}', f'perplexity_{role}',
                    f'teacher_maxprob_{role}'} <= set(record)
            assert record[f'kl_{role}'] == pytest.approx(record[f'loss_kl_{role}'])    # -b 1
        summary = json.loads((run_dir / 'summary.json').read_text())
        assert summary['params_deployed'] == expected_params[distill]
        model = load_deployed(run_dir / 'ckpt_epoch_1.pth')
        assert isinstance(model, LetKDStudent) == distill.startswith('letkd')
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
        if distill != 'letkd1':                            # the penultimate codebook is built once, then reused
            assert 'penult quantizer: reusing' in out
    args = json.loads((run_folder(tmp_path, 'letkd2') / 'args.json').read_text())
    assert (args['alpha_penult'], args['alpha_inter'], args['letkd_tau']) == (1.0, 1.0, 1.0)
    assert len(list((tmp_path / 'cache' / 'letkd').glob('*.pth'))) == 2

    # resume reloads the quantizers from the cache and continues
    assert train_student.cli(student_args(data_dir, teacher_ckpt, tmp_path, 'letkd2', '--resume', '--epochs', '2')) == 0
    assert 'inter quantizer: reusing' in capsys.readouterr().out
    lines = (run_folder(tmp_path, 'letkd2') / 'metrics.jsonl').read_text().splitlines()
    assert [json.loads(line)['epoch'] for line in lines] == [1, 2]


def test_offline_error_leaves_no_run_folder(tmp_path, data_dir, teacher_ckpt, capsys):
    assert train_student.cli(student_args(data_dir, teacher_ckpt, tmp_path, 'letkd2', '--k_inter', '129')) == 2
    assert 'fewer than --k_inter 129' in capsys.readouterr().err
    assert not (tmp_path / 'student_model').exists()
