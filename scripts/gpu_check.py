"""The steps of scripts/gpu_check.sh (see there); prints one table, exit code 1 when a check failed."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]

PATHS = {'reference': [], 'fast': ['--fast']}


def sizes(tiny: bool) -> dict[str, Any]:
    """Data, model and method sizes of the full (GPU) check and of the toy (--tiny, CPU CI) one."""
    if tiny:
        return {'classes': 10, 'per_class': 8, 'teacher': 'resnet8', 'student': 'resnet8', 'batch': 16,
                'k_penult': 16, 'method_flags': ['--nce_k', '32', '--init_epochs', '1', '--k_penult', '16',
                                                 '--k_inter', '2'],
                'fast_flags': ['--fast', '--compile', 'none'], 'bench': ['--steps', '1', '--repeats', '1',
                                                                           '--warmup', '1', '--configs', 'reference',
                                                                           'device_data']}
    return {'classes': 100, 'per_class': 40, 'teacher': 'resnet56', 'student': 'resnet20', 'batch': 64,
            'k_penult': 4096, 'method_flags': ['--init_epochs', '1'], 'fast_flags': ['--fast'],
            'bench': ['--steps', '30', '--repeats', '3', '--warmup', '10']}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda', choices=('cpu', 'cuda'))
    parser.add_argument('--tiny', action='store_true', help='toy sizes (CI on CPU)')
    parser.add_argument('--work_dir', default=None)
    parser.add_argument('--methods', nargs='+', default=None, help='default: every registered method')
    args = parser.parse_args(argv)
    from distiller_zoo.registry import DISTILLERS
    from dataset.generated import write_cifar100
    size = sizes(args.tiny)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix='gpu_check_'))
    data = work / 'data'
    write_cifar100(data, n_train_per_class=size['per_class'], n_test_per_class=2, num_classes=size['classes'])
    common = ['--data_folder', str(data), '--no_download', '--device', args.device, '--num_workers', '2',
              '--batch_size', str(size['batch']), '--print_freq', '1000', '--lr_decay_epochs', '1']
    rows: list[dict[str, Any]] = []

    def check(name: str, path: str, run: Callable[[], str]) -> None:
        tic = time.time()
        try:
            status, detail = 'ok', run()
        except BaseException as err:  # noqa: BLE001 - every failure becomes a row
            if isinstance(err, KeyboardInterrupt):
                raise
            status, detail = 'FAIL', f'{type(err).__name__}: {err}'.splitlines()[0][:100]
        rows.append({'check': name, 'path': path, 'status': status, 'seconds': time.time() - tic, 'detail': detail})
        print(f"[{status}] {name} ({path}) {time.time() - tic:.0f}s {detail}", flush=True)

    def python(*cli: str) -> str:
        result = subprocess.run([sys.executable, *cli], capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            raise RuntimeError((result.stderr or result.stdout).strip().splitlines()[-1])
        return result.stdout

    save = work / 'save'
    teacher_dir = save / 'models'

    def teacher() -> str:
        python('train_teacher.py', '--model', size['teacher'], '--epochs', '1', '--save_dir', str(save), *common)
        return 'trained 1 epoch'

    check('teacher', 'reference', teacher)
    ckpt = next(teacher_dir.glob(f"{size['teacher']}_*/ckpt_epoch_1.pth"), None)
    student_flags = ['--path_t', str(ckpt), '--model_s', size['student'], '--epochs', '1', *size['method_flags'],
                     *common]

    def student(method: str, path_flags: list[str], path: str) -> Callable[[], str]:
        def run() -> str:
            python('train_student.py', '--distill', method, '--save_dir', str(save / path), '--overwrite',
                   *path_flags, *student_flags)
            summary = json.loads(next((save / path / 'student_model').glob(f'*_{method}_*/summary.json')).read_text())
            return f"acc {summary['last_acc']:.2f}"
        return run

    for method in args.methods or list(DISTILLERS):
        for path, flags in (('reference', []), ('fast', size['fast_flags'])):
            check(method, path, student(method, flags, path))

    def kill_and_resume() -> str:
        flags = ['train_student.py', '--distill', 'kd', '--save_dir', str(save / 'resume'), *size['fast_flags'],
                 *student_flags, '--epochs', '3']
        proc = subprocess.Popen([sys.executable, *flags], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        metrics = None
        while proc.poll() is None:
            metrics = next((save / 'resume' / 'student_model').glob('*/metrics.jsonl'), None) \
                if (save / 'resume' / 'student_model').is_dir() else None
            if metrics is not None and metrics.read_text().strip():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.2)
        proc.wait()
        python(*flags, '--resume')
        epochs = [json.loads(line)['epoch'] for line in metrics.read_text().splitlines()] if metrics else []
        if epochs != [1, 2, 3]:
            raise RuntimeError(f'resumed run logged epochs {epochs}')
        return 'killed after epoch 1, resumed to 3'

    check('kill + resume', 'fast', kill_and_resume)

    def quantizer() -> str:
        out = python('helper/letkd_offline.py', '--path_t', str(ckpt), '--model_s', size['student'],
                     '--data_folder', str(data), '--no_download', '--device', args.device, '--k_penult',
                     str(size['k_penult']), '--save_dir', str(save / 'offline'), '--num_workers', '2')
        return f"K={size['k_penult']} " + (out.strip().splitlines() or [''])[-1][:60]

    check('offline quantizer', args.device, quantizer)

    def bench(method: str) -> Callable[[], str]:
        def run() -> str:
            out = save / f'bench_{method}.json'
            python('scripts/bench_train.py', '--methods', method, '--model_s', size['student'], '--model_t',
                   size['teacher'], '--dataset', 'cifar100', '--data_folder', str(data), '--device', args.device,
                   '--batch_size', str(size['batch']), '--num_workers', '2', '--json', str(out),
                   '--method_flags', f"--k_penult {size['k_penult']}" + (' --k_inter 2' if args.tiny else ''),
                   *size['bench'])
            table = {r['config']: r for r in json.loads(out.read_text())}
            return ', '.join(f"{c} {r['ms_per_step']:.1f} ms ({r['syncs_per_step']} syncs)" for c, r in table.items())
        return run

    for method in ('kd', 'letkd2'):
        check(f'bench {method}', args.device, bench(method))

    print(f"\ngpu_check on {args.device}{' (tiny)' if args.tiny else ''}, work dir {work}\n")
    print('| check | path | status | s | detail |\n|---|---|---|---:|---|')
    for r in rows:
        print(f"| {r['check']} | {r['path']} | {r['status']} | {r['seconds']:.0f} | {r['detail']} |")
    return 0 if all(r['status'] == 'ok' for r in rows) else 1


if __name__ == '__main__':
    os.environ.setdefault('PYTHONUNBUFFERED', '1')
    sys.exit(main())
