"""Evidence that the fast path does not change results: seeds x {reference, fast} on digits (CPU ok).

    python scripts/fast_evidence.py                        # quickstart setting: resnet20 teacher, 8 epochs, KD
    python scripts/fast_evidence.py --methods kd letkd2 --seeds 0 1 2

One teacher is trained on the reference path (quickstart flags); then every method distils it into the
student on both paths for each seed (the fast path here is ``--fast --compile none``: device data, the
sync-free loop, channels_last; TF32 is a no-op on CPU). Prints mean and std of the last and best test
accuracy per (method, path); rows are appended to <save_dir>/evidence.jsonl as runs finish.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import train_student
import train_teacher
from scripts.quickstart import common_flags, parse_args as quickstart_args

PATHS = {'reference': [], 'fast': ['--fast', '--compile', 'none']}
METHOD_FLAGS = {'letkd2': ['--k_penult', '64', '--k_inter', '2'], 'letkd1': ['--k_penult', '64'],
                'crd': ['--nce_k', '256']}   # the quickstart's sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--save_dir', default='./save/fast_evidence')
    parser.add_argument('--methods', nargs='+', default=['kd'])
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=8)
    parser.add_argument('--teacher', default='resnet20')
    parser.add_argument('--student', default='resnet8')
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    save = Path(args.save_dir)
    base = ['--epochs', str(args.epochs), '--device', 'cpu', '--teacher', args.teacher, '--student', args.student]
    teacher_flags = common_flags(quickstart_args(['--save_dir', str(save), *base]))
    checkpoints = sorted((save / 'models').glob(f'{args.teacher}_digits_*/ckpt_epoch_{args.epochs}.pth'))
    if not checkpoints:
        train_teacher.main(train_teacher.get_args_parser().parse_args(['--model', args.teacher, *teacher_flags]))
        checkpoints = sorted((save / 'models').glob(f'{args.teacher}_digits_*/ckpt_epoch_{args.epochs}.pth'))
    rows = []
    for seed in args.seeds:
        for method in args.methods:
            for path, extra in PATHS.items():
                q = quickstart_args(['--save_dir', str(save / path), '--seed', str(seed), *base])
                flags = ['--path_t', str(checkpoints[0]), '--model_s', args.student, '--distill', method,
                         '--trial', str(seed), '--print_freq', '100000', '--overwrite',
                         *METHOD_FLAGS.get(method, []), *extra, *common_flags(q)]
                summary = train_student.main(train_student.get_args_parser().parse_args(flags))
                row = {'method': method, 'path': path, 'seed': seed, 'last_acc': summary['last_acc'],
                       'best_acc': summary['best_acc'], 'wall_time_s': summary['wall_time_s']}
                rows.append(row)
                with open(save / 'evidence.jsonl', 'a') as f:
                    f.write(json.dumps(row) + '\n')
    print(f'\n{args.teacher} -> {args.student} on digits, {args.epochs} epochs, seeds {args.seeds}\n')
    print('| method | path | last acc (mean +- std) | best acc (mean +- std) | s/run |')
    print('|---|---|---|---|---:|')
    for method in args.methods:
        for path in PATHS:
            sel = [r for r in rows if r['method'] == method and r['path'] == path]
            last, best = [r['last_acc'] for r in sel], [r['best_acc'] for r in sel]
            std = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
            print(f'| {method} | {path} | {statistics.mean(last):.2f} +- {std(last):.2f} | '
                  f'{statistics.mean(best):.2f} +- {std(best):.2f} | '
                  f'{statistics.mean(r["wall_time_s"] for r in sel):.0f} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
