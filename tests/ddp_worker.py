"""A torchrun entry point for tests/test_distributed.py: runs train_teacher / train_student's CLI and then
saves what this rank holds (its own files, not the run's: only rank 0 writes those).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT_DIR student NAME [flags] :: teacher NAME ...

Several runs (separated by ``::``) share one launch (process start-up dominates on small CPUs); each run's
rank-r state goes to OUT_DIR/NAME.rank<r>.pt.

A run's ``--kill_after_epoch E`` (taken out before the CLI sees the flags) ends every rank abruptly right
after last.pth of epoch E is written; TORCHVISION_FAKE_CLASSES=C replaces torchvision's weights by a random
model's (nothing downloads).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import helper.distributed  # noqa: E402
import helper.run  # noqa: E402
import train_student  # noqa: E402
import train_teacher  # noqa: E402


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
    # one process group for all runs of the launch (re-joining after destroy_process_group hangs)
    helper.distributed.cleanup = lambda: None
    for which, name, *argv in runs:
        kill_after = 0
        if '--kill_after_epoch' in argv:  # ours, not the CLI's
            at = argv.index('--kill_after_epoch')
            kill_after, argv = int(argv[at + 1]), argv[:at] + argv[at + 2:]
        module = train_student if which == 'student' else train_teacher
        code = _run(module, out / f"{name}.rank{os.environ.get('RANK', '0')}.pt", argv, kill_after)
        if code:
            return code
    return 0


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
        torch.save({'state': {k: v.cpu() for k, v in distiller.state_dict_without_teacher().items()},
                    'summary': summary}, dump)
        return summary

    module.fit, helper.run.save_checkpoint = fit_and_dump, save_then_maybe_die
    try:
        return module.cli(argv)
    finally:
        module.fit, helper.run.save_checkpoint = original_fit, original_save


if __name__ == '__main__':
    sys.exit(main())
