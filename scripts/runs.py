"""What to do with one training command: its run folder and whether to run, resume, restart or skip it
(shared by scripts/launch.py and its Slurm backend, scripts/slurm.py)."""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]   # children run from the repository root


@dataclass
class Job:
    argv: list[str]
    run_dir: Path
    action: str          # 'run', 'resume', 'restart' or 'skip'


def run_dir_of(argv: list[str]) -> Path:
    """The run folder a train_teacher.py / train_student.py command line will write."""
    script = next((a for a in argv if a.endswith(('train_student.py', 'train_teacher.py'))), None)
    if script is None:
        raise ValueError(f'not a training command: {shlex.join(argv)}')
    flags = argv[argv.index(script) + 1:]
    import train_student
    import train_teacher
    cli = train_student if script.endswith('train_student.py') else train_teacher
    return cli.resolve_run_dir(cli.get_args_parser().parse_args(flags))


def plan(argv: list[str]) -> Job:
    """Decide what to do with one command from the state of its run folder."""
    run_dir = run_dir_of(argv)
    argv = [a for a in argv if a not in ('--resume', '--overwrite')]
    if (run_dir / 'summary.json').is_file():
        return Job(argv, run_dir, 'skip')
    if (run_dir / 'last.pth').is_file():
        return Job(argv + ['--resume'], run_dir, 'resume')
    if run_dir.exists() and any(run_dir.iterdir()):
        return Job(argv + ['--overwrite'], run_dir, 'restart')
    return Job(argv, run_dir, 'run')


def has_flag(argv: list[str], flag: str) -> bool:
    """Whether ``flag`` appears in ``argv`` as ``--flag value`` or ``--flag=value``."""
    return any(a == flag or a.startswith(flag + '=') for a in argv)


def with_processes(argv: list[str], nproc: int) -> list[str]:
    """``argv`` started by torchrun with ``nproc`` processes on this machine (unchanged for one process).

    ``python train_student.py ...`` becomes ``python -m torch.distributed.run --standalone --nproc_per_node N
    train_student.py ...``; a command that already starts torchrun is left as it is.
    """
    if nproc <= 1 or any(a in ('torchrun', 'torch.distributed.run') or a.endswith('/torchrun') for a in argv):
        return list(argv)
    at = next(i for i, a in enumerate(argv) if a.endswith(('train_student.py', 'train_teacher.py')))
    return ['python', '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc), *argv[at:]]
