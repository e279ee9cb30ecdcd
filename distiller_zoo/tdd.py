"""TDD: Song et al., "Tree-like Decision Distillation" (CVPR 2021); ``tdd_crd`` is TDD+CRD.

The lab's reference implementation is KamalEngine (zju-vipa/KamalEngine, ``kamal/distillation/TDD``);
this file is written by us from the method's description and that code's facts (docs/methods.md, "TDD and
TDD+CRD" lists which choices are the reference's and which are ours).

Offline (``prepare``, once per teacher, cached under ``<cache_dir>/tdd/``): for every teacher stage the
training images, without augmentation, are globally average pooled (``--tdd_teacher_feat``: the stage
outputs feat[1:-1], or the reference's pre-ReLU residual sum of block 3 of each CIFAR-ResNet stage);
the per-class means are clustered with Ward linkage into a binary tree of the classes; every internal
node gets a prototype (``--tdd_prototype``: the mean of its classes' means, or the reference's
recursive midpoint of its two children) and a kNN purity (the share of the k training embeddings
nearest to the prototype whose label is one of the node's classes); the tree is cut top down (a node
with purity >= threshold is split into its two children; a leaf or a node with purity < threshold
becomes one group). The result is one partition of the classes per stage. When every distilled stage
has one group per class the trees are degenerate (a warning on stderr, ``tdd_degenerate`` in
summary.json).

Online: one head (GAP + Linear to the number of groups) per student stage output, trained with
cross-entropy against the coarse label of the true class, each group weighted 1 / |group|; the
stages are summed. Total: ``-r`` CE + ``-a`` KL_T + ``-b`` TDD (0.1, 0.9, 0.1). The heads are
dropped at test time: the deployed network is the plain student.
"""
from __future__ import annotations

import sys
import time
from argparse import ArgumentParser, Namespace
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.cluster.hierarchy import linkage
from torch import Tensor

from crd.criterion import add_crd_arguments, check_crd_options
from dataset import DataInfo
from distiller_zoo.base import Distiller, probe_features
from distiller_zoo.crd import build_crd_loss
from helper.errors import UserError
from helper.meters import DeviceMeters
from helper.teachers import teacher_identity
from helper.util import load_checkpoint, progress, save_checkpoint
from models import create_model
from models.resnet import BasicBlock, ResNet

FORMAT_VERSION = 1
Partition = list[list[int]]   # groups of class ids; each group sorted, groups ordered by their first class
# --tdd_teacher_feat: 'stage' = the stage outputs feat[1:-1] (ours); 'block3_preact' = KamalEngine's hook on
# layerX.2.bn2 of its resnet56, which (the residual being added in place after the hook) stores the
# pre-ReLU residual sum bn2(conv2(.)) + shortcut of the third block of each stage.
TEACHER_FEATS = ('stage', 'block3_preact')
# --tdd_prototype: 'mean' = mean of the node's class means (ours); 'midpoint' = KamalEngine's set_means,
# the midpoint of the two children's prototypes, recursively.
PROTOTYPES = ('mean', 'midpoint')
# values assumed for cache files written before these options existed
LEGACY_META = {'teacher_feat': 'stage', 'prototype': 'mean'}


# ---------------------------------------------------------------------------- offline class trees
def stage_maps(feats: list[Tensor]) -> list[Tensor]:
    """The stage outputs feat[1:-1] of a RepDistiller feature list."""
    return list(feats[1:-1])


def reference_blocks(teacher: nn.Module) -> list[BasicBlock]:
    """``layer1[2], layer2[2], layer3[2]`` of a CIFAR ResNet: the blocks KamalEngine's TDD reads.

    UserError for any other teacher (the reference defines this layer only for its resnet56).
    """
    stages = [getattr(teacher, f'layer{i}', None) for i in (1, 2, 3)]
    if (not isinstance(teacher, ResNet) or teacher.block is not BasicBlock
            or any(stage is None or len(stage) < 3 for stage in stages)):
        raise UserError(f"--tdd_teacher_feat block3_preact needs a CIFAR ResNet teacher with at least 3 blocks "
                        f"per stage (resnet20, resnet32, resnet44, resnet56, resnet110, resnet32x4), "
                        f"got {type(teacher).__name__}")
    return [stage[2] for stage in stages]


def block3_preact_maps(teacher: nn.Module, image: Tensor) -> list[Tensor]:
    """The pre-ReLU residual sum ``bn2(conv2(.)) + shortcut(x)`` of block 3 of every stage, (B, C_l, H_l, W_l).

    Read with hooks during one ordinary forward pass (the model and its state_dict are unchanged).
    """
    blocks = reference_blocks(teacher)
    inputs: dict[int, Tensor] = {}
    branch: dict[int, Tensor] = {}
    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0])))
        handles.append(block.bn2.register_forward_hook(lambda _m, _a, out, i=i: branch.__setitem__(i, out)))
    try:
        teacher(image)
    finally:
        for handle in handles:
            handle.remove()
    maps = []
    for i, block in enumerate(blocks):
        shortcut = inputs[i] if block.downsample is None else block.downsample(inputs[i])
        maps.append(branch[i] + shortcut)
    return maps


def teacher_stage_maps(teacher: nn.Module, image: Tensor, feature: str = 'stage') -> list[Tensor]:
    """The teacher's per-stage maps the class trees are built from (see ``TEACHER_FEATS``)."""
    if feature == 'stage':
        feats, _ = teacher(image, is_feat=True)
        return stage_maps(feats)
    if feature == 'block3_preact':
        return block3_preact_maps(teacher, image)
    raise UserError(f"--tdd_teacher_feat must be one of {', '.join(TEACHER_FEATS)}, got {feature!r}")


@torch.no_grad()
def stage_embeddings(teacher: nn.Module, loader: Iterable, n_data: int, device: torch.device,
                     feature: str = 'stage') -> tuple[list[Tensor], Tensor]:
    """Global-average-pooled teacher stage maps (``teacher_stage_maps``) of every training image.

    ``loader`` yields (img, target, index) (no augmentation). Returns ([(N, C_l) float32 per stage],
    labels (N,) int64), rows placed by dataset index, on the CPU.
    """
    teacher.eval()
    embeddings: list[Tensor] = []
    labels = torch.full((n_data,), -1, dtype=torch.long)
    for image, target, index in progress(loader, 'TDD teacher features'):
        stages = teacher_stage_maps(teacher, image.to(device), feature)
        if not embeddings:
            embeddings = [torch.zeros(n_data, f.shape[1]) for f in stages]
        for store, f in zip(embeddings, stages):
            store[index] = f.mean(dim=(2, 3)).float().cpu()
        labels[index] = target
    if (labels < 0).any():
        raise UserError(f"the training loader covered {int((labels >= 0).sum())} of {n_data} images")
    return embeddings, labels


def ward_children(class_means: Tensor) -> list[tuple[int, int]]:
    """Ward agglomerative clustering of the (n, C) class means. Row i gives the two children of node n + i.

    Nodes 0..n-1 are the classes (leaves); the root is node 2n - 2 (scipy's linkage numbering).
    """
    merges = linkage(class_means.double().numpy(), method='ward')
    return [(int(a), int(b)) for a, b in merges[:, :2]]


def node_members(children: list[tuple[int, int]], num_classes: int) -> list[list[int]]:
    """Sorted class ids below every node: leaves first (node c -> [c]), then the internal nodes."""
    members = [[c] for c in range(num_classes)]
    for a, b in children:
        members.append(sorted(members[a] + members[b]))
    return members


def node_prototypes(children: list[tuple[int, int]], class_means: Tensor, kind: str = 'mean') -> Tensor:
    """(n - 1, C) prototypes of the internal nodes n..2n-2 from the (n, C) class means.

    ``mean``: the mean of the node's class means (every class weighs the same). ``midpoint``
    (KamalEngine's): the midpoint of the two children's prototypes, a leaf's prototype being its class
    mean; on an unbalanced node the smaller child weighs more than its share of classes.
    """
    if kind not in PROTOTYPES:
        raise UserError(f"--tdd_prototype must be one of {', '.join(PROTOTYPES)}, got {kind!r}")
    num_classes = class_means.shape[0]
    protos = list(class_means)
    members = node_members(children, num_classes)
    for node, (a, b) in enumerate(children, start=num_classes):
        protos.append(class_means[members[node]].mean(0) if kind == 'mean' else (protos[a] + protos[b]) / 2)
    return torch.stack(protos[num_classes:])


def knn_purity(prototypes: Tensor, embeddings: Tensor, labels: Tensor, members: list[list[int]], k: int,
               num_classes: int, chunk: int = 8192) -> Tensor:
    """Share of the k training embeddings nearest to each prototype whose label is in that node's classes.

    prototypes (M, C), embeddings (N, C), labels (N,) in [0, num_classes), members: M lists of class ids.
    Squared Euclidean distances in float64; ties are broken by dataset index. Returns (M,) float64 in [0, 1].
    """
    protos = prototypes.double()
    proto_sq = protos.pow(2).sum(1)
    dist = torch.cat([x.pow(2).sum(1, keepdim=True) - 2 * x @ protos.T + proto_sq
                      for x in (rows.double() for rows in embeddings.split(chunk))])   # (N, M)
    nearest = torch.sort(dist, dim=0, stable=True).indices[:k]              # (k, M)
    is_member = torch.zeros(len(members), num_classes, dtype=torch.bool)
    for node, classes in enumerate(members):
        is_member[node, classes] = True
    hits = is_member.gather(1, labels[nearest].T)                            # (M, k)
    return hits.double().mean(1)


def cut_tree(children: list[tuple[int, int]], members: list[list[int]], purity: Tensor, threshold: float
             ) -> Partition:
    """Top-down cut: from the root, a leaf or an internal node with purity < threshold is one group;
    an internal node with purity >= threshold is split into its children.

    ``purity[i]`` is the purity of internal node n + i. Groups are returned ordered by their first class.
    """
    num_classes = len(children) + 1
    groups: Partition = []
    stack = [2 * num_classes - 2]
    while stack:
        node = stack.pop()
        if node < num_classes or purity[node - num_classes] < threshold:
            groups.append(members[node])
        else:
            stack.extend(children[node - num_classes])
    return sorted(groups)


def class_tree_partition(embeddings: Tensor, labels: Tensor, num_classes: int, threshold: float, k: int,
                         prototype: str = 'mean') -> tuple[Partition, dict[str, Tensor]]:
    """One stage's partition of the classes from its (N, C) training embeddings and (N,) labels.

    ``prototype`` picks the node prototypes of the kNN purity (``node_prototypes``).

    Returns (partition, {'linkage': (n-1, 2) children, 'purity': (n-1,) purity of internal nodes}).
    """
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise UserError(f"TDD: class {int((counts == 0).nonzero()[0])} has no training image")
    means = torch.zeros(num_classes, embeddings.shape[1], dtype=torch.float64)
    for rows, rows_labels in zip(embeddings.split(8192), labels.split(8192)):
        means.index_add_(0, rows_labels, rows.double())
    means /= counts[:, None]
    if num_classes == 1:
        return [[0]], {'linkage': torch.zeros(0, 2, dtype=torch.long), 'purity': torch.zeros(0, dtype=torch.float64)}
    children = ward_children(means)
    members = node_members(children, num_classes)
    internal = members[num_classes:]
    prototypes = node_prototypes(children, means, prototype)
    purity = knn_purity(prototypes, embeddings, labels, internal, k, num_classes)
    partition = cut_tree(children, members, purity, threshold)
    return partition, {'linkage': torch.tensor(children, dtype=torch.long), 'purity': purity}


def is_degenerate(partitions: list[Partition], num_classes: int) -> bool:
    """True when every partition has one group per class (then TDD is KD plus per-class heads)."""
    return bool(partitions) and all(len(groups) == num_classes for groups in partitions)


def check_partition(groups: Partition, num_classes: int) -> None:
    """ValueError unless ``groups`` is a partition of range(num_classes) into non-empty groups."""
    flat = sorted(c for g in groups for c in g)
    if flat != list(range(num_classes)) or any(not g for g in groups):
        raise ValueError(f"not a partition of the {num_classes} classes: {groups}")


def teacher_feat_option(opt: Namespace) -> str:
    """``opt.tdd_teacher_feat``, 'stage' when the option is absent."""
    return getattr(opt, 'tdd_teacher_feat', 'stage')


def prototype_option(opt: Namespace) -> str:
    """``opt.tdd_prototype``, 'mean' when the option is absent."""
    return getattr(opt, 'tdd_prototype', 'mean')


def check_choices(opt: Namespace) -> str:
    """UserError unless ``--tdd_teacher_feat`` and ``--tdd_prototype`` are known; returns the former."""
    feature, prototype = teacher_feat_option(opt), prototype_option(opt)
    if feature not in TEACHER_FEATS:
        raise UserError(f"--tdd_teacher_feat must be one of {', '.join(TEACHER_FEATS)}, got {feature!r}")
    if prototype not in PROTOTYPES:
        raise UserError(f"--tdd_prototype must be one of {', '.join(PROTOTYPES)}, got {prototype!r}")
    return feature


@torch.no_grad()
def probe_block3_preact(teacher: nn.Module, image_size: int) -> list[Tensor]:
    """``block3_preact_maps`` of a dummy (2, 3, S, S) batch, to read shapes; the model's mode is restored."""
    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device
    maps = block3_preact_maps(teacher, torch.zeros(2, 3, image_size, image_size, device=device))
    teacher.train(was_training)
    return maps


# ---------------------------------------------------------------------------- student side
class DecisionHead(nn.Module):
    """A coarse classifier on one student stage: GAP + Linear(C -> groups). (B, C, H, W) -> (B, groups).

    Buffers: ``class_to_group`` (classes,) maps a fine label to its group; ``group_weight`` (groups,)
    is 1 / |group|, the class weights of the decision loss.
    """

    def __init__(self, in_channels: int, groups: Partition, num_classes: int) -> None:
        super().__init__()
        check_partition(groups, num_classes)
        self.linear = nn.Linear(in_channels, len(groups))
        class_to_group = torch.empty(num_classes, dtype=torch.long)
        for g, classes in enumerate(groups):
            class_to_group[classes] = g
        self.register_buffer('class_to_group', class_to_group)
        self.register_buffer('group_weight', torch.tensor([1.0 / len(g) for g in groups]))

    def forward(self, feature: Tensor) -> Tensor:
        return self.linear(feature.mean(dim=(2, 3)))

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """sum_i w(g_i) CE_i / sum_i w(g_i), with g_i the group of target i (PyTorch's weighted mean)."""
        return F.cross_entropy(logits, self.class_to_group[target], weight=self.group_weight)

    def groups(self) -> Partition:
        return [torch.nonzero(self.class_to_group == g).flatten().tolist() for g in range(len(self.group_weight))]


def add_tdd_arguments(parser: ArgumentParser) -> None:
    """TDD's flags (and TDD+CRD's CRD weight)."""
    g = parser.add_argument_group('TDD')
    g.add_argument('--tdd_threshold', type=float, default=0.2,
                   help='kNN purity below which a class-tree node becomes one coarse group')
    g.add_argument('--tdd_knn', type=int, default=20, help='neighbours of the kNN purity of a tree node')
    g.add_argument('--tdd_teacher_feat', type=str, default='stage', choices=TEACHER_FEATS,
                   help="teacher maps of the class trees: stage outputs (ours), or block3_preact, the pre-ReLU "
                        "residual sum of block 3 of each stage (KamalEngine's layerX.2.bn2 hook; CIFAR ResNets)")
    g.add_argument('--tdd_prototype', type=str, default='mean', choices=PROTOTYPES,
                   help="tree-node prototype of the kNN purity: mean of the class means (ours), or midpoint "
                        "of the two children (KamalEngine's)")
    g.add_argument('--crd_weight', type=float, default=0.8, help='weight of the CRD term of tdd_crd (TDD+CRD)')


class TDD(Distiller):
    """``-r`` CE + ``-a`` KL_T + ``-b`` sum over stages of the 1/|group|-weighted coarse CE of the heads."""

    name = 'tdd'
    data_mode = 'plain'
    default_weights = (0.1, 0.9, 0.1)   # KamalEngine's TDD config (classify, kd, other)
    option_groups = (add_tdd_arguments,)

    @classmethod
    def resolve_options(cls, opt: Namespace) -> Namespace:
        """The choice flags, the threshold and k; the reference's teacher layer exists only in CIFAR ResNets
        with >= 3 blocks per stage."""
        if check_choices(opt) == 'block3_preact':
            reference_blocks(create_model(opt.model_t, num_classes=10, dataset=opt.dataset))
        if not 0.0 <= opt.tdd_threshold <= 1.0:
            raise UserError(f"--tdd_threshold must be in [0, 1], got {opt.tdd_threshold}")
        if opt.tdd_knn < 1:
            raise UserError(f"--tdd_knn must be at least 1, got {opt.tdd_knn}")
        return super().resolve_options(opt)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                 info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        self.teacher_feat, self.prototype = check_choices(opt), prototype_option(opt)
        if self.teacher_feat == 'block3_preact':
            reference_blocks(teacher)
        if opt.tdd_knn > info.n_data:   # the flag itself is checked in resolve_options
            raise UserError(f"--tdd_knn must be between 1 and the {info.n_data} training images, got {opt.tdd_knn}")
        maps_s = stage_maps(probe_features(student, self.image_size))
        maps_t = (stage_maps(probe_features(teacher, self.image_size)) if self.teacher_feat == 'stage'
                  else probe_block3_preact(teacher, self.image_size))
        if not maps_s or not maps_t or any(f.dim() != 4 for f in maps_s + maps_t):
            raise UserError(f"TDD needs spatial stage outputs from both networks "
                            f"({getattr(opt, 'model_t', 'teacher')} -> {getattr(opt, 'model_s', 'student')})")
        # stage l of the student learns the decision of teacher stage l (zip-truncated, as RepDistiller)
        self.stage_channels = [f.shape[1] for f, _ in zip(maps_s, maps_t)]
        self.teacher_stages = list(range(1, len(maps_t) + 1))
        self.heads = nn.ModuleList()
        self.head_meters = DeviceMeters([])

    # ---------------------------------------------------------------- offline stage
    def prepare(self, data: Any, *, device: torch.device, cache_dir: str, resumed: bool = False) -> None:
        """Build (or reload) one class partition per teacher stage, then the student heads."""
        opt = self.opt
        meta = {'format_version': FORMAT_VERSION, 'teacher_sha256': teacher_identity(opt.path_t),
                'teacher_arch': opt.model_t, 'dataset': opt.dataset, 'num_classes': self.num_classes,
                'n_images': self.info.n_data, 'stages': self.teacher_stages, 'threshold': float(opt.tdd_threshold),
                'knn': int(opt.tdd_knn), 'teacher_feat': self.teacher_feat, 'prototype': self.prototype}
        choices = ''.join(f'_{meta[key]}' for key, default in LEGACY_META.items() if meta[key] != default)
        path = Path(cache_dir) / 'tdd' / (f"{opt.model_t}_{opt.dataset}_{meta['teacher_sha256'][:12]}"
                                          f"_thr{opt.tdd_threshold:g}_knn{opt.tdd_knn}{choices}.pth")
        if path.is_file():
            partitions = self._load_cache(path, meta)
            how = f'loaded from {path}'
        else:
            if resumed:
                print(f'TDD: cache {path} is missing; rebuilding the class trees (deterministic)')
            tic = time.time()
            partitions, extras = self._build(data.train_eval_loader, device)
            meta['groups_per_stage'] = [len(p) for p in partitions]
            path.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint({'meta': meta, 'partitions': partitions, **extras}, path)
            how = f'built in {time.time() - tic:.1f}s, cached at {path}'
        self.set_partitions(partitions)
        groups = ', '.join(f'stage {s}: {len(p)}' for s, p in zip(self.teacher_stages, partitions))
        print(f'TDD: groups per teacher stage (threshold {opt.tdd_threshold:g}, kNN {opt.tdd_knn}, features '
              f'{self.teacher_feat}, prototypes {self.prototype}): {groups} of {self.num_classes} classes; '
              f'{len(self.heads)} student heads; {how}')
        if self.degenerate():
            print(f'warning: TDD trees are degenerate: every distilled stage has one group per class '
                  f'({self.num_classes}), so TDD is KD plus per-class heads on intermediate stages, not '
                  f'coarse-to-fine decisions (raise --tdd_threshold to merge classes)', file=sys.stderr)

    def _build(self, loader: Iterable, device: torch.device) -> tuple[list[Partition], dict[str, list[Tensor]]]:
        embeddings, labels = stage_embeddings(self.teacher, loader, self.info.n_data, device, self.teacher_feat)
        partitions, linkages, purities = [], [], []
        for emb in embeddings:
            partition, info = class_tree_partition(emb, labels, self.num_classes, float(self.opt.tdd_threshold),
                                                   int(self.opt.tdd_knn), self.prototype)
            partitions.append(partition)
            linkages.append(info['linkage'])
            purities.append(info['purity'])
        return partitions, {'linkage': linkages, 'purity': purities}

    def _load_cache(self, path: Path, meta: dict[str, Any]) -> list[Partition]:
        cached = load_checkpoint(path)
        stored = cached.get('meta', {})
        for key, value in meta.items():
            if stored.get(key, LEGACY_META.get(key)) != value:
                raise UserError(f"TDD cache {path} was built for {key}={stored.get(key)!r}, this run needs "
                                f"{value!r}; delete the file to rebuild it")
        partitions = cached.get('partitions')
        try:
            if not isinstance(partitions, list) or len(partitions) != len(self.teacher_stages):
                raise ValueError('wrong number of stages')
            for groups in partitions:
                check_partition(groups, self.num_classes)
        except (TypeError, ValueError) as err:
            raise UserError(f"TDD cache {path} is damaged ({err}); delete the file to rebuild it") from None
        return partitions

    def set_partitions(self, partitions: list[Partition]) -> None:
        """Install one partition per teacher stage; builds a fresh head for each distilled student stage."""
        device = next(self.student.parameters()).device
        self.heads = nn.ModuleList(DecisionHead(c, groups, self.num_classes)
                                   for c, groups in zip(self.stage_channels, partitions)).to(device)
        # the heads' coarse training accuracy, summed on the student's device in place inside the step
        self.head_meters = DeviceMeters([f'tdd_head_acc_{i}' for i in range(1, len(self.heads) + 1)], device)

    def partitions(self) -> list[Partition]:
        """The partitions of the distilled stages (read back from the heads)."""
        return [head.groups() for head in self.heads]

    def groups_per_stage(self) -> list[int]:
        """The number of coarse groups of every distilled stage."""
        return [len(head.group_weight) for head in self.heads]

    def degenerate(self) -> bool:
        """True when every distilled stage has one group per class (see ``is_degenerate``)."""
        return is_degenerate(self.partitions(), self.num_classes)

    def summary_extras(self) -> dict[str, Any]:
        """``tdd_groups`` (groups per distilled stage) and ``tdd_degenerate`` for summary.json."""
        return {'tdd_groups': self.groups_per_stage(), 'tdd_degenerate': self.degenerate()}

    # ---------------------------------------------------------------- training
    def decision_loss(self, feat_s: list[Tensor], target: Tensor) -> Tensor:
        """Sum over distilled stages of each head's weighted coarse CE (unweighted by ``-b``)."""
        if not self.heads:
            raise RuntimeError('TDD: call prepare() (or set_partitions()) before training')
        total = feat_s[0].new_zeros(())
        correct = []
        for head, feature in zip(self.heads, stage_maps(feat_s)):
            logits = head(feature)
            total = total + head.loss(logits, target)
            correct.append((logits.detach().argmax(1) == head.class_to_group[target]).float().mean() * 100.0)
        self.head_meters.add(torch.stack(correct), target.shape[0])
        return total

    def method_loss(self, feat_s: list[Tensor], feat_t: list[Tensor], logit_s: Tensor, logit_t: Tensor,
                    target: Tensor, **extras: Any) -> Tensor:
        return self.decision_loss(feat_s, target)

    def epoch_metrics(self) -> dict[str, float]:
        """Groups per distilled stage and the heads' coarse training accuracy (%) since the last call."""
        metrics = {f'tdd_groups_{i}': float(len(head.group_weight)) for i, head in enumerate(self.heads, start=1)}
        return {**metrics, **self.head_meters.take_averages()}


class TDDCRD(TDD):
    """TDD+CRD (our reconstruction): RepDistiller's CRD+KD plus the TDD term.

    Default 1 CE + 1 KL_T + 0.1 TDD + ``--crd_weight`` (0.8) x CRDLoss on the pooled features; the
    published TDD+CRD numbers sit within 0.3 of CRD+KD (``-r 1 -a 1 -b 0.8``). TDD's own base is
    ``-r 0.1 -a 0.9 -b 0.1``.
    """

    name = 'tdd_crd'
    data_mode = 'crd'
    default_weights = (1.0, 1.0, 0.1)   # CRD+KD's CE and KD weights, TDD's 0.1 (CRD: --crd_weight 0.8)

    option_groups = (add_tdd_arguments, add_crd_arguments)

    @classmethod
    def resolve_options(cls, opt: Namespace) -> Namespace:
        check_crd_options(opt)
        return super().resolve_options(opt)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                 info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        self.crd_weight = float(opt.crd_weight)
        self.criterion_crd = build_crd_loss(student, teacher, opt, info)

    def forward_train(self, image: Tensor, target: Tensor, *, index: Tensor, contrast_idx: Tensor | None = None,
                      **extras: Any) -> tuple[Tensor, dict[str, Tensor]]:
        feat_s, logit_s = self.student(image, is_feat=True)
        feat_t, logit_t = self.teacher_forward(image)
        losses = self.logit_losses(logit_s, logit_t, target)
        losses['tdd'] = self.beta * self.decision_loss(feat_s, target)
        losses['crd'] = self.crd_weight * self.criterion_crd(feat_s[-1], feat_t[-1], index, contrast_idx)
        return logit_s, losses
