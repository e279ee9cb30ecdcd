"""The bookkeeping around a step, which no loss test looks at: epoch means over images when the last batch is
smaller (both loops), the best epoch when two epochs tie, the epoch a resumed run starts at, and the DDP prefix
of checkpoint keys. Found by the mutation audit (scripts/dev/mutation_audit.py).

Expected values are computed here from the batches themselves (per-batch losses weighted by batch size), never
from the meters under test; ``fit`` runs with its training epoch and evaluation replaced by scripted numbers.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import helper.run as run
from distiller_zoo import build_distiller
from helper.loops import FastTrainer, train_one_epoch, train_one_epoch_fast
from helper.run import RunConfig, fit
from helper.util import load_checkpoint, state_dict_from_checkpoint
from tests.options import data_info, student_options

CPU = torch.device('cpu')


class TinyStudent(nn.Module):
    """A linear classifier on the flattened (3, 2, 2) image: no BN, so a batch's logits do not depend on the
    other images of the batch."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(12, classes)

    def forward(self, x, is_feat=False, preact=False):
        logits = self.fc(x.flatten(1))
        return ([x, logits], logits) if is_feat else logits


def ce_distiller(seed: int = 0):
    torch.manual_seed(seed)
    opt = student_options('ce', model_s='resnet8')
    return build_distiller('ce', TinyStudent(), None, opt, data_info(num_classes=3, n_data=10, image_size=2))


def uneven_batches():
    """Batches of 4, 4 and 2 images (10 in all): a mean of batch means differs from the mean over images."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 3, 2, 2, generator=g), torch.randint(0, 3, (10,), generator=g)
    return [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]


def per_image_expectation(distiller, batches):
    """train_loss (= loss_ce here) and train_acc over images, from the frozen model (lr 0 leaves it unchanged)."""
    total, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = distiller.student(x)
            total += F.cross_entropy(logits, y).item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
    return total / n, 100.0 * correct / n


@pytest.mark.parametrize('fast', [False, True])
def test_epoch_means_are_over_images_when_the_last_batch_is_smaller(fast):
    distiller = ce_distiller()
    batches = uneven_batches()
    loss, acc = per_image_expectation(distiller, batches)
    batch_means = sum(F.cross_entropy(distiller.student(x), y).item() for x, y in batches) / 3
    assert abs(batch_means - loss) > 1e-3                          # the data tells the two means apart
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.0)
    if fast:
        stats = train_one_epoch_fast(FastTrainer(distiller, optimizer, CPU), batches, epoch=1, print_freq=0)
    else:
        stats = train_one_epoch(distiller, batches, optimizer, epoch=1, device=CPU, print_freq=0)
    assert stats['train_loss'] == pytest.approx(loss, rel=1e-6)
    assert stats['loss_ce'] == pytest.approx(loss, rel=1e-6)
    assert stats['train_acc'] == pytest.approx(acc, rel=1e-6)


class Scripted:
    """Stand-ins for ``fit``'s training epoch and evaluation: the epochs trained, and a given test accuracy per
    epoch."""

    def __init__(self, accuracies: dict[int, float]) -> None:
        self.accuracies, self.trained, self.epoch = accuracies, [], 0

    def train_epoch(self, distiller, data, optimizer, trainer, cfg, epoch, device):
        self.trained.append(epoch)
        self.epoch = epoch
        return {'train_loss': 1.0, 'train_acc': 0.0, 'train_acc_top5': 0.0}

    def validate(self, model, loader, device, **kwargs):
        acc = self.accuracies[self.epoch]
        return {'acc': acc, 'acc_top5': acc, 'loss': 1.0, 'images': 10}


def scripted_fit(monkeypatch, tmp_path, accuracies, epochs, resume=False):
    script = Scripted(accuracies)
    monkeypatch.setattr(run, 'train_epoch', script.train_epoch)
    monkeypatch.setattr(run, 'validate', script.validate)
    cfg = RunConfig(run_dir=tmp_path, model_name='tiny', epochs=epochs, learning_rate=0.1, lr_decay_epochs=[],
                    lr_decay_rate=0.1, weight_decay=0.0, momentum=0.9, nesterov=False, seed=0, save_freq=100,
                    resume=resume)
    data = type('Data', (), {'val_loader': [], 'image_size': 2})()
    return fit(ce_distiller(), data, cfg, CPU), script


def test_the_best_epoch_is_the_first_to_reach_the_best_accuracy(monkeypatch, tmp_path):
    summary, _ = scripted_fit(monkeypatch, tmp_path, {1: 50.0, 2: 60.0, 3: 60.0, 4: 55.0}, epochs=4)
    assert (summary['best_acc'], summary['best_epoch'], summary['last_acc']) == (60.0, 2, 55.0)
    assert load_checkpoint(tmp_path / 'tiny_best.pth')['epoch'] == 2
    assert json.loads((tmp_path / 'summary.json').read_text())['best_epoch'] == 2


def test_a_resumed_run_starts_after_the_epoch_last_pth_holds(monkeypatch, tmp_path):
    accuracies = {1: 10.0, 2: 20.0, 3: 30.0}
    _, first = scripted_fit(monkeypatch, tmp_path, accuracies, epochs=2)
    assert first.trained == [1, 2] and load_checkpoint(tmp_path / 'last.pth')['epoch'] == 2
    summary, resumed = scripted_fit(monkeypatch, tmp_path, accuracies, epochs=3, resume=True)
    assert resumed.trained == [3]
    assert [json.loads(line)['epoch'] for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()] == [1, 2, 3]
    assert (summary['best_epoch'], summary['epochs']) == (3, 3)


def test_checkpoint_keys_lose_exactly_the_ddp_prefix():
    w, b = torch.ones(2), torch.zeros(2)
    ckpt = {'model': {'module.conv1.weight': w, 'module.fc.bias': b}, 'epoch': 240}
    assert list(state_dict_from_checkpoint(ckpt, 'x.pth')) == ['conv1.weight', 'fc.bias']
    mixed = {'module.conv1.weight': w, 'fc.bias': b}                  # not every key prefixed: left as it is
    assert list(state_dict_from_checkpoint({'model': mixed}, 'x.pth')) == ['module.conv1.weight', 'fc.bias']
    assert list(state_dict_from_checkpoint({'conv1.weight': w}, 'x.pth')) == ['conv1.weight']   # a bare state_dict
