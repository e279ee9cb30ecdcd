"""The Slurm backend of scripts/launch.py, through submitit: one job array per stage, one run per task.

A task claims its run when it starts (scripts/runs.py ``claim``: the run's lock, then the plan under it): after
a preemption or a time-limit requeue it finds the run's last.pth and continues with ``--resume``; a finished run
(summary.json) is skipped; a run whose lock another process holds is left to it ('[busy]'). The task holds the
lock for its whole life (its training process inherits the descriptor), so no two tasks, launchers or
relaunches ever train one run at the same time.

Ends of a task:
- time limit: Slurm sends USR2 ``slurm_signal_delay_s`` (120 s) before it; submitit calls ``checkpoint``,
  which stops the training process and requeues the task (at most ``--max_num_timeout`` times);
- preemption (or the local executor's test of it): Slurm sends SIGTERM to every process of the step; the
  training process (or torchrun and its workers) dies from it. The task notices the signal (its SIGTERM handler
  records it) and ends **without a result**: Slurm requeues a preempted job itself (``--requeue``, which
  ``executor`` asks for), and the requeued task resumes. The launcher keeps waiting instead of reporting a
  failure. On the local executor the task asks for the requeue itself (submitit's exit code).
- a failure of the training process without a signal to the task: the task raises, the launcher reports it.

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

from scripts.runs import ROOT, claim, has_flag, lock_is_held, plan, run_dir_of, with_processes

# how long a task whose training process died from a signal waits for its own SIGTERM (Slurm signals the
# processes of a step one after the other) before it calls the death a failure
SIGNAL_GRACE_S = 10.0
BUSY = '[busy]'


def _ignore_preemption_signal() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def memory_gb(requested: float | None, gpus: int, offline: bool) -> float | None:
    """The ``mem_gb`` of a task: ``requested`` (0: none, the partition's default), else 32 GB per GPU (at least
    32) for training (ImageNet: 8 loader workers per GPU and the main process), 64 GB for an offline stage
    (ResNet50's 3.2M sampled 2048-channel positions are 26 GB, plus the loader)."""
    if requested is not None:
        return requested or None
    return 64.0 if offline else 32.0 * max(1, gpus)


class TrainingRun:
    """One command line as a submitit task; ``checkpoint`` (called by submitit on the time-limit signal)
    stops the training process and hands submitit a fresh copy of this task to requeue."""

    def __init__(self, argv: list[str], gpus: int, log_dir: str) -> None:
        self.argv, self.gpus, self.log_dir = list(argv), gpus, log_dir
        self._process: subprocess.Popen | None = None
        self._terminated = False

    def __getstate__(self) -> dict[str, Any]:
        return {'argv': self.argv, 'gpus': self.gpus, 'log_dir': self.log_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state['argv'], state['gpus'], state['log_dir'])

    def _on_sigterm(self, previous: Any) -> Any:
        def handler(signum: int, frame: Any) -> None:
            self._terminated = True
            if callable(previous):
                previous(signum, frame)      # submitit's handler (it logs and carries on)
        return handler

    def __call__(self) -> str:
        os.chdir(ROOT)      # as the local launcher's children: relative paths are the repository's
        job = claim(self.argv)
        if job.action == 'skip':
            return f'[skip] {job.name}'
        if job.action == 'busy':
            return f'{BUSY} {job.name}: another process holds its lock (it trains the run); skipped'
        signal.signal(signal.SIGTERM, self._on_sigterm(signal.getsignal(signal.SIGTERM)))
        argv = with_processes(job.argv, self.gpus)
        if self.gpus == 0 and not has_flag(argv, '--device'):
            argv += ['--device', 'cpu']
        log_dir = Path(self.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        fds = job.lock.inheritable_fds() if job.lock is not None else ()
        try:
            with open(log_dir / f'{job.name}.log', 'a') as log:
                log.write(f'\n$ {shlex.join(argv)}\n')
                log.flush()
                argv = [sys.executable if a == 'python' else a for a in argv]
                # the training process ignores the time-limit signal (Slurm sends it to every process of the
                # step): checkpoint() below stops it, so the task's handler decides, not a race between the two
                self._process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                                 preexec_fn=_ignore_preemption_signal, pass_fds=fds)
                # poll, not wait(): submitit's time-limit handler runs in this thread and waits for the process
                # in checkpoint(); a blocking wait() here would hold Popen's wait lock and deadlock it
                while (code := self._process.poll()) is None:
                    time.sleep(1.0)
                if code and (self._terminated or code < 0):
                    deadline = time.monotonic() + SIGNAL_GRACE_S
                    while not self._terminated and time.monotonic() < deadline:
                        time.sleep(0.2)
                    if self._terminated:
                        log.write(f'\n# preempted (SIGTERM; the training process ended with {code}): requeued, '
                                  'the next start resumes from last.pth\n')
                        log.flush()
                        self._requeue_preempted()
        finally:
            if job.lock is not None:
                job.lock.release()
        if code:
            raise RuntimeError(f'{job.name} exited with {code}; see {log_dir / job.name}.log')
        return f'[{job.action}] {job.name}: done'

    def _requeue_preempted(self) -> None:
        """End the task without a result, so that submitit's launcher keeps waiting for the requeued job.

        On Slurm the preempted job is requeued by Slurm itself (``--requeue``); asking again (scontrol requeue)
        would also requeue a job the user cancelled with scancel, which sends the same SIGTERM. The local
        executor has no scheduler: its task exits with submitit's requeue code and its controller restarts it.
        """
        import submitit
        env = submitit.JobEnvironment()
        if env.cluster == 'local':
            env._requeue(0)          # sys.exit with the local executor's requeue code
        raise SystemExit(-1)         # not an Exception: submitit's process_job writes no (failed) result

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
             partition: str | None, array_parallelism: int, slurm_extra: Sequence[str] = (),
             mem_gb: float | None = None, max_num_timeout: int = 10) -> Any:
    """A submitit executor: ``slurm`` (sbatch job arrays) or ``submitit-local`` (the same code on this machine).

    ``slurm_extra``: 'key=value' sbatch options (e.g. 'account=abc', 'constraint=a100', 'qos=high'); jobs are
    submitted with ``--requeue`` (so that Slurm requeues a preempted task) unless 'requeue' is given there.
    ``mem_gb``: memory per task (None: no request). ``max_num_timeout``: how many time-limit requeues a task
    gets (submitit's count; preemptions do not count).
    """
    try:
        import submitit
    except ImportError:
        raise SystemExit('launch.py: --backend slurm needs submitit (pip install submitit)') from None
    cluster = 'slurm' if backend == 'slurm' else 'local'
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster, slurm_max_num_timeout=max_num_timeout,
                               local_max_num_timeout=max_num_timeout)
    params: dict[str, Any] = dict(timeout_min=timeout_min, nodes=1, tasks_per_node=1, cpus_per_task=cpus_per_job)
    if gpus_per_job:
        params['gpus_per_node'] = gpus_per_job
    if mem_gb:
        params['mem_gb'] = mem_gb
    if cluster == 'slurm':
        extra: dict[str, Any] = {'requeue': True}
        extra.update(item.split('=', 1) for item in slurm_extra)
        params.update(slurm_array_parallelism=array_parallelism, slurm_signal_delay_s=120,
                      slurm_additional_parameters=extra)
        if partition:
            params['slurm_partition'] = partition
    ex.update_parameters(**params)
    return ex


def _submit(ex: Any, commands: list[list[str]], gpus_per_job: int, log_dir: Path
            ) -> tuple[list[TrainingRun], list[Any]]:
    runs = [TrainingRun(argv, gpus_per_job, str(log_dir)) for argv in commands]
    with ex.batch():
        jobs = [ex.submit(run) for run in runs]
    print(f'submitted {len(jobs)} task(s): {", ".join(j.job_id for j in jobs[:3])}{" ..." if len(jobs) > 3 else ""}',
          flush=True)
    return runs, jobs


def run_stage(ex: Any, commands: list[list[str]], gpus_per_job: int, log_dir: Path, poll_s: float,
              wait_for_busy: bool = True) -> int:
    """Submit one stage as a job array, wait for it, print each task's outcome; returns the number failed.

    Runs whose lock another process holds are not submitted ('[busy]'); with ``wait_for_busy`` (a later stage
    may need them) the launcher waits here, on no GPU, for their locks, and submits those that ended unfinished.
    """
    failed = 0
    todo = [list(c) for c in commands]
    deferred: list[list[str]] = []
    while todo or deferred:
        ready = []
        for argv in todo:
            if lock_is_held(run_dir_of(argv)):
                print(f'{BUSY} {run_dir_of(argv).name}: another process holds its lock (it trains the run); '
                      'not submitted', flush=True)
                deferred.append(argv)
            else:
                ready.append(argv)
        todo = []
        if ready:
            runs, jobs = _submit(ex, ready, gpus_per_job, log_dir)
            pending = dict(enumerate(jobs))
            while pending:
                for i, job in list(pending.items()):
                    if job.done():
                        del pending[i]
                        try:
                            result = job.result()
                        except Exception as error:    # the task's exception, re-raised by submitit
                            failed += 1
                            print(f'[FAILED] {shlex.join(runs[i].argv)}: {str(error).strip().splitlines()[-1]}',
                                  flush=True)
                            continue
                        print(result, flush=True)
                        if str(result).startswith(BUSY):
                            deferred.append(runs[i].argv)
                time.sleep(poll_s)
        if deferred and not wait_for_busy:
            print(f'{len(deferred)} run(s) held by another process were left to it', flush=True)
            break
        if deferred:
            print(f'waiting for {len(deferred)} run(s) held by another process before the next stage', flush=True)
            while deferred and all(lock_is_held(run_dir_of(argv)) for argv in deferred):
                time.sleep(max(poll_s, 1.0))
            freed = [argv for argv in deferred if not lock_is_held(run_dir_of(argv))]
            deferred = [argv for argv in deferred if argv not in freed]
            for argv in freed:       # finished by the other process: nothing to submit; else taken over here
                if plan(argv).action == 'skip':
                    print(f'[skip] {run_dir_of(argv).name}: finished by the other process', flush=True)
                else:
                    todo.append(argv)
    return failed
