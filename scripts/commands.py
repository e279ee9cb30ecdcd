"""Print the command lines of a sweep, one per line, from the settings table (scripts/settings.py).

    python scripts/commands.py vanilla                       # teachers + students from scratch, CIFAR-100
    python scripts/commands.py distill --trials 5            # every Table-1 method x pair
    python scripts/commands.py extended --trials 5           # every method (new ones too) x RepDistiller's 13 pairs
    python scripts/commands.py tinyimagenet --trials 3       # Table 3: teachers, students, methods
    python scripts/commands.py imagenet                      # Table 2: students from scratch, 6 methods x 2 pairs
    python scripts/commands.py distill --methods letKD-2 KD --pairs resnet56:resnet20
    python scripts/commands.py distill --fast                # every run on the fast path (or --extra "--fast")
    python scripts/commands.py distill --protocol letkd      # every method with the letKD authors' recipe

--protocol (scripts/settings.py PROTOCOLS): 'published' (default) gives every method its own published recipe;
'repdistiller' and 'letkd' give every method, and the students from scratch (``train_student.py --distill ce``,
written into the sweep), one recipe, spelled out on each line with ``--protocol NAME``, which places the run in
``<save_dir>/student_model/protocol_NAME/``. The method flags are the same under every protocol. Teachers (the
published checkpoints; Tiny-ImageNet's, trained by the sweep) are shared by all protocols.

A line '# barrier' separates stages that depend on each other (teachers before their students);
scripts/launch.py finishes a stage before starting the next.

Every sweep with letKD/QUEST runs builds their quantizers first, in stages of their own: one
``python helper/letkd_offline.py ...`` per teacher, student map size and quantizer settings (the runs of all
trials, and letKD-1/letKD-2/QUEST of one pair, share the files), at most one per teacher in a stage (builds
of one teacher share a lock), then '# barrier' and the runs. So no training run waits for a build on rank 0
while its other GPUs idle, and no two GPUs build the same files. (A run with --crop_size gets no offline
command: helper/letkd_offline.py has no such flag; such smoke runs build their own small files.)
"""
from __future__ import annotations

import argparse
import shlex
import sys
from functools import lru_cache

from models import feature_channels, model_facts
from scripts.launch import BARRIER
from scripts.runs import quantized_distiller
from scripts.settings import (CIFAR_STUDENTS, CIFAR_TEACHERS, DEFAULT_PROTOCOL, EXTENDED_METHODS, EXTENDED_PAIRS,
                              EXTRA_METHODS, IMAGENET_BASELINE_PROTOCOL, IMAGENET_DKD_BETA, IMAGENET_LOADER,
                              IMAGENET_METHODS, IMAGENET_PAIRS, METHODS, PROTOCOLS, TABLE1_METHODS, TABLE1_PAIRS,
                              TABLE3_METHODS, TABLE3_PAIRS, TRIALS_CIFAR, TRIALS_IMAGENET, TRIALS_TINYIMAGENET,
                              imagenet_recipe, pair_flags, recipe_flags)


def exclusion(label: str, teacher: str, student: str) -> str | None:
    """Why ``label`` cannot run on teacher -> student, or None: FSP and KDSVD need equal channel counts per stage,
    ReviewKD as many feature levels in both networks, OFD a BN before each stage's ReLU in the teacher (the checks
    the methods make when they are built; tests/test_scripts.py builds every method of the extended sweep)."""
    method = METHODS[label]
    s, t = feature_channels(student), feature_channels(teacher)
    if method.needs_equal_channels and s != t:
        return f'{label} needs equal channel counts per stage ({teacher} {list(t)}, {student} {list(s)})'
    if method.distill == 'reviewkd' and len(s) != len(t):
        return f'{label} needs as many feature levels in both networks ({teacher} {len(t)}, {student} {len(s)})'
    if method.distill == 'ofd' and model_facts(teacher).no_bn_before_relu:
        return f'{label} needs the BN before each stage\'s ReLU in the teacher ({teacher}: ' \
               f'{model_facts(teacher).no_bn_before_relu})'
    return None


def runnable(label: str, teacher: str, student: str) -> bool:
    """False for the pairs a method cannot handle (``exclusion`` says why)."""
    return exclusion(label, teacher, student) is None


def protocol_flag(protocol: str) -> list[str]:
    """``--protocol NAME`` for a protocol other than the default (the published protocol's lines are as before)."""
    return [] if protocol == DEFAULT_PROTOCOL else ['--protocol', protocol]


def teacher_path(save_dir: str, dataset: str, teacher: str) -> str:
    """RepDistiller's published teachers for CIFAR-100; ours (trial 0) elsewhere."""
    if dataset == 'cifar100':
        return f'{save_dir}/models/{teacher}_vanilla/ckpt_epoch_240.pth'
    from helper.util import default_learning_rate
    return (f'{save_dir}/models/{teacher}_{dataset}_lr_{default_learning_rate(teacher)}_decay_0.0005_trial_0/'
            'ckpt_epoch_240.pth')


def vanilla_lines(models: list[str], dataset: str, trials: int, save_dir: str, common: list[str]) -> list[str]:
    return [shlex.join(['python', 'train_teacher.py', '--model', m, '--dataset', dataset, '--trial', str(t),
                        '--save_dir', save_dir, *common])
            for m in models for t in range(trials)]


def distill_lines(labels: list[str], pairs: list[tuple[str, str]], dataset: str, trials: int, save_dir: str,
                  common: list[str], protocol: str = DEFAULT_PROTOCOL, left_out: list[str] | None = None) -> list[str]:
    """Every method x pair x trial: the method's flags and per-pair values, then the recipe of ``protocol``
    (settings.recipe_flags). Pairs a method cannot run are left out (with the reason appended to ``left_out``)."""
    lines = []
    for teacher, student in pairs:
        for label in labels:
            reason = exclusion(label, teacher, student)
            if reason is not None:
                if left_out is not None:
                    left_out.append(f'{label} on {teacher} -> {student}: {reason}')
                continue
            method = METHODS[label]
            for trial in range(1, trials + 1):
                lines.append(shlex.join([
                    'python', 'train_student.py', '--path_t', teacher_path(save_dir, dataset, teacher),
                    '--distill', method.distill, '--model_s', student, '--dataset', dataset, '--trial', str(trial),
                    '--save_dir', save_dir, *method.flags, *pair_flags(label, teacher, student),
                    *recipe_flags(protocol, label, teacher, student, dataset), *protocol_flag(protocol), *common]))
    return lines


def scratch_lines(students: list[str], dataset: str, trials: int, save_dir: str, common: list[str],
                  protocol: str) -> list[str]:
    """The students from scratch under a protocol other than 'published': ``train_student.py --distill ce`` with the
    protocol's recipe (their own folder beside the protocol's distilled students). The published protocol trains
    them with train_teacher.py (``vanilla_lines``)."""
    recipe = PROTOCOLS[protocol].small if dataset != 'imagenet' else PROTOCOLS[protocol].imagenet
    return [shlex.join(['python', 'train_student.py', '--distill', 'ce', '--model_s', student, '--dataset', dataset,
                        '--trial', str(trial), '--save_dir', save_dir, *recipe.flags(dataset, student),
                        *protocol_flag(protocol), *common])
            for student in students for trial in range(1, trials + 1)]


def imagenet_lines(labels: list[str], trials: int, save_dir: str, common: list[str],
                   protocol: str = DEFAULT_PROTOCOL) -> list[str]:
    """Table 2: the students from scratch, then every method x pair; teachers are torchvision's weights.

    One process per line; scripts/launch.py --gpus_per_job N starts each with torchrun (--batch_size is global).
    The published protocol trains letKD/QUEST with their authors' recipe and everything else (students from scratch
    included, with train_teacher.py) with mdistiller's; another protocol trains every run with its ImageNet recipe.
    """
    students = [student for _, student in IMAGENET_PAIRS.values()]
    if protocol == DEFAULT_PROTOCOL:
        lines = [shlex.join(['python', 'train_teacher.py', '--model', student, '--dataset', 'imagenet', '--trial',
                             str(t), '--save_dir', save_dir, *IMAGENET_BASELINE_PROTOCOL, *IMAGENET_LOADER, *common])
                 for student in students for t in range(trials)]
    else:
        lines = scratch_lines(students, 'imagenet', trials, save_dir, [*IMAGENET_LOADER, *common], protocol)
    for key, (teacher, student) in IMAGENET_PAIRS.items():
        for label in labels:
            method = IMAGENET_METHODS[label]
            beta = ['--dkd_beta', str(IMAGENET_DKD_BETA[key])] if method.distill == 'dkd' else []
            for trial in range(1, trials + 1):
                lines.append(shlex.join([
                    'python', 'train_student.py', '--path_t', f'torchvision:{teacher}', '--distill', method.distill,
                    '--model_s', student, '--dataset', 'imagenet', '--trial', str(trial), '--save_dir', save_dir,
                    *method.flags, *beta, *imagenet_recipe(protocol, method.distill, method.own_optimizer),
                    *protocol_flag(protocol), *IMAGENET_LOADER, *common]))
    return lines


@lru_cache(maxsize=None)
def _map_sizes(model: str, dataset: str, roles: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """The (H, W) of ``model``'s KD-layer maps for ``roles`` at the data set's image size."""
    from dataset import _MODULES
    from helper.letkd_offline import kd_sites
    from models import create_model, site_shapes
    net = create_model(model, num_classes=10, dataset=dataset)
    shapes = site_shapes(net, kd_sites(model, roles, dataset), _MODULES[dataset].IMAGE_SIZE)
    return tuple(tuple(shapes[role][1:]) for role in roles)


def offline_stages(lines: list[str]) -> list[list[str]]:
    """The offline commands (helper/letkd_offline.py) that build the quantizers of the letKD/QUEST runs among
    ``lines``, grouped into stages with at most one command per teacher each.

    One command per (teacher, data, quantizer settings) and student whose KD-layer map sizes no earlier command
    covers, with the union of the layers its runs need (letKD-2: inter and penult; letKD-1, QUEST: penult).
    """
    import train_student
    from distiller_zoo.registry import DISTILLERS, canonical_name
    groups: dict[tuple, dict] = {}
    parser = train_student.get_args_parser()
    for line in lines:
        argv = shlex.split(line)
        if len(argv) < 2 or not argv[1].endswith('train_student.py') or ' --distill ' not in f' {line} ':
            continue
        opt = parser.parse_args(argv[2:])
        if not quantized_distiller(opt.distill) or opt.crop_size is not None:
            continue
        base = (opt.path_t, opt.model_t, opt.dataset, opt.data_folder, opt.save_dir, opt.k_penult, opt.k_inter,
                opt.lda_dim, opt.quantizer_seed, opt.max_positions, opt.download, opt.trust_checkpoint, opt.device)
        group = groups.setdefault((base, opt.model_s), {'roles': set(), 'opt': opt})
        group['roles'] |= set(DISTILLERS[canonical_name(opt.distill)].roles)
    covered: set[tuple] = set()
    per_teacher: dict[tuple, int] = {}
    stages: list[list[str]] = []
    for (base, model_s), group in groups.items():
        opt, roles = group['opt'], tuple(r for r in ('inter', 'penult') if r in group['roles'])
        needs = {role: (base, role, size) for role, size in zip(roles, _map_sizes(model_s, opt.dataset, roles))}
        missing = [role for role in roles if needs[role] not in covered]
        if not missing:
            continue
        covered |= {needs[role] for role in missing}
        argv = ['python', 'helper/letkd_offline.py', '--path_t', opt.path_t,
                *(['--model_t', opt.model_t] if opt.model_t else []), '--model_s', model_s, '--dataset', opt.dataset,
                '--data_folder', opt.data_folder, '--save_dir', opt.save_dir, '--layers', *missing,
                '--k_penult', str(opt.k_penult), '--k_inter', str(opt.k_inter), '--lda_dim', str(opt.lda_dim),
                '--quantizer_seed', str(opt.quantizer_seed), '--max_positions', str(opt.max_positions),
                '--batch_size', str(opt.batch_size), '--num_workers', str(opt.num_workers),
                *([] if opt.download else ['--no_download']), *(['--trust_checkpoint'] if opt.trust_checkpoint else []),
                *(['--device', opt.device] if opt.device != 'auto' else [])]
        teacher = (opt.save_dir, opt.path_t)
        at = per_teacher[teacher] = per_teacher.get(teacher, -1) + 1
        if at == len(stages):
            stages.append([])
        stages[at].append(shlex.join(argv))
    return stages


def with_offline_stages(lines: list[str]) -> list[str]:
    """``lines`` preceded by the offline stages their letKD/QUEST runs need, each ended by '# barrier'."""
    out: list[str] = []
    for stage in offline_stages(lines):
        out += [*stage, BARRIER]
    return out + lines


def parse_pairs(items: list[str] | None, default: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if not items:
        return default
    return [tuple(item.split(':', 1)) for item in items]  # type: ignore[misc]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('sweep', choices=('vanilla', 'distill', 'extended', 'tinyimagenet', 'imagenet'))
    parser.add_argument('--trials', type=int, default=None,
                        help='default: 5 on CIFAR-100, 3 on Tiny-ImageNet, 1 on ImageNet')
    parser.add_argument('--methods', nargs='*', default=None,
                        help=f"labels among: {', '.join(METHODS)}; ImageNet: {', '.join(IMAGENET_METHODS)}")
    parser.add_argument('--pairs', nargs='*', default=None, help='teacher:student pairs (default: the table\'s)')
    parser.add_argument('--protocol', choices=tuple(PROTOCOLS), default=DEFAULT_PROTOCOL,
                        help="the training recipe: published = each method's own (default); repdistiller, letkd = one "
                             "recipe for every method (scripts/settings.py PROTOCOLS)")
    parser.add_argument('--save_dir', default='./save')
    parser.add_argument('--data_folder', default='./data')
    parser.add_argument('--extra', default='', help='flags appended to every command, e.g. "--epochs 1"')
    parser.add_argument('--fast', action='store_true',
                        help='append --fast (the fast path, docs/speed.md) to every command; the same as --extra --fast')
    args = parser.parse_args(argv)
    if args.fast:
        args.extra = f'{args.extra} --fast'.strip()
    known = IMAGENET_METHODS if args.sweep == 'imagenet' else METHODS
    for label in args.methods or []:
        if label not in known:
            parser.error(f'unknown method label {label!r}')
    if args.sweep == 'vanilla' and args.protocol != DEFAULT_PROTOCOL:
        parser.error("the vanilla sweep trains the teachers, which every protocol shares; the students from scratch "
                     "of a protocol are part of its distill / extended / tinyimagenet / imagenet sweep")
    common = ['--data_folder', args.data_folder, *shlex.split(args.extra)]
    protocol = args.protocol
    scratch = protocol != DEFAULT_PROTOCOL

    def students_of(pairs: list[tuple[str, str]]) -> list[str]:
        return list(dict.fromkeys(s for _, s in pairs))

    lines: list[str]
    if args.sweep == 'vanilla':
        trials = args.trials or 1
        lines = vanilla_lines(CIFAR_TEACHERS + CIFAR_STUDENTS, 'cifar100', trials, args.save_dir, common)
    elif args.sweep in ('distill', 'extended'):
        trials = args.trials or TRIALS_CIFAR
        extended = args.sweep == 'extended'
        labels = args.methods or (EXTENDED_METHODS if extended else TABLE1_METHODS + EXTRA_METHODS)
        pairs = parse_pairs(args.pairs, EXTENDED_PAIRS if extended else TABLE1_PAIRS)
        left_out: list[str] = []
        runs = distill_lines(labels, pairs, 'cifar100', trials, args.save_dir, common, protocol, left_out)
        if scratch:
            runs = scratch_lines(students_of(pairs), 'cifar100', trials, args.save_dir, common, protocol) + runs
        lines = with_offline_stages(runs)
        if extended:    # the cells a method cannot run, with the reason (comment lines: the launcher skips them)
            lines = [f'# left out: {reason}' for reason in left_out] + lines
    elif args.sweep == 'imagenet':
        lines = with_offline_stages(imagenet_lines(args.methods or list(IMAGENET_METHODS),
                                                   args.trials or TRIALS_IMAGENET, args.save_dir, common, protocol))
    else:
        trials = args.trials or TRIALS_TINYIMAGENET
        pairs = parse_pairs(args.pairs, TABLE3_PAIRS)
        # Table 3 protocol (letKD authors): select on val (25/class), report on test (25/class); docs/models-and-data.md
        common = ['--data_folder', args.data_folder, '--tiny_split', 'letkd', *shlex.split(args.extra)]
        teachers = sorted({t for t, _ in pairs})
        students = sorted({s for _, s in pairs})
        lines = vanilla_lines(teachers, 'tinyimagenet', 1, args.save_dir, common)
        lines += [BARRIER]
        scratch_runs = (scratch_lines(students, 'tinyimagenet', trials, args.save_dir, common, protocol) if scratch
                        else vanilla_lines(students, 'tinyimagenet', trials, args.save_dir, common))
        lines += with_offline_stages(
            scratch_runs + distill_lines(args.methods or TABLE3_METHODS, pairs, 'tinyimagenet', trials, args.save_dir,
                                         common, protocol))
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    import torch
    torch.set_num_threads(1)    # the shape probes are tiny forwards; more threads only contend (3x slower on 2 cores)
    sys.exit(main())
