"""scripts/launch.py's Slurm backend through submitit's local executor (the code path of ``--backend slurm``
without a cluster): two tiny jobs of one array, a task that reaches its time limit (USR2) and one that is
preempted (SIGTERM to every process of the task, as Slurm signals a job step), both requeued and resumed; a task
whose run another process holds; the sbatch parameters (memory, requeue, timeouts) and the offline stage's."""
from __future__ import annotations

import json
import os
import shlex
import signal
import time
from pathlib import Path

import pytest

from scripts import launch
from tests.fixtures_data import write_cifar100

submitit = pytest.importorskip('submitit')


@pytest.fixture(scope='module')
def cifar(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp('cifar_slurm')
    write_cifar100(root, n_train_per_class=1, n_test_per_class=1)
    return str(root)


def teacher_line(cifar: str, save: Path, model: str, epochs: int) -> str:
    return (f'python train_teacher.py --model {model} --epochs {epochs} --data_folder {cifar} --save_dir {save} '
            '--num_workers 0 --batch_size 50 --print_freq 0')


def epochs_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)['epoch'] for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


def test_two_jobs_of_one_array_run_and_a_second_launch_skips_them(tmp_path: Path, cifar: str, capsys) -> None:
    save, logs = tmp_path / 'save', tmp_path / 'logs'
    lines = [teacher_line(cifar, save, 'resnet8', 1), teacher_line(cifar, save, 'resnet14', 1)]
    commands = tmp_path / 'commands.txt'
    commands.write_text('\n'.join(lines) + '\n')
    flags = [str(commands), '--backend', 'submitit-local', '--gpus', '', '--poll', '0.2', '--log_dir', str(logs),
             '--submitit_dir', str(tmp_path / 'submitit'), '--timeout_min', '10']
    assert launch.main(flags) == 0
    out = capsys.readouterr().out
    assert 'submitted 2 task(s)' in out
    for line in lines:
        run_dir = launch.run_dir_of(shlex.split(line))
        assert json.loads((run_dir / 'summary.json').read_text())['epochs'] == 1
        assert f'[run] {run_dir.name}: done' in out
        log = (logs / f'{run_dir.name}.log').read_text()
        assert '--device cpu' in log            # CPU tasks (--gpus '') are told so
    assert launch.main(flags) == 0             # everything finished: nothing is submitted
    out = capsys.readouterr().out
    assert '0 to run, 2 finished already' in out and 'submitted' not in out


def submitit_task_pids(folder: Path) -> list[int]:
    """The processes running submitit's task entry point for ``folder`` (Linux /proc)."""
    pids = []
    for entry in Path('/proc').iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / 'cmdline').read_bytes().split(b'\0')
        except OSError:
            continue
        if b'submitit.core._submit' in cmdline and str(folder).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path('/proc').is_dir(), reason='finds the task process through /proc')
def test_a_preempted_task_is_requeued_and_resumes_from_last_pth(tmp_path: Path, cifar: str) -> None:
    from scripts import slurm
    save, logs, folder = tmp_path / 'save', tmp_path / 'logs', tmp_path / 'submitit'
    epochs = 30
    argv = shlex.split(teacher_line(cifar, save, 'resnet8', epochs))
    run_dir = launch.run_dir_of(argv)
    ex = slurm.executor('submitit-local', folder, gpus_per_job=0, cpus_per_job=1, timeout_min=10, partition=None,
                        array_parallelism=1)
    job = ex.submit(slurm.TrainingRun(argv, 0, str(logs)))
    deadline = time.time() + 240
    while not (run_dir / 'last.pth').is_file():      # the first epoch is written: now preempt the task
        assert time.time() < deadline and not job.done(), job.stderr() if job.done() else 'no last.pth in time'
        time.sleep(0.05)
    pids = submitit_task_pids(folder)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGUSR2)                 # what Slurm sends before preemption / the time limit
    assert job.result().endswith(': done')
    log = (logs / f'{run_dir.name}.log').read_text()
    started = [line for line in log.splitlines() if line.startswith('$ ')]
    assert len(started) == 2, log                    # the first start, then the requeued one
    assert '--resume' not in started[0] and '--resume' in started[1]
    summary = json.loads((run_dir / 'summary.json').read_text())
    assert summary['epochs'] == epochs
    assert epochs_logged(run_dir) == list(range(1, epochs + 1))   # the interrupted epoch is logged once
    assert 'Caught signal SIGUSR2' in job.stderr()   # submitit's handler, not a crash, ended the first start


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children, grandchildren, ...), from /proc."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f'/proc/{parent}/task').glob('*'):
            try:
                children = [int(c) for c in (task / 'children').read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


@pytest.mark.skipif(not Path('/proc').is_dir(), reason='finds the task process through /proc')
def test_a_task_whose_step_gets_sigterm_is_requeued_and_resumes(tmp_path: Path, cifar: str) -> None:
    """Preemption: Slurm sends SIGTERM to every process of the step (the task, its training process, torchrun's
    workers); the training process dies from it. The task must not report a failure: it ends without a result,
    is requeued (here by the local executor's controller, on Slurm by Slurm) and the new start resumes."""
    from scripts import slurm
    save, logs, folder = tmp_path / 'save', tmp_path / 'logs', tmp_path / 'submitit'
    epochs = 12          # last.pth appears before epoch 1: the signal comes in the first of these
    argv = shlex.split(teacher_line(cifar, save, 'resnet8', epochs))
    run_dir = launch.run_dir_of(argv)
    ex = slurm.executor('submitit-local', folder, gpus_per_job=0, cpus_per_job=1, timeout_min=10, partition=None,
                        array_parallelism=1)
    job = ex.submit(slurm.TrainingRun(argv, 0, str(logs)))
    deadline = time.time() + 240
    while not (run_dir / 'last.pth').is_file():
        assert time.time() < deadline and not job.done(), job.stderr() if job.done() else 'no last.pth in time'
        time.sleep(0.05)
    pids = submitit_task_pids(folder)
    assert len(pids) == 1, pids
    step = [pids[0], *descendants(pids[0])]
    assert len(step) >= 2, step                      # the task and its training process
    for pid in step:
        os.kill(pid, signal.SIGTERM)
    assert job.result().endswith(': done')           # no exception: not reported as a failure
    log = (logs / f'{run_dir.name}.log').read_text()
    started = [line for line in log.splitlines() if line.startswith('$ ')]
    assert len(started) == 2, log
    assert '--resume' not in started[0] and '--resume' in started[1]
    assert '# preempted' in log
    assert epochs_logged(run_dir) == list(range(1, epochs + 1))
    assert json.loads((run_dir / 'summary.json').read_text())['epochs'] == epochs


def test_a_task_leaves_a_run_whose_lock_another_process_holds(tmp_path: Path, cifar: str) -> None:
    from scripts import slurm
    from scripts.runs import RunLock, lock_path
    argv = shlex.split(teacher_line(cifar, tmp_path / 'save', 'resnet8', 1))
    run_dir = launch.run_dir_of(argv)
    with RunLock(lock_path(run_dir)) as lock:
        assert lock.acquire()
        assert slurm.TrainingRun(argv, 0, str(tmp_path / 'logs'))().startswith('[busy]')
    assert not run_dir.exists() and not (tmp_path / 'logs').exists()     # nothing started


def test_slurm_parameters_memory_requeue_timeouts_and_the_offline_stage(tmp_path: Path, cifar: str,
                                                                        monkeypatch) -> None:
    """``--mem_gb`` (default: 32 GB per GPU of a task, 64 GB for an offline stage) and ``--max_num_timeout``
    reach submitit; jobs ask for --requeue; the offline stage runs on one GPU per command."""
    from scripts import commands, slurm
    fake_bin = tmp_path / 'bin'                   # submitit's Slurm executor wants an srun on PATH; nothing runs
    fake_bin.mkdir()
    (fake_bin / 'srun').write_text('#!/bin/sh\nexit 1\n')
    (fake_bin / 'srun').chmod(0o755)
    monkeypatch.setenv('PATH', f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    ex = slurm.executor('slurm', tmp_path / 'submitit', gpus_per_job=8, cpus_per_job=64, timeout_min=2880,
                        partition='gpu', array_parallelism=4, mem_gb=256, max_num_timeout=7)
    text = ex._executor._make_submission_file_text('python -c pass', 'uid')
    for option in ('#SBATCH --mem=256GB', '#SBATCH --requeue', '#SBATCH --gpus-per-node=8',
                   '#SBATCH --partition=gpu', '#SBATCH --signal=USR2@120'):
        assert option in text, text
    assert ex._executor.max_num_timeout == 7
    assert slurm.memory_gb(None, 8, offline=False) == 256 and slurm.memory_gb(None, 1, offline=True) == 64
    assert slurm.memory_gb(None, 0, offline=False) == 32 and slurm.memory_gb(0, 8, offline=False) is None

    seen = []
    monkeypatch.setattr(slurm, 'executor', lambda backend, folder, **kw: kw)
    monkeypatch.setattr(slurm, 'run_stage', lambda ex, cmds, gpus, log_dir, poll, wait_for_busy=True:
                        seen.append((ex, [c[1] for c in cmds], gpus, wait_for_busy)) or 0)
    save = tmp_path / 'save'
    common = f'--data_folder {cifar} --save_dir {save} --num_workers 0 --batch_size 50'
    student = (f'python train_student.py --path_t {save}/models/t/ckpt.pth --model_t resnet8 --distill letkd2 '
               f'--model_s resnet8 {common}')
    (tmp_path / 'cmds.txt').write_text('\n'.join(commands.with_offline_stages([student])) + '\n')
    assert launch.main([str(tmp_path / 'cmds.txt'), '--backend', 'slurm', '--gpus_per_job', '8',
                        '--max_num_timeout', '5']) == 0
    (offline_kw, offline_cmds, offline_gpus, offline_wait), (train_kw, train_cmds, train_gpus, train_wait) = seen
    assert offline_cmds == ['helper/letkd_offline.py'] and offline_gpus == 1 and offline_wait
    assert (offline_kw['gpus_per_job'], offline_kw['mem_gb'], offline_kw['max_num_timeout']) == (1, 64, 5)
    assert train_cmds == ['train_student.py'] and train_gpus == 8 and not train_wait
    assert (train_kw['gpus_per_job'], train_kw['mem_gb']) == (8, 256)
    seen.clear()
    assert launch.main([str(tmp_path / 'cmds.txt'), '--backend', 'slurm', '--gpus_per_job', '8',
                        '--mem_gb', '100']) == 0
    assert [kw['mem_gb'] for kw, *_ in seen] == [100, 100]
