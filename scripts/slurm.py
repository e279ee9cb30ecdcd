"""The Slurm backend of scripts/launch.py, through submitit: one job array per stage, one run per task.

A task re-plans its run when it starts (scripts/runs.py ``plan``): after a preemption or a time-limit
requeue it finds the run's last.pth and continues with ``--resume``; a finished run (summary.json) is skipped.
The job class lives here, not in launch.py, so that submitit's pickles name an importable module even when
launch.py runs as ``__main__``.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from scripts.runs import ROOT, has_flag, plan, with_processes


def _ignore_preemption_signal() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class TrainingRun:
    """One command line as a submitit task; ``checkpoint`` (called by submitit on preemption or timeout)
    stops the training process and hands submitit a fresh copy of this task to requeue."""

    def __init__(self, argv: list[str], gpus: int, log_dir: str) -> None:
        self.argv, self.gpus, self.log_dir = list(argv), gpus, log_dir
        self._process: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {'argv': self.argv, 'gpus': self.gpus, 'log_dir': self.log_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state['argv'], state['gpus'], state['log_dir'])

    def __call__(self) -> str:
        os.chdir(ROOT)      # as the local launcher's children: relative paths are the repository's
        job = plan(self.argv)
        if job.action == 'skip':
            return f'[skip] {job.run_dir.name}'
        argv = with_processes(job.argv, self.gpus)
        if self.gpus == 0 and not has_flag(argv, '--device'):
            argv += ['--device', 'cpu']
        log_dir = Path(self.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / f'{job.run_dir.name}.log', 'a') as log:
            log.write(f'\n$ {shlex.join(argv)}\n')
            log.flush()
            argv = [sys.executable if a == 'python' else a for a in argv]
            # the training process ignores the preemption signal (Slurm sends it to every process of the step):
            # checkpoint() below stops it, so the task's handler decides, not a race between the two
            self._process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                             preexec_fn=_ignore_preemption_signal)
            # poll, not wait(): submitit's preemption handler runs in this thread and waits for the process in
            # checkpoint(); a blocking wait() here would hold Popen's wait lock and deadlock it
            while (code := self._process.poll()) is None:
                time.sleep(1.0)
        if code:
            raise RuntimeError(f'{job.run_dir.name} exited with {code}; see {log_dir / job.run_dir.name}.log')
        return f'[{job.action}] {job.run_dir.name}: done'

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Stop the training process (its last.pth is at most one epoch old) and requeue this run."""
        import submitit
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return submitit.helpers.DelayedSubmission(TrainingRun(self.argv, self.gpus, self.log_dir))


def executor(backend: str, folder: Path, *, gpus_per_job: int, cpus_per_job: int, timeout_min: int,
             partition: str | None, array_parallelism: int, slurm_extra: Sequence[str] = ()) -> Any:
    """A submitit executor: ``slurm`` (sbatch job arrays) or ``submitit-local`` (the same code on this machine).

    ``slurm_extra``: 'key=value' sbatch options (e.g. 'account=abc', 'constraint=a100', 'qos=high').
    """
    try:
        import submitit
    except ImportError:
        raise SystemExit('launch.py: --backend slurm needs submitit (pip install submitit)') from None
    cluster = 'slurm' if backend == 'slurm' else 'local'
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params: dict[str, Any] = dict(timeout_min=timeout_min, nodes=1, tasks_per_node=1, cpus_per_task=cpus_per_job)
    if gpus_per_job:
        params['gpus_per_node'] = gpus_per_job
    if cluster == 'slurm':
        extra = dict(item.split('=', 1) for item in slurm_extra)
        params.update(slurm_array_parallelism=array_parallelism, slurm_signal_delay_s=120,
                      slurm_additional_parameters=extra)
        if partition:
            params['slurm_partition'] = partition
    ex.update_parameters(**params)
    return ex


def run_stage(ex: Any, commands: list[list[str]], gpus_per_job: int, log_dir: Path, poll_s: float) -> int:
    """Submit one stage as a job array, wait for it, print each task's outcome; returns the number failed."""
    runs = [TrainingRun(argv, gpus_per_job, str(log_dir)) for argv in commands]
    with ex.batch():
        jobs = [ex.submit(run) for run in runs]
    print(f'submitted {len(jobs)} task(s): {", ".join(j.job_id for j in jobs[:3])}{" ..." if len(jobs) > 3 else ""}',
          flush=True)
    pending = dict(enumerate(jobs))
    failed = 0
    while pending:
        for i, job in list(pending.items()):
            if job.done():
                del pending[i]
                try:
                    print(job.result(), flush=True)
                except Exception as error:    # the task's exception, re-raised by submitit
                    failed += 1
                    print(f'[FAILED] {shlex.join(runs[i].argv)}: {str(error).strip().splitlines()[-1]}', flush=True)
        time.sleep(poll_s)
    return failed
