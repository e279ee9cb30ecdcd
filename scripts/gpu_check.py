"""The evidence a GPU run must give, in one time-boxed call (scripts/gpu_check.sh; docs/speed.md, "The GPU check").

    bash scripts/gpu_check.sh [--budget_s 480] [--out DIR]          # on a CUDA machine
    bash scripts/gpu_check.sh --device cpu --tiny                    # the same checks at toy sizes (the tests)

Sections, most important first; each row is printed when it completes and the rows are rewritten to
``<out>/gpu_check.json`` after every row, so a call cut short still returns what it measured:

1. env: GPU, memory, torch / CUDA / cuDNN versions, faiss.
2. speed: resnet56 -> resnet20 at CIFAR-100 size (50,000 generated images, batch 64, 782 steps, 10,000 test
   images), kd and letkd2 (K_penult 4096): one epoch each of the reference path, --fast with compile default,
   --fast with reduce-overhead (CUDA graphs) and reduce-overhead + bf16. Warm-up (first steps: compile, CUDA
   graph recording) apart from the steady epoch; GPU-busy time per step (profiler) next to wall time; 240
   epochs extrapolated, PASS/FAIL against the goals (GOALS below), mapped to an H100 when measured on an H200.
3. concurrency: 1, 4 and 8 concurrent kd --fast runs on the one GPU, aggregate images/s.
4. methods: every registered method, a few dozen fast-path steps each, all in one process, graph breaks and
   compilations counted (backend 'cudagraphs' on CUDA: dynamo + AOTAutograd + CUDA graphs without Inductor's
   code generation, which kd and letkd2 get in section 2; 'eager' on the CPU).
5. resume: a run killed (SIGKILL) mid-epoch 2, then --resume: metrics and weights against an uninterrupted run.
6. offline: letKD's K=4096 quantizers built on the device (time, k-means backend).
7. numerics: the same batches through the reference step and the compiled fast step, TF32 off: losses and
   gradients within a stated tolerance.

Every subprocess runs with a timeout inside the global deadline (--budget_s); what does not fit is a 'skip' row.
Workers are this file with --worker; they print ``ROW {json}`` lines.
"""
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
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:      # a plain checkout, not pip-installed (gpu_check.sh also sets PYTHONPATH)
    sys.path.insert(0, str(ROOT))

# Goals on one H100 (the issue's): 240 epochs resnet56 -> resnet20 at batch 64, and the speed-up over the reference.
GOALS = {'kd': 240.0, 'letkd2': 360.0}
MIN_SPEEDUP = 6.0
MIN_CONCURRENCY_GAIN = 4.0          # 8 concurrent runs: aggregate images/s over one run's
EPOCHS = 240
# memory bandwidth H200 / H100 (SXM: 4.8 / 3.35 TB/s). Same Hopper SMs and clocks, so a compute- or launch-bound
# step takes as long on both and a bandwidth-bound one up to this factor longer on an H100: H200 epochs are
# scaled by it to judge the H100 goals (an upper bound).
H200_TO_H100 = 4.8 / 3.35
SPEED_CONFIGS = {           # name -> train_student flags on top of the run's
    'reference': [],
    'fast-default': ['--fast', '--compile', 'default'],
    'fast-reduce-overhead': ['--fast', '--compile', 'reduce-overhead'],
    'fast-reduce-overhead-bf16': ['--fast', '--compile', 'reduce-overhead', '--amp', 'bf16'],
}
SECTION_SHARES = {'speed': 0.45, 'concurrency': 0.12, 'methods': 0.2, 'resume': 0.1, 'offline': 0.06,
                  'numerics': 0.07}


def sizes(tiny: bool) -> dict[str, Any]:
    """The full (GPU) sizes, or toy ones for the CPU (the test suite)."""
    if tiny:
        return {'classes': 10, 'train_per_class': 8, 'test_per_class': 2, 'teacher': 'resnet8', 'student': 'resnet8',
                'small_teacher': 'resnet8', 'small_student': 'resnet8', 'batch': 16, 'k_penult': 16, 'k_inter': 2,
                'warmup_steps': 2, 'profile_steps': 0, 'method_steps': 6, 'levels': (1, 2), 'window_s': 2.0,
                'resume_per_class': 8, 'resume_batch': 8, 'speed_configs': ['reference', 'fast-default'],
                'compile_backend': 'eager', 'workers': 0, 'nce_k': 32}
    return {'classes': 100, 'train_per_class': 500, 'test_per_class': 100, 'teacher': 'resnet56', 'student': 'resnet20',
            'small_teacher': 'resnet20', 'small_student': 'resnet8', 'batch': 64, 'k_penult': 4096, 'k_inter': 8,
            'warmup_steps': 30, 'profile_steps': 20, 'method_steps': 30, 'levels': (1, 4, 8), 'window_s': 8.0,
            'resume_per_class': 20, 'resume_batch': 16, 'speed_configs': list(SPEED_CONFIGS),
            'compile_backend': 'inductor', 'workers': min(8, os.cpu_count() or 1), 'nce_k': 1024}


# ---------------------------------------------------------------------------------------------- the report

class Deadline:
    """The global time box: ``left()`` seconds remain; ``cap(section)`` is a section's share, at most what is left."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s, self.end = budget_s, time.monotonic() + budget_s

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def cap(self, section: str, floor: float = 0.0) -> float:
        return min(self.left(), max(floor, SECTION_SHARES.get(section, 0.1) * self.budget_s))


class Report:
    """Rows printed as they come and rewritten to ``<out>/gpu_check.json`` after each one."""

    def __init__(self, out: Path) -> None:
        self.out, self.rows = out, []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        shown = {k: v for k, v in row.items() if k not in ('section', 'check', 'status')}
        print(f"[{row.get('status', 'ok')}] {row['section']}: {row.get('check', '')}  {json.dumps(shown)}", flush=True)
        tmp = self.out / 'gpu_check.json.tmp'
        tmp.write_text(json.dumps(self.rows, indent=1))
        tmp.replace(self.out / 'gpu_check.json')


def emit(row: dict[str, Any]) -> None:
    """A worker's row, for the parent to relay."""
    print('ROW ' + json.dumps(row), flush=True)


def run_worker(report: Report, section: str, args: list[str], timeout: float, *, env: dict | None = None) -> int:
    """Run ``gpu_check.py --worker ...`` with a timeout, relaying its ROW lines; a crash or a timeout is a row too."""
    if timeout < 5:
        report.add({'section': section, 'check': ' '.join(args[:2]), 'status': 'skip', 'why': 'no time left'})
        return 1
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=env or child_env(), start_new_session=True)
    tail: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        for line in _lines_until(proc, deadline):
            if line.startswith('ROW '):
                report.add(json.loads(line[4:]))
            else:
                tail = (tail + [line.rstrip()])[-5:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            report.add({'section': section, 'check': ' '.join(args[:4]), 'status': 'timeout',
                        'after_s': round(timeout), 'last_output': tail[-2:]})
        elif proc.returncode != 0:
            report.add({'section': section, 'check': ' '.join(args[:4]), 'status': 'FAIL',
                        'exit': proc.returncode, 'last_output': tail})
    return proc.returncode or 0


def _lines_until(proc: subprocess.Popen, deadline: float) -> Iterator[str]:
    """The process's output lines until it ends or the deadline passes (then the caller kills it)."""
    import selectors
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if not selector.select(timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if not line:
            break
        yield line
    else:
        return
    proc.wait(timeout=max(0.1, deadline - time.monotonic()))


def child_env() -> dict[str, str]:
    return {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])),
            'PYTHONUNBUFFERED': '1'}


# ---------------------------------------------------------------------------------------------- shared set-up

def write_data(folder: Path, size: dict[str, Any], per_class: int | None = None, test_per_class: int | None = None
               ) -> Path:
    """A CIFAR-100-format folder of generated images (dataset/generated.py), written once."""
    from dataset.generated import write_cifar100
    if not (folder / 'cifar-100-python' / 'train').is_file():
        write_cifar100(folder, n_train_per_class=per_class or size['train_per_class'],
                       n_test_per_class=test_per_class or size['test_per_class'], num_classes=size['classes'])
    return folder


def write_teacher(work: Path, arch: str, classes: int) -> Path:
    """A randomly initialised teacher in RepDistiller's checkpoint layout (speed does not depend on its accuracy)."""
    import torch

    from models import create_model
    path = work / 'teachers' / f'{arch}_vanilla' / 'ckpt_epoch_240.pth'
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save({'model': create_model(arch, num_classes=classes).state_dict(), 'epoch': 240}, path)
    return path


def run_flags(teacher: Path, student: str, data: Path, size: dict[str, Any], device: str) -> list[str]:
    """train_student.py flags shared by the sections' runs (the method and its path come on top)."""
    return ['--path_t', str(teacher), '--model_s', student, '--dataset', 'cifar100', '--data_folder', str(data),
            '--no_download', '--device', device, '--batch_size', str(size['batch']), '--num_workers',
            str(size['workers']), '--k_penult', str(size['k_penult']), '--k_inter', str(size['k_inter']),
            '--nce_k', str(size['nce_k']), '--init_epochs', '1', '--print_freq', '0']


def student_options(flags: list[str]) -> Any:
    """train_student.py's resolved options for ``flags`` (exactly what the CLI would run)."""
    import train_student
    return train_student.resolve_options(train_student.get_args_parser().parse_args(flags))


def build_run(opt: Any, device: Any, cache_dir: Path) -> tuple[Any, Any]:
    """(distiller with its offline stage done, data) as train_student.main builds them, without a run folder."""
    from distiller_zoo.registry import DISTILLERS
    from helper.numerics import set_tf32
    from helper.run import load_data
    from helper.util import load_teacher, seed_everything
    from models import create_model
    method = DISTILLERS[opt.distill]
    seed_everything(opt.seed, opt.deterministic)
    set_tf32(opt.tf32)
    data = load_data(opt, device, method.data_mode, nce_k=opt.nce_k, crd_mode=opt.mode)
    teacher = load_teacher(opt.path_t, opt.model_t, data.num_classes, False, dataset=opt.dataset).to(device) \
        if method.needs_teacher else None
    student = create_model(opt.model_s, num_classes=data.num_classes, dataset=opt.dataset).to(device)
    distiller = method(student, teacher, opt, data.info).to(device)
    distiller.prepare(data, device=device, cache_dir=str(cache_dir), resumed=False)
    return distiller, data


def sync(device: Any) -> None:
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- workers

def worker_speed(a: argparse.Namespace) -> None:
    """Section 2 for one method: each configuration's warm-up, steady epoch, evaluation and GPU-busy time."""
    import torch

    from helper.loops import validate
    from helper.run import RunConfig, prepare_training, train_epoch
    size = sizes(a.tiny)
    device = torch.device(a.device)
    for config in size['speed_configs']:
        torch._dynamo.reset()
        flags = [*a.common, '--distill', a.method, *SPEED_CONFIGS[config]]
        opt = student_options(flags)
        distiller, data = build_run(opt, device, Path(a.work) / 'cache')
        cfg = RunConfig.from_opt(opt, Path(a.work) / 'unused', opt.model_s, {})
        if a.tiny:
            from dataclasses import replace
            cfg = replace(cfg, fast=replace(cfg.fast, compile_backend=size['compile_backend']))
        optimizer, trainer = prepare_training(distiller, cfg, device)
        step = _step_function(distiller, optimizer, trainer, device)
        distiller.train()
        distiller.start_epoch(1)
        tic = time.perf_counter()
        warm = iter(data.train_loader)
        for _ in range(size['warmup_steps']):
            step(next(warm))
        if trainer is not None:
            trainer.read()
        sync(device)
        warmup_s = time.perf_counter() - tic
        del warm
        tic = time.perf_counter()
        stats = train_epoch(distiller, data, optimizer, trainer, cfg, 1, device)
        sync(device)
        epoch_s = time.perf_counter() - tic
        tic = time.perf_counter()
        test = validate(distiller.deployable(), data.val_loader, device)
        eval_s = time.perf_counter() - tic
        steps = len(data.train_loader)
        busy_ms = _gpu_busy_ms(step, data, size['profile_steps'], device)
        emit({'section': 'speed', 'check': f'{a.method} {config}', 'status': 'ok', 'method': a.method,
              'config': config, 'compile': opt.compile, 'amp': opt.amp, 'steps': steps,
              'warmup_steps': size['warmup_steps'], 'warmup_s': round(warmup_s, 2), 'epoch_s': round(epoch_s, 3),
              'eval_s': round(eval_s, 3), 'ms_per_step': round(1000 * epoch_s / steps, 3),
              'gpu_busy_ms_per_step': busy_ms, 'images_per_s': round(steps * opt.batch_size / epoch_s),
              'train_loss': round(stats['train_loss'], 4), 'test_acc': round(test['acc'], 2)})
        del distiller, data, optimizer, trainer
        if device.type == 'cuda':
            torch.cuda.empty_cache()


def _step_function(distiller: Any, optimizer: Any, trainer: Any, device: Any) -> Callable[[Any], None]:
    """One training step of the run's path (the reference loop's body on one batch, or the fast trainer's)."""
    if trainer is not None:
        trainer.reset(1, 10 ** 9)
        return trainer.step
    from helper.loops import train_one_epoch
    return lambda batch: train_one_epoch(distiller, [batch], optimizer, epoch=1, device=device, print_freq=0,
                                         progress=False)


def _gpu_busy_ms(step: Callable[[Any], None], data: Any, steps: int, device: Any) -> float | None:
    """Kernel time per step (the profiler's device self time over ``steps`` steps); None on the CPU."""
    if device.type != 'cuda' or steps == 0:
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile
    batches = iter(data.train_loader)
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step(next(batches))
            sync(device)
        total_us = sum(getattr(e, 'self_device_time_total', getattr(e, 'self_cuda_time_total', 0))
                       for e in prof.key_averages())
        return round(total_us / 1000 / steps, 3)
    except Exception as err:  # noqa: BLE001 - the busy time is a diagnostic; its failure must not lose the row
        print(f'profiler failed: {type(err).__name__}: {err}', file=sys.stderr)
        return None
    finally:
        torch.cuda.synchronize(device)


def worker_concurrency(a: argparse.Namespace) -> None:
    """One of N kd --fast runs: warm up, say ready, then run steps during each phase it is part of."""
    import torch
    size = sizes(a.tiny)
    device = torch.device(a.device)
    control = Path(a.control)
    opt = student_options([*a.common, '--distill', 'kd', '--fast'])
    distiller, data = build_run(opt, device, Path(a.work) / f'cache_c{a.id}')
    from dataclasses import replace

    from helper.run import RunConfig, prepare_training
    cfg = RunConfig.from_opt(opt, Path(a.work) / 'unused', opt.model_s, {})
    if a.tiny:
        cfg = replace(cfg, fast=replace(cfg.fast, compile_backend=size['compile_backend']))
    _, trainer = prepare_training(distiller, cfg, device)
    assert trainer is not None
    distiller.train()
    trainer.reset(1, 10 ** 9)

    def batches() -> Iterator[Any]:
        while True:
            yield from data.train_loader

    stream = batches()
    for _ in range(size['warmup_steps'] + 3):
        trainer.step(next(stream))
    trainer.read()
    (control / f'ready_{a.id}').write_text('1')
    done: set[int] = set()
    while True:
        plan = json.loads((control / 'plan.json').read_text()) if (control / 'plan.json').is_file() else {}
        if plan.get('stop'):
            return
        phase = plan.get('phase')
        if phase is None or phase in done or a.id >= plan['active'] or time.time() < plan['start']:
            time.sleep(0.02)
            continue
        steps = 0
        while time.time() < plan['start'] + plan['duration']:
            trainer.step(next(stream))
            steps += 1
        sync(device)
        elapsed = time.time() - plan['start']
        (control / f'result_{phase}_{a.id}.json').write_text(json.dumps({'images': steps * opt.batch_size,
                                                                          'elapsed': elapsed}))
        done.add(phase)


def worker_methods(a: argparse.Namespace) -> None:
    """Section 4: every registered method, a few dozen fast-path steps each, in this one process."""
    import torch

    from distiller_zoo.registry import DISTILLERS
    from helper.compile_counter import CompileCounter
    from helper.loops import FastOptions, FastTrainer
    size = sizes(a.tiny)
    device = torch.device(a.device)
    backend = 'cudagraphs' if device.type == 'cuda' else 'eager'
    for name in a.methods or list(DISTILLERS):
        tic = time.perf_counter()
        try:
            opt = student_options([*a.common, '--distill', name, '--fast', '--compile', 'default'])
            distiller, data = build_run(opt, device, Path(a.work) / 'cache_methods')
            options = FastOptions(compile='default', compile_backend=backend, channels_last=opt.channels_last,
                                  tf32=opt.tf32)
            optimizer = torch.optim.SGD(list(distiller.trainable_parameters()), lr=0.01, momentum=0.9,
                                        fused=True if device.type == 'cuda' else None)
            from helper.loops import configure_fast_path
            configure_fast_path(distiller, device, options)
            trainer = FastTrainer(distiller, optimizer, device, options)
            torch._dynamo.reset()
            distiller.train()
            distiller.start_epoch(1)
            trainer.reset(1, size['method_steps'])
            full = [b for b, _ in zip(data.train_loader, range(size['method_steps']))
                    if b[0].shape[0] == opt.batch_size]
            with CompileCounter() as compiled:
                for batch in full:
                    trainer.step(batch)
                stats = trainer.read()
            sync(device)
            ok = compiled.graph_breaks == 0 and compiled.frames <= 2 and stats['train_loss'] == stats['train_loss']
            emit({'section': 'methods', 'check': name, 'status': 'ok' if ok else 'FAIL', 'backend': backend,
                  'steps': len(full), 'graph_breaks': compiled.graph_breaks, 'frames': compiled.frames,
                  'breaks': compiled.reasons[:2], 'train_loss': round(stats['train_loss'], 4),
                  'seconds': round(time.perf_counter() - tic, 1)})
            del distiller, data, trainer, optimizer
        except Exception as err:  # noqa: BLE001 - one method's failure is its row; the others still run
            emit({'section': 'methods', 'check': name, 'status': 'FAIL', 'error': f'{type(err).__name__}: {err}'[:300],
                  'seconds': round(time.perf_counter() - tic, 1)})
        if device.type == 'cuda':
            torch.cuda.empty_cache()


def worker_numerics(a: argparse.Namespace) -> None:
    """Section 7: the same batches through the reference step and the compiled fast step (TF32 off, lr 0):
    loss and gradients of the last batch compared."""
    import torch

    from helper.loops import FastOptions, FastTrainer, batch_extras, extra_names, total_loss
    from helper.numerics import set_tf32
    size = sizes(a.tiny)
    device = torch.device(a.device)
    for name in ('kd', 'letkd2'):
        results = {}
        for path in ('reference', 'fast'):
            torch._dynamo.reset()
            opt = student_options([*a.common, '--distill', name, '--no-tf32', '--device_data'])
            distiller, data = build_run(opt, device, Path(a.work) / 'cache')
            set_tf32(False)
            batches = [b for b, _ in zip(data.train_loader, range(3))]
            distiller.train()
            distiller.start_epoch(1)
            if path == 'reference':
                step_losses = []
                for batch in batches:
                    distiller.zero_grad(set_to_none=True)
                    _, losses = distiller.forward_train(batch[0], batch[1],
                                                        **batch_extras(batch, extra_names(distiller), device))
                    loss = total_loss(losses)
                    loss.backward()
                    step_losses.append(float(loss))
                loss = torch.tensor(sum(step_losses) / len(step_losses))
            else:
                optimizer = torch.optim.SGD(list(distiller.trainable_parameters()), lr=0.0)
                trainer = FastTrainer(distiller, optimizer, device,
                                      FastOptions(compile='default', compile_backend=size['compile_backend']))
                trainer.reset(1, len(batches))
                for batch in batches:           # the first eager, the others compiled
                    trainer.step(batch)
                loss = torch.tensor(trainer.read()['train_loss'])
            grads = {n: p.grad.detach().clone() for n, p in distiller.named_parameters() if p.grad is not None}
            results[path] = (float(loss), grads)
        (ref_loss, ref_grads), (fast_loss, fast_grads) = results['reference'], results['fast']
        worst = max(((g - fast_grads[n]).abs().max() / g.abs().max().clamp_min(1e-12)).item()
                    for n, g in ref_grads.items())
        loss_diff = abs(ref_loss - fast_loss) / max(abs(ref_loss), 1e-12)
        passed = worst < 1e-3 and loss_diff < 1e-5 and set(ref_grads) == set(fast_grads)
        emit({'section': 'numerics', 'check': name, 'status': 'ok' if passed else 'FAIL',
              'tolerance': 'mean loss rel. diff < 1e-5; per tensor max |grad diff| / max |grad| < 1e-3; TF32 off',
              'loss_rel_diff': loss_diff, 'worst_relative_grad_diff': worst, 'reference_mean_loss': ref_loss,
              'fast_mean_loss': fast_loss, 'tensors': len(ref_grads)})


WORKERS = {'speed': worker_speed, 'concurrency': worker_concurrency, 'methods': worker_methods,
           'numerics': worker_numerics}


# ---------------------------------------------------------------------------------------------- sections

def section_env(report: Report, device: str) -> None:
    import platform

    import torch
    row: dict[str, Any] = {'section': 'env', 'check': 'machine', 'status': 'ok', 'python': platform.python_version(),
                           'torch': torch.__version__, 'cuda': torch.version.cuda,
                           'cudnn': torch.backends.cudnn.version(), 'cpus': os.cpu_count()}
    try:
        import faiss
        row['faiss'] = f"{faiss.__version__} ({faiss.get_num_gpus()} GPUs)"
    except ImportError:
        row['faiss'] = 'absent (the torch k-means backend is used)'
    if device == 'cuda':
        if not torch.cuda.is_available():
            report.add({**row, 'status': 'FAIL', 'why': 'torch sees no CUDA device'})
            return
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        row.update(gpu=props.name, gpu_memory_gib=round(total / 2 ** 30, 1), free_gib=round(free / 2 ** 30, 1),
                   capability=f'{props.major}.{props.minor}', h100_factor=h100_factor(props.name))
    report.add(row)


def h100_factor(gpu_name: str) -> float | None:
    """What an epoch measured on this GPU is multiplied by to judge the H100 goals (None: not a Hopper)."""
    name = gpu_name.upper()
    return H200_TO_H100 if 'H200' in name else 1.0 if 'H100' in name else None


def judge_speed(report: Report, factor: float | None) -> None:
    """240-epoch estimates of every speed row, PASS/FAIL against the goals (H100-mapped where possible)."""
    rows = [r for r in report.rows if r['section'] == 'speed' and r.get('status') == 'ok']
    for method in GOALS:
        mine = {r['config']: r for r in rows if r['method'] == method}
        ref = mine.get('reference')
        ref_total = ref and ref['warmup_s'] + EPOCHS * (ref['epoch_s'] + ref['eval_s'])
        for config, r in mine.items():
            total = r['warmup_s'] + EPOCHS * (r['epoch_s'] + r['eval_s'])
            row: dict[str, Any] = {'section': 'speed-240', 'check': f'{method} {config}', 'est_240_s_here': round(total)}
            if ref_total:
                row['speedup_vs_reference'] = round(ref_total / total, 2)
            if factor is not None:
                h100 = r['warmup_s'] + EPOCHS * (r['epoch_s'] + r['eval_s']) * factor
                row['est_240_s_h100'] = round(h100)
            if config == 'reference':
                row['status'] = 'ok'
            elif factor is None:
                row['status'] = 'n/a'
                row['why'] = 'goals are stated for an H100; this device is not an H100/H200'
            else:
                passed = row['est_240_s_h100'] <= GOALS[method] and row.get('speedup_vs_reference', 0) >= MIN_SPEEDUP
                row['status'] = 'PASS' if passed else 'FAIL'
                row['goal'] = f"<= {GOALS[method]:.0f} s on an H100 and >= {MIN_SPEEDUP:.0f}x the reference"
            report.add(row)


def section_concurrency(report: Report, a: argparse.Namespace, common: list[str], budget: float) -> None:
    """Start max(levels) warmed-up kd --fast workers, then let 1, 4, 8 of them run at once; aggregate images/s."""
    size = sizes(a.tiny)
    levels = size['levels']
    control = Path(a.work) / 'concurrency'
    control.mkdir(parents=True, exist_ok=True)
    for f in control.iterdir():
        f.unlink()
    end = time.monotonic() + budget
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), '--worker', 'concurrency', '--id', str(i),
                               '--control', str(control), '--work', a.work, '--device', a.device,
                               *(['--tiny'] if a.tiny else []), '--common', *common],
                              cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for i in range(max(levels))]
    try:
        while len(list(control.glob('ready_*'))) < len(procs):
            if time.monotonic() > end or any(p.poll() is not None for p in procs):
                failed = next((p for p in procs if p.poll() not in (None, 0)), None)
                why = (failed.stderr.read().strip().splitlines() or ['?'])[-1] if failed else 'warm-up did not finish'
                report.add({'section': 'concurrency', 'check': 'warm-up', 'status': 'FAIL', 'why': why[:300]})
                return
            time.sleep(0.2)
        single = None
        for phase, active in enumerate(levels):
            if time.monotonic() + size['window_s'] + 5 > end:
                report.add({'section': 'concurrency', 'check': f'{active} runs', 'status': 'skip', 'why': 'no time left'})
                continue
            start = time.time() + 1.0
            plan = {'phase': phase, 'active': active, 'start': start, 'duration': size['window_s']}
            (control / 'plan.json.tmp').write_text(json.dumps(plan))
            (control / 'plan.json.tmp').replace(control / 'plan.json')
            results = [control / f'result_{phase}_{i}.json' for i in range(active)]
            while not all(r.is_file() for r in results) and time.monotonic() < end:
                time.sleep(0.1)
            if not all(r.is_file() for r in results):
                report.add({'section': 'concurrency', 'check': f'{active} runs', 'status': 'timeout'})
                return
            done = [json.loads(r.read_text()) for r in results]
            rate = sum(d['images'] for d in done) / max(d['elapsed'] for d in done)
            single = single or rate
            row = {'section': 'concurrency', 'check': f'{active} runs', 'status': 'ok',
                   'aggregate_images_per_s': round(rate), 'vs_one_run': round(rate / single, 2)}
            if active == 8:
                row['status'] = 'PASS' if rate / single >= MIN_CONCURRENCY_GAIN else 'FAIL'
                row['goal'] = f'>= {MIN_CONCURRENCY_GAIN:.0f}x one run'
            report.add(row)
    finally:
        (control / 'plan.json').write_text(json.dumps({'stop': True}))
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def section_resume(report: Report, a: argparse.Namespace, work: Path, budget: float) -> None:
    """An uninterrupted 3-epoch kd --fast --deterministic run, and the same run killed with SIGKILL during epoch 2
    (seen from its per-iteration log line) then resumed: metrics.jsonl and last.pth's weights compared."""
    size = sizes(a.tiny)
    end = time.monotonic() + budget
    data = write_data(work / 'data_resume', size, per_class=size['resume_per_class'], test_per_class=2)
    teacher = write_teacher(work, size['small_teacher'], size['classes'])
    flags = ['--path_t', str(teacher), '--model_s', size['small_student'], '--distill', 'kd', '--data_folder', str(data),
             '--no_download', '--device', a.device, '--num_workers', '0', '--batch_size', str(size['resume_batch']),
             '--epochs', '3', '--lr_decay_epochs', '2', '--fast', '--deterministic', '--print_freq', '1',
             *(['--compile', 'none'] if a.tiny else [])]
    runs = {name: work / f'resume_{name}' for name in ('straight', 'killed')}
    cli = [sys.executable, 'train_student.py']
    try:
        subprocess.run([*cli, *flags, '--save_dir', str(runs['straight'])], cwd=ROOT, env=child_env(), check=True,
                       capture_output=True, text=True, timeout=max(5.0, end - time.monotonic()))
        proc = subprocess.Popen([*cli, *flags, '--save_dir', str(runs['killed'])], cwd=ROOT, env=child_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        killed_at = None
        assert proc.stdout is not None
        for line in _lines_until(proc, end):
            if line.startswith('Epoch: [2]['):          # the fast loop's per-iteration line of epoch 2
                iteration = int(line.split('][')[1].split('/')[0])
                if iteration >= 2:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = iteration
                    break
        proc.kill()
        proc.wait()
        folder = next((runs['killed'] / 'student_model').iterdir())
        epochs_before = [json.loads(x)['epoch'] for x in (folder / 'metrics.jsonl').read_text().splitlines()]
        if killed_at is None or epochs_before != [1]:
            report.add({'section': 'resume', 'check': 'kill mid-epoch 2', 'status': 'FAIL',
                        'why': f'the kill did not land mid-epoch 2 (logged epochs {epochs_before})'})
            return
        subprocess.run([*cli, *flags, '--save_dir', str(runs['killed']), '--resume'], cwd=ROOT, env=child_env(),
                       check=True, capture_output=True, text=True, timeout=max(5.0, end - time.monotonic()))
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, StopIteration) as err:
        detail = getattr(err, 'stderr', None) or str(err)
        report.add({'section': 'resume', 'check': 'kill + resume', 'status': 'FAIL', 'why': str(detail)[-300:]})
        return
    report.add(compare_runs(runs['straight'], runs['killed'], killed_at))


def compare_runs(straight: Path, resumed: Path, killed_at: int) -> dict[str, Any]:
    """metrics.jsonl and last.pth's weights of two runs of one command, one of them killed and resumed."""
    import torch

    from helper.util import load_checkpoint
    folders = [next((p / 'student_model').iterdir()) for p in (straight, resumed)]
    records = [[json.loads(x) for x in (f / 'metrics.jsonl').read_text().splitlines()] for f in folders]
    keys = ('train_loss', 'train_acc', 'test_loss', 'test_acc')
    metric_diff = max(abs(a[k] - b[k]) for a, b in zip(*records) for k in keys)
    weights = [load_checkpoint(f / 'last.pth')['distiller'] for f in folders]
    weight_diff = max((weights[0][k].float() - weights[1][k].float()).abs().max().item() for k in weights[0]
                      if torch.is_floating_point(weights[0][k]))
    same_epochs = [r['epoch'] for r in records[1]] == [r['epoch'] for r in records[0]] == [1, 2, 3]
    passed = same_epochs and metric_diff <= 1e-4 and weight_diff <= 1e-4
    return {'section': 'resume', 'check': 'kill mid-epoch 2 + resume', 'status': 'PASS' if passed else 'FAIL',
            'killed_at_iteration': killed_at, 'epochs_logged': [r['epoch'] for r in records[1]],
            'max_metric_diff': metric_diff, 'max_weight_diff': weight_diff,
            'tolerance': '1e-4 (--deterministic; 0 expected)'}


def section_offline(report: Report, a: argparse.Namespace, data: Path, teacher: Path, work: Path, budget: float) -> None:
    """letKD's quantizers (K_penult, 8 sub-classes per class) of the speed section's teacher, built on the device."""
    size = sizes(a.tiny)
    tic = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, 'helper/letkd_offline.py', '--path_t', str(teacher), '--model_s',
                                 size['student'], '--data_folder', str(data), '--no_download', '--device', a.device,
                                 '--k_penult', str(size['k_penult']), '--k_inter', str(size['k_inter']),
                                 '--save_dir', str(work / 'offline'), '--num_workers', str(size['workers'])],
                                cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=max(5.0, budget))
    except subprocess.TimeoutExpired:
        report.add({'section': 'offline', 'check': f"K={size['k_penult']}", 'status': 'timeout', 'after_s': round(budget)})
        return
    built = [line for line in result.stdout.splitlines() if 'quantizer' in line]
    report.add({'section': 'offline', 'check': f"K={size['k_penult']} + sub-classes", 'status':
                'ok' if result.returncode == 0 else 'FAIL', 'seconds': round(time.perf_counter() - tic, 1),
                'log': built[-3:] or (result.stderr or result.stdout).strip().splitlines()[-2:]})


def final_table(report: Report) -> str:
    lines = ['| section | check | status | details |', '|---|---|---|---|']
    for r in report.rows:
        details = {k: v for k, v in r.items() if k not in ('section', 'check', 'status', 'log', 'last_output')}
        lines.append(f"| {r['section']} | {r.get('check', '')} | {r.get('status', '')} | "
                     f"{json.dumps(details)[:220]} |")
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda', choices=('cpu', 'cuda'))
    parser.add_argument('--tiny', action='store_true', help='toy sizes (the CPU test suite)')
    parser.add_argument('--budget_s', type=float, default=480.0, help='global deadline of the whole check')
    parser.add_argument('--out', default=None, help='folder of gpu_check.json / gpu_check.md (default: the work dir)')
    parser.add_argument('--work', default=None, help='work folder (default: a new temporary folder)')
    parser.add_argument('--sections', nargs='+', default=['env', 'speed', 'concurrency', 'methods', 'resume',
                                                           'offline', 'numerics'])
    parser.add_argument('--methods', nargs='+', default=None, help='section methods: these (default: all)')
    parser.add_argument('--speed_methods', nargs='+', default=['kd', 'letkd2'])
    # worker mode (internal)
    parser.add_argument('--worker', choices=sorted(WORKERS), default=None, help=argparse.SUPPRESS)
    parser.add_argument('--method', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--id', type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument('--control', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--common', nargs=argparse.REMAINDER, default=[], help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.worker:
        WORKERS[a.worker](a)
        return 0

    deadline = Deadline(a.budget_s)
    work = Path(a.work or tempfile.mkdtemp(prefix='gpu_check_'))
    a.work = str(work)
    report = Report(Path(a.out) if a.out else work)
    size = sizes(a.tiny)
    print(f'gpu_check: device {a.device}{" (tiny)" if a.tiny else ""}, budget {a.budget_s:.0f} s, work {work}', flush=True)
    if 'env' in a.sections:
        section_env(report, a.device)
    factor = next((r.get('h100_factor') for r in report.rows if r['section'] == 'env'), None)
    data = write_data(work / 'data', size)
    teacher = write_teacher(work, size['teacher'], size['classes'])
    common = run_flags(teacher, size['student'], data, size, a.device)
    # sections 4 and 7: a smaller pair on a smaller set (100 classes x 20 images at full size)
    small = run_flags(write_teacher(work, size['small_teacher'], size['classes']), size['small_student'],
                      write_data(work / 'data_small', size, per_class=size['resume_per_class'], test_per_class=2),
                      size, a.device)
    worker = ['--work', str(work), '--device', a.device, *(['--tiny'] if a.tiny else [])]
    if 'speed' in a.sections:
        per_method = deadline.cap('speed') / max(1, len(a.speed_methods))
        for method in a.speed_methods:
            run_worker(report, 'speed', ['--worker', 'speed', '--method', method, *worker, '--common', *common],
                       min(per_method, deadline.left()))
        judge_speed(report, factor)
    if 'concurrency' in a.sections:
        section_concurrency(report, a, common, deadline.cap('concurrency'))
    if 'methods' in a.sections:
        run_worker(report, 'methods', ['--worker', 'methods', *worker, *(['--methods', *a.methods] if a.methods else []),
                                       '--common', *small], deadline.cap('methods'))
    if 'resume' in a.sections:
        section_resume(report, a, work, deadline.cap('resume'))
    if 'offline' in a.sections:
        section_offline(report, a, data, teacher, work, deadline.cap('offline'))
    if 'numerics' in a.sections:
        run_worker(report, 'numerics', ['--worker', 'numerics', *worker, '--common', *small], deadline.cap('numerics'))
    table = final_table(report)
    (report.out / 'gpu_check.md').write_text(table + '\n')
    print(f'\ngpu_check on {a.device}: {a.budget_s - deadline.left():.0f} s of {a.budget_s:.0f}\n\n{table}')
    bad = [r for r in report.rows if r.get('status') in ('FAIL', 'timeout')]
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
