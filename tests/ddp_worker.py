"""A torchrun entry point for tests/test_distributed.py: runs train_teacher / train_student's CLI and then
saves what this rank holds (its own files, not the run's: only rank 0 writes those).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT_DIR student NAME [flags] :: teacher NAME ...

Several runs (separated by ``::``) share one launch (process start-up dominates on small CPUs); each run's
rank-r state goes to OUT_DIR/NAME.rank<r>.pt.

A run's ``--kill_after_epoch E`` (taken out before the CLI sees the flags) ends every rank abruptly right
after last.pth of epoch E is written; ``--slow_prepare S`` makes rank 0's ``prepare`` take S seconds longer
(a cache that takes long to build); ``--nan_on_rank1_at_step S`` makes rank 1's loss NaN at its S-th training
step (rank 0's stays finite); ``--dump_after_prepare`` saves each rank's state right after ``prepare``
with the indices the training loader gave it during ``prepare`` (an init stage) to OUT_DIR/NAME.prepare.rank<r>.pt.
TORCHVISION_FAKE_CLASSES=C replaces torchvision's weights by a random model's (nothing downloads);
DDP_TEST_TIMEOUT_S=T sets the collectives' timeout (helper/distributed.py TIMEOUT) to T seconds.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataset  # noqa: E402
import helper.distributed  # noqa: E402
import helper.run  # noqa: E402
import train_student  # noqa: E402
import train_teacher  # noqa: E402
from distiller_zoo.registry import DISTILLERS, canonical_name  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    out, runs, current = Path(sys.argv[1]), [], []
    for arg in sys.argv[2:] + ['::']:
        if arg == '::':
            runs.append(current)
            current = []
        else:
            current.append(arg)
    if os.environ.get('TORCHVISION_FAKE_CLASSES'):
        import torchvision

        import helper.teachers as teachers
        classes = int(os.environ['TORCHVISION_FAKE_CLASSES'])
        teachers.state_dict_loader = lambda name: getattr(torchvision.models, name.lower())(
            weights=None, num_classes=classes).state_dict()
    if os.environ.get('DDP_TEST_TIMEOUT_S'):
        helper.distributed.TIMEOUT = timedelta(seconds=float(os.environ['DDP_TEST_TIMEOUT_S']))
    # one process group for all runs of the launch (re-joining after destroy_process_group hangs)
    helper.distributed.cleanup = lambda: None
    rank = os.environ.get('RANK', '0')
    for which, name, *argv in runs:
        argv, kill_after = _take(argv, '--kill_after_epoch', 0)   # ours, not the CLI's
        argv, slow = _take(argv, '--slow_prepare', 0)
        argv, nan_step = _take(argv, '--nan_on_rank1_at_step', 0)
        dump_prepare = '--dump_after_prepare' in argv
        argv = [a for a in argv if a != '--dump_after_prepare']
        module = train_student if which == 'student' else train_teacher
        method = DISTILLERS[canonical_name(argv[argv.index('--distill') + 1])] if which == 'student' else None
        original = method.prepare if method is not None else None
        original_step = method.forward_train if method is not None else None
        if method is not None and (slow or dump_prepare):
            method.prepare = _watched_prepare(original, slow, out / f'{name}.prepare.rank{rank}.pt' if dump_prepare
                                              else None)
        if method is not None and nan_step and rank == '1':
            method.forward_train = _nan_at(original_step, int(nan_step))
        try:
            code = _run(module, out / f"{name}.rank{rank}.pt", argv, kill_after)
        finally:
            if method is not None:
                method.prepare, method.forward_train = original, original_step
        if code:
            return code
        # separate launches in real use: the next run may read what rank 0 of this one is still writing
        helper.distributed.barrier()
    return 0


def _take(argv: list[str], flag: str, default: float) -> tuple[list[str], float]:
    """``argv`` without ``flag VALUE``, and VALUE (``default`` when absent)."""
    if flag not in argv:
        return argv, default
    at = argv.index(flag)
    return argv[:at] + argv[at + 2:], float(argv[at + 1])


class _RecordingLoader:
    """A training loader that records, per epoch, the indices of the batches it gives out (items' 3rd field)."""

    def __init__(self, loader) -> None:
        self.loader, self.epochs = loader, []

    def set_epoch(self, epoch: int, seed: int, stream: int) -> None:
        dataset.set_epoch(self.loader, epoch, seed, stream)
        self.epochs.append([])

    def __iter__(self):
        for batch in self.loader:
            self.epochs[-1] += batch[2].tolist()
            yield batch

    def __len__(self) -> int:
        return len(self.loader)


def _nan_at(forward_train, step: int):
    """``forward_train`` whose losses are NaN at its ``step``-th call (1-based)."""
    calls = [0]

    def flaky(self, image, target, **extras):
        logits, losses = forward_train(self, image, target, **extras)
        calls[0] += 1
        if calls[0] == step:
            losses = {name: value * float('nan') for name, value in losses.items()}
        return logits, losses
    return flaky


def _watched_prepare(prepare, slow_s: float, dump: Path | None):
    """``prepare`` that first sleeps ``slow_s`` seconds on rank 0 and, with ``dump``, saves the state after it."""
    def watched(self, data, **kwargs):
        if slow_s and helper.distributed.is_main():
            time.sleep(slow_s)
        recording = _RecordingLoader(data.train_loader)
        prepare(self, dataclasses.replace(data, train_loader=recording) if dump else data, **kwargs)
        if dump:
            torch.save({'state': {k: v.detach().cpu().clone() for k, v in self.state_dict_without_teacher().items()},
                        'indices': recording.epochs}, dump)
    return watched


def _run(module, dump: Path, argv: list[str], kill_after: int) -> int:
    """module.cli(argv), dumping this rank's distiller state and the summary after fit; with kill_after,
    every rank ends abruptly (os._exit) right after last.pth of that epoch is written (a preempted job)."""
    original_fit, original_save = module.fit, helper.run.save_checkpoint

    def save_then_maybe_die(obj: dict, path) -> None:
        original_save(obj, path)
        if kill_after and Path(path).name == 'last.pth' and obj.get('epoch') == kill_after:
            sys.stdout.flush()
            os._exit(17)

    def fit_and_dump(distiller, data, cfg, device):
        summary = original_fit(distiller, data, cfg, device)
        ddp = helper.distributed._WRAPPED.get(distiller)
        torch.save({'state': {k: v.cpu() for k, v in distiller.state_dict_without_teacher().items()},
                    'summary': summary,
                    'ddp': {'find_unused_parameters': ddp.find_unused_parameters, 'static_graph': ddp.static_graph}},
                   dump)
        return summary

    module.fit, helper.run.save_checkpoint = fit_and_dump, save_then_maybe_die
    try:
        return module.cli(argv)
    finally:
        module.fit, helper.run.save_checkpoint = original_fit, original_save


if __name__ == '__main__':
    sys.exit(main())
