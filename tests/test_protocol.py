"""Issue 10: Tiny-ImageNet as the letKD authors ran it, drop_last, the init stage's own data stream,
option checks, and a NaN loss that stops a run cleanly and leaves it resumable."""
import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms

import train_student
import train_teacher
from dataset import INIT_STREAM, DataBundle, get_dataloaders, get_transforms, set_epoch
from distiller_zoo import load_deployed
from distiller_zoo.logit_kd import KD
from helper.loops import validate
from helper.pretrain import run_init_stage
from helper.util import load_checkpoint
from scripts import commands
from scripts.settings import METHODS
from tests.fixtures_data import tinyimagenet_val_labels, write_tinyimagenet

FAST = ['--num_workers', '0', '--device', 'cpu', '--print_freq', '1000']


def one_line_error(capsys, code):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith('error: '), (code, err)
    return err[0]


# ------------------------------------------------------------------ Tiny-ImageNet augmentation


def test_tinyimagenet_default_augmentation_is_the_authors_rotation_and_flip():
    train_tf, _ = get_transforms('tinyimagenet')
    rotate, flip = train_tf.transforms[:2]
    assert isinstance(rotate, transforms.RandomRotation) and list(rotate.degrees) == [-20.0, 20.0]
    assert isinstance(flip, transforms.RandomHorizontalFlip) and flip.p == 0.5
    assert not any(isinstance(t, transforms.RandomCrop) for t in train_tf.transforms)
    crop_tf, _ = get_transforms('tinyimagenet', 'reflect', augment='crop')   # the old recipe, selectable
    crop = crop_tf.transforms[0]
    assert isinstance(crop, transforms.RandomCrop) and crop.padding == 4 and crop.padding_mode == 'reflect'
    assert not any(isinstance(t, transforms.RandomRotation) for t in crop_tf.transforms)


# ------------------------------------------------------------------ Tiny-ImageNet splits


@pytest.fixture(scope='module')
def tiny_official(tmp_path_factory):
    """The official archive layout: 3 classes, 2 train and 4 labelled val images per class."""
    root = tmp_path_factory.mktemp('tiny_official')
    write_tinyimagenet(root, num_classes=3, n_train_per_class=2, n_val_per_class=4)
    return root


def names(dataset):
    return {Path(p).name: t for p, t in dataset.samples}


def test_letkd_split_of_the_official_val_is_the_lower_numbered_half_per_class(tiny_official):
    labels = tinyimagenet_val_labels(tiny_official)           # val_<i>.JPEG -> class
    bundle = get_dataloaders('tinyimagenet', str(tiny_official), 4, 0, split='letkd')
    val, test = names(bundle.val_loader.dataset), names(bundle.test_loader.dataset)
    assert not set(val) & set(test) and {**val, **test} == labels
    for c in range(3):
        files = sorted((n for n, t in labels.items() if t == c), key=lambda n: int(n[4:-5]))
        assert sorted(n for n, t in val.items() if t == c) == sorted(files[:2])   # 2 of 4 (25 of 50)
        assert sorted(n for n, t in test.items() if t == c) == sorted(files[2:])
    again = get_dataloaders('tinyimagenet', str(tiny_official), 4, 0, split='letkd')
    assert names(again.val_loader.dataset) == val                          # deterministic
    x, y = next(iter(bundle.test_loader))
    assert x.shape[1:] == (3, 64, 64)
    full = get_dataloaders('tinyimagenet', str(tiny_official), 4, 0)        # the 50-image evaluation
    assert full.test_loader is None and names(full.val_loader.dataset) == labels


def test_authors_layout_with_val_and_test_class_folders_is_read(tiny_official, tmp_path):
    root = tmp_path / 'tiny-imagenet-200'
    shutil.copytree(tiny_official / 'tiny-imagenet-200', root)
    labels = tinyimagenet_val_labels(root)
    wnids = sorted(p.name for p in (root / 'train').iterdir())
    shutil.rmtree(root / 'test')                                           # the unlabelled official test set
    expected = {'val': {}, 'test': {}}
    for i, (name, c) in enumerate(sorted(labels.items())):
        part = 'val' if i % 2 else 'test'                                  # an arbitrary cut, not ours
        (root / part / wnids[c]).mkdir(parents=True, exist_ok=True)
        shutil.move(root / 'val' / 'images' / name, root / part / wnids[c] / name)
        expected[part][name] = c
    shutil.rmtree(root / 'val' / 'images')
    (root / 'val' / 'val_annotations.txt').unlink()

    bundle = get_dataloaders('tinyimagenet', str(tmp_path), 4, 0, split='letkd')
    assert names(bundle.val_loader.dataset) == expected['val']
    assert names(bundle.test_loader.dataset) == expected['test']
    assert bundle.val_loader.dataset.targets == [t for _, t in bundle.val_loader.dataset.samples]
    full = get_dataloaders('tinyimagenet', str(tmp_path), 4, 0)
    assert names(full.val_loader.dataset) == labels and full.test_loader is None
    x, y = next(iter(bundle.val_loader))
    assert x.shape[1:] == (3, 64, 64)


def test_letkd_split_run_selects_on_val_and_reports_test_there(tiny_official, tmp_path):
    args = ['--model', 'resnet8', '--dataset', 'tinyimagenet', '--data_folder', str(tiny_official),
            '--save_dir', str(tmp_path), '--epochs', '3', '--batch_size', '2', '--tiny_split', 'letkd', *FAST]
    assert train_teacher.cli(args) == 0
    run = tmp_path / 'models' / 'resnet8_tinyimagenet_lr_0.05_decay_0.0005_trial_0'
    records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert all({'val_acc', 'val_loss', 'test_acc', 'test_loss'} <= set(r) for r in records)
    summary = json.loads((run / 'summary.json').read_text())
    best = max(records, key=lambda r: (r['val_acc'], -r['epoch']))       # first epoch of the best val accuracy
    assert summary['best_val_epoch'] == best['epoch'] and summary['best_val_acc'] == best['val_acc']
    assert summary['test_acc_at_best_val'] == best['test_acc']
    assert summary['best_acc'] == max(r['test_acc'] for r in records)    # the existing key keeps its meaning
    assert load_checkpoint(run / 'resnet8_best.pth')['epoch'] == best['epoch']
    args_json = json.loads((run / 'args.json').read_text())
    assert (args_json['tiny_split'], args_json['tiny_aug']) == ('letkd', 'rotate')
    # the logged numbers are the two splits' accuracies of the last model
    data = get_dataloaders('tinyimagenet', str(tiny_official), 2, 0, split='letkd')
    model = load_deployed(run / 'ckpt_epoch_3.pth')
    assert validate(model, data.val_loader, torch.device('cpu'))['acc'] == pytest.approx(records[-1]['val_acc'])
    assert validate(model, data.test_loader, torch.device('cpu'))['acc'] == pytest.approx(records[-1]['test_acc'])


def test_tinyimagenet_sweep_uses_the_letkd_split():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        commands.main(['tinyimagenet', '--trials', '1', '--methods', 'KD'])
    runs = [line for line in out.getvalue().splitlines() if line.startswith('python')]
    assert runs and all('--tiny_split letkd' in line for line in runs)


# ------------------------------------------------------------------ drop_last


def test_drop_last_skips_the_incomplete_batch(cifar100_dir):
    kept = get_dataloaders('cifar100', str(cifar100_dir), 32, 0, download=False)
    dropped = get_dataloaders('cifar100', str(cifar100_dir), 32, 0, download=False, drop_last=True)
    assert [len(b[1]) for b in kept.train_loader] == [32] * 6 + [8]
    assert [len(b[1]) for b in dropped.train_loader] == [32] * 6            # 200 // 32 iterations
    assert len(dropped.val_loader.dataset) == 100                           # evaluation keeps everything


def test_drop_last_is_in_the_letkd_and_quest_protocol_only():
    """Their published recipe (Method.recipe, what the 'published' sweep protocol passes); no method's own flags
    carry a recipe flag (scripts/settings.py PROTOCOLS swaps the recipe, never the method flags)."""
    for label, method in METHODS.items():
        assert ('--drop_last' in method.published_flags) == (label in ('QUEST', 'letKD-1', 'letKD-2')), label
        if '--drop_last' in method.published_flags:
            assert {'--nesterov', 'reflect'} <= set(method.recipe)
        assert not {'--nesterov', '--drop_last', '--pad_mode', '--epochs', '--learning_rate'} & set(method.flags), label
    opt = train_student.get_args_parser().parse_args(['--drop_last'])
    assert opt.drop_last and not train_student.get_args_parser().parse_args([]).drop_last


# ------------------------------------------------------------------ the init stage's own stream


def test_init_stage_does_not_replay_the_main_stage_order():
    items = TensorDataset(torch.arange(16, dtype=torch.float32).view(16, 1, 1, 1).expand(16, 3, 4, 4).clone())
    loader = DataLoader(items, batch_size=4, shuffle=True, generator=torch.Generator())
    data = DataBundle(train_loader=loader, val_loader=loader, train_eval_loader=loader, num_classes=2, n_data=16,
                      image_size=4)

    def order():
        return [int(x[0, 0, 0]) for (batch,) in loader for x in batch]

    main_orders = []
    for epoch in (1, 2):
        set_epoch(data, epoch, 3)
        main_orders.append(order())

    seen = []
    module = torch.nn.Linear(1, 1)

    def batch_loss(image):
        seen.extend(int(v) for v in image[:, 0, 0, 0])
        return module(image[:, :1, 0, 0]).pow(2).mean()

    opt = type('Opt', (), dict(distill='abound', model_s='resnet8', learning_rate=0.01, momentum=0.9,
                               weight_decay=0.0, init_epochs=2, seed=3))()
    run_init_stage(module, module, batch_loss, data, opt, torch.device('cpu'), lr=0.01, progress=False)
    init_orders = [seen[:16], seen[16:]]
    assert init_orders != main_orders and init_orders[0] != main_orders[0] and init_orders[1] != main_orders[1]
    set_epoch(data, 1, 3, INIT_STREAM)                                      # still a pure function of (seed, epoch)
    assert order() == init_orders[0]


# ------------------------------------------------------------------ option checks


@pytest.mark.parametrize('flags, match', [
    (['--learning_rate', '-1'], '--learning_rate must be positive'),
    (['--learning_rate', '0'], '--learning_rate must be positive'),
    (['--learning_rate', 'nan'], '--learning_rate must be a finite number'),
    (['--weight_decay', '-0.1'], '--weight_decay must be >= 0'),
    (['--momentum', '1'], '--momentum must be in [0, 1)'),
    (['--momentum', '-0.5'], '--momentum must be in [0, 1)'),
    (['--momentum', '0', '--nesterov'], '--nesterov needs a positive --momentum'),
    (['--lr_decay_rate', '0'], '--lr_decay_rate must be positive'),
    (['--lr_decay_epochs', '-5'], '--lr_decay_epochs must be non-negative'),
    (['--tiny_split', 'letkd'], '--tiny_split applies to --dataset tinyimagenet only'),
])
def test_bad_optimisation_flags_are_one_line_errors(tmp_path, cifar100_dir, capsys, flags, match):
    save = tmp_path / 'save'
    code = train_teacher.cli(['--model', 'resnet8', '--data_folder', str(cifar100_dir), '--save_dir', str(save),
                              '--epochs', '1', *FAST, *flags])
    assert match in one_line_error(capsys, code)
    assert not save.exists()


# ------------------------------------------------------------------ NaN loss


@pytest.fixture()
def nan_at(monkeypatch):
    """nan_at(epoch, iteration): KD's loss becomes NaN there (1-based iteration), once."""
    real = KD.forward_train
    where = {'calls': {}, 'epoch': 0}

    def start_epoch(self, epoch):          # the loops announce each epoch; the step itself gets no epoch
        where['epoch'] = epoch

    def forward_train(self, image, target, **extras):
        logits, losses = real(self, image, target, **extras)
        epoch = where['epoch']
        where['calls'][epoch] = where['calls'].get(epoch, 0) + 1
        if (epoch, where['calls'][epoch]) == where.get('at'):
            losses['kd'] = losses['kd'] * float('nan')
        return logits, losses

    monkeypatch.setattr(KD, 'forward_train', forward_train)
    monkeypatch.setattr(KD, 'start_epoch', start_epoch)
    def arm(epoch, iteration):
        where.update(at=(epoch, iteration), calls={})
    return arm


def student(cifar100_dir, save, teacher, *extra):
    return ['--path_t', str(teacher), '--model_s', 'resnet8', '--distill', 'kd', '--data_folder', str(cifar100_dir),
            '--save_dir', str(save), '--batch_size', '64', '--lr_decay_epochs', '2', *FAST, *extra]


RUN = 'S:resnet8_T:resnet8_cifar100_kd_r:0.1_a:0.9_b:0.0_1'


def test_nan_loss_stops_with_one_line_and_resumes_with_a_smaller_lr(tmp_path, cifar100_dir, vanilla_teacher,
                                                                   capsys, nan_at):
    teacher = vanilla_teacher('resnet8')
    nan_at(2, 3)
    code = train_student.cli(student(cifar100_dir, tmp_path, teacher, '--epochs', '3'))
    line = one_line_error(capsys, code)
    assert 'loss became nan at epoch 2, iteration 3/4' in line and 'kd=nan' in line and 'ce=' in line
    assert '--resume' in line and '--learning_rate' in line
    run = tmp_path / 'student_model' / RUN
    assert load_checkpoint(run / 'last.pth')['epoch'] == 1                  # the last good epoch
    assert [json.loads(x)['epoch'] for x in (run / 'metrics.jsonl').read_text().splitlines()] == [1]

    nan_at(0, 0)
    assert train_student.cli(student(cifar100_dir, tmp_path, teacher, '--epochs', '3', '--resume',
                                     '--learning_rate', '0.01', '--weight_decay', '0.0001')) == 0
    records = [json.loads(x) for x in (run / 'metrics.jsonl').read_text().splitlines()]
    assert [(r['epoch'], r['lr']) for r in records] == [(1, 0.05), (2, 0.01), (3, pytest.approx(0.001))]
    last = load_checkpoint(run / 'last.pth')
    assert last['optimizer']['param_groups'][0]['lr'] == pytest.approx(0.001)
    assert last['optimizer']['param_groups'][0]['weight_decay'] == 0.0001   # not the saved optimizer's 5e-4
    args = json.loads((run / 'args.json').read_text())
    assert args['resumes'] == [{'at_epoch': 2, 'changed': {'learning_rate': [0.05, 0.01],
                                                           'weight_decay': [0.0005, 0.0001]}}]


def test_a_run_that_fails_in_epoch_1_can_be_resumed(tmp_path, cifar100_dir, vanilla_teacher, capsys, nan_at):
    teacher = vanilla_teacher('resnet8')
    nan_at(1, 1)
    code = train_student.cli(student(cifar100_dir, tmp_path, teacher, '--epochs', '1'))
    assert 'at epoch 1, iteration 1/4' in one_line_error(capsys, code)
    run = tmp_path / 'student_model' / RUN
    assert load_checkpoint(run / 'last.pth')['epoch'] == 0
    nan_at(0, 0)
    assert train_student.cli(student(cifar100_dir, tmp_path, teacher, '--epochs', '1', '--resume',
                                     '--learning_rate', '0.02')) == 0
    assert json.loads((run / 'summary.json').read_text())['epochs'] == 1
