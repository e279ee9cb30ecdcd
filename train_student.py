"""Distil a teacher into a student with any registered method (RepDistiller's train_student.py).

    python train_student.py --path_t save/models/resnet56_vanilla/ckpt_epoch_240.pth \
        --distill kd --model_s resnet20 --trial 1

The training loop has no method-specific code: ``--distill`` picks a Distiller from
distiller_zoo/registry.py, which owns its modules, losses and offline stages.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.nn as nn

from dataset import get_dataloaders
from distiller_zoo.letkd import DEFAULT_MAX_POSITIONS
from distiller_zoo.registry import ALIASES, DISTILLERS, canonical_name
from helper.errors import UserError
from helper.loops import validate
from helper.options import (add_common_arguments, finalize_common, run_cli, student_folder_name,
                            teacher_name_from_path)
from helper.run import RunConfig, check_run_dir, create_run_dir, fit
from helper.util import (count_params, load_checkpoint, load_weights, resolve_device, save_json, seed_everything,
                         state_dict_from_checkpoint)
from models import create_model, model_dict

# CIFAR-100 top-1 of RepDistiller's published teachers (its README); used to flag a broken load.
PUBLISHED_TEACHER_ACC = {'wrn_40_2': 75.61, 'resnet56': 72.34, 'resnet110': 74.31, 'resnet32x4': 79.42,
                         'vgg13': 74.64, 'ResNet50': 79.34}
TEACHER_ACC_TOLERANCE = 2.0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Distil a teacher into a student.')
    g = parser.add_argument_group('models and method')
    g.add_argument('--model_s', type=str, default='resnet8', help=f"student; one of: {', '.join(model_dict)}")
    g.add_argument('--path_t', type=str, default=None, help='teacher checkpoint ({"model": state_dict, ...})')
    g.add_argument('--model_t', type=str, default=None,
                   help="teacher architecture; default: parsed from --path_t's folder name as RepDistiller does")
    g.add_argument('--distill', type=str, default='kd', help=f"one of: {', '.join(sorted(DISTILLERS) + sorted(ALIASES))}")
    g.add_argument('--trial', type=str, default='1', help='experiment id (folder name, default seed)')
    g.add_argument('-r', '--gamma', type=float, default=None, help="weight of CE; default: the method's published value")
    g.add_argument('-a', '--alpha', type=float, default=None, help="weight of logit KD; default: the method's published value")
    g.add_argument('-b', '--beta', type=float, default=None, help="weight of the method's loss; default: its published value")
    g.add_argument('--kd_T', type=float, default=4, help='temperature of logit KD')
    g.add_argument('--init_epochs', type=int, default=30, help='init-stage epochs of abound, factor, fsp')
    g.add_argument('--hint_layer', type=int, default=2, choices=range(5), help='FitNet feature index')
    g = parser.add_argument_group('CRD')
    g.add_argument('--feat_dim', type=int, default=128, help='embedding size of CRD and CC')
    g.add_argument('--mode', type=str, default='exact', choices=('exact', 'relax'), help='CRD positive sampling')
    g.add_argument('--nce_k', type=int, default=16384, help='CRD negatives per anchor')
    g.add_argument('--nce_t', type=float, default=0.07, help='CRD temperature')
    g.add_argument('--nce_m', type=float, default=0.5, help='CRD memory momentum')
    g = parser.add_argument_group('DKD')
    g.add_argument('--dkd_alpha', type=float, default=1.0, help='DKD weight of TCKD')
    g.add_argument('--dkd_beta', type=float, default=8.0, help='DKD weight of NCKD (per pair: README, Methods)')
    g.add_argument('--dkd_T', type=float, default=4.0, help='DKD temperature')
    g.add_argument('--dkd_warmup', type=int, default=20, help='epochs of linear DKD warm-up (0: none)')
    g = parser.add_argument_group('SimKD')
    g.add_argument('--simkd_factor', type=int, default=2, help="SimKD projector's bottleneck factor (t_n / factor)")
    g = parser.add_argument_group('TDD')
    g.add_argument('--tdd_threshold', type=float, default=0.2,
                   help='kNN purity below which a class-tree node becomes one coarse group')
    g.add_argument('--tdd_knn', type=int, default=20, help='neighbours of the kNN purity of a tree node')
    g.add_argument('--tdd_teacher_feat', type=str, default='stage', choices=('stage', 'block3_preact'),
                   help="teacher maps of the class trees: stage outputs (ours), or block3_preact, the pre-ReLU "
                        "residual sum of block 3 of each stage (KamalEngine's layerX.2.bn2 hook; CIFAR ResNets)")
    g.add_argument('--tdd_prototype', type=str, default='mean', choices=('mean', 'midpoint'),
                   help="tree-node prototype of the kNN purity: mean of the class means (ours), or midpoint "
                        "of the two children (KamalEngine's)")
    g.add_argument('--crd_weight', type=float, default=0.8, help='weight of the CRD term of tdd_crd (TDD+CRD)')
    g = parser.add_argument_group('letKD / QUEST')
    g.add_argument('--k_penult', type=int, default=4096, help='words of the penultimate codebook (k-means K)')
    g.add_argument('--k_inter', type=int, default=8, help='sub-classes per class at the intermediate layer (letkd2)')
    g.add_argument('--lda_dim', type=int, default=60, help='LDA components kept at the intermediate layer (fewer if the rank is smaller)')
    g.add_argument('--alpha_penult', type=float, default=None,
                   help="weight of the penultimate KD layer's value; default per pair: 1, ResNet50->MobileNetV2 "
                        "0.1 (cifar100) / 0.5 (tinyimagenet)")
    g.add_argument('--alpha_inter', type=float, default=None,
                   help="weight of the intermediate KD layer's value; default per pair: 1, ResNet50->MobileNetV2 "
                        "0.2 (cifar100) / 1 (tinyimagenet)")
    g.add_argument('--letkd_tau', type=float, default=1.0, help='letKD: teacher codebook targets softmax(-tau * squared distance)')
    g.add_argument('--quest_tau', type=float, default=5.0, help='QUEST: the same tau, with QuEST\'s default')
    g.add_argument('--quantizer_seed', type=int, default=0,
                   help='seed of the offline quantizers (k-means, position sampling); the same for every trial')
    g.add_argument('--max_positions', type=int, default=DEFAULT_MAX_POSITIONS,
                   help='offline quantizers sample at most this many teacher positions per layer')
    g.add_argument('--kd_layer_weight', type=float, default=1.0,
                   help="fitnet_kdlayer: weight of the KD layer's KL loss (0: the layer without supervision); "
                        "-b weights FitNet's hint loss")
    add_common_arguments(parser)
    return parser


def load_teacher(path: str, model_name: str, num_classes: int, trust: bool) -> nn.Module:
    """Build ``model_name`` and load the checkpoint strictly (CPU map_location; weights_only unless trusted)."""
    ckpt = load_checkpoint(path, map_location='cpu', trust=trust)
    model = create_model(model_name, num_classes=num_classes)
    load_weights(model, state_dict_from_checkpoint(ckpt, path), model_name, path)
    return model


def resolve_run_dir(opt: argparse.Namespace) -> Path:
    """Resolve the derived flags (method alias, teacher name, published weights, lr, seed) in place and
    return the run folder. Reads no file, so scripts/launch.py can name runs before their teacher exists."""
    opt.distill = canonical_name(opt.distill)
    method = DISTILLERS[opt.distill]
    if not method.needs_teacher:
        opt.model_t = opt.model_t or 'none'
    elif opt.model_t is None and opt.path_t is not None:
        opt.model_t = teacher_name_from_path(opt.path_t)
    for flag, value in zip(('gamma', 'alpha', 'beta'), method.default_weights):
        if getattr(opt, flag) is None:
            setattr(opt, flag, value)
    finalize_common(opt, opt.model_s)
    return Path(opt.save_dir) / 'student_model' / student_folder_name(opt)


def check_models(opt: argparse.Namespace, needs_teacher: bool) -> None:
    """The student and teacher names exist and the teacher file is there (UserError otherwise)."""
    if opt.model_s not in model_dict:
        raise UserError(f"unknown --model_s {opt.model_s!r}; choose one of: {', '.join(model_dict)}")
    if not needs_teacher:
        return
    if opt.path_t is None:
        raise UserError(f"--distill {opt.distill} needs a teacher: pass --path_t")
    if not Path(opt.path_t).is_file():
        raise UserError(f"teacher checkpoint not found: {opt.path_t}")
    if opt.model_t not in model_dict:
        raise UserError(f"cannot use teacher architecture {opt.model_t!r} (from --model_t or the folder of "
                        f"{opt.path_t}); pass --model_t with one of: {', '.join(model_dict)}")


def main(opt: argparse.Namespace) -> dict:
    """Validate everything, prepare the method, then create the run folder and train. Returns the summary."""
    run_dir = resolve_run_dir(opt)
    method = DISTILLERS[opt.distill]
    check_models(opt, method.needs_teacher)
    method.check_options(opt)
    check_run_dir(run_dir, resume=opt.resume, overwrite=opt.overwrite)
    device = resolve_device(opt.device)

    seed_everything(opt.seed, opt.deterministic)
    data = get_dataloaders(opt.dataset, opt.data_folder, opt.batch_size, opt.num_workers, mode=method.data_mode,
                           pad_mode=opt.pad_mode, download=opt.download, seed=opt.seed, nce_k=opt.nce_k,
                           crd_mode=opt.mode, pin_memory=device.type == 'cuda')
    opt.num_classes, opt.n_data, opt.image_size = data.num_classes, data.n_data, data.image_size
    teacher = None
    if method.needs_teacher:
        print(f'==> loading teacher {opt.model_t} from {opt.path_t}')
        teacher = load_teacher(opt.path_t, opt.model_t, data.num_classes, opt.trust_checkpoint).to(device)
    student = create_model(opt.model_s, num_classes=data.num_classes).to(device)
    distiller = method(student, teacher, opt).to(device)

    teacher_acc = None
    if teacher is not None:
        teacher_acc = validate(teacher, data.val_loader, device, desc='teacher')['acc']
        print(f'teacher accuracy: {teacher_acc:.2f}')
        published = PUBLISHED_TEACHER_ACC.get(opt.model_t) if opt.dataset == 'cifar100' else None
        if published is not None and abs(teacher_acc - published) > TEACHER_ACC_TOLERANCE:
            print(f'warning: teacher {opt.model_t} scores {teacher_acc:.2f}, the published checkpoint {published:.2f}; '
                  'check that this is the checkpoint you meant', file=sys.stderr)
    distiller.prepare(data, device=device, cache_dir=str(Path(opt.save_dir) / 'cache'), resumed=opt.resume)

    create_run_dir(run_dir, overwrite=opt.overwrite)
    if not opt.resume:
        save_json(vars(opt), run_dir / 'args.json')
    deployed = distiller.deployable()
    print(f'==> {opt.distill}: {opt.model_t} -> {opt.model_s} on {opt.dataset} ({device}); '
          f'deployed student {count_params(deployed):,} params; run folder {run_dir}')
    summary = {'distill': opt.distill, 'model_s': opt.model_s, 'model_t': opt.model_t, 'dataset': opt.dataset,
               'trial': opt.trial, 'gamma': opt.gamma, 'alpha': opt.alpha, 'beta': opt.beta, 'teacher_acc': teacher_acc}
    cfg = RunConfig.from_opt(opt, run_dir, opt.model_s, summary)
    return fit(distiller, data, cfg, device)


def cli(argv: list[str] | None = None) -> int:
    return run_cli(get_args_parser(), main, argv)


if __name__ == '__main__':
    sys.exit(cli())
