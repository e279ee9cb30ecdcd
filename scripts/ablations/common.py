"""What the ablation scripts share: their command line, grid -> train_student.py commands, running the
commands through scripts/launch.py (finished runs skipped, killed ones resumed), and reading the runs back.

A grid point is a ``Variant``: a ``--distill`` name and its flags. Its runs are the trials 1..N; a point that
is not its method's default configuration gets the trial label ``<tag>_<n>`` (and ``--seed n``, so every
point of a grid uses the same seeds), because the run-folder name only holds the method and -r/-a/-b.
The default configurations keep the plain trial numbers, so the ablation scripts share those runs (letKD-2
at K_inter 8 is Fig. 1's K = 8 point, Table 5's last row and Table 4's alpha_inter = 1 student).
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import train_student
from helper.errors import UserError
from helper.options import teacher_name_from_path
from scripts import launch
from scripts.commands import teacher_path
from scripts.compare_with_paper import mean_std
from scripts.launch import BARRIER
from scripts.settings import METHODS, TRIALS_CIFAR

ROOT = Path(__file__).resolve().parents[2]

DEFAULT_SAVE_DIR = './save_ablations'
PUBLISHED_TEACHERS_DIR = './save'    # RepDistiller's teachers: save/models/<name>_vanilla/ckpt_epoch_240.pth
# args.json entries that may differ between a finished run and the grid's command without changing the result
NOT_COMPARED = {'resume', 'overwrite', 'device', 'num_workers', 'print_freq', 'tb_freq', 'save_freq', 'data_folder',
                'save_dir', 'path_t', 'trust_checkpoint', 'download'}


@dataclass(frozen=True)
class Variant:
    """One grid point: ``key`` (its label in tables and plots), ``--distill`` name, its flags, and the trial
    ``tag`` ('' for the method's default configuration)."""

    key: str
    distill: str
    flags: tuple[str, ...]
    tag: str = ''


def method_variant(key: str, label: str, extra: Iterable[str] = (), tag: str = '') -> Variant:
    """A Variant of a method of scripts/settings.py (its published flags) plus ``extra`` flags."""
    method = METHODS[label]
    return Variant(key, method.distill, (*method.published_flags, *extra), tag)


def parser_default(flag: str) -> object:
    """train_student.py's default of ``flag`` (its dest name)."""
    return train_student.get_args_parser().get_default(flag)


# ---------------------------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser, *, teacher: str, student: str, student_runs: bool = True) -> None:
    """The flags of the ablation scripts: data, pair, protocol, output, launcher (``student_runs``: the
    flags of the students' grid too). Parse with ``parse_args``."""
    g = parser.add_argument_group('setting (defaults: the paper\'s protocol)')
    g.add_argument('--dataset', default='cifar100', choices=('cifar100', 'tinyimagenet', 'imagenet', 'digits'))
    g.add_argument('--data_folder', default='./data')
    g.add_argument('--teacher', default=None,
                   help=f"teacher architecture (default: parsed from --path_t's folder as train_student.py does, "
                        f"else {teacher})")
    parser.set_defaults(default_teacher=teacher)
    g.add_argument('--student', default=student, help=f'student architecture (default {student})')
    g.add_argument('--path_t', default=None,
                   help=f'teacher checkpoint; default on cifar100: {PUBLISHED_TEACHERS_DIR}/models/<teacher>_vanilla/'
                        'ckpt_epoch_240.pth (RepDistiller\'s), elsewhere a teacher trained first into --save_dir')
    g.add_argument('--teacher_epochs', type=int, default=None, help='epochs of that teacher (default --epochs)')
    g.add_argument('--epochs', type=int, default=240)
    if student_runs:
        g.add_argument('--trials', type=int, default=TRIALS_CIFAR)
        g.add_argument('--k_penult', type=int, default=parser_default('k_penult'), help='penultimate codebook words')
    g.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    g.add_argument('--num_workers', type=int, default=8)
    g.add_argument('--extra', default='', help='flags appended to every training command, e.g. "--batch_size 32"')
    g = parser.add_argument_group('output and launcher')
    g.add_argument('--save_dir', default=DEFAULT_SAVE_DIR,
                   help='root of the runs (kept apart from ./save so compare_with_paper.py save/ never counts them)')
    g.add_argument('--out', default=None, help='folder of the figure / table (default <save_dir>/results)')
    g.add_argument('--gpus', default=None, help='comma-separated GPU ids (default: all visible; "" for CPU)')
    g.add_argument('--jobs_per_gpu', type=int, default=1)
    g.add_argument('--jobs', type=int, default=1, help='concurrent runs without a GPU')
    g.add_argument('--dry-run', dest='dry_run', action='store_true', help='print the training commands, run nothing')
    g.add_argument('--plot_only', action='store_true', help='train nothing; draw from what is there')
    g.add_argument('--poll', type=float, default=1.0, help=argparse.SUPPRESS)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, and resolve the teacher architecture: --teacher, else --path_t's folder, else the script's default.

    The training commands run in the repository root (scripts/launch.py); started elsewhere, the relative
    paths given here are made absolute so that they mean the same to the script and to the runs.
    """
    args = parser.parse_args(argv)
    for flag in ('data_folder', 'save_dir', 'out', 'path_t'):
        if getattr(args, flag) is not None:
            setattr(args, flag, for_the_runs(getattr(args, flag)))
    if args.teacher is None:
        args.teacher = (args.path_t and teacher_name_from_path(args.path_t)) or args.default_teacher
    return args


def for_the_runs(path: str) -> str:
    """``path`` as the runs (started in the repository root) must see it: absolute unless we are in the root."""
    return path if Path.cwd().resolve() == ROOT else str(Path(path).resolve())


def out_dir(args: argparse.Namespace) -> Path:
    path = Path(args.out or Path(args.save_dir) / 'results')
    path.mkdir(parents=True, exist_ok=True)
    return path


def _non_default(flag: str, value: object) -> list[str]:
    """``[--flag, value]`` unless it is train_student.py's default (keeps commands equal to the table scripts')."""
    return [] if value == parser_default(flag) else [f'--{flag}', str(value)]


def teacher_command(args: argparse.Namespace) -> tuple[str, list[str] | None]:
    """The teacher checkpoint, and the train_teacher.py command that makes it when it is trained here."""
    if args.path_t:
        return args.path_t, None
    if args.dataset == 'cifar100':
        return for_the_runs(teacher_path(PUBLISHED_TEACHERS_DIR, 'cifar100', args.teacher)), None
    epochs = args.teacher_epochs or args.epochs
    argv = ['python', 'train_teacher.py', '--model', args.teacher, '--dataset', args.dataset,
            '--data_folder', args.data_folder, '--epochs', str(epochs), '--trial', '0', '--save_dir', args.save_dir,
            *_non_default('device', args.device), *_non_default('num_workers', args.num_workers),
            *shlex.split(args.extra)]
    return str(launch.run_dir_of(argv) / f'ckpt_epoch_{epochs}.pth'), argv


def trial_label(tag: str, trial: int) -> str:
    return f'{tag}_{trial}' if tag else str(trial)


def student_command(args: argparse.Namespace, path_t: str, variant: Variant, trial: int) -> list[str]:
    """The train_student.py command of one trial of a grid point."""
    seed = ['--seed', str(trial)] if variant.tag else []
    model_t = [] if teacher_name_from_path(path_t) == args.teacher else ['--model_t', args.teacher]
    return ['python', 'train_student.py', '--path_t', path_t, *model_t, '--distill', variant.distill,
            '--model_s', args.student, '--dataset', args.dataset, '--data_folder', args.data_folder,
            '--trial', trial_label(variant.tag, trial), *seed, '--save_dir', args.save_dir, *variant.flags,
            *_non_default('epochs', args.epochs),
            *_non_default('k_penult', args.k_penult), *_non_default('device', args.device),
            *_non_default('num_workers', args.num_workers), *shlex.split(args.extra)]


@dataclass
class Grid:
    """The commands of a grid: ``runs[variant key]`` = one command per trial; ``teacher`` = its checkpoint path
    and the command training it (None for a given or published teacher)."""

    path_t: str
    teacher: list[str] | None
    runs: dict[str, list[list[str]]]

    def stages(self) -> list[list[list[str]]]:
        students = [argv for commands in self.runs.values() for argv in commands]
        return [stage for stage in ([self.teacher] if self.teacher else [], students) if stage]


def build_grid(args: argparse.Namespace, variants: Iterable[Variant]) -> Grid:
    path_t, teacher = teacher_command(args)
    runs = {v.key: [student_command(args, path_t, v, t) for t in range(1, args.trials + 1)] for v in variants}
    return Grid(path_t, teacher, runs)


# ---------------------------------------------------------------------------------------------- running

def print_commands(grid: Grid) -> None:
    """The commands, one per line, '# barrier' between stages: a file scripts/launch.py can run."""
    lines: list[str] = []
    for number, stage in enumerate(grid.stages()):
        if number:
            lines.append(BARRIER)
        lines += [shlex.join(argv) for argv in stage]
    print('\n'.join(lines))


def recorded_mismatches(argv: list[str], run_dir: Path) -> list[str]:
    """The settings in which the run in ``run_dir`` (its args.json) differs from the command ``argv``."""
    recorded_path = run_dir / 'args.json'
    if not recorded_path.is_file():
        return []
    recorded = json.loads(recorded_path.read_text())
    opt = train_student.resolve_options(train_student.get_args_parser().parse_args(argv[2:]))
    # a flag newer than the run (absent from its args.json) is not a difference
    return [f'{key}: run {recorded[key]!r}, asked {value!r}' for key, value in sorted(vars(opt).items())
            if value is not None and key not in NOT_COMPARED and key in recorded and recorded[key] != value]


def check_reusable(argv: list[str], run_dir: Path) -> None:
    """UserError when an existing run folder of this command was made with other settings."""
    wrong = recorded_mismatches(argv, run_dir)
    if wrong:
        raise UserError(f"{run_dir} holds a run with other settings ({'; '.join(wrong[:3])}); "
                        f"use another --save_dir or delete it")


def run_grid(args: argparse.Namespace, grid: Grid) -> int:
    """Run what is not finished, stage by stage; returns the number of failed runs (stops after a failed stage)."""
    if grid.teacher is None and not Path(grid.path_t).is_file():
        raise UserError(f"teacher checkpoint not found: {grid.path_t} (bash scripts/fetch_pretrained_teachers.sh "
                        "fetches the published CIFAR-100 teachers; or pass --path_t)")
    slots = launch.slots_from(args)
    log_dir = Path(args.save_dir) / 'logs'
    for stage in grid.stages():
        jobs = [launch.plan(argv) for argv in stage]
        for job in jobs:
            if job.argv[1] == 'train_student.py':
                check_reusable(job.argv, job.run_dir)
        todo = [job for job in jobs if job.action != 'skip']
        print(f'== {len(todo)} run(s) to do, {len(jobs) - len(todo)} finished already; logs in {log_dir}', flush=True)
        failed = launch.run_stage([job.argv for job in todo], slots, log_dir, args.poll)   # claims each run again
        if failed:
            print(f'{failed} run(s) failed; see {log_dir}', file=sys.stderr)
            return failed
    return 0


# ---------------------------------------------------------------------------------------------- results

@dataclass
class Run:
    """A finished run: its folder and summary.json."""

    run_dir: Path
    summary: dict


def finished_runs(commands: list[list[str]]) -> list[Run]:
    """The finished runs (summary.json present) among ``commands``; UserError for one made with other settings."""
    runs = []
    for argv in commands:
        run_dir = launch.run_dir_of(argv)
        if (run_dir / 'summary.json').is_file():
            check_reusable(argv, run_dir)
            runs.append(Run(run_dir, json.loads((run_dir / 'summary.json').read_text())))
    return runs


Cell = str | list  # a table cell: text, or the values over the trials (shown as mean +- std (n))


def fmt(values: list[float]) -> str:
    """'72.44 +- 0.21 (5)'; '-' without values."""
    if not values:
        return '-'
    mean, std = mean_std(values)
    return f'{mean:.2f} +- {std:.2f} ({len(values)})'


def fmt_delta(values: list[float], paper: float | None) -> str:
    return '-' if not values or paper is None else f'{statistics.fmean(values) - paper:+.2f}'


def accuracies(runs: list[Run], metric: str) -> list[float]:
    """``last_acc`` or ``best_acc`` of each run."""
    return [float(run.summary[f'{metric}_acc']) for run in runs]


def paper_value(args: argparse.Namespace, pair: tuple[str, str, str], value: float) -> float | None:
    """The paper's number when the runs use the setting it was measured in, else None."""
    return value if (args.dataset, args.teacher, args.student) == pair else None


def write_table(out: Path, name: str, header: list[str], rows: list[list[Cell]], title: str) -> str:
    """Write ``<name>.md`` (title + Markdown table, values as mean +- std (n)) and ``<name>.csv`` (a column of
    values becomes three: '<column> mean', '<column> std', '<column> n'); return the Markdown."""
    lines = [f'{title}\n', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(fmt(c) if isinstance(c, list) else c for c in row) + ' |' for row in rows]
    text = '\n'.join(lines) + '\n'
    (out / f'{name}.md').write_text(text)
    stats = {i for row in rows for i, cell in enumerate(row) if isinstance(cell, list)}
    with open(out / f'{name}.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow([part for i, h in enumerate(header)
                         for part in ((f'{h} mean', f'{h} std', f'{h} n') if i in stats else (h,))])
        for row in rows:
            writer.writerow([part for cell in row
                             for part in (_stat_columns(cell) if isinstance(cell, list) else (cell,))])
    return text


def _stat_columns(values: list[float]) -> tuple[str, str, str]:
    if not values:
        return '', '', '0'
    mean, std = mean_std(values)
    return f'{mean:.4f}', f'{std:.4f}', str(len(values))


def missing_note(grid: Grid, runs: dict[str, list[Run]]) -> str:
    """'' or a line naming how many runs of each grid point are not finished."""
    missing = [f'{key} {len(runs[key])}/{len(commands)}' for key, commands in grid.runs.items()
               if len(runs[key]) < len(commands)]
    return f"unfinished runs (finished/asked): {', '.join(missing)}" if missing else ''


def finish_report(text: str, note: str, written: list[Path], failed: int) -> int:
    """Print a script's table, its unfinished-runs note and the files written; the exit code (1 if a run failed)."""
    print(text)
    if note:
        print(note)
    print(f"wrote {', '.join(str(path) for path in written)}")
    return 1 if failed else 0


def main_wrapper(body: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Run a script's body; a UserError becomes one line on stderr and exit code 2."""
    try:
        return body(argv)
    except UserError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
