"""letKD (Gorgun, Gurbuz & Alatan, BMVC 2023): a knowledge-distillation layer that lets the student decide.

letKD-1 (``--distill letkd1``) puts one KD layer on the student's penultimate map; letKD-2 (``letkd2``,
alias ``letkd``) adds one on the output of the first block of the last stage. A KD layer scores every
position against K learnt words (the student's assignment logits), turns the scores into a value vector
and adds it to the feature, ``F_hat = F + alpha * v``; F_hat replaces F in the student's forward
(``LetKDStudent``), so the KD layers stay in the deployed network.

The teacher's per-position targets come from offline quantizers (helper/letkd_offline.py): a k-means
codebook at the penultimate place, an LDA projection + per-class sub-classes + a sub-class score matrix at
the intermediate one. Loss per KD layer: KL(p_T || softmax(scores)) averaged over the B*H*W positions.
QUEST (distiller_zoo/quest.py) reuses the codebook, the predictor and the loss from here.
README.md, "letKD: what is computed", states every formula and choice.

Two variants exist for the supplementary's ablations (README, "Ablations"): ``letkd_inter`` (the
intermediate KD layer alone, Table 5) and ``fitnet_kdlayer`` (FitNet's hint loss plus a penultimate KD
layer whose KL weight ``--kd_layer_weight`` may be 0, Table 6).
"""
from __future__ import annotations

import math
from argparse import Namespace
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from distiller_zoo.base import Distiller
from distiller_zoo.deploy import register_deployable
from distiller_zoo.FitNet import HintLoss, hint_regressor
from helper.errors import UserError
from helper.util import AverageMeter
from models import create_model

NORM_EPS = 1e-12
PREDICTOR_SCALE = 3.0            # initial scale of the word predictor (cosine conv C -> K)
VALUE_SCALE = 1.0                # initial scale of the value conv (cosine conv K -> C)
ROLES = ('inter', 'penult')      # the two KD-layer places, in forward order
DEFAULT_MAX_POSITIONS = 3_200_000  # offline sample bound: all of CIFAR-100's 50,000 x 8x8 positions


# ---------------------------------------------------------------------------------------------- layers

class CosineConv1x1(nn.Module):
    """1x1 convolution on cosines: ``out[k] = scale * cos(x, w_k)`` at every position, no bias.

    The input is L2-normalised over channels at each position and each of the ``out_channels`` kernels
    is L2-normalised (eps 1e-12); ``scale`` is ONE learnable scalar. (B, C_in, H, W) -> (B, C_out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, scale: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / in_channels))   # only the directions matter
        self.scale = nn.Parameter(torch.tensor([float(scale)]))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        kernels = self.scale * F.normalize(self.weight.flatten(1), dim=1, eps=NORM_EPS)    # (C_out, C_in)
        # one GEMM over all B*H*W positions (a per-image product re-reads the kernels B times, which
        # dominates on small maps); the output is returned in channels-last memory, so a following
        # CosineConv1x1 reads its rows without a copy
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)                                         # (BHW, C_in)
        norms = rows.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        # dividing by the input norms before or after the (linear) product gives the same values; doing it
        # on the side with fewer channels saves a pass over the large K-channel tensor
        out = F.linear(rows / norms, kernels) if c <= kernels.shape[0] else F.linear(rows, kernels) / norms
        return out.view(b, h, w, -1).permute(0, 3, 1, 2)


class KDLayer(nn.Module):
    """The letKD layer: ``scores = predictor(F)``, ``v = value(relu(bn(scores)))``, ``F_hat = F + alpha * v``.

    ``predictor``: cosine conv C -> K (scale init 3.0), whose output ``scores`` (B, K, H, W) are the
    student's word-assignment logits; ``bn``: BatchNorm2d(K); ``value``: cosine conv K -> C (scale init 1.0).
    ``forward(F) -> (F_hat, scores)``.
    """

    def __init__(self, in_channels: int, num_words: int, alpha: float = 1.0) -> None:
        super().__init__()
        self.in_channels, self.num_words, self.alpha = in_channels, num_words, float(alpha)
        self.predictor = CosineConv1x1(in_channels, num_words, scale=PREDICTOR_SCALE)
        self.bn = nn.BatchNorm2d(num_words)
        self.value = CosineConv1x1(num_words, in_channels, scale=VALUE_SCALE)

    def forward(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.predictor(feature)
        v = self.value(F.relu(self.bn(scores), inplace=True))   # BN's backward does not need its output
        return feature + self.alpha * v, scores


# ---------------------------------------------------------------------------------------------- places

@dataclass(frozen=True)
class Site:
    """A KD-layer place: the output of the submodule ``module`` (dotted path), or its input if ``on_input``."""

    module: str
    on_input: bool = False


_CIFAR_RESNETS = ('resnet8', 'resnet14', 'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110',
                  'resnet8x4', 'resnet32x4')
_VGG_POOL_INPUT = Site('pool4', on_input=True)   # relu(block4): VGG applies that ReLU functionally

# Per architecture: 'penult' = the last spatial map feeding global pooling, 'inter' = the output of the
# first block of the last stage. When both are the same tensor (one-block last stage: resnet8(x4), vgg8)
# the intermediate layer comes first, then the penultimate one reads its output.
KD_SITES: dict[str, dict[str, Site]] = {
    **{name: {'inter': Site('layer3.0'), 'penult': Site('layer3')} for name in _CIFAR_RESNETS},
    'ResNet50': {'inter': Site('layer4.0'), 'penult': Site('layer4')},
    # WRN: 'relu' is the network's final BN-ReLU (block outputs are raw pre-activation sums)
    **{name: {'inter': Site('block3.layer.0'), 'penult': Site('relu')}
       for name in ('wrn_16_1', 'wrn_16_2', 'wrn_40_1', 'wrn_40_2')},
    'ShuffleV1': {'inter': Site('layer3.0'), 'penult': Site('layer3')},
    'ShuffleV2': {'inter': Site('layer3.0'), 'penult': Site('relu2')},        # after conv2-bn2-ReLU
    'MobileNetV2': {'inter': Site('blocks.5.0'), 'penult': Site('conv2')},    # conv2 = 1x1 conv-BN-ReLU
    # VGG's last stage is block4, made of conv-BN-ReLU units; vgg8's block4 has one unit
    'vgg8': {'inter': _VGG_POOL_INPUT, 'penult': _VGG_POOL_INPUT},
    **{name: {'inter': Site('block4.2'), 'penult': _VGG_POOL_INPUT} for name in ('vgg11', 'vgg13', 'vgg16', 'vgg19')},
}


def kd_sites(model_name: str, roles: tuple[str, ...] = ROLES) -> dict[str, Site]:
    """The KD-layer places of a model of the zoo, for ``roles``; UserError for a model without a table entry."""
    if model_name not in KD_SITES:
        raise UserError(f"letKD/QUEST know no KD-layer places for model {model_name!r}; "
                        f"supported: {', '.join(KD_SITES)}")
    return {role: KD_SITES[model_name][role] for role in roles}


class _OutputHook:
    """Forward hook calling ``fn(output)``; a returned tensor replaces the module's output."""

    def __init__(self, fn: Callable[[Tensor], Tensor | None]) -> None:
        self.fn = fn

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        return self.fn(output)


class _InputHook:
    """Forward pre-hook calling ``fn(first input)``; a returned tensor replaces that input."""

    def __init__(self, fn: Callable[[Tensor], Tensor | None]) -> None:
        self.fn = fn

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        new = self.fn(args[0])
        return None if new is None else (new, *args[1:])


def attach(model: nn.Module, site: Site, fn: Callable[[Tensor], Tensor | None]) -> RemovableHandle:
    """Call ``fn`` on the tensor at ``site`` in every forward of ``model``; a returned tensor replaces it."""
    module = model.get_submodule(site.module)
    if site.on_input:
        return module.register_forward_pre_hook(_InputHook(fn))
    return module.register_forward_hook(_OutputHook(fn))


def _store(store: dict[str, Tensor], role: str, tensor: Tensor) -> None:
    store[role] = tensor


@contextmanager
def tap(model: nn.Module, sites: dict[str, Site]) -> Iterator[dict[str, Tensor]]:
    """Inside the block, each forward of ``model`` puts the tensor at every site into the yielded dict
    (read only; the model's computation is unchanged). The hooks are removed on exit."""
    store: dict[str, Tensor] = {}
    handles = [attach(model, site, partial(_store, store, role)) for role, site in sites.items()]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def site_shapes(model: nn.Module, sites: dict[str, Site], image_size: int) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of the tensor at each site for (image_size x image_size) inputs (dummy batch, eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with tap(model, sites) as maps:
        model(torch.zeros(2, 3, image_size, image_size, device=device))
    model.train(was_training)
    return {role: tuple(maps[role].shape[1:]) for role in sites}


def pair_shapes(student: nn.Module, teacher: nn.Module, model_s: str, model_t: str, roles: tuple[str, ...],
                image_size: int) -> tuple[dict[str, tuple[int, int, int]], dict[str, tuple[int, int, int]]]:
    """(student, teacher) site shapes; UserError when a teacher map is smaller than the student's
    (the teacher is average-pooled down to the student's size, never up)."""
    shapes_s = site_shapes(student, kd_sites(model_s, roles), image_size)
    shapes_t = site_shapes(teacher, kd_sites(model_t, roles), image_size)
    for role in roles:
        (_, hs, ws), (_, ht, wt) = shapes_s[role], shapes_t[role]
        if ht < hs or wt < ws:
            raise UserError(f"{model_t} -> {model_s}: the teacher's {role} map is {ht}x{wt}, smaller than the "
                            f"student's {hs}x{ws}; letKD/QUEST need a teacher map at least as large")
    return shapes_s, shapes_t


def pool_teacher_to(t: Tensor, size: tuple[int, int]) -> Tensor:
    """Average-pool a teacher map (B, D, H, W) down to ``size`` (e.g. 8x8 -> 4x4 is 2x2 / stride 2)."""
    return t if tuple(t.shape[2:]) == tuple(size) else F.adaptive_avg_pool2d(t, tuple(size))


# ---------------------------------------------------------------------------------------------- targets and loss

def flatten_positions(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B*H*W, C): one row per position, ordered image, row, column."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def codebook_targets(t: Tensor, centroids: Tensor, tau: float) -> Tensor:
    """``softmax_k(-tau * ||t_n - rho_k||^2)`` for rows t (N, D) and centroids rho (K, D) -> (N, K)."""
    # ||t_n||^2 is the same for every k and cancels in the softmax; leaving it out avoids cancellation error
    logits = tau * (2.0 * t @ centroids.t() - centroids.pow(2).sum(1))
    return logits.softmax(dim=1)


def lda_project(t: Tensor, xbar: Tensor, scalings: Tensor) -> Tensor:
    """The teacher's LDA projection ``(t - xbar) @ scalings``: (N, D) -> (N, n_comp)."""
    return (t - xbar) @ scalings


def nearest_subclass_of_class(z: Tensor, labels: Tensor, centroids: Tensor, k_inter: int) -> Tensor:
    """Global index of the nearest of the ``k_inter`` centroids of class ``labels[n]`` for each row z_n.

    z (N, n_comp); labels (N,); centroids (classes * k_inter, n_comp), sub-class j belonging to class
    j // k_inter. Returns (N,) long.
    """
    own = centroids.view(-1, k_inter, centroids.shape[1])[labels]            # (N, k_inter, n_comp)
    return labels * k_inter + (z.unsqueeze(1) - own).pow(2).sum(2).argmin(1)


def position_kl(scores: Tensor, target: Tensor) -> Tensor:
    """Mean over the N positions of KL(target_n || softmax(scores_n)); scores and target (N, K)."""
    return F.kl_div(F.log_softmax(scores, dim=1), target, reduction='batchmean')


class CodebookQuantizer(nn.Module):
    """Penultimate teacher targets from the k-means codebook (non-persistent buffer ``centroids`` (K, D)).

    ``forward(t (N, D), labels) -> (targets (N, K), hard assignments (N,))``; labels are not used.
    """

    def __init__(self, num_words: int, dim: int, tau: float) -> None:
        super().__init__()
        self.tau = float(tau)
        self.register_buffer('centroids', torch.zeros(num_words, dim), persistent=False)
        self.loaded = False

    def load(self, tensors: dict[str, Tensor]) -> None:
        """Take ``centroids`` from an offline file's tensors."""
        centroids = tensors['centroids']
        if centroids.shape != self.centroids.shape:
            raise UserError(f"codebook of shape {tuple(centroids.shape)}, expected {tuple(self.centroids.shape)}")
        self.centroids.copy_(centroids)
        self.loaded = True

    def forward(self, t: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        target = codebook_targets(t, self.centroids, self.tau)
        return target, target.argmax(1)


class SubclassQuantizer(nn.Module):
    """Intermediate teacher targets: LDA projection, the nearest sub-class centroid of the TRUE class,
    and that sub-class's row of the score matrix s_T.

    Non-persistent buffers, filled by ``load``: ``scalings`` (D, n_comp), ``xbar`` (D,), ``centroids``
    (classes*K_inter, n_comp), ``scores`` (classes*K_inter, classes*K_inter).
    ``forward(t (N, D), labels (N,)) -> (targets (N, classes*K_inter), chosen sub-classes (N,))``.
    """

    def __init__(self, num_classes: int, k_inter: int, dim: int) -> None:
        super().__init__()
        self.k_inter, self.dim, self.num_subclasses = k_inter, dim, num_classes * k_inter
        for name in ('scalings', 'xbar', 'centroids', 'scores'):     # sized by load()
            self.register_buffer(name, torch.zeros(0), persistent=False)
        self.loaded = False

    def load(self, tensors: dict[str, Tensor]) -> None:
        """Take scalings, xbar, centroids and scores from an offline file's tensors."""
        dim, subclasses, n_comp = self.dim, self.num_subclasses, tensors['scalings'].shape[1]
        expected = {'scalings': (dim, n_comp), 'xbar': (dim,), 'centroids': (subclasses, n_comp),
                    'scores': (subclasses, subclasses)}
        device = self.scores.device
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise UserError(f"sub-class {name} of shape {tuple(tensors[name].shape)}, expected {shape}")
            setattr(self, name, tensors[name].to(device=device, dtype=torch.float32))
        self.loaded = True

    def forward(self, t: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        z = lda_project(t, self.xbar, self.scalings)
        chosen = nearest_subclass_of_class(z, labels, self.centroids, self.k_inter)
        return self.scores[chosen], chosen


# ---------------------------------------------------------------------------------------------- deployed student

class LetKDStudent(nn.Module):
    """The deployed letKD student: ``backbone`` (a model of the zoo, its state_dict keys untouched) whose
    forward runs through the KD layers in ``kd_layers`` ('inter' and/or 'penult').

    Forward hooks at the model's KD_SITES replace each site's tensor F by F_hat; the scores of the last
    forward are in ``self.scores`` (role -> (B, K, H, W)). ``forward(x, is_feat=False)`` is the
    backbone's (logits, or (features, logits)); pre-activation features are not available.
    """

    def __init__(self, backbone: nn.Module, model_name: str, kd_layers: dict[str, KDLayer]) -> None:
        super().__init__()
        self.model_name = model_name
        self.backbone = backbone
        self.kd_layers = nn.ModuleDict(kd_layers)
        self.scores: dict[str, Tensor] = {}
        sites = kd_sites(model_name, tuple(kd_layers))
        for role in ROLES:   # forward order: on a shared tensor the intermediate layer runs first
            if role in kd_layers:
                attach(backbone, sites[role], partial(self._through_kd_layer, role))

    def _through_kd_layer(self, role: str, feature: Tensor) -> Tensor:
        feature_hat, self.scores[role] = self.kd_layers[role](feature)
        return feature_hat

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False) -> Any:
        if preact:
            # the preact path calls the last block's forward_with_preact directly, bypassing the hooks
            raise ValueError('the letKD student has no pre-activation features')
        self.scores = {}
        return self.backbone(x, is_feat=is_feat)


@register_deployable('letkd')
def build_letkd_student(spec: dict[str, Any]) -> LetKDStudent:
    """An untrained LetKDStudent from ``LetKD1.deploy_spec()``."""
    layers = {role: KDLayer(layer['in_channels'], layer['num_words'], layer['alpha'])
              for role, layer in spec['kd_layers'].items()}
    return LetKDStudent(create_model(spec['model'], num_classes=spec['num_classes']), spec['model'], layers)


# ---------------------------------------------------------------------------------------------- distillers

class QuantizedKD(Distiller):
    """What letKD-1/2 and QUEST share: the teacher's maps at the KD sites, average-pooled to the student's
    size, turned into per-position targets by the offline quantizers (``prepare``); one KL per site,
    weighted by ``kl_weight`` (``-b``); per-epoch metrics. Subclasses provide the student's scores per site.

    Loss names: ``kl_inter``, ``kl_penult``. Epoch metrics per site: ``kl_*`` (unweighted),
    ``agree_*`` (percent of positions where the student's top word is the teacher target's argmax),
    ``perplexity_*`` (exp of the entropy of the batch's hard teacher-assignment histogram, batch mean)
    and ``teacher_maxprob_*`` (mean largest teacher probability).
    """

    roles: tuple[str, ...] = ('penult',)
    tau_flag = 'letkd_tau'           # the flag holding the codebook's soft-assignment tau
    data_mode = 'plain'
    default_weights = (1.0, 0.0, 1.0)

    def __init__(self, student: nn.Module, teacher: nn.Module, opt: Namespace,
                 student_shapes: dict[str, tuple[int, int, int]],
                 teacher_shapes: dict[str, tuple[int, int, int]]) -> None:
        super().__init__(student, teacher, opt)
        self.student_shapes, self.teacher_shapes = student_shapes, teacher_shapes
        self.pool_sizes = {role: student_shapes[role][1:] for role in self.roles}
        self.teacher_sites = kd_sites(opt.model_t, self.roles)
        quantizers: dict[str, nn.Module] = {}
        if 'inter' in self.roles:
            quantizers['inter'] = SubclassQuantizer(opt.num_classes, opt.k_inter, teacher_shapes['inter'][0])
        if 'penult' in self.roles:
            quantizers['penult'] = CodebookQuantizer(opt.k_penult, teacher_shapes['penult'][0],
                                                     getattr(opt, self.tau_flag))
        self.quantizers = nn.ModuleDict(quantizers)
        self.kl_weight = self.beta
        self.meters: dict[str, AverageMeter] = {}

    @staticmethod
    def check_flags(opt: Namespace) -> None:
        """UserError for unusable letKD/QUEST flags."""
        for flag in ('k_penult', 'k_inter', 'lda_dim', 'max_positions'):
            if getattr(opt, flag) < 1:
                raise UserError(f"--{flag} must be at least 1, got {getattr(opt, flag)}")
        for flag in ('letkd_tau', 'quest_tau'):
            if getattr(opt, flag) <= 0:
                raise UserError(f"--{flag} must be positive, got {getattr(opt, flag)}")

    def prepare(self, data: Any, *, device: torch.device, cache_dir: str, resumed: bool = False) -> None:
        """Load the teacher's quantizers from ``<cache_dir>/letkd/``, building the missing ones first
        (also on resume: the files are reused, or rebuilt identically from the same seed)."""
        # imported here: helper/letkd_offline.py imports this module
        from helper.letkd_offline import OfflineSettings, ensure_quantizers
        tensors = ensure_quantizers(
            self.teacher, teacher_arch=self.opt.model_t, teacher_path=self.opt.path_t, roles=self.roles,
            pool_sizes=self.pool_sizes, loader=data.train_eval_loader, dataset=self.opt.dataset,
            num_classes=self.opt.num_classes, settings=OfflineSettings.from_opt(self.opt),
            cache_dir=cache_dir, device=device)
        for role, role_tensors in tensors.items():
            self.quantizers[role].load(role_tensors)

    @torch.no_grad()
    def teacher_features(self, image: Tensor) -> tuple[dict[str, Tensor], list[Tensor], Tensor]:
        """The teacher's maps at the KD sites (pooled to the student's sizes), its feature list and its logits."""
        with tap(self.teacher, self.teacher_sites) as maps:
            feat_t, logit_t = self.teacher(image, is_feat=True)
        return {role: pool_teacher_to(maps[role], self.pool_sizes[role]) for role in self.roles}, feat_t, logit_t

    def teacher_maps(self, image: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The teacher's maps at the KD sites, pooled to the student's sizes, and its logits."""
        maps, _, logit_t = self.teacher_features(image)
        return maps, logit_t

    def kd_losses(self, logit_s: Tensor, scores: dict[str, Tensor], image: Tensor, target: Tensor
                  ) -> dict[str, Tensor]:
        """CE (and logit KD when -a is non-zero) plus ``kl_weight * KL`` per site; scores: role -> (B, K, H, W)."""
        maps, logit_t = self.teacher_maps(image)
        return self.site_losses(logit_s, logit_t, scores, maps, target)

    def site_losses(self, logit_s: Tensor, logit_t: Tensor, scores: dict[str, Tensor], maps: dict[str, Tensor],
                    target: Tensor) -> dict[str, Tensor]:
        """``kd_losses`` from the teacher's pooled site maps and logits computed by the caller."""
        if not all(q.loaded for q in self.quantizers.values()):
            raise RuntimeError('the teacher quantizers are not loaded: call prepare() first')
        losses = self.logit_losses(logit_s, logit_t, target)
        for role in self.roles:
            height, width = maps[role].shape[2:]
            labels = target.repeat_interleave(height * width)
            p_t, hard = self.quantizers[role](flatten_positions(maps[role]), labels)
            s = flatten_positions(scores[role])
            kl = position_kl(s, p_t)
            losses[f'kl_{role}'] = self.kl_weight * kl
            self._record(role, kl, s, p_t, hard)
        return losses

    @torch.no_grad()
    def _record(self, role: str, kl: Tensor, scores: Tensor, target: Tensor, hard: Tensor) -> None:
        n = scores.shape[0]
        histogram = torch.bincount(hard, minlength=target.shape[1]).float() / n
        values = {
            f'kl_{role}': (kl.item(), n),
            f'agree_{role}': ((scores.argmax(1) == target.argmax(1)).float().mean().item() * 100.0, n),
            f'perplexity_{role}': (torch.special.entr(histogram).sum().exp().item(), 1),
            f'teacher_maxprob_{role}': (target.max(1).values.mean().item(), n),
        }
        for name, (value, weight) in values.items():
            self.meters.setdefault(name, AverageMeter()).update(value, weight)

    def epoch_metrics(self) -> dict[str, float]:
        metrics = {name: meter.avg for name, meter in self.meters.items()}
        self.meters = {}
        return metrics


def default_alphas(model_t: str, model_s: str, dataset: str) -> dict[str, float]:
    """The paper's (supplementary) alpha per KD layer: 1, except ResNet50 -> MobileNetV2 on CIFAR-100
    (penult 0.1, inter 0.2) and Tiny-ImageNet (0.5, 1)."""
    if (model_t, model_s) == ('ResNet50', 'MobileNetV2'):
        per_dataset = {'cifar100': {'inter': 0.2, 'penult': 0.1}, 'tinyimagenet': {'inter': 1.0, 'penult': 0.5}}
        if dataset in per_dataset:
            return per_dataset[dataset]
    return {'inter': 1.0, 'penult': 1.0}


class LetKD1(QuantizedKD):
    """letKD-1: one KD layer on the student's penultimate map (``--distill letkd1``).

    ``self.student`` is the LetKDStudent (backbone + KD layers): it is what is trained, evaluated,
    counted and saved. Flags: ``--k_penult``, ``--alpha_penult`` (default per pair), ``--letkd_tau``.
    """

    name = 'letkd1'
    roles = ('penult',)

    def __init__(self, student: nn.Module, teacher: nn.Module, opt: Namespace) -> None:
        self.check_flags(opt)
        shapes_s, shapes_t = pair_shapes(student, teacher, opt.model_s, opt.model_t, self.roles, opt.image_size)
        defaults = default_alphas(opt.model_t, opt.model_s, opt.dataset)
        layers = {}
        for role in self.roles:
            flag = f'alpha_{role}'
            if getattr(opt, flag, None) is None:
                setattr(opt, flag, defaults[role])   # so args.json records the value used
            num_words = opt.k_penult if role == 'penult' else opt.num_classes * opt.k_inter
            layers[role] = KDLayer(shapes_s[role][0], num_words, getattr(opt, flag))
        super().__init__(LetKDStudent(student, opt.model_s, layers), teacher, opt, shapes_s, shapes_t)

    def forward_train(self, image: Tensor, target: Tensor, **extras: Any) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(image)
        return logits, self.kd_losses(logits, self.student.scores, image, target)

    def deploy_spec(self) -> dict[str, Any]:
        layers = {role: {'in_channels': layer.in_channels, 'num_words': layer.num_words, 'alpha': layer.alpha}
                  for role, layer in self.student.kd_layers.items()}
        return {'kind': 'letkd', 'model': self.opt.model_s, 'num_classes': self.opt.num_classes, 'kd_layers': layers}


class LetKD2(LetKD1):
    """letKD-2: KD layers at the intermediate and the penultimate place (``--distill letkd2``, alias ``letkd``).

    The intermediate layer has ``num_classes * --k_inter`` words (sub-classes); ``--alpha_inter``, ``--lda_dim``.
    """

    name = 'letkd2'
    roles = ('inter', 'penult')


class LetKDInter(LetKD1):
    """letKD with the intermediate KD layer alone (``--distill letkd_inter``; supplementary Table 5).

    The sub-class KD layer of letKD-2 (``--k_inter``, ``--alpha_inter``, ``--lda_dim``), no penultimate layer.
    """

    name = 'letkd_inter'
    roles = ('inter',)


class FitNetKDLayer(LetKD1):
    """FitNet plus a penultimate KD layer (``--distill fitnet_kdlayer``; supplementary Table 6).

    Loss: ``-r`` CE + ``-b`` FitNet hint (``HintLoss`` between a trainable ``ConvReg`` of the student's
    ``feat[--hint_layer]`` and the teacher's; published -b 100) + ``--kd_layer_weight`` x the KD layer's KL.
    ``--kd_layer_weight 0`` keeps the layer in the network (capacity) without its supervision. The deployed
    student is letKD-1's (backbone + KD layer); the regressor is dropped, as in FitNet.
    """

    name = 'fitnet_kdlayer'
    default_weights = (1.0, 0.0, 100.0)

    @classmethod
    def check_options(cls, opt: Namespace) -> None:
        super().check_options(opt)
        if opt.kd_layer_weight < 0:
            raise UserError(f"--kd_layer_weight must be >= 0, got {opt.kd_layer_weight}")

    def __init__(self, student: nn.Module, teacher: nn.Module, opt: Namespace) -> None:
        self.check_options(opt)
        super().__init__(student, teacher, opt)
        self.kl_weight = float(opt.kd_layer_weight)
        self.hint_layer = int(opt.hint_layer)
        self.regressor = hint_regressor(self.student, teacher, self.hint_layer, self.image_size)
        self.hint_loss = HintLoss()

    def forward_train(self, image: Tensor, target: Tensor, **extras: Any) -> tuple[Tensor, dict[str, Tensor]]:
        feat_s, logits = self.student(image, is_feat=True)
        maps, feat_t, logit_t = self.teacher_features(image)
        losses = self.site_losses(logits, logit_t, self.student.scores, maps, target)
        losses['hint'] = self.beta * self.hint_loss(self.regressor(feat_s[self.hint_layer]), feat_t[self.hint_layer])
        return logits, losses
