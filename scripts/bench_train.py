"""Training-step benchmark: the reference path against the fast path and each fast option alone, same run.

    python scripts/bench_train.py --methods kd letkd2 --model_s resnet8 --model_t resnet20 --dataset digits \\
        --device cpu --steps 20 --method_flags "--k_penult 64 --k_inter 2"
    python scripts/bench_train.py --loader_only --dataset cifar100 --device cuda      # the data path alone
    python scripts/bench_train.py --loader_only --dataset imagenet --generate 64 --num_workers 2 --batch_size 64
                                                # ImageNet's PIL loader on generated 500x375 JPEGs (images/s per worker)

For every method and configuration it prints ms/step (median over --repeats blocks of --steps steps, each block
ending in one sync, warm-up and compilation excluded), images/s, the speed-up over the reference, host syncs per
step (helper/sync_counter.py over one non-print step; a compiled step is counted through its eager twin, the
same aten ops) and peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: the peak RSS of the process,
interpreter and libraries included). Each (method, configuration) runs in a fresh subprocess so peaks and
compile caches do not leak between rows. The teacher is randomly initialised: speed does not depend on
its weights (letKD/QUEST quantizers are built from it as in a real run; keep K small on CPU).

Configurations: reference (today's loop: DataLoader workers, PIL transforms, a sync per step), loop (the
sync-free loop alone), device_data, tf32, channels_last, compile, bf16 (each alone on top of the loop),
fast (= --fast: loop + device_data + tf32 + channels_last + compile).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]

CONFIGS: dict[str, dict[str, Any]] = {
    'reference': {},
    'loop': {'fast_loop': True},
    'device_data': {'fast_loop': True, 'device_data': True},
    'tf32': {'fast_loop': True, 'tf32': True},
    'channels_last': {'fast_loop': True, 'channels_last': True},
    'compile': {'fast_loop': True, 'compile': 'default'},
    'bf16': {'fast_loop': True, 'amp': 'bf16'},
    'fast': {'fast_loop': True, 'device_data': True, 'tf32': True, 'channels_last': True, 'compile': 'default'},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--methods', nargs='+', default=['kd'], help='--distill names')
    parser.add_argument('--model_s', default='resnet20')
    parser.add_argument('--model_t', default='resnet56')
    parser.add_argument('--dataset', default='cifar100', choices=('cifar100', 'tinyimagenet', 'digits', 'imagenet'))
    parser.add_argument('--generate', type=int, default=0, metavar='N',
                        help='imagenet --loader_only: write N generated 500x375 JPEGs per class (10 classes, train '
                             'and val) to a temporary folder and read those instead of --data_folder')
    parser.add_argument('--data_folder', default='./data')
    parser.add_argument('--batch_size', type=int, default=64)
    parser.add_argument('--num_workers', type=int, default=8, help='workers of the reference DataLoader')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    parser.add_argument('--steps', type=int, default=50, help='steps per timed block')
    parser.add_argument('--repeats', type=int, default=3, help='timed blocks; the median is reported')
    parser.add_argument('--warmup', type=int, default=5, help='untimed steps first (compilation happens here)')
    parser.add_argument('--configs', nargs='+', default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument('--compile_mode', default='default', choices=('default', 'reduce-overhead'),
                        help="the mode of the 'compile' and 'fast' rows (reduce-overhead: CUDA graphs)")
    parser.add_argument('--method_flags', default='', help='extra train_student.py flags, e.g. "--k_penult 64"')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    parser.add_argument('--loader_only', action='store_true', help='images/s of the data path alone')
    parser.add_argument('--json', default=None, help='also write the rows to this file')
    parser.add_argument('--one', default=None, help=argparse.SUPPRESS)   # internal: run one METHOD:CONFIG
    return parser.parse_args(argv)


def _device(name: str) -> Any:
    from helper.util import resolve_device
    return resolve_device(name)


def _sync(device: Any) -> None:
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _peak_mib(device: Any) -> float:
    import torch
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # kB on Linux


def _options(args: argparse.Namespace, method: str, config: dict[str, Any], teacher_file: str) -> Any:
    import train_student
    flags = ['--distill', method, '--model_s', args.model_s, '--model_t', args.model_t, '--path_t', teacher_file,
             '--dataset', args.dataset, '--data_folder', args.data_folder, '--batch_size', str(args.batch_size),
             '--num_workers', str(args.num_workers), *shlex.split(args.method_flags)]
    for flag in ('device_data', 'tf32', 'channels_last'):   # the configuration as the CLI's flags
        if config.get(flag):
            flags.append(f'--{flag}')
    flags += ['--compile', config.get('compile', 'none'), '--amp', config.get('amp', 'none')]
    return train_student.resolve_options(train_student.get_args_parser().parse_args(flags))


def _data(opt: Any, mode: str, device: Any) -> Any:
    """The run's data as train_student.py builds it (loaders, then device data with --device_data)."""
    from helper.run import load_data
    return load_data(opt, device, mode, nce_k=opt.nce_k, crd_mode=opt.mode)


def write_generated_imagenet(root: Path, per_class: int, classes: int = 10, seed: int = 0) -> None:
    """root/imagenet/{train,val}/<wnid>/*.JPEG: smooth random colour fields with noise, 500x375 (about the
    ImageNet average), JPEG quality 90, so decoding costs what a real photo of that size costs."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:375, 0:500].astype(np.float32)
    for split in ('train', 'val'):
        for c in range(classes):
            folder = root / 'imagenet' / split / f'n{c:08d}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                a, b, phase = rng.uniform(0.005, 0.05, 3)
                field = np.stack([np.sin(a * xs + b * ys + phase + k) for k in range(3)], -1)
                pixels = 127 + 80 * field + rng.normal(0, 20, field.shape)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f'n{c:08d}_{i}.JPEG', quality=90)


def _batches(data: Any, seed: int) -> Iterator[Any]:
    """The training loader's batches over as many epochs as needed."""
    from dataset import set_epoch
    epoch = 1
    while True:
        set_epoch(data, epoch, seed)
        yield from data.train_loader
        epoch += 1


def count_syncs(step: Any, batches: Iterator[Any], *, device_data: bool, twin: Any = None) -> Any:
    """Host syncs of one non-print step. The reference loaders' CPU-side work (PIL, worker collation) never
    waits for the device, so their batch is fetched outside the count; a device loader's is counted. A
    compiled step is counted through ``twin``, its eager FastTrainer (the same aten ops)."""
    from helper.sync_counter import SyncCounter
    run = step
    if twin is not None:
        twin.reset(1, 10 ** 9)
        run = twin.step
    try:
        run(next(batches))
        batch = None if device_data else next(batches)
        with SyncCounter() as counter:
            run(next(batches) if device_data else batch)
        return counter.count
    except Exception as err:   # a counting failure must not hide the timing
        return f'n/a ({type(err).__name__})'


def run_one(args: argparse.Namespace, method: str, config_name: str) -> dict[str, Any]:
    """Time one (method, configuration) in this process; returns its row."""
    import torch

    from distiller_zoo.registry import DISTILLERS, canonical_name
    from helper.loops import FastOptions, FastTrainer, configure_fast_path, train_one_epoch
    from helper.numerics import set_tf32
    from models import create_model
    if args.threads:
        torch.set_num_threads(args.threads)
    config = dict(CONFIGS[config_name])
    if config.get('compile'):
        config['compile'] = args.compile_mode
    device = _device(args.device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        teacher_file = str(Path(tmp) / 'teacher' / 'ckpt.pth')
        opt = _options(args, method, config, teacher_file)
        distiller_cls = DISTILLERS[canonical_name(method)]
        data = _data(opt, distiller_cls.data_mode, device)
        teacher = create_model(args.model_t, num_classes=data.num_classes).to(device)
        Path(teacher_file).parent.mkdir(parents=True)
        torch.save({'model': teacher.state_dict()}, teacher_file)
        student = create_model(args.model_s, num_classes=data.num_classes).to(device)
        distiller = distiller_cls(student, teacher if distiller_cls.needs_teacher else None, opt, data.info).to(device)
        distiller.prepare(data, device=device, cache_dir=str(Path(tmp) / 'cache'), resumed=False)
    options = FastOptions.from_opt(opt)
    set_tf32(options.tf32)           # both directions, as the CLIs do: the reference rows run in true float32
    if config.get('fast_loop'):
        configure_fast_path(distiller, device, options)
    optimizer = torch.optim.SGD(list(distiller.trainable_parameters()), lr=0.01, momentum=0.9, weight_decay=5e-4,
                                fused=True if config.get('fast_loop') and device.type == 'cuda' else None)
    batches = _batches(data, opt.seed)
    distiller.train()
    if config.get('fast_loop'):
        trainer = FastTrainer(distiller, optimizer, device, options)
        trainer.reset(1, 10 ** 9)

        def step(batch: Any) -> None:
            trainer.step(batch)

        def block_end() -> None:
            trainer.read()                 # the print-step sync
    else:
        def step(batch: Any) -> None:
            train_one_epoch(distiller, [batch], optimizer, epoch=1, device=device, print_freq=0, progress=False)

        def block_end() -> None:
            pass

    for _ in range(args.warmup):
        step(next(batches))
    block_end()
    _sync(device)
    per_step = []
    for _ in range(args.repeats):
        tic = time.perf_counter()
        for _ in range(args.steps):
            step(next(batches))
        block_end()
        _sync(device)
        per_step.append((time.perf_counter() - tic) / args.steps * 1000)
    syncs = count_syncs(step, batches, device_data=bool(config.get('device_data')),
                        twin=None if options.compile == 'none' or not config.get('fast_loop') else
                        FastTrainer(distiller, optimizer, device, replace(options, compile='none')))
    ms = statistics.median(per_step)
    return {'method': method, 'config': config_name, 'ms_per_step': ms, 'images_per_s': args.batch_size / ms * 1000,
            'syncs_per_step': syncs, 'peak_mib': _peak_mib(device), 'device': str(device),
            'blocks_ms': per_step}


def loader_one(args: argparse.Namespace, config_name: str) -> dict[str, Any]:
    """Images/s of a training loader alone (batches moved to the device and waited for)."""
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    device_data = config_name == 'device_data'
    with tempfile.TemporaryDirectory() as tmp:
        opt = _options(args, 'kd', {'device_data': device_data}, str(Path(tmp) / 't.pth'))
    data = _data(opt, 'plain', device)
    batches = _batches(data, opt.seed)
    for _ in range(args.warmup):
        next(batches)[0].to(device)
    per_batch = []
    for _ in range(args.repeats):
        tic = time.perf_counter()
        for _ in range(args.steps):
            image = next(batches)[0].to(device, non_blocking=True)
        _sync(device)
        del image
        per_batch.append((time.perf_counter() - tic) / args.steps * 1000)
    ms = statistics.median(per_batch)
    return {'method': 'loader', 'config': config_name, 'ms_per_step': ms, 'images_per_s': args.batch_size / ms * 1000,
            'syncs_per_step': '', 'peak_mib': _peak_mib(device), 'device': str(device), 'blocks_ms': per_batch}


def _child(argv: list[str], one: str) -> dict[str, Any]:
    """Run one row in a fresh interpreter; its last stdout line is the row's JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, '--one', one]
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.getcwd())
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ['no output']
        return {'method': one.split(':')[0], 'config': one.split(':')[1], 'error': tail[0]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table; speed-up relative to the same method's reference row."""
    reference = {r['method']: r['ms_per_step'] for r in rows if r.get('config') in ('reference',) and 'error' not in r}
    lines = ['| method | config | ms/step | images/s | vs reference | host syncs/step | peak MiB |',
             '|---|---|---:|---:|---:|---:|---:|']
    for r in rows:
        if 'error' in r:
            lines.append(f"| {r['method']} | {r['config']} | error: {r['error']} | | | | |")
            continue
        ref = reference.get(r['method'])
        speedup = f"{ref / r['ms_per_step']:.2f}x" if ref else ''
        lines.append(f"| {r['method']} | {r['config']} | {r['ms_per_step']:.1f} | {r['images_per_s']:.0f} | "
                     f"{speedup} | {r['syncs_per_step']} | {r['peak_mib']:.0f} |")
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.one:
        name, config = args.one.split(':')
        row = loader_one(args, config) if name == 'loader' else run_one(args, name, config)
        print(json.dumps(row))
        return 0
    generated = None
    if args.generate:
        if args.dataset != 'imagenet' or not args.loader_only:
            raise SystemExit('bench_train.py: --generate is for --loader_only --dataset imagenet')
        generated = tempfile.TemporaryDirectory()
        write_generated_imagenet(Path(generated.name), args.generate)
        argv = [*argv, '--data_folder', generated.name, '--generate', '0']
    if args.loader_only:
        # ImageNet has no device-resident path (it does not fit on a device)
        todo = [('loader', 'reference')] + ([] if args.dataset == 'imagenet' else [('loader', 'device_data')])
    else:
        todo = [(method, config) for method in args.methods for config in args.configs]
    rows = []
    for method, config in todo:
        row = _child(argv, f'{method}:{config}')
        rows.append(row)
        done = f"{row['ms_per_step']:.1f} ms/step" if 'error' not in row else f"error: {row['error']}"
        print(f'{method} / {config}: {done}', file=sys.stderr, flush=True)
    device = next((r['device'] for r in rows if 'device' in r), args.device)
    print(f'\n{args.model_t} -> {args.model_s}, {args.dataset}, batch {args.batch_size}, device {device}, '
          f'median of {args.repeats} x {args.steps} steps\n')
    print(format_table(rows))
    if args.loader_only:
        for r in rows:
            if r.get('config') == 'reference' and 'error' not in r:
                print(f"\nreference loader: {r['images_per_s'] / max(1, args.num_workers):.0f} images/s per worker "
                      f"({args.num_workers} workers)")
    if generated is not None:
        generated.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any('error' in r for r in rows) else 0


if __name__ == '__main__':
    sys.exit(main())
