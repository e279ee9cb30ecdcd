"""Distil a teacher into a student with any registered method (RepDistiller's train_student.py).

    python train_student.py --path_t save/models/resnet56_vanilla/ckpt_epoch_240.pth \
        --distill kd --model_s resnet20 --trial 1

The training loop has no method-specific code: ``--distill`` picks a Distiller from
distiller_zoo/registry.py, which owns its modules, losses and offline stages.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from dataset.device_data import DEVICE_MODES
from distiller_zoo.registry import ALIASES, DISTILLERS, add_method_arguments, canonical_name
from helper import distributed
from helper.errors import UserError
from helper.loops import validate
from helper.numerics import set_tf32
from helper.optim import TRAINERS
from helper.options import (DEFAULT_PROTOCOL, PROTOCOL_NAME, ResolvedOptions, add_common_arguments, freeze,
                            protocol_folder, resolve_common, run_cli, student_folder_name, teacher_name_from_path,
                            updated)
from helper.run import RunConfig, check_run_dir, create_run_dir, fit, load_data
from helper.util import count_params, load_teacher, resolve_device, save_json, seed_everything
from helper.teachers import is_torchvision_teacher, torchvision_teacher_name
from models import create_model, model_names

# CIFAR-100 top-1 of RepDistiller's published teachers (its README); used to flag a broken load.
PUBLISHED_TEACHER_ACC = {'wrn_40_2': 75.61, 'resnet56': 72.34, 'resnet110': 74.31, 'resnet32x4': 79.42,
                         'vgg13': 74.64, 'ResNet50': 79.34}
TEACHER_ACC_TOLERANCE = 2.0


def get_args_parser() -> argparse.ArgumentParser:
    """The student CLI's flags: models and weights here, each method's own flags from its file (registry)."""
    parser = argparse.ArgumentParser(description='Distil a teacher into a student.')
    g = parser.add_argument_group('models and method')
    g.add_argument('--model_s', type=str, default='resnet8',
                   help=f"student; one of: {', '.join(model_names())} (with --dataset imagenet "
                   "ResNet18/34/50 and MobileNetV1 are the ImageNet architectures)")
    g.add_argument('--path_t', type=str, default=None,
                   help='teacher checkpoint ({"model": state_dict, ...}), or torchvision:ResNet18/34/50 for '
                        "torchvision's IMAGENET1K_V1 weights (--dataset imagenet)")
    g.add_argument('--model_t', type=str, default=None,
                   help="teacher architecture; default: parsed from --path_t's folder name as RepDistiller does")
    g.add_argument('--distill', type=str, default='kd', help=f"one of: {', '.join(sorted(DISTILLERS) + sorted(ALIASES))}")
    g.add_argument('--trial', type=str, default='1', help='experiment id (folder name, default seed)')
    g.add_argument('-r', '--gamma', type=float, default=None, help="weight of CE; default: the method's published value")
    g.add_argument('-a', '--alpha', type=float, default=None, help="weight of logit KD; default: the method's published value")
    g.add_argument('-b', '--beta', type=float, default=None, help="weight of the method's loss; default: its published value")
    g.add_argument('--kd_T', type=float, default=4, help='temperature of logit KD')
    g.add_argument('--trainer', type=str, default='sgd', choices=TRAINERS,
                   help="the update: sgd, or dot (DOT, ICCV 2023: separate momentum for the task term 'ce' and the "
                        "distillation terms; helper/optim.py)")
    g.add_argument('--dot_delta', type=float, default=0.075,
                   help="DOT: task momentum = --momentum - delta, distillation momentum = --momentum + delta "
                        "(mdistiller's CIFAR-100 configs: 0.075)")
    g.add_argument('--protocol', type=str, default=DEFAULT_PROTOCOL,
                   help="the sweep protocol the run belongs to (scripts/settings.py PROTOCOLS: published, repdistiller, "
                        "letkd): a label recorded in args.json and summary.json that places the run in "
                        "<save_dir>/student_model/protocol_<name>/ (published: student_model/ itself); the recipe's "
                        "flags themselves are on the command line (scripts/commands.py --protocol writes them)")
    add_method_arguments(parser)
    add_common_arguments(parser)
    return parser


def resolve_options(parsed: argparse.Namespace) -> ResolvedOptions:
    """The run's options, checked and complete: method alias, teacher name, the method's published weights
    and per-pair defaults, lr, seed. Reads no file (scripts/launch.py names runs before their teacher exists);
    the result is read-only and is what args.json records (with the data's facts)."""
    opt = updated(parsed, distill=canonical_name(parsed.distill))
    method = DISTILLERS[opt.distill]
    if not PROTOCOL_NAME.fullmatch(str(opt.protocol)):
        raise UserError(f"--protocol must be a name of letters, digits, '_', '.' or '-' (it names a folder), got "
                        f"{opt.protocol!r}")
    if opt.model_s not in model_names():
        raise UserError(f"unknown --model_s {opt.model_s!r}; choose one of: {', '.join(model_names())}")
    if not method.needs_teacher:
        opt = updated(opt, model_t=opt.model_t or 'none')
    elif opt.model_t is None and opt.path_t is not None:
        opt = updated(opt, model_t=teacher_name_from_path(opt.path_t))
    if getattr(opt, 'device_data', None) is None and method.data_mode not in DEVICE_MODES:
        opt = updated(opt, device_data=False)   # --fast alone: everything but device data for modes it lacks (mlkd)
    parsed_compile = opt.compile
    opt = resolve_common(opt, opt.model_s)
    if opt.trainer == 'dot':
        opt = resolve_dot(opt, method, compile_was_given=parsed_compile is not None)
    return freeze(method.resolve_options(opt))


def resolve_dot(opt: argparse.Namespace, method: type, *, compile_was_given: bool) -> argparse.Namespace:
    """Checks of ``--trainer dot``; --fast's compile default becomes 'default' (DOT's two backward passes through
    one step have not been run under CUDA graphs)."""
    if not method.needs_teacher:
        raise UserError(f"--trainer dot needs distillation terms; --distill {opt.distill} has none")
    if opt.nesterov:
        raise UserError("--trainer dot has no Nesterov momentum (as mdistiller's); drop --nesterov")
    if not 0 <= opt.dot_delta <= opt.momentum or opt.momentum + opt.dot_delta >= 1:
        raise UserError(f"--dot_delta must be in [0, --momentum] with --momentum + --dot_delta < 1, got "
                        f"{opt.dot_delta} (momentum {opt.momentum})")
    if opt.compile == 'reduce-overhead' and not compile_was_given:
        opt = updated(opt, compile='default')
    return opt


def run_folder(opt: argparse.Namespace) -> Path:
    """The run folder of resolved options: <save_dir>/student_model/S:<s>_T:<t>_..., or
    <save_dir>/student_model/protocol_<name>/S:<s>_T:<t>_... for a protocol other than 'published'."""
    return Path(opt.save_dir) / 'student_model' / protocol_folder(opt) / student_folder_name(opt)


def resolve_run_dir(parsed: argparse.Namespace) -> Path:
    """The run folder of a parsed command line (resolves a copy of the options; reads no file)."""
    return run_folder(resolve_options(parsed))


def check_teacher(opt: argparse.Namespace) -> None:
    """The teacher checkpoint is given and exists, and its architecture is known (UserError otherwise)."""
    if opt.path_t is None:
        raise UserError(f"--distill {opt.distill} needs a teacher: pass --path_t")
    if is_torchvision_teacher(opt.path_t):
        torchvision_teacher_name(opt.path_t)  # UserError for a name without weights
        if opt.dataset != 'imagenet':
            raise UserError(f"--path_t {opt.path_t} holds ImageNet weights; pass --dataset imagenet")
    elif not Path(opt.path_t).is_file():
        raise UserError(f"teacher checkpoint not found: {opt.path_t}")
    if opt.model_t not in model_names():
        raise UserError(f"cannot use teacher architecture {opt.model_t!r} (from --model_t or the folder of "
                        f"{opt.path_t}); pass --model_t with one of: {', '.join(model_names())}")


def main(parsed: argparse.Namespace) -> dict:
    """Validate everything, prepare the method, then create the run folder and train. Returns the summary."""
    opt = resolve_options(parsed)
    run_dir = run_folder(opt)
    method = DISTILLERS[opt.distill]
    if method.needs_teacher:
        check_teacher(opt)
    device = distributed.setup(resolve_device(opt.device))  # joins torchrun's process group, if any
    check_run_dir(run_dir, resume=opt.resume, overwrite=opt.overwrite)

    seed_everything(opt.seed, opt.deterministic)
    set_tf32(opt.tf32)   # both directions: without --tf32 CUDA convolves in true float32, not cuDNN's default TF32
    data = load_data(opt, device, method.data_mode, nce_k=opt.nce_k, crd_mode=opt.mode)
    teacher = None
    if method.needs_teacher:
        print(f'==> loading teacher {opt.model_t} from {opt.path_t}')
        teacher = load_teacher(opt.path_t, opt.model_t, data.num_classes, opt.trust_checkpoint,
                               dataset=opt.dataset).to(device)
    student = create_model(opt.model_s, num_classes=data.num_classes, dataset=opt.dataset).to(device)
    distiller = method(student, teacher, opt, data.info).to(device)

    teacher_acc = teacher_acc_top5 = None
    if teacher is not None:
        teacher_val = validate(teacher, data.val_loader, device, desc='teacher')
        teacher_acc, teacher_acc_top5 = teacher_val['acc'], teacher_val['acc_top5']
        print(f'teacher accuracy: {teacher_acc:.2f}')
        published = PUBLISHED_TEACHER_ACC.get(opt.model_t) if opt.dataset == 'cifar100' else None
        if published is not None and abs(teacher_acc - published) > TEACHER_ACC_TOLERANCE:
            print(f'warning: teacher {opt.model_t} scores {teacher_acc:.2f}, the published checkpoint {published:.2f}; '
                  'check that this is the checkpoint you meant', file=sys.stderr)
    cache_dir = str(Path(opt.save_dir) / 'cache')
    if method.collective_prepare:   # init stages (AB/FT/FSP): every rank on its shard at once
        distiller.prepare(data, device=device, cache_dir=cache_dir, resumed=opt.resume)
    else:
        with distributed.main_first(cache_dir):   # rank 0 builds the caches, the others then load them
            distiller.prepare(data, device=device, cache_dir=cache_dir, resumed=opt.resume)

    create_run_dir(run_dir, overwrite=opt.overwrite)   # rank 0 under torchrun
    if not opt.resume:
        save_json({**vars(opt), **asdict(data.info)}, run_dir / 'args.json')
    deployed = distiller.deployable()
    print(f'==> {opt.distill}: {opt.model_t} -> {opt.model_s} on {opt.dataset} ({device}); '
          f'deployed student {count_params(deployed):,} params; run folder {run_dir}')
    summary = {'distill': opt.distill, 'model_s': opt.model_s, 'model_t': opt.model_t, 'dataset': opt.dataset,
               'trial': opt.trial, 'gamma': opt.gamma, 'alpha': opt.alpha, 'beta': opt.beta, 'teacher_acc': teacher_acc,
               'teacher_acc_top5': teacher_acc_top5, 'trainer': opt.trainer, 'protocol': opt.protocol}
    cfg = RunConfig.from_opt(opt, run_dir, opt.model_s, summary)
    return fit(distiller, data, cfg, device)


def cli(argv: list[str] | None = None) -> int:
    return run_cli(get_args_parser(), main, argv)


if __name__ == '__main__':
    sys.exit(cli())
