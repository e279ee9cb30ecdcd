"""letKD/QUEST offline quantizers (helper/letkd_offline.py): the LDA against sklearn's, the sub-class score
matrix by its counting definition, reproducible files built one layer at a time, the cache and its refusals,
and letkd1 / letkd2 / quest end to end through train_student.cli on generated CIFAR-format data."""
import hashlib
import json
import shutil
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sklearn
import torch
import torch.nn as nn
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

import train_student
import distiller_zoo.letkd as letkd_module
from distiller_zoo import build_distiller, load_deployed
from distiller_zoo.letkd import LetKDStudent
from helper import letkd_offline
from helper.errors import UserError
from helper.letkd_offline import build_subclasses, fit_lda, subclass_prototypes, subclass_score_matrix
from helper.util import count_params, load_checkpoint
from models import create_model
from tests.fixtures_data import read_cifar100_split
from tests.options import data_info, student_options

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


def sklearn_scale(n, num_classes):
    """sklearn's svd solver whitens the within-class covariance S_w / N since 1.9 (ours too), S_w / (N - C)
    before: its projection is ours times sqrt((N - C) / N) there."""
    version = tuple(int(part) for part in sklearn.__version__.split('.')[:2])
    return 1.0 if version >= (1, 9) else np.sqrt((n - num_classes) / n)


def lda_transform(features, labels):
    """sklearn's own LDA projection (solver 'svd', all components), in our scale convention, independent of
    build_subclasses' tensors."""
    z = LinearDiscriminantAnalysis(solver='svd').fit(features, labels).transform(features).astype(np.float64)
    return z / sklearn_scale(len(labels), len(np.unique(labels)))


def module_projection(features, tensors):
    return (features.astype(np.float64) - tensors['xbar'].numpy()) @ tensors['scalings'].numpy()


def assert_same_up_to_column_signs(got, expected):
    """got == expected * s with one sign s per column; returns s."""
    assert got.shape == expected.shape
    signs = np.sign(np.sum(got * expected, 0))
    assert np.all(signs != 0)
    np.testing.assert_allclose(got, expected * signs, rtol=1e-4, atol=1e-4)
    return signs


def lda_problem(singular):
    """5 classes of unequal sizes in 12-d with correlated noise; ``singular`` adds a constant feature and one
    that copies another (S_w singular: both directions must be dropped, as sklearn does)."""
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(5), [300, 120, 200, 80, 200])
    x = rng.normal(size=(5, 12))[labels] * 2 + rng.normal(size=(900, 12)) @ rng.normal(size=(12, 12))
    if singular:
        x = np.column_stack([x, np.full(900, 3.0), x[:, 2]])
    return x.astype(np.float32), labels


@pytest.mark.parametrize('singular', [False, True])
def test_fit_lda_reproduces_sklearns_svd_solver(singular):
    features, labels = lda_problem(singular)
    lda = LinearDiscriminantAnalysis(solver='svd').fit(features, labels)
    xbar, scalings = fit_lda(features, labels, 5)
    # xbar_: the class means weighted by the empirical priors (= the mean of all rows)
    np.testing.assert_allclose(xbar, lda.xbar_, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xbar, features.astype(np.float64).mean(0), rtol=1e-9, atol=1e-9)
    assert scalings.shape == lda.scalings_.shape == (features.shape[1], 4)
    # the same projection up to one sign per component
    z = (features - xbar) @ scalings
    assert_same_up_to_column_signs(z, lda_transform(features, labels))
    # our convention: identity within-class covariance (S_w / N), between-class variance decreasing
    means = np.stack([z[labels == c].mean(0) for c in range(5)])
    within = (z - means[labels]).T @ (z - means[labels]) / len(z)
    np.testing.assert_allclose(within, np.eye(4), atol=1e-6)
    between = np.bincount(labels) @ (means - z.mean(0)) ** 2
    assert np.all(np.diff(between) < 0)
    # chunking the two passes does not change the result
    xbar_chunked, scalings_chunked = fit_lda(features, labels, 5, chunk_bytes=1000)
    np.testing.assert_allclose(xbar_chunked, xbar, rtol=1e-12)
    np.testing.assert_allclose(scalings_chunked, scalings, rtol=1e-9, atol=1e-12)


def test_fit_lda_refuses_features_without_within_class_variation():
    features = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)
    with pytest.raises(UserError, match='do not vary within the classes'):
        fit_lda(features, np.repeat(np.arange(3), 4), 3)


def test_build_subclasses_matches_an_independent_recomputation():
    rng = np.random.default_rng(0)
    num_classes, k_inter = 3, 2
    labels = np.repeat(np.arange(num_classes), 60)
    features = (rng.normal(size=(180, 5)) + labels[:, None] * 0.8).astype(np.float32)
    tensors, extra = build_subclasses(features, labels, num_classes, k_inter, lda_dim=60, seed=0,
                                      device=torch.device('cpu'))
    assert extra == {'n_comp': 2, 'lda_rank': 2}             # rank = classes - 1 < lda_dim
    # the projection is sklearn's LinearDiscriminantAnalysis(solver='svd').transform, up to a sign per column
    z = lda_transform(features, labels)
    assert z.shape == (180, 2)
    signs = assert_same_up_to_column_signs(module_projection(features, tensors), z)
    z = z * signs
    # the centroids are k-means output (checked on separable data below); given them, the rest by definition
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
    # --lda_dim below the rank keeps sklearn's leading components
    tensors, extra = build_subclasses(features, labels, num_classes, k_inter, lda_dim=1, seed=0,
                                      device=torch.device('cpu'))
    assert extra == {'n_comp': 1, 'lda_rank': 2} and tuple(tensors['centroids'].shape) == (6, 1)
    assert_same_up_to_column_signs(module_projection(features, tensors), lda_transform(features, labels)[:, :1])


def test_build_subclasses_finds_well_separated_sub_clusters():
    """4 classes in 3-d (LDA keeps all 3 components), each made of 2 tight sub-clusters of unequal sizes, 6
    apart along a class-specific axis: every centroid is the mean of its sub-cluster's projected points, in its
    own class's block of rows; the counts are the sub-cluster sizes and s_T is the identity."""
    rng = np.random.default_rng(1)
    num_classes, k_inter = 4, 2
    class_means = 20.0 * np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    sizes = [(30, 18), (25, 35), (40, 22), (20, 28)]
    features, labels, truth = [], [], []
    for c in range(num_classes):
        for j in range(k_inter):
            offset = np.zeros(3)
            offset[c % 3] = 3.0 if j == 0 else -3.0
            features.append(class_means[c] + offset + 0.1 * rng.normal(size=(sizes[c][j], 3)))
            labels += [c] * sizes[c][j]
            truth += [k_inter * c + j] * sizes[c][j]
    order = rng.permutation(len(labels))
    features = np.concatenate(features).astype(np.float32)[order]
    labels, truth = np.array(labels)[order], np.array(truth)[order]
    tensors, extra = build_subclasses(features, labels, num_classes, k_inter, lda_dim=60, seed=0,
                                      device=torch.device('cpu'))
    assert extra == {'n_comp': 3, 'lda_rank': 3}
    z = lda_transform(features, labels)
    z = z * assert_same_up_to_column_signs(module_projection(features, tensors), z)
    centroids, counts, protos = (tensors[k].numpy() for k in ('centroids', 'counts', 'prototypes'))
    for c in range(num_classes):
        block = range(k_inter * c, k_inter * (c + 1))
        means = {s: z[truth == s].mean(0) for s in block}
        # k-means numbers the sub-clusters of a class in any order: match each true sub-cluster to its centroid
        match = {s: min(block, key=lambda k: np.sum((centroids[k] - means[s]) ** 2)) for s in block}
        assert sorted(match.values()) == list(block)
        for s, k in match.items():
            np.testing.assert_allclose(centroids[k], means[s], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(protos[k], means[s], rtol=1e-4, atol=1e-4)
            assert counts[k] == np.sum(truth == s)
    np.testing.assert_allclose(tensors['scores'].numpy(), np.eye(8), atol=1e-6)


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
    assert penult['meta']['teacher_sha256'] == hashlib.sha256(Path(teacher_ckpt).read_bytes()).hexdigest()
    assert inter['meta']['teacher_sha256'] == penult['meta']['teacher_sha256']
    assert inter['tensors']['scores'].shape == (200, 200) and inter['meta']['n_comp'] == 60
    torch.testing.assert_close(inter['tensors']['scores'].sum(1), torch.ones(200))


def test_layers_are_gathered_and_built_one_at_a_time(tmp_path, data_dir, teacher_ckpt, monkeypatch):
    """Both layers missing: one teacher pass per layer, inter first, and the inter features (rows and labels) are
    freed before the penultimate pass starts."""
    calls, kept = [], []
    original = letkd_offline.collect_features

    def spy(teacher, arch, roles, *args, **kwargs):
        calls.append((roles, [ref() is None for ref in kept]))
        out = original(teacher, arch, roles, *args, **kwargs)
        kept.extend(weakref.ref(array) for pair in out.values() for array in pair)
        return out

    monkeypatch.setattr(letkd_offline, 'collect_features', spy)
    assert letkd_offline.cli(offline_args(data_dir, teacher_ckpt, tmp_path, '--max_positions', '3000')) == 0
    assert calls == [(('inter',), []), (('penult',), [True, True])]
    assert all(ref() is None for ref in kept)


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


# ---------------------------------------------------------------------------------------------- features and images

class PositionCode(nn.Module):
    """Stands at resnet8's KD places ('layer3.0' inside 'layer3'): from constant images it makes 8x8 maps whose row
    at (i, j) is (the image's pixel value, i, j)."""

    def forward(self, x):
        b = x.shape[0]
        grid = torch.arange(8.0)
        return torch.stack([x[:, 0, :8, :8], grid.view(1, 8, 1).expand(b, 8, 8), grid.view(1, 1, 8).expand(b, 8, 8)], 1)


class CodedTeacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer3 = nn.Sequential(PositionCode())

    def forward(self, x):
        return self.layer3(x)


def test_sampled_positions_keep_the_label_of_their_image():
    """11 constant images (pixel value = image index) in batches of 3, labels shuffled; 8x8 'inter' rows and
    4x4-pooled 'penult' rows, --max_positions 100 of 704 / 176: each kept row comes from a distinct position,
    in image, row, column order, and carries the label of the image it came from."""
    n_images = 11
    labels = torch.from_numpy(np.random.default_rng(0).permutation(n_images) % 4)
    images = torch.arange(n_images, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 32, 32).contiguous()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels, torch.arange(n_images)),
                                         batch_size=3, shuffle=False)
    for max_positions, expected_rows in ((100, {'inter': 100, 'penult': 100}), (10 ** 6, {'inter': 704, 'penult': 176})):
        out = letkd_offline.collect_features(CodedTeacher(), 'resnet8', ('inter', 'penult'),
                                             {'inter': (8, 8), 'penult': (4, 4)}, loader, n_images,
                                             max_positions=max_positions, seed=0, device=torch.device('cpu'))
        for role, (features, row_labels) in out.items():
            assert features.shape == (expected_rows[role], 3) and row_labels.shape == (expected_rows[role],)
            image = np.rint(features[:, 0]).astype(int)
            np.testing.assert_array_equal(features[:, 0], image)
            np.testing.assert_array_equal(row_labels, labels.numpy()[image])
            positions = [tuple(row) for row in np.column_stack([image, features[:, 1:]]).tolist()]
            assert positions == sorted(set(positions))           # distinct, in image, row, column order
            if role == 'penult':                                 # 2x2 windows of the 8x8 map
                assert set(features[:, 1].tolist()) <= {0.5, 2.5, 4.5, 6.5}
            if max_positions == 100:
                assert len(set(image.tolist())) >= 8             # a sample over the whole data set
        # the two roles draw their own samples
        if max_positions == 100:
            assert not np.array_equal(out['inter'][0][:, 1:], out['penult'][0][:, 1:])


def test_offline_step_reads_the_training_images_unaugmented_and_in_order(tmp_path, data_dir, teacher_ckpt,
                                                                        monkeypatch):
    """The features come from the train split with the test transform (ToTensor + RepDistiller's normalisation,
    no crop or flip), in file order; both the CLI and Distiller.prepare use ``train_eval_loader``."""
    seen = {}
    original = letkd_offline.collect_features

    def spy(teacher, arch, roles, pool_sizes, loader, n_images, **kw):
        seen['loader'] = loader
        seen['batches'] = [(batch[0].clone(), batch[1].clone()) for batch in loader]
        return original(teacher, arch, roles, pool_sizes, seen['batches'], n_images, **kw)

    monkeypatch.setattr(letkd_offline, 'collect_features', spy)
    args = offline_args(data_dir, teacher_ckpt, tmp_path, '--layers', 'penult', '--max_positions', '2000',
                        '--batch_size', '64')
    assert letkd_offline.cli(args) == 0
    images = torch.cat([b[0] for b in seen['batches']])
    pixels, fine = read_cifar100_split(data_dir, train=True)
    mean, std = torch.tensor([0.5071, 0.4867, 0.4408]), torch.tensor([0.2675, 0.2565, 0.2761])
    expected = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    assert torch.cat([b[1] for b in seen['batches']]).tolist() == fine
    again = [batch[0] for batch in seen['loader']]            # a second pass gives the same images
    assert torch.equal(torch.cat(again), images)

    # Distiller.prepare hands the offline step the bundle's train_eval_loader (not the augmented train_loader)
    calls = []

    def fake_ensure(teacher, **kw):
        calls.append(kw['loader'])
        return {'penult': {'centroids': torch.zeros(16, 64)}}

    monkeypatch.setattr(letkd_module, 'ensure_quantizers', fake_ensure)
    o = student_options('letkd1', model_s='resnet8', model_t='resnet8', k_penult=16, path_t=str(teacher_ckpt))
    d = build_distiller('letkd1', create_model('resnet8', 100), create_model('resnet8', 100), o, data_info())
    data = SimpleNamespace(train_loader=object(), val_loader=object(), train_eval_loader=object())
    d.prepare(data, device=torch.device('cpu'), cache_dir=str(tmp_path / 'cache'))
    assert calls == [data.train_eval_loader] and d.quantizers['penult'].loaded


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
