"""The whole pipeline in a few minutes on CPU, on real data that ships with scikit-learn (8x8 digits).

    python scripts/quickstart.py                 # teacher, student from scratch, KD; prints a table
    python scripts/quickstart.py --epochs 3      # faster smoke run

It calls the same train_teacher / train_student code the benchmark uses, with the digits set
upscaled to 32x32 RGB (10 classes, 1437 train / 360 test images). Runs go to --save_dir
(default ./save/quickstart); an existing quickstart folder is replaced.

The numbers depend on the CPU threads (summation order in torch, BLAS and faiss): ``--threads`` (default 2)
pins them, so the same machine type and thread count reproduce the README's table.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

import train_student
import train_teacher


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--save_dir', default='./save/quickstart')
    parser.add_argument('--epochs', type=int, default=8, help='epochs of every run')
    parser.add_argument('--teacher', default='resnet20')
    parser.add_argument('--student', default='resnet8')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=2,
                        help='CPU threads of torch, BLAS and faiss (the results depend on it; the README used 2)')
    return parser.parse_args(argv)


def common_flags(args: argparse.Namespace) -> list[str]:
    # lr decays twice near the end, as in the 240-epoch protocol (150/180/210)
    decay = f'{max(1, int(args.epochs * 0.6))},{max(1, int(args.epochs * 0.8))}'
    return ['--dataset', 'digits', '--epochs', str(args.epochs), '--lr_decay_epochs', decay,
            '--num_workers', '0', '--batch_size', '64', '--save_dir', args.save_dir, '--device', args.device,
            '--seed', str(args.seed), '--save_freq', str(args.epochs)]


def run_student(args: argparse.Namespace, teacher_ckpt: Path, distill: str, extra: list[str] = ()) -> dict:
    flags = ['--path_t', str(teacher_ckpt), '--model_s', args.student, '--distill', distill,
             *extra, *common_flags(args)]
    return train_student.main(train_student.get_args_parser().parse_args(flags))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)     # the offline stage gets the same count (--offline_threads)
    with threadpool_limits(limits=args.threads):
        return run_all(args)


def run_all(args: argparse.Namespace) -> int:
    if Path(args.save_dir).exists():
        shutil.rmtree(args.save_dir)
    tic = time.time()
    rows: list[tuple[str, str, dict]] = []

    print(f'=== teacher: {args.teacher}')
    teacher = train_teacher.main(train_teacher.get_args_parser().parse_args(
        ['--model', args.teacher, *common_flags(args)]))
    rows.append(('teacher', args.teacher, teacher))
    teacher_dir = next((Path(args.save_dir) / 'models').glob(f'{args.teacher}_digits_*'))
    teacher_ckpt = teacher_dir / f'ckpt_epoch_{args.epochs}.pth'

    quantizer = ['--k_penult', '64', '--offline_threads', str(args.threads)]
    methods = [('student from scratch', 'ce', []), ('KD', 'kd', []), ('CRD', 'crd', ['--nce_k', '256']),
               ('letKD-1', 'letkd1', quantizer), ('letKD-2', 'letkd2', [*quantizer, '--k_inter', '2'])]
    for label, distill, extra in methods:
        print(f'=== {label}: {args.teacher} -> {args.student}')
        rows.append((label, args.student, run_student(args, teacher_ckpt, distill, extra)))

    print(f'\nQuickstart on digits ({args.epochs} epochs each, {time.time() - tic:.0f} s in all)\n')
    print(f"| {'run':<22} | {'model':<10} | {'last acc':>8} | {'best acc':>8} | {'params':>9} |")
    print(f"|{'-' * 24}|{'-' * 12}|{'-' * 10}|{'-' * 10}|{'-' * 11}|")
    for label, model, summary in rows:
        print(f"| {label:<22} | {model:<10} | {summary['last_acc']:>8.2f} | {summary['best_acc']:>8.2f} "
              f"| {summary['params_deployed']:>9,} |")
    return 0


if __name__ == '__main__':
    sys.exit(main())
