"""Command-line flags shared by train_teacher.py and train_student.py (RepDistiller's, plus ours)."""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from dataset import DATASETS
from helper import distributed
from helper.distributed import launched_by_torchrun
from helper.errors import UserError
from helper.teachers import PREFIX as TORCHVISION_PREFIX, is_torchvision_teacher
from helper.util import default_learning_rate, parse_milestones, seed_from_trial


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Optimisation, data, output and reproducibility flags used by both CLIs."""
    g = parser.add_argument_group('training (RepDistiller defaults)')
    g.add_argument('--print_freq', type=int, default=100, help='log line every N iterations (when no progress bar)')
    g.add_argument('--tb_freq', type=int, default=500, help='kept for RepDistiller compatibility; unused')
    g.add_argument('--save_freq', type=int, default=40, help='write ckpt_epoch_<E>.pth every N epochs (and at the end)')
    g.add_argument('--batch_size', type=int, default=64)
    g.add_argument('--num_workers', type=int, default=8)
    g.add_argument('--epochs', type=int, default=240)
    g.add_argument('--learning_rate', type=float, default=None,
                   help='initial lr; default 0.05, or 0.01 for MobileNetV2/ShuffleV1/ShuffleV2 (an explicit value is honoured)')
    g.add_argument('--lr_decay_epochs', type=str, default='150,180,210', help='epochs after which lr is multiplied by the rate')
    g.add_argument('--lr_decay_rate', type=float, default=0.1)
    g.add_argument('--weight_decay', type=float, default=5e-4)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--nesterov', action='store_true', help='Nesterov momentum (the letKD/QUEST protocol)')
    g.add_argument('--drop_last', action='store_true',
                   help='skip the last incomplete training batch each epoch (the letKD/QUEST protocol: 781 '
                        'iterations per CIFAR-100 epoch); RepDistiller keeps it')

    g = parser.add_argument_group('data')
    g.add_argument('--dataset', type=str, default='cifar100', choices=DATASETS)
    g.add_argument('--data_folder', type=str, default='./data',
                   help='CIFAR-100: folder holding cifar-100-python/; Tiny-ImageNet: holding tiny-imagenet-200/; '
                        'ImageNet: holding imagenet/{train,val}')
    g.add_argument('--no_download', dest='download', action='store_false',
                   help='never download CIFAR-100; fail if it is missing from --data_folder')
    g.add_argument('--pad_mode', type=str, default='zero', choices=('zero', 'reflect'),
                   help='padding of the random crop: zero (RepDistiller) or reflect (letKD/QUEST code)')
    g.add_argument('--crop_size', type=int, default=None,
                   help='ImageNet only: training crop / test centre crop (default 224, test resize 256); '
                        'smaller values are for smoke tests')
    g.add_argument('--tiny_aug', type=str, default=None, choices=('rotate', 'crop'),
                   help="Tiny-ImageNet augmentation: rotate = RandomRotation(20) + flip (default; the letKD "
                        "authors' code), crop = RandomCrop(64, padding 4, --pad_mode) + flip")
    g.add_argument('--tiny_split', type=str, default=None, choices=('val50', 'letkd'),
                   help='Tiny-ImageNet evaluation: val50 = all 50 labelled val images per class (default); '
                        'letkd = select on val (25/class), report on test (25/class), as the letKD authors (Table 3)')

    g = parser.add_argument_group('run')
    g.add_argument('--save_dir', type=str, default='./save', help='root of all run folders')
    g.add_argument('--seed', type=int, default=None, help='seed of everything; default: derived from --trial')
    g.add_argument('--deterministic', action='store_true', help='deterministic kernels (slower on GPU)')
    g.add_argument('--resume', action='store_true', help='continue the run in its folder from last.pth')
    g.add_argument('--overwrite', action='store_true', help='delete an existing run folder of the same name first')
    g.add_argument('--device', type=str, default='auto', choices=('auto', 'cpu', 'cuda'))
    g.add_argument('--trust_checkpoint', action='store_true',
                   help='allow checkpoints that need arbitrary pickled objects (only for files you trust)')
    g.add_argument('--name_sep', type=str, default='~' if os.name == 'nt' else ':', choices=(':', '~'),
                   help="separator in student folder names (RepDistiller's ':'; '~' is Windows-safe)")
    g.add_argument('--sync_bn', action='store_true',
                   help='under torchrun on GPUs: SyncBatchNorm in the student and the method modules (BN statistics '
                        'over the global batch, at a collective per BN layer and step); the teacher is unchanged; '
                        'no effect in one process or on the CPU')


    g = parser.add_argument_group('fast path (changes speed, not the method; docs/speed.md)')
    g.add_argument('--fast', action='store_true',
                   help='the sync-free training loop with --device_data --tf32 --channels_last and a compiled step '
                        '(--compile reduce-overhead on one GPU, default elsewhere; bf16 only with --amp bf16); each '
                        'part can be switched off, e.g. --compile none')
    g.add_argument('--device_data', action=argparse.BooleanOptionalAction, default=None,
                   help='training and test data resident on the device, augmented there (cifar100, '
                        'tinyimagenet, digits)')
    g.add_argument('--tf32', action=argparse.BooleanOptionalAction, default=None,
                   help='TF32 for CUDA matmuls and cuDNN convolutions, both on (default with --fast) or both off '
                        "(default otherwise: true float32, although torch's own default convolves in TF32); no "
                        'effect on CPU')
    g.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=None,
                   help='channels_last memory format for models and images')
    g.add_argument('--compile', type=str, default=None, choices=COMPILE_MODES,
                   help='torch.compile the training step (forward, losses, bookkeeping and their backward as one '
                        'graph); reduce-overhead = CUDA graphs, CUDA only; default with --fast: reduce-overhead on '
                        'one GPU, default on the CPU and under torchrun; else none')
    g.add_argument('--amp', type=str, default='none', choices=AMP_MODES,
                   help='bf16: torch.autocast(bfloat16) around the training forward (CPU and CUDA)')


COMPILE_MODES = ('none', 'default', 'reduce-overhead')
AMP_MODES = ('none', 'bf16')
# fast-path options: any of them selects the sync-free loop (helper/loops.py FastTrainer)
FAST_OPTIONS = ('device_data', 'tf32', 'channels_last', 'compile', 'amp')


def resolve_fast(opt: argparse.Namespace) -> dict[str, Any]:
    """The fast-path flags resolved: --fast turns on device data, TF32, channels_last and compile unless
    a finer flag says otherwise; ``fast_loop`` is True when --fast or any fast option is on. UserError for
    device data on ImageNet."""
    fast = bool(getattr(opt, 'fast', False))
    values: dict[str, Any] = {}
    for flag in ('device_data', 'tf32', 'channels_last'):
        value = getattr(opt, flag, None)
        values[flag] = fast if value is None else bool(value)
    if getattr(opt, 'device_data', None) is None and (opt.dataset == 'imagenet' or launched_by_torchrun()):
        values['device_data'] = False    # --fast on ImageNet or under torchrun: everything but device data
    compile_mode = getattr(opt, 'compile', None)
    if compile_mode is None:
        # --fast: CUDA graphs (reduce-overhead) where they are safe, one process on a GPU; under torchrun DDP
        # splits the graph at its gradient buckets, so there the default mode
        cuda = opt.device == 'cuda' or (opt.device == 'auto' and torch.cuda.is_available())
        compile_mode = ('reduce-overhead' if cuda and not launched_by_torchrun() else 'default') if fast else 'none'
    values['compile'] = compile_mode
    values['amp'] = getattr(opt, 'amp', None) or 'none'
    values['fast_loop'] = fast or values['device_data'] or values['tf32'] or values['channels_last'] \
        or values['compile'] != 'none' or values['amp'] != 'none'
    if values['device_data'] and opt.dataset == 'imagenet':
        raise UserError("--device_data supports cifar100, tinyimagenet and digits, not imagenet (--fast alone "
                        "leaves it off there)")
    if values['device_data'] and launched_by_torchrun():
        raise UserError("--device_data is single-process; under torchrun the DataLoader path shards the data "
                        "(--fast alone leaves device data off there)")
    return values


class ResolvedOptions(argparse.Namespace):
    """The options of a run after resolution: read-only, so no module writes into them afterwards."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the resolved options are read-only (tried to set {name!r}); "
                             "derive values in the method's resolve_options instead")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"the resolved options are read-only (tried to delete {name!r})")


def updated(opt: argparse.Namespace, **values: Any) -> argparse.Namespace:
    """A copy of ``opt`` (a plain Namespace) with ``values`` set; ``opt`` itself is left as it is."""
    return argparse.Namespace(**{**vars(opt), **values})


def freeze(opt: argparse.Namespace) -> ResolvedOptions:
    """A read-only copy of ``opt``."""
    return ResolvedOptions(**vars(opt))


def resolve_common(opt: argparse.Namespace, model_name: str) -> argparse.Namespace:
    """``opt`` with the defaults that depend on other flags resolved (lr, milestones, trial, seed);
    UserError for bad values. Returns a new Namespace."""
    values: dict[str, Any] = {'trial': str(opt.trial)}
    if opt.learning_rate is None:
        values['learning_rate'] = default_learning_rate(model_name)
    values['lr_decay_epochs'] = parse_milestones(opt.lr_decay_epochs) if isinstance(opt.lr_decay_epochs, str) \
        else list(opt.lr_decay_epochs)
    if opt.seed is None:
        values['seed'] = seed_from_trial(values['trial'])
    for flag in ('epochs', 'batch_size', 'save_freq'):
        if getattr(opt, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(opt, flag)}")
    if opt.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {opt.num_workers}")
    check_optimisation(updated(opt, **values))
    if getattr(opt, 'crop_size', None) is not None and (opt.dataset != 'imagenet' or opt.crop_size < 8):
        raise UserError(f"--crop_size is an ImageNet option of at least 8 pixels (got {opt.crop_size} with "
                        f"--dataset {opt.dataset})")
    tiny = opt.dataset == 'tinyimagenet'
    for flag, default in (('tiny_aug', 'rotate'), ('tiny_split', 'val50')):
        value = getattr(opt, flag, None)
        if value is not None and not tiny:
            raise UserError(f"--{flag} applies to --dataset tinyimagenet only, not {opt.dataset}")
        values[flag] = (value or default) if tiny else None
    values.update(resolve_fast(opt))
    return updated(opt, **values)


def check_optimisation(opt: argparse.Namespace) -> None:
    """Reject optimiser and schedule values SGD would refuse or that cannot train (UserError)."""
    def finite(flag: str) -> float:
        value = float(getattr(opt, flag))
        if not math.isfinite(value):
            raise UserError(f"--{flag} must be a finite number, got {value}")
        return value

    if finite('learning_rate') <= 0:
        raise UserError(f"--learning_rate must be positive, got {opt.learning_rate}")
    if finite('weight_decay') < 0:
        raise UserError(f"--weight_decay must be >= 0, got {opt.weight_decay}")
    if not 0 <= finite('momentum') < 1:
        raise UserError(f"--momentum must be in [0, 1), got {opt.momentum}")
    if opt.nesterov and opt.momentum == 0:
        raise UserError("--nesterov needs a positive --momentum")
    if finite('lr_decay_rate') <= 0:
        raise UserError(f"--lr_decay_rate must be positive, got {opt.lr_decay_rate}")
    if any(m < 0 for m in opt.lr_decay_epochs):
        raise UserError(f"--lr_decay_epochs must be non-negative epochs, got {opt.lr_decay_epochs}")
    if opt.print_freq < 0:
        raise UserError(f"--print_freq must be >= 0, got {opt.print_freq}")


def data_options(opt: argparse.Namespace) -> dict[str, Any]:
    """The protocol keywords of dataset.get_dataloaders taken from finalized flags."""
    return {'drop_last': bool(getattr(opt, 'drop_last', False)), 'augment': getattr(opt, 'tiny_aug', None),
            'split': getattr(opt, 'tiny_split', None) or 'val50', 'crop_size': getattr(opt, 'crop_size', None)}


def teacher_folder_name(opt: argparse.Namespace) -> str:
    """RepDistiller's teacher folder: <model>_<dataset>_lr_<lr>_decay_<wd>_trial_<trial>."""
    return f'{opt.model}_{opt.dataset}_lr_{opt.learning_rate}_decay_{opt.weight_decay}_trial_{opt.trial}'


def student_folder_name(opt: argparse.Namespace) -> str:
    """RepDistiller's student folder: S:<s>_T:<t>_<dataset>_<distill>_r:<r>_a:<a>_b:<b>_<trial>; <distill> ends in
    ``_ls`` with --logit_stand (dkd and dkd + logit standardization have the same -r -a -b) and is followed by
    ``+dot`` with ``--trainer dot``."""
    s = opt.name_sep
    method = f"{opt.distill}_ls" if getattr(opt, 'logit_stand', False) else opt.distill
    if getattr(opt, 'trainer', 'sgd') != 'sgd':
        method = f'{method}+{opt.trainer}'
    return (f'S{s}{opt.model_s}_T{s}{opt.model_t}_{opt.dataset}_{method}_'
            f'r{s}{float(opt.gamma)}_a{s}{float(opt.alpha)}_b{s}{float(opt.beta)}_{opt.trial}')


DEFAULT_PROTOCOL = 'published'
PROTOCOL_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.-]*')


def protocol_folder(opt: argparse.Namespace) -> str:
    """The folder between ``<save_dir>/student_model`` and a student's run folder: '' for the ``published`` protocol
    (each method's own recipe; RepDistiller's layout, so existing runs keep their place), ``protocol_<name>`` for
    another (scripts/settings.py PROTOCOLS). The run-folder name holds the method's weights only, so runs of two
    protocols would otherwise share a folder."""
    name = getattr(opt, 'protocol', None) or DEFAULT_PROTOCOL
    return '' if name == DEFAULT_PROTOCOL else f'protocol_{name}'


def teacher_name_from_path(path: str) -> str | None:
    """The architecture encoded in a teacher checkpoint's folder name, as RepDistiller/SimKD parse it.

    ``.../resnet32x4_vanilla/ckpt_epoch_240.pth`` -> resnet32x4; ``.../wrn_40_2_cifar100_lr_.../x.pth``
    -> wrn_40_2; a distilled student folder ``S:resnet8x4_T:resnet32x4_...`` -> resnet8x4;
    ``torchvision:ResNet34`` (torchvision's ImageNet weights) -> ResNet34.
    """
    if is_torchvision_teacher(path):
        return path[len(TORCHVISION_PREFIX):]
    folder = Path(path).parent.name
    for sep in (':', '~'):
        if folder.startswith(f'S{sep}') and f'_T{sep}' in folder:
            return folder[2:folder.index(f'_T{sep}')]
    tokens = folder.split('_')
    if not tokens[0]:
        return None
    return '_'.join(tokens[:3]) if tokens[0] == 'wrn' else tokens[0]


def run_cli(parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], Any],
            argv: list[str] | None = None) -> int:
    """Parse, run ``main``; a UserError becomes one line on stderr and exit code 2. Under torchrun the process
    leaves its process group at the end (``main`` joined it)."""
    opt = parser.parse_args(argv)
    try:
        main(opt)
    except UserError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()
    return 0
