"""What to do with one command of a sweep: its run folder, whether to run, resume, restart or skip it, and the
lock that gives one process at a time the right to train it (shared by scripts/launch.py and its Slurm backend,
scripts/slurm.py).

Commands are training runs (train_teacher.py / train_student.py) or offline stages (helper/letkd_offline.py:
letKD/QUEST quantizers, built once per teacher before the runs that load them; scripts/commands.py writes them).

Locks: ``claim`` takes an exclusive, non-blocking lock on ``<run folder>.lock`` (beside the run folder, so that
``--overwrite`` cannot delete it) and only then decides from the run's files; a run whose lock is held by another
process is ``busy``. The lock is an ``flock`` on an open file: the launcher hands the descriptor to the process
that trains the run (``Popen(pass_fds=...)``), so the lock lives exactly as long as that process (and its
torchrun workers' parent), whoever started it and whatever happens to the launcher; a requeued Slurm task takes
it again when it starts. On a cluster the save folder must be on a file system whose ``flock`` works across
machines (NFSv4, or Lustre mounted with ``-o flock``; not ``localflock``).
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]   # children run from the repository root
TRAINING_SCRIPTS = ('train_student.py', 'train_teacher.py')
OFFLINE_SCRIPT = 'letkd_offline.py'          # helper/letkd_offline.py


@dataclass
class Job:
    argv: list[str]
    run_dir: Path
    action: str          # 'run', 'resume', 'restart', 'skip', 'busy' (held by another process) or 'offline'
    lock: 'RunLock | None' = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.run_dir.name


def script_of(argv: list[str]) -> str | None:
    """The training or offline script a command runs (its file name), or None."""
    for a in argv:
        name = Path(a).name
        if name in TRAINING_SCRIPTS or name == OFFLINE_SCRIPT:
            return name
    return None


def is_offline(argv: list[str]) -> bool:
    return script_of(argv) == OFFLINE_SCRIPT


def _flags(argv: list[str]) -> list[str]:
    script = script_of(argv)
    if script is None:
        raise ValueError(f'not a training or offline command: {shlex.join(argv)}')
    at = next(i for i, a in enumerate(argv) if Path(a).name == script)
    return argv[at + 1:]


def run_dir_of(argv: list[str]) -> Path:
    """The run folder a train_teacher.py / train_student.py command line will write; for an offline command
    the name its log and lock carry (``<save_dir>/cache/letkd/offline_<teacher>_for_<student>_<dataset>``)."""
    flags = _flags(argv)
    script = script_of(argv)
    if script == OFFLINE_SCRIPT:
        opt = offline_options(argv)
        from helper.options import teacher_name_from_path
        teacher = opt.model_t or teacher_name_from_path(opt.path_t)
        layers = '+'.join(sorted(opt.layers))
        return Path(opt.save_dir) / 'cache' / 'letkd' / f'offline_{teacher}_for_{opt.model_s}_{opt.dataset}_{layers}'
    import train_student
    import train_teacher
    cli = train_student if script == 'train_student.py' else train_teacher
    return cli.resolve_run_dir(cli.get_args_parser().parse_args(flags))


def offline_options(argv: list[str]):
    """The parsed flags of a helper/letkd_offline.py command."""
    from helper.letkd_offline import get_args_parser
    return get_args_parser().parse_args(_flags(argv))


def quantized_distiller(distill: str) -> bool:
    """Whether ``--distill distill`` loads letKD/QUEST quantizers (helper/letkd_offline.py files)."""
    from distiller_zoo.letkd import QuantizedKD
    from distiller_zoo.registry import ALIASES, DISTILLERS
    cls = DISTILLERS.get(ALIASES.get(distill, distill))
    return cls is not None and issubclass(cls, QuantizedKD)


def quantizer_key(argv: list[str]) -> tuple[str, str, str, str] | None:
    """(save folder, teacher, dataset, data folder) of a letKD/QUEST training run or an offline command, which
    pairs an offline stage with the runs that load its files; None for any other command."""
    script = script_of(argv)
    if script == OFFLINE_SCRIPT:
        opt = offline_options(argv)
    elif script == 'train_student.py':
        import train_student
        opt = train_student.get_args_parser().parse_args(_flags(argv))
        if not quantized_distiller(opt.distill):
            return None
    else:
        return None
    return str(Path(opt.save_dir).resolve()), str(opt.path_t), opt.dataset, str(Path(opt.data_folder).resolve())


def plan(argv: list[str]) -> Job:
    """Decide what to do with one command from the state of its run folder (no lock: see ``claim``).

    An offline command is always 'offline': the stage reuses the files it finds (under its own file lock) and
    builds what is missing; scripts/launch.py skips it when no run that needs it is left to train.
    """
    run_dir = run_dir_of(argv)
    if is_offline(argv):
        return Job(list(argv), run_dir, 'offline')
    argv = [a for a in argv if a not in ('--resume', '--overwrite')]
    if (run_dir / 'summary.json').is_file():
        return Job(argv, run_dir, 'skip')
    if (run_dir / 'last.pth').is_file():
        return Job(argv + ['--resume'], run_dir, 'resume')
    if run_dir.exists() and any(run_dir.iterdir()):
        return Job(argv + ['--overwrite'], run_dir, 'restart')
    return Job(argv, run_dir, 'run')


def lock_path(run_dir: Path) -> Path:
    """``<parent>/.<run folder>.lock``: beside the run folder, which ``--overwrite`` may delete."""
    return run_dir.parent / f'.{run_dir.name}.lock'


class RunLock:
    """An exclusive, non-blocking lock on a file (``flock`` where the platform has it: held by every process
    that has the descriptor, released when the last one closes it or exits; elsewhere filelock's lock, held by
    this process)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self._fallback = None

    def acquire(self) -> bool:
        """True when this process now holds the lock, False when another process does."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:      # Windows: filelock's lock (not inherited by children)
            from filelock import FileLock, Timeout
            self._fallback = FileLock(str(self.path))
            try:
                self._fallback.acquire(timeout=0)
            except Timeout:
                self._fallback = None
                return False
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f'{os.uname().nodename if hasattr(os, "uname") else ""} pid {os.getpid()}\n'.encode())
        return True

    def inheritable_fds(self) -> tuple[int, ...]:
        """The descriptor to hand to the process that trains the run (``Popen(pass_fds=...)``)."""
        return () if self.fd is None else (self.fd,)

    def release(self) -> None:
        """Close this process's descriptor (a child that inherited it keeps the lock until it exits)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self._fallback is not None:
            self._fallback.release()
            self._fallback = None

    def __enter__(self) -> 'RunLock':
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim(argv: list[str]) -> Job:
    """``plan`` under the run's lock. 'busy': another process holds the lock (it trains the run now); 'skip':
    the run is finished (the lock is let go again). Otherwise ``job.lock`` holds the lock: pass its descriptor to
    the process that trains the run, then ``release`` it here. Offline commands take no lock (helper/
    letkd_offline.py serialises its builds under a lock per teacher)."""
    run_dir = run_dir_of(argv)
    if is_offline(argv):
        return plan(argv)
    lock = RunLock(lock_path(run_dir))
    if not lock.acquire():
        return Job([a for a in argv if a not in ('--resume', '--overwrite')], run_dir, 'busy')
    job = plan(argv)
    if job.action == 'skip':
        lock.release()
    else:
        job.lock = lock
    return job


def lock_is_held(run_dir: Path) -> bool:
    """Whether another process holds the run's lock now (takes and lets go of it when free)."""
    lock = RunLock(lock_path(run_dir))
    if lock.acquire():
        lock.release()
        return False
    return True


def has_flag(argv: list[str], flag: str) -> bool:
    """Whether ``flag`` appears in ``argv`` as ``--flag value`` or ``--flag=value``."""
    return any(a == flag or a.startswith(flag + '=') for a in argv)


def with_processes(argv: list[str], nproc: int) -> list[str]:
    """``argv`` started by torchrun with ``nproc`` processes on this machine (unchanged for one process and for
    offline commands, which run as one process on one GPU).

    ``python train_student.py ...`` becomes ``python -m torch.distributed.run --standalone --nproc_per_node N
    train_student.py ...``; a command that already starts torchrun is left as it is.
    """
    if nproc <= 1 or is_offline(argv) or any(a in ('torchrun', 'torch.distributed.run') or a.endswith('/torchrun')
                                             for a in argv):
        return list(argv)
    at = next(i for i, a in enumerate(argv) if a.endswith(TRAINING_SCRIPTS))
    return ['python', '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc), *argv[at:]]


def main(argv: list[str] | None = None) -> int:
    """For sbatch scripts that start one run themselves (scripts/slurm_multinode.sbatch):

        python -m scripts.runs train_student.py FLAGS...              # the flags to start it with, or nothing
        python -m scripts.runs --lock_path train_student.py FLAGS...  # the file to flock while it trains

    The first prints the planned flags (with --resume when the run has a last.pth, --overwrite for a folder
    without one) or nothing for a finished run; both exit 0.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    want_lock = bool(args) and args[0] == '--lock_path'
    args = args[1:] if want_lock else args
    if not args or script_of(args) not in TRAINING_SCRIPTS:
        print('usage: python -m scripts.runs [--lock_path] train_student.py|train_teacher.py FLAGS...',
              file=sys.stderr)
        return 2
    command = ['python', *args]
    if want_lock:
        print(lock_path(run_dir_of(command)))
        return 0
    job = plan(command)
    if job.action != 'skip':
        print(shlex.join(_flags(job.argv)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
