"""helper/util.py and helper/options.py: schedule, meters, accuracy, RNG state, checkpoint I/O, names."""
import argparse
import random

import numpy as np
import pytest
import torch

from helper.errors import UserError
from helper.options import student_folder_name, teacher_folder_name, teacher_name_from_path
from helper.util import (AverageMeter, accuracy, default_learning_rate, load_checkpoint, lr_at_epoch,
                         parse_milestones, rng_state, save_checkpoint, seed_from_trial, set_rng_state)


def test_lr_schedule_matches_repdistiller_steps():
    milestones = [150, 180, 210]
    assert lr_at_epoch(1, 0.05, milestones, 0.1) == 0.05
    assert lr_at_epoch(150, 0.05, milestones, 0.1) == 0.05          # decays only after the milestone
    assert lr_at_epoch(151, 0.05, milestones, 0.1) == pytest.approx(0.005)
    assert lr_at_epoch(181, 0.05, milestones, 0.1) == pytest.approx(5e-4)
    assert lr_at_epoch(240, 0.05, milestones, 0.1) == pytest.approx(5e-5)
    assert parse_milestones('150,180,210') == milestones
    with pytest.raises(UserError):
        parse_milestones('150;180')


def test_default_lr_for_mobile_and_shuffle_students():
    assert default_learning_rate('resnet20') == 0.05
    for name in ('MobileNetV2', 'ShuffleV1', 'ShuffleV2'):
        assert default_learning_rate(name) == 0.01


def test_accuracy_and_meter_on_known_batch():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    target = torch.tensor([1, 1, 0, 2])
    top1, top2 = accuracy(logits, target, topk=(1, 2))
    assert top1 == pytest.approx(25.0)       # only sample 0 right
    assert top2 == pytest.approx(50.0)       # samples 0 and 1 (class 1 is second for sample 1)
    meter = AverageMeter()
    meter.update(10.0, n=3)
    meter.update(20.0, n=1)
    assert meter.avg == pytest.approx(12.5)  # sample-weighted


def test_rng_state_round_trip_through_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    save_checkpoint({'rng': state}, tmp_path / 'rng.pth')
    random.random(), np.random.rand(), torch.rand(1)           # move every generator on
    set_rng_state(load_checkpoint(tmp_path / 'rng.pth')['rng'])  # weights_only=True load
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_save_checkpoint_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / 'ckpt.pth'
    save_checkpoint({'model': {'w': torch.ones(2)}}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError('disk full')

    with pytest.raises(RuntimeError):
        save_checkpoint({'model': Boom()}, path)
    assert torch.equal(load_checkpoint(path)['model']['w'], torch.ones(2))   # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ['ckpt.pth']


def test_load_checkpoint_refuses_pickled_objects_unless_trusted(tmp_path):
    path = tmp_path / 'with_namespace.pth'
    torch.save({'opt': argparse.Namespace(lr=0.1), 'model': {}}, path)
    with pytest.raises(UserError, match='--trust_checkpoint'):
        load_checkpoint(path)
    assert load_checkpoint(path, trust=True)['opt'].lr == 0.1
    with pytest.raises(UserError, match='not found'):
        load_checkpoint(tmp_path / 'missing.pth')
    (tmp_path / 'garbage.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match='cannot read'):
        load_checkpoint(tmp_path / 'garbage.pth')


@pytest.mark.parametrize('path, name', [
    ('save/models/resnet32x4_vanilla/ckpt_epoch_240.pth', 'resnet32x4'),
    ('save/models/wrn_40_2_vanilla/ckpt_epoch_240.pth', 'wrn_40_2'),
    ('save/models/ResNet50_vanilla/ckpt_epoch_240.pth', 'ResNet50'),
    ('save/models/resnet56_cifar100_lr_0.05_decay_0.0005_trial_0/resnet56_best.pth', 'resnet56'),
    ('save/student_model/S:resnet8x4_T:resnet32x4_cifar100_kd_r:0.1_a:0.9_b:0.0_1/x.pth', 'resnet8x4'),
    ('save/student_model/S~wrn_16_2_T~wrn_40_2_cifar100_kd_r~0.1_a~0.9_b~0.0_1/x.pth', 'wrn_16_2'),
])
def test_teacher_name_from_path_follows_repdistiller_and_simkd(path, name):
    assert teacher_name_from_path(path) == name


def test_run_folder_names_follow_repdistiller():
    opt = argparse.Namespace(model='resnet32x4', dataset='cifar100', learning_rate=0.05, weight_decay=5e-4, trial='0')
    assert teacher_folder_name(opt) == 'resnet32x4_cifar100_lr_0.05_decay_0.0005_trial_0'
    opt = argparse.Namespace(model_s='resnet8x4', model_t='resnet32x4', dataset='cifar100', distill='kd',
                             gamma=0.1, alpha=0.9, beta=0, trial='1', name_sep=':')
    assert student_folder_name(opt) == 'S:resnet8x4_T:resnet32x4_cifar100_kd_r:0.1_a:0.9_b:0.0_1'


def test_seed_from_trial_is_stable():
    """Pinned values: a seed must not change between processes, machines or releases (resumes and reruns rely
    on it). A non-numeric id maps to CRC-32 mod 2**31 (crc32(b'abc') = 0x352441C2, the standard check value)."""
    assert seed_from_trial('3') == 3
    assert seed_from_trial('007') == 7
    assert seed_from_trial('abc') == 891_568_578 == 0x352441C2
    assert seed_from_trial('abd') == 725_668_961
    assert seed_from_trial('trial-A') == 874_847_099
    assert seed_from_trial('1a') == 1_026_638_979


def test_count_macs_of_resnet20_matches_the_known_41m():
    from helper.util import count_macs
    from models import create_model
    macs = count_macs(create_model('resnet20', 100), 32)
    assert 40.5e6 < macs < 41.5e6        # resnet20 on CIFAR is quoted at ~41M multiply-adds
