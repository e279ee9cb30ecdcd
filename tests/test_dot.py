"""DOT (--trainer dot, helper/optim.py): mdistiller's DistillationOrientedTrainer (mdistiller/engine/dot.py) on a
hand-worked two-step example, its resume, its flags and the CLI, and the compiled fast step's two backward passes."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import train_student
from helper.errors import UserError
from helper.optim import DistillationOrientedSGD, apply_update
from tests.options import student_options


def toy_losses(x, y, z):
    """x gets task and distillation gradients, y task only, z distillation only."""
    return {'ce': (x - 1) ** 2 + 3 * y ** 2, 'kd': x ** 2 + 2 * z ** 2}


def toy(lr=0.1, momentum=0.9, delta=0.05, wd=0.01):
    x, y, z = (nn.Parameter(torch.tensor([v], dtype=torch.float64)) for v in (2.0, 1.0, -1.0))
    return (x, y, z), DistillationOrientedSGD([x, y, z], lr=lr, momentum=momentum, delta=delta, weight_decay=wd)


def test_two_steps_by_hand():
    # lr 0.1, momentum 0.9, delta 0.05: task momentum 0.85 (x) / 0.9 (y, task only); distillation 0.95 (x) / 0.9 (z)
    # step 1 at x=2, y=1, z=-1: task grads 2(x-1)=2, 6y=6; distillation grads 2x=4, 4z=-4
    #   task: buffers = grad + 0.01 p: 2.02, 6.01 -> x = 2 - 0.202 = 1.798, y = 1 - 0.601 = 0.399
    #   distillation, first step (no weight decay): buffers 4, -4 -> x = 1.798 - 0.4 = 1.398, z = -1 + 0.4 = -0.6
    # step 2 at x=1.398, y=0.399, z=-0.6: task grads 0.796, 2.394; distillation grads 2.796, -2.4
    #   task x: 0.85 * 2.02 + (0.796 + 0.01398) = 2.52698 -> x = 1.398 - 0.252698 = 1.145302
    #   task y: 0.9 * 6.01 + (2.394 + 0.00399) = 7.80699 -> y = 0.399 - 0.780699 = -0.381699
    #   distillation x (has a task grad: no decay here): 0.95 * 4 + 2.796 = 6.596 -> x = 1.145302 - 0.6596 = 0.485702
    #   distillation z (distillation only: decay, momentum 0.9): 0.9 * -4 + (-2.4 - 0.006) = -6.006 -> z = 0.0006
    (x, y, z), optimizer = toy()
    expected = [(1.398, 0.399, -0.6), (0.485702, -0.381699, 0.0006)]
    for step in range(2):
        losses = toy_losses(x, y, z)
        apply_update(optimizer, losses, losses['ce'] + losses['kd'])
        assert [p.item() for p in (x, y, z)] == pytest.approx(expected[step], abs=1e-9)
    state = optimizer.state
    assert state[x]['momentum_buffer'].item() == pytest.approx(2.52698) and 'momentum_kd_buffer' not in state[y]
    assert state[z]['momentum_kd_buffer'].item() == pytest.approx(-6.006) and 'momentum_buffer' not in state[z]


def test_delta_zero_and_no_distillation_terms_is_momentum_sgd_for_the_task():
    """With delta 0 a task-only parameter follows torch's SGD exactly."""
    w = nn.Parameter(torch.tensor([0.5, -1.5], dtype=torch.float64))
    ref = nn.Parameter(w.detach().clone())
    dot = DistillationOrientedSGD([w], lr=0.05, momentum=0.9, delta=0.0, weight_decay=5e-4)
    sgd = torch.optim.SGD([ref], lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(4):
        dot.zero_grad()
        ((w ** 3).sum()).backward()
        dot.step()
        sgd.zero_grad()
        ((ref ** 3).sum()).backward()
        sgd.step()
    torch.testing.assert_close(w, ref)


def test_resume_from_the_state_dict_continues_exactly():
    (x, y, z), optimizer = toy()
    for _ in range(2):
        losses = toy_losses(x, y, z)
        optimizer.update_from_losses(losses)
    saved = copy.deepcopy(optimizer.state_dict())        # as last.pth holds it (the live one is updated in place)
    params = [p.detach().clone() for p in (x, y, z)]
    losses = toy_losses(x, y, z)
    optimizer.update_from_losses(losses)
    straight = [p.item() for p in (x, y, z)]
    (x2, y2, z2), resumed = toy()
    with torch.no_grad():
        for p, value in zip((x2, y2, z2), params):
            p.copy_(value)
    resumed.load_state_dict(saved)
    resumed.update_from_losses(toy_losses(x2, y2, z2))
    assert [p.item() for p in (x2, y2, z2)] == straight


def test_a_step_without_distillation_terms_is_refused():
    (x, y, z), optimizer = toy()
    with pytest.raises(RuntimeError, match='distillation terms'):
        optimizer.update_from_losses({'ce': x.sum()})


@pytest.mark.parametrize('values, match', [({'distill': 'ce'}, 'needs distillation terms'),
                                           ({'nesterov': True}, 'Nesterov'),
                                           ({'dot_delta': 0.2}, '--dot_delta')])
def test_flags_that_cannot_work_are_refused(values, match):
    values = {'distill': 'kd', **values}
    with pytest.raises(UserError, match=match):
        student_options(trainer='dot', **values)


def test_dot_runs_get_their_own_folder_and_fast_keeps_graphs_off_cuda_graphs():
    opt = student_options('kd', trainer='dot', model_t='resnet32x4', model_s='resnet8x4')
    assert train_student.run_folder(opt).name.startswith('S:resnet8x4_T:resnet32x4_cifar100_kd+dot_r:')
    assert train_student.run_folder(student_options('kd', model_t='resnet32x4', model_s='resnet8x4')).name \
        .startswith('S:resnet8x4_T:resnet32x4_cifar100_kd_r:')
    assert student_options('kd', trainer='dot', fast=True, device='cuda').compile == 'default'
    assert student_options('kd', trainer='dot', fast=True, device='cuda', compile='reduce-overhead').compile \
        == 'reduce-overhead'                                                  # asked for explicitly: kept


@pytest.mark.parametrize('fast', [False, True])
def test_one_cli_epoch_with_dot(tmp_path, data_dir, vanilla_teacher, fast):
    """The reference loop and the compiled fast step (two backward passes through one compiled graph)."""
    flags = ['--path_t', str(vanilla_teacher('resnet8')), '--model_s', 'resnet8', '--distill', 'kd', '--trainer', 'dot',
             '--data_folder', data_dir, '--no_download', '--device', 'cpu', '--num_workers', '0', '--epochs', '1',
             '--save_dir', str(tmp_path)]
    if fast:
        flags += ['--fast', '--compile', 'default']
    summary = train_student.main(train_student.get_args_parser().parse_args(flags))
    assert summary['trainer'] == 'dot' and summary['last_acc'] >= 0
    run = next((tmp_path / 'student_model').iterdir())
    assert '_kd+dot_' in run.name and json.loads((run / 'args.json').read_text())['trainer'] == 'dot'
