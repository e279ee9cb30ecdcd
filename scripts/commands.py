"""Print the command lines of a sweep, one per line, from the settings table (scripts/settings.py).

    python scripts/commands.py vanilla                       # teachers + students from scratch, CIFAR-100
    python scripts/commands.py distill --trials 5            # every Table-1 method x pair
    python scripts/commands.py tinyimagenet --trials 3       # Table 3: teachers, students, methods
    python scripts/commands.py distill --methods letKD-2 KD --pairs resnet56:resnet20
    python scripts/commands.py distill --fast                # every run on the fast path (or --extra "--fast")

A line '# barrier' separates stages that depend on each other (teachers before their students);
scripts/launch.py finishes a stage before starting the next.
"""
from __future__ import annotations

import argparse
import shlex
import sys


from models import feature_channels
from scripts.launch import BARRIER
from scripts.settings import (CIFAR_STUDENTS, CIFAR_TEACHERS, EXTRA_METHODS, METHODS, TABLE1_METHODS,
                              TABLE1_PAIRS, TABLE3_METHODS, TABLE3_PAIRS, TRIALS_CIFAR, TRIALS_TINYIMAGENET,
                              pair_flags)



def runnable(label: str, teacher: str, student: str) -> bool:
    """False for the pairs a method cannot handle (FSP/KDSVD need equal channels per stage)."""
    if METHODS[label].needs_equal_channels:
        s, t = feature_channels(student), feature_channels(teacher)
        return len(s) == len(t) and s == t
    return True


def teacher_path(save_dir: str, dataset: str, teacher: str) -> str:
    """RepDistiller's published teachers for CIFAR-100; ours (trial 0) elsewhere."""
    if dataset == 'cifar100':
        return f'{save_dir}/models/{teacher}_vanilla/ckpt_epoch_240.pth'
    from helper.util import default_learning_rate
    return (f'{save_dir}/models/{teacher}_{dataset}_lr_{default_learning_rate(teacher)}_decay_0.0005_trial_0/'
            'ckpt_epoch_240.pth')


def vanilla_lines(models: list[str], dataset: str, trials: int, save_dir: str, common: list[str]) -> list[str]:
    return [shlex.join(['python', 'train_teacher.py', '--model', m, '--dataset', dataset, '--trial', str(t),
                        '--save_dir', save_dir, *common])
            for m in models for t in range(trials)]


def distill_lines(labels: list[str], pairs: list[tuple[str, str]], dataset: str, trials: int, save_dir: str,
                  common: list[str]) -> list[str]:
    lines = []
    for teacher, student in pairs:
        for label in labels:
            if not runnable(label, teacher, student):
                continue
            method = METHODS[label]
            for trial in range(1, trials + 1):
                lines.append(shlex.join([
                    'python', 'train_student.py', '--path_t', teacher_path(save_dir, dataset, teacher),
                    '--distill', method.distill, '--model_s', student, '--dataset', dataset, '--trial', str(trial),
                    '--save_dir', save_dir, *method.flags, *pair_flags(label, teacher, student), *common]))
    return lines


def parse_pairs(items: list[str] | None, default: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if not items:
        return default
    return [tuple(item.split(':', 1)) for item in items]  # type: ignore[misc]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('sweep', choices=('vanilla', 'distill', 'tinyimagenet'))
    parser.add_argument('--trials', type=int, default=None, help='default: 5 on CIFAR-100, 3 on Tiny-ImageNet')
    parser.add_argument('--methods', nargs='*', default=None, help=f"labels among: {', '.join(METHODS)}")
    parser.add_argument('--pairs', nargs='*', default=None, help='teacher:student pairs (default: the table\'s)')
    parser.add_argument('--save_dir', default='./save')
    parser.add_argument('--data_folder', default='./data')
    parser.add_argument('--extra', default='', help='flags appended to every command, e.g. "--epochs 1"')
    parser.add_argument('--fast', action='store_true',
                        help='append --fast (the fast path, README "Speed") to every command; the same as --extra --fast')
    args = parser.parse_args(argv)
    if args.fast:
        args.extra = f'{args.extra} --fast'.strip()
    for label in args.methods or []:
        if label not in METHODS:
            parser.error(f'unknown method label {label!r}')
    common = ['--data_folder', args.data_folder, *shlex.split(args.extra)]

    if args.sweep == 'vanilla':
        trials = args.trials or 1
        lines = vanilla_lines(CIFAR_TEACHERS + CIFAR_STUDENTS, 'cifar100', trials, args.save_dir, common)
    elif args.sweep == 'distill':
        trials = args.trials or TRIALS_CIFAR
        labels = args.methods or TABLE1_METHODS + EXTRA_METHODS
        lines = distill_lines(labels, parse_pairs(args.pairs, TABLE1_PAIRS), 'cifar100', trials, args.save_dir,
                              common)
    else:
        trials = args.trials or TRIALS_TINYIMAGENET
        pairs = parse_pairs(args.pairs, TABLE3_PAIRS)
        # Table 3 protocol (letKD authors): select on val (25/class), report on test (25/class); README, Data
        common = ['--data_folder', args.data_folder, '--tiny_split', 'letkd', *shlex.split(args.extra)]
        teachers = sorted({t for t, _ in pairs})
        students = sorted({s for _, s in pairs})
        lines = vanilla_lines(teachers, 'tinyimagenet', 1, args.save_dir, common)
        lines += [BARRIER]
        lines += vanilla_lines(students, 'tinyimagenet', trials, args.save_dir, common)
        lines += distill_lines(args.methods or TABLE3_METHODS, pairs, 'tinyimagenet', trials, args.save_dir, common)
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
