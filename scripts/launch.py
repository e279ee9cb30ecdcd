"""Run a list of training commands across the visible GPUs, N jobs per GPU, from a queue.

    python scripts/commands.py distill --trials 5 > table1.txt
    python scripts/launch.py table1.txt --jobs_per_gpu 3          # every GPU, 3 runs on each
    python scripts/launch.py table1.txt --gpus 0,1 --dry-run      # what would run, skip or resume

One command per line (train_teacher.py / train_student.py, or helper/letkd_offline.py for an offline stage;
'#' lines are comments, and a '# barrier' line waits for everything above it to finish). For each command the
launcher works out its run folder: a run whose summary.json exists is skipped, one with a last.pth is
continued with --resume, one whose folder exists without a checkpoint is restarted with --overwrite. Each run
logs to <log_dir>/<run folder name>.log. Without GPUs, --jobs runs that many at once on the CPU.

One process trains a run at a time (scripts/runs.py ``claim``): the launcher takes the run's lock when it
starts it, decides from the files under that lock, and hands the lock to the training process. A run whose
lock is held (another launcher, or a Slurm task, trains it) is skipped with '[busy]'; before the next stage
the launcher waits for such runs to end, and takes over any that ended unfinished. Relaunching a sweep, or
launching it twice at once, therefore trains every run once.

Offline stages (scripts/commands.py puts the letKD/QUEST quantizer builds in a stage of their own before the
runs that load them): each offline command runs as one process on one GPU (all GPUs in use, one build each),
and is skipped when every run that would load its files is finished.

--gpus takes positions among this process's visible GPUs; each child's CUDA_VISIBLE_DEVICES gets
the matching entry of the parent's (an index or a UUID). CPU children see no GPU and get --device cpu
unless their command names a device.

Runs on several GPUs (ImageNet): ``--gpus_per_job N`` gives each run N GPUs and starts it as
``python -m torch.distributed.run --standalone --nproc_per_node N train_student.py ...`` (torchrun).

Slurm (through submitit): ``--backend slurm`` submits each stage as one job array, one run per task,
``--gpus_per_job`` GPUs per task (offline stages: one), ``--mem_gb`` of memory per task, and waits for the
stage before the next; a task that is preempted or reaches its time limit is requeued and continues from its
run's last.pth (``--resume``, decided again when the task starts; ``--max_num_timeout`` time-limit requeues at
most, preemptions do not count). ``--backend submitit-local`` runs the same code path with submitit's local
executor.

    python scripts/launch.py table2.txt --backend slurm --partition gpu --gpus_per_job 8 --timeout_min 2880
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

from scripts.runs import (ROOT, Job, claim, has_flag, is_offline, lock_is_held, plan, quantizer_key,  # noqa: F401
                          run_dir_of, with_processes)

BARRIER = '# barrier'


def read_stages(path: str) -> list[list[list[str]]]:
    """Commands grouped into stages separated by '# barrier' lines."""
    text = sys.stdin.read() if path == '-' else Path(path).read_text()
    stages: list[list[list[str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if line == BARRIER:
            stages.append([])
        elif line and not line.startswith('#'):
            stages[-1].append(shlex.split(line))
    return [s for s in stages if s]


def parent_visible_devices(env: Mapping[str, str]) -> list[str] | None:
    """The parent's CUDA_VISIBLE_DEVICES entries (indices or GPU/MIG UUIDs), or None when it is unset."""
    value = env.get('CUDA_VISIBLE_DEVICES')
    if value is None:
        return None
    return [d.strip() for d in value.split(',') if d.strip()]


def child_device(position: str, visible: list[str] | None) -> str:
    """The CUDA_VISIBLE_DEVICES value for a child that runs on GPU ``position`` of the parent's visible list.

    Positions count the GPUs this process sees (as torch numbers them); under CUDA_VISIBLE_DEVICES=4,5
    position 1 is the machine's GPU 5, not its GPU 1.
    """
    if visible is None:
        return position
    try:
        return visible[int(position)]
    except (ValueError, IndexError):
        raise SystemExit(f'launch.py: --gpus {position!r} is not a position in the visible GPUs '
                         f'(CUDA_VISIBLE_DEVICES={",".join(visible)!r})') from None


def slots_from(args: argparse.Namespace, env: Mapping[str, str] | None = None, per_job: int | None = None,
               jobs_per_gpu: int | None = None) -> list[str | None]:
    """One entry per concurrent job: the child's CUDA_VISIBLE_DEVICES value, or None for a CPU slot.

    ``--gpus`` (and the default, every visible GPU) gives positions in this process's visible list;
    they are mapped through the parent's CUDA_VISIBLE_DEVICES.
    """
    env = os.environ if env is None else env
    if args.gpus is None:
        import torch
        gpus = [str(i) for i in range(torch.cuda.device_count())]
    else:
        gpus = [g.strip() for g in args.gpus.split(',') if g.strip() != '']
    if not gpus:
        return [None] * args.jobs
    visible = parent_visible_devices(env)
    per_job = max(1, getattr(args, 'gpus_per_job', 1) if per_job is None else per_job)
    jobs_per_gpu = args.jobs_per_gpu if jobs_per_gpu is None else jobs_per_gpu
    if len(gpus) % per_job:
        raise SystemExit(f'launch.py: {len(gpus)} GPUs cannot be split into groups of --gpus_per_job {per_job}')
    groups = [gpus[i:i + per_job] for i in range(0, len(gpus), per_job)]
    return [','.join(child_device(g, visible) for g in group) for group in groups for _ in range(jobs_per_gpu)]


def launch(job: Job, gpu: str | None, log_dir: Path) -> subprocess.Popen:
    """Start ``job`` on its GPUs (``gpu`` is the child's CUDA_VISIBLE_DEVICES value; several GPUs: torchrun with
    one process each) or, for None, on the CPU. The child inherits the run's lock (``job.lock``), which this
    process then lets go: the lock lives as long as the child.

    A CPU child sees no GPU (CUDA_VISIBLE_DEVICES='') and gets ``--device cpu`` unless it names a device.
    """
    env = dict(os.environ)
    argv = list(job.argv)
    if gpu is not None:
        env['CUDA_VISIBLE_DEVICES'] = gpu
        argv = with_processes(argv, len(gpu.split(',')))
    else:
        env['CUDA_VISIBLE_DEVICES'] = ''
        if not has_flag(argv, '--device'):
            argv += ['--device', 'cpu']
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f'{job.name}.log', 'a')
    log.write(f'\n$ {shlex.join(argv)}\n')
    log.flush()
    argv = [sys.executable if a == 'python' else a for a in argv]
    fds = job.lock.inheritable_fds() if job.lock is not None else ()
    try:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, pass_fds=fds)
    finally:
        log.close()
        if job.lock is not None and fds:     # the child holds it now (without flock: this process, until it ends)
            job.lock.release()


def run_stage(commands: list[list[str]], slots: list[str | None], log_dir: Path, poll_s: float,
              wait_for_busy: bool = True) -> int:
    """Run ``commands`` with at most one per slot; returns the number of failed runs.

    Each run is claimed (scripts/runs.py ``claim``) when a slot is free for it. Runs held by another process are
    skipped ('[busy]'); with ``wait_for_busy`` (a later stage may need them) the stage ends only when their locks
    are free, and any that ended unfinished is run here.
    """
    queue = [list(c) for c in commands]
    deferred: list[list[str]] = []
    running: dict[int, tuple[subprocess.Popen, Job]] = {}
    failed, waiting_said = 0, False
    try:
        while queue or running or (deferred and wait_for_busy):
            for slot in range(len(slots)):
                while slot not in running and queue:
                    job = claim(queue.pop(0))
                    if job.action == 'skip':
                        print(f'[skip] {job.name}: finished', flush=True)
                        continue
                    if job.action == 'busy':
                        print(f'[busy] {job.name}: another process holds its lock (it trains the run); skipped',
                              flush=True)
                        deferred.append(job.argv)
                        continue
                    where = 'gpu ' + slots[slot] if slots[slot] else 'cpu'
                    print(f'[{job.action}] {job.name} on {where}', flush=True)
                    running[slot] = (launch(job, slots[slot], log_dir), job)
            for slot, (proc, job) in list(running.items()):
                if proc.poll() is not None:
                    del running[slot]
                    if job.lock is not None:
                        job.lock.release()
                    status = 'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'
                    failed += proc.returncode != 0
                    print(f'[{status}] {job.name}', flush=True)
            if not queue and not running and deferred:
                if not wait_for_busy:
                    break
                if not waiting_said:
                    print(f'waiting for {len(deferred)} run(s) held by another process before the next stage',
                          flush=True)
                    waiting_said = True
                freed = [argv for argv in deferred if not lock_is_held(run_dir_of(argv))]
                deferred = [argv for argv in deferred if argv not in freed]
                queue.extend(freed)      # claimed again: skipped when finished, taken over when not
                if queue:
                    continue
            time.sleep(poll_s)
    except KeyboardInterrupt:
        for proc, _ in running.values():
            proc.terminate()
        raise
    if deferred:
        print(f'{len(deferred)} run(s) held by another process were left to it: '
              + ', '.join(run_dir_of(argv).name for argv in deferred), flush=True)
    return failed


def offline_needed(stages: list[list[list[str]]]) -> set[tuple]:
    """The quantizer keys (scripts/runs.py ``quantizer_key``) of the letKD/QUEST runs left to train."""
    keys = set()
    for commands in stages:
        for argv in commands:
            key = None if is_offline(argv) else quantizer_key(argv)
            if key is not None and plan(argv).action != 'skip':
                keys.add(key)
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('commands', help="file with one command per line, or '-' for stdin")
    parser.add_argument('--gpus', default=None, help='comma-separated GPU positions among the visible ones, mapped through '
                             'CUDA_VISIBLE_DEVICES (default: all visible; "" for CPU)')
    parser.add_argument('--jobs_per_gpu', type=int, default=1)
    parser.add_argument('--jobs', type=int, default=1, help='concurrent jobs when there is no GPU')
    parser.add_argument('--gpus_per_job', type=int, default=1,
                        help='GPUs per run; more than 1 starts each run with torchrun, one process per GPU '
                             '(offline stages always use one GPU per command)')
    parser.add_argument('--log_dir', default='./save/logs')
    parser.add_argument('--dry-run', dest='dry_run', action='store_true', help='print the plan, run nothing')
    parser.add_argument('--poll', type=float, default=1.0, help=argparse.SUPPRESS)
    slurm = parser.add_argument_group('Slurm (submitit)')
    slurm.add_argument('--backend', choices=('local', 'slurm', 'submitit-local'), default='local',
                       help='local: this machine\'s queue; slurm: job arrays through submitit; submitit-local: '
                            'submitit\'s local executor (the Slurm code path on this machine)')
    slurm.add_argument('--partition', default=None)
    slurm.add_argument('--timeout_min', type=int, default=24 * 60,
                       help='time limit per task; a task that reaches it is requeued and resumes')
    slurm.add_argument('--max_num_timeout', type=int, default=10,
                       help='time-limit requeues per task before it counts as failed (preemptions do not count)')
    slurm.add_argument('--cpus_per_job', type=int, default=10, help='CPUs per task (data-loading workers)')
    slurm.add_argument('--mem_gb', type=float, default=None,
                       help='memory per task in GB; default: 32 per GPU of the task (at least 32), offline stages '
                            '64; 0: no request (the partition\'s default)')
    slurm.add_argument('--array_parallelism', type=int, default=64, help='tasks of an array running at once')
    slurm.add_argument('--slurm', action='append', default=[], metavar='KEY=VALUE',
                       help='extra sbatch option, e.g. --slurm account=abc --slurm constraint=a100')
    slurm.add_argument('--submitit_dir', default='./save/submitit', help="submitit's job folder (its logs, pickles)")
    args = parser.parse_args(argv)
    for item in args.slurm:
        if '=' not in item:
            parser.error(f'--slurm {item!r}: expected KEY=VALUE')
    if args.mem_gb is not None and args.mem_gb < 0:
        parser.error('--mem_gb must be >= 0')

    stages = read_stages(args.commands)
    on_slurm = args.backend != 'local'
    log_dir = Path(args.log_dir).resolve()
    needed = offline_needed(stages) if any(is_offline(c) for s in stages for c in s) else set()
    failed = 0
    for number, commands in enumerate(stages, 1):
        jobs = [plan(c) for c in commands]
        for job in jobs:
            if job.action == 'offline' and quantizer_key(job.argv) not in needed:
                job.action = 'skip'      # every run that loads these quantizers is finished
        todo = [j for j in jobs if j.action != 'skip']
        print(f'== stage {number}/{len(stages)}: {len(todo)} to run, {len(jobs) - len(todo)} finished already',
              flush=True)
        if args.dry_run:
            for job in jobs:
                print(f'[{job.action}] {shlex.join(job.argv)}')
            continue
        if not todo:
            continue
        offline = all(j.action == 'offline' for j in todo)
        later = number < len(stages)
        if on_slurm:
            from scripts import slurm as slurm_backend
            gpus = 0 if args.gpus == '' else (1 if offline else args.gpus_per_job)
            ex = slurm_backend.executor(args.backend, Path(args.submitit_dir), gpus_per_job=gpus,
                                        cpus_per_job=args.cpus_per_job, timeout_min=args.timeout_min,
                                        partition=args.partition, array_parallelism=args.array_parallelism,
                                        slurm_extra=args.slurm, mem_gb=slurm_backend.memory_gb(args.mem_gb, gpus,
                                                                                               offline),
                                        max_num_timeout=args.max_num_timeout)
            # each task claims and plans its run again when it starts (a requeued task resumes)
            failed += slurm_backend.run_stage(ex, [j.argv for j in todo], gpus, log_dir, args.poll,
                                              wait_for_busy=later)
        else:
            slots = slots_from(args, per_job=1, jobs_per_gpu=1) if offline else slots_from(args)
            failed += run_stage([j.argv for j in todo], slots, log_dir, args.poll, wait_for_busy=later)
    if failed:
        print(f'{failed} run(s) failed; see {args.log_dir}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
