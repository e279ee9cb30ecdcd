"""Supplementary Fig. 2: the teacher's sub-class at every position of the intermediate map, over a few test images.

    python scripts/ablations/subclass_picture.py                  # CIFAR-100, resnet56 teacher (resnet20's map size)
    python scripts/ablations/subclass_picture.py --images 0 17 230 --k_inter 8
    python scripts/ablations/subclass_picture.py --dataset digits --teacher resnet14 --student resnet8 --epochs 5 \
        --k_inter 4 --device cpu --num_workers 0                          # trains a small teacher first

For each image, the teacher's map at the intermediate KD place (models/facts.py, ``kd_sites``; pooled to the
student's size, as letKD-2 does) is projected by the teacher's LDA and every position gets the nearest of the
K_inter sub-class centroids of the image's TRUE class, exactly the sub-class letKD-2's intermediate target uses
(the quantizer files come from <save_dir>/cache/letkd/, built through helper.letkd_offline when missing).
Left: the image, upsampled, with a marker at the centre of each position's cell (the H/h x W/w patch it
strides over), one colour per sub-class. Right: over all sub-class indices (class c owns c*K .. c*K+K-1), the
share of positions assigned to each (bars) and the mean teacher target s_T[k*] (line), which spreads to the
sub-classes of other classes; the true class's range is shaded and its first index ticked with the class.
Writes <out>/subclass_picture.png and subclass_picture.csv (image, label, row, col, sub-class).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


import numpy as np
import torch

from scripts.ablations.common import (Grid, add_arguments, main_wrapper, out_dir, parse_args,
                                      parser_default, print_commands, run_grid, teacher_command)

NUM_IMAGES = 4


@torch.no_grad()
def assignments(teacher: torch.nn.Module, teacher_arch: str, quantizer: torch.nn.Module, pool_size: tuple[int, int],
                images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the chosen global sub-class at each position (B, h, w) and the teacher target rows (B, h*w, S)."""
    from helper.letkd_offline import flatten_positions, kd_sites, pool_teacher_to
    from models import tap
    with tap(teacher, kd_sites(teacher_arch, ('inter',))) as maps:
        teacher(images)
    t = pool_teacher_to(maps['inter'], pool_size)
    b, _, h, w = t.shape
    targets, chosen = quantizer(flatten_positions(t), labels.repeat_interleave(h * w))
    return chosen.view(b, h, w), targets.view(b, h * w, -1)


def draw(path: Path, pictures: list[np.ndarray], labels: list[int], class_names: list[str], chosen: torch.Tensor,
         targets: torch.Tensor, k_inter: int, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    n, (h, w) = len(pictures), chosen.shape[1:]
    num_subclasses = targets.shape[2]
    cmap = plt.get_cmap('tab10' if k_inter <= 10 else 'tab20' if k_inter <= 20 else 'turbo')

    def colour(k: int) -> tuple:
        return cmap(k) if k_inter <= 20 else cmap(k / max(k_inter - 1, 1))

    fig, axes = plt.subplots(n, 2, figsize=(10, 2.7 * n), gridspec_kw={'width_ratios': [1, 2.6]}, squeeze=False)
    for (ax_img, ax_hist), picture, label, sub, target in zip(axes, pictures, labels, chosen, targets):
        height, width = picture.shape[:2]
        ax_img.imshow(picture, extent=(0, width, height, 0), interpolation='bicubic')
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
        local = (sub - label * k_inter).numpy()
        ax_img.scatter((cols.ravel() + 0.5) * width / w, (rows.ravel() + 0.5) * height / h, s=22,
                       c=[colour(k) for k in local.ravel()],
                       edgecolors='white', linewidths=0.5)
        ax_img.set_title(f'{class_names[label]} (class {label})', fontsize=9)
        ax_img.axis('off')

        share = np.bincount(sub.flatten().numpy(), minlength=num_subclasses) / (h * w)
        own = np.arange(label * k_inter, (label + 1) * k_inter)
        ax_hist.bar(own, share[own], width=0.9, color=[colour(k) for k in range(k_inter)],
                    label='share of positions assigned ($k^*$)')
        ax_hist.plot(np.arange(num_subclasses), target.mean(0).numpy(), color='black', linewidth=0.8,
                     label='mean teacher target $s_T[k^*]$')
        ax_hist.axvspan(label * k_inter - 0.5, (label + 1) * k_inter - 0.5, color='tab:orange', alpha=0.2)
        ax_hist.set_xticks([label * k_inter], [f'{label * k_inter}\n({class_names[label]})'], fontsize=8)
        ax_hist.set_xlim(-0.5, num_subclasses - 0.5)
        ax_hist.set_ylabel('share', fontsize=8)
    axes[0][1].legend(fontsize=7, loc='upper left')
    axes[-1][1].set_xlabel('sub-class index')
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_arguments(parser, teacher='resnet56', student='resnet20', student_runs=False)
    parser.add_argument('--k_inter', type=int, default=parser_default('k_inter'), help='sub-classes per class')
    parser.add_argument('--lda_dim', type=int, default=parser_default('lda_dim'))
    parser.add_argument('--quantizer_seed', type=int, default=parser_default('quantizer_seed'))
    parser.add_argument('--max_positions', type=int, default=parser_default('max_positions'))
    parser.add_argument('--images', type=int, nargs='+', default=None,
                        help=f'test-split indices (default: {NUM_IMAGES} evenly spaced ones)')
    return parser


def body(argv: list[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    path_t, teacher_argv = teacher_command(args)
    grid = Grid(path_t, teacher_argv, {})
    if args.dry_run:
        print_commands(grid)
        return 0
    if not args.plot_only and run_grid(args, grid):
        return 1

    from dataset import get_dataloaders, get_datasets, get_transforms
    from distiller_zoo.letkd import SubclassQuantizer
    from helper.letkd_offline import OfflineSettings, ensure_quantizers, pair_shapes
    from helper.util import resolve_device
    from models import create_model
    from helper.util import load_teacher

    device = resolve_device(args.device)
    data = get_dataloaders(args.dataset, args.data_folder, 64, args.num_workers, mode='plain', download=False)
    teacher = load_teacher(path_t, args.teacher, data.num_classes, trust=False).to(device).eval()
    student = create_model(args.student, num_classes=data.num_classes).to(device)
    shapes_s, shapes_t = pair_shapes(student, teacher, args.student, args.teacher, ('inter',), data.image_size)
    pool_size = shapes_s['inter'][1:]
    settings = OfflineSettings(parser_default('k_penult'), args.k_inter, args.lda_dim, args.quantizer_seed,
                               args.max_positions)
    tensors = ensure_quantizers(teacher, teacher_arch=args.teacher, teacher_path=path_t, roles=('inter',),
                                pool_sizes={'inter': pool_size}, loader=data.train_eval_loader, dataset=args.dataset,
                                num_classes=data.num_classes, settings=settings,
                                cache_dir=Path(args.save_dir) / 'cache', device=device)
    quantizer = SubclassQuantizer(data.num_classes, args.k_inter, shapes_t['inter'][0]).to(device)
    quantizer.load(tensors['inter'])

    _, raw_test = get_datasets(args.dataset, args.data_folder, download=False)
    test_tf = get_transforms(args.dataset)[1]
    indices = args.images or np.linspace(0, len(raw_test) - 1, NUM_IMAGES).round().astype(int).tolist()
    pictures, labels, inputs = [], [], []
    for index in indices:
        image, label = raw_test[index]
        pictures.append(np.asarray(image.convert('RGB')))
        labels.append(int(label))
        inputs.append(test_tf(image))
    chosen, targets = assignments(teacher, args.teacher, quantizer, pool_size, torch.stack(inputs).to(device),
                                  torch.tensor(labels, device=device))
    chosen, targets = chosen.cpu(), targets.cpu()

    out = out_dir(args)
    with open(out / 'subclass_picture.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['image', 'label', 'row', 'col', 'subclass'])
        for index, label, sub in zip(indices, labels, chosen):
            writer.writerows([index, label, r, c, int(sub[r, c])]
                             for r in range(sub.shape[0]) for c in range(sub.shape[1]))
    title = (f'teacher {args.teacher} sub-classes at the intermediate place ({args.dataset}, K_inter {args.k_inter}, '
             f'{tuple(pool_size)[0]}x{tuple(pool_size)[1]} positions)')
    draw(out / 'subclass_picture.png', pictures, labels, list(raw_test.classes), chosen, targets, args.k_inter, title)
    for index, label, sub in zip(indices, labels, chosen):
        used = np.bincount((sub.flatten() - label * args.k_inter).numpy(), minlength=args.k_inter)
        print(f'image {index} (class {label}): positions per sub-class {used.tolist()}')
    print(f"wrote {out / 'subclass_picture.png'}, {out / 'subclass_picture.csv'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_wrapper(body, argv)


if __name__ == '__main__':
    sys.exit(main())
