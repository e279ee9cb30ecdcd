"""scripts/launch.py's Slurm backend through submitit's local executor (the code path of ``--backend slurm``
without a cluster): two tiny jobs of one array, and a preempted task that is requeued and resumes."""
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
