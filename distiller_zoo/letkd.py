"""letKD (Gorgun, Gurbuz & Alatan, BMVC 2023): a knowledge-distillation layer that lets the student decide.

letKD-1 (``--distill letkd1``) puts one KD layer on the student's penultimate map; letKD-2 (``letkd2``,
alias ``letkd``) adds one on the output of the first block of the last stage. A KD layer scores every
position against K learnt words (the student's assignment logits), turns the scores into a value vector
and adds it to the feature, ``F_hat = F + alpha * v``; F_hat replaces F in the student's forward
(``LetKDStudent``), so the KD layers stay in the deployed network.

The file reads top to bottom: the layer; the teacher's targets and the loss; the deployed student; the
flags; the Distillers. The places of the KD layers are model facts (models/facts.py, ``kd_sites``). The
teacher's per-position targets come from offline quantizers (helper/letkd_offline.py, which owns their
maths and file format): a k-means codebook at the penultimate place, an LDA projection + per-class
sub-classes + a sub-class score matrix at the intermediate one. Loss per KD layer: KL(p_T || softmax(scores))
averaged over the B*H*W positions. QUEST (distiller_zoo/quest.py) reuses the codebook, the predictor and
the loss from here. docs/letkd.md states every formula and choice.

Two variants exist for the supplementary's ablations (docs/reproducing.md, "Ablations"): ``letkd_inter`` (the
intermediate KD layer alone, Table 5) and ``fitnet_kdlayer`` (FitNet's hint loss plus a penultimate KD
layer whose KL weight ``--kd_layer_weight`` may be 0, Table 6).
"""
from __future__ import annotations

import math
from argparse import ArgumentParser, Namespace
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dataset import DataInfo
from distiller_zoo.base import Distiller
from distiller_zoo.deploy import register_deployable
from distiller_zoo.FitNet import HintLoss, add_hint_arguments, hint_regressor
from helper.errors import UserError
from helper.letkd_offline import (ROLES, OfflineSettings, add_quantizer_arguments, check_quantizer_options,
                                  codebook_targets, ensure_quantizers, flatten_positions, kd_sites, lda_project,
                                  nearest_subclass_of_class, pair_shapes, pool_teacher_to)
from helper.meters import DeviceMeters
from helper.numerics import fp32_matmul
from helper.options import updated
from models import SiteRecorder, attach, create_model

NORM_EPS = 1e-12
PREDICTOR_SCALE = 3.0            # initial scale of the word predictor (cosine conv C -> K)
VALUE_SCALE = 1.0                # initial scale of the value conv (cosine conv K -> C)


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

    @torch.no_grad()
    def fold_bn(self) -> 'FusedKDLayer':
        """This layer's eval-mode computation with BN folded into the predictor (same outputs up to
        rounding; uses BN's running statistics as they are now)."""
        bn, predictor, value = self.bn, self.predictor, self.value
        factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)                          # (K,)
        unit_in = F.normalize(predictor.weight.flatten(1), dim=1, eps=NORM_EPS)           # (K, C)
        weight_in = (factor * predictor.scale).unsqueeze(1) * unit_in
        bias_in = bn.bias - bn.running_mean * factor
        weight_out = (self.alpha * value.scale) * F.normalize(value.weight.flatten(1), dim=1, eps=NORM_EPS)
        return FusedKDLayer(weight_in, bias_in, weight_out).to(predictor.weight.device).eval()


class FusedKDLayer(nn.Module):
    """A KDLayer folded for inference (``KDLayer.fold_bn()``; eval mode only, never trained or saved).

    In eval mode ``bn(scores)`` is affine per word, so BN and the predictor's scale fold into one
    predictor GEMM whose bias rides as an extra input column: ``r = relu([F / |F|, 1] @ W_in)``, then
    ``F_hat = F + (r @ W_out) / |r|`` with ``W_out`` the value's unit kernels times its scale and alpha.
    On the CPU, positions run in chunks whose (rows, K) buffer fits in ``chunk_bytes`` (stays in cache;
    one chunk on other devices); no normalised copy of the K-channel tensor is made.
    ``forward(F) -> (F_hat, None)`` (no scores).
    """

    def __init__(self, weight_in: Tensor, bias_in: Tensor, weight_out: Tensor, chunk_bytes: int = 2 ** 20) -> None:
        super().__init__()
        # (C + 1, K): the folded predictor kernels as columns, the folded bias as the last row
        self.register_buffer('weight_in', torch.cat([weight_in.t(), bias_in.unsqueeze(0)]).contiguous())
        self.register_buffer('weight_out', weight_out.t().contiguous())                      # (K, C)
        self.chunk_bytes = int(chunk_bytes)

    def forward(self, feature: Tensor) -> tuple[Tensor, None]:
        if self.training:
            raise RuntimeError('a folded KD layer is for inference only (eval mode)')
        b, c, h, w = feature.shape
        rows = feature.permute(0, 2, 3, 1).reshape(-1, c)                                 # (BHW, C)
        inputs = torch.ones(rows.shape[0], c + 1, dtype=rows.dtype, device=rows.device)   # [F / |F|, 1]
        torch.div(rows, rows.norm(dim=1, keepdim=True).clamp_min(NORM_EPS), out=inputs[:, :c])
        out = torch.empty_like(rows)
        step = rows.shape[0]
        if feature.device.type == 'cpu':
            step = max(16, self.chunk_bytes // (self.weight_out.shape[0] * rows.element_size()))
        for start in range(0, rows.shape[0], step):
            chunk = inputs[start:start + step]
            r = torch.mm(chunk, self.weight_in).relu_()                                    # (rows, K)
            norms = torch.linalg.vector_norm(r, dim=1, keepdim=True).clamp_min_(NORM_EPS)
            torch.mm(r, self.weight_out, out=out[start:start + chunk.shape[0]]).div_(norms)
        return feature + out.view(b, h, w, c).permute(0, 3, 1, 2), None


# ---------------------------------------------------------------------------------------------- targets and loss

def position_kl(scores: Tensor, target: Tensor) -> Tensor:
    """Mean over the N positions of KL(target_n || softmax(scores_n)); scores and target (N, K).

    The reference formula (``F.kl_div`` of ``log_softmax``); training uses ``position_kl_lse``."""
    return F.kl_div(F.log_softmax(scores, dim=1), target, reduction='batchmean')


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(1)`` for (N, K) rows as a batched product, without an (N, K) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _PositionKL(torch.autograd.Function):
    """mean_n [neg_entropy_n - p_n . s_n + logsumexp(s_n)], gradient (softmax(s) - p) / N for s only."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, target: Tensor, target_neg_entropy: Tensor) -> Tensor:
        ctx.save_for_backward(scores, target)
        return (target_neg_entropy - row_dot(target, scores) + torch.logsumexp(scores, dim=1)).mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        scores, target = ctx.saved_tensors
        # one (N, K) buffer: softmax, minus the target and times the scale, in place
        return torch.softmax(scores, dim=1).sub_(target).mul_(grad / scores.shape[0]), None, None


def position_kl_lse(scores: Tensor, target: Tensor, target_neg_entropy: Tensor) -> Tensor:
    """``position_kl`` in log-sum-exp form: mean_n [sum_k p log p - sum_k p s + logsumexp(s)].

    ``target_neg_entropy`` (N,) is sum_k p_nk log p_nk, which the quantizers get from their logits or
    tables; no log-softmax copy of the scores and no elementwise KL map are made, and the backward makes
    one (N, K) buffer (the gradient). Computed in fp32; no gradient flows into the targets.
    """
    return _PositionKL.apply(scores.float(), target.detach(), target_neg_entropy.detach())


SITE_METRICS = ('kl', 'agree', 'perplexity', 'teacher_maxprob')   # per-site epoch metrics, <metric>_<role>


class SiteTargets(NamedTuple):
    """The teacher's targets at one KD site, per position: ``probs`` (N, K) fp32, ``neg_entropy`` (N,)
    sum_k p log p, ``hard`` (N,) the assignment (nearest word or chosen sub-class)."""
    probs: Tensor
    neg_entropy: Tensor
    hard: Tensor


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

    def targets(self, t: Tensor, labels: Tensor) -> SiteTargets:
        """``forward``'s targets in float32 accuracy whatever the autocast / TF32 state (``fp32_matmul``), with
        their negative entropy from the logits; one (N, K) logit buffer, made in place into the probabilities."""
        with torch.autocast(t.device.type, enabled=False):
            centroids = self.centroids.float()
            # tau * (2 t.c - |c|^2), codebook_targets' operations in its order (||t||^2 cancels in the
            # softmax), the last two in place on the GEMM's output
            logits = fp32_matmul(2.0 * t.float(), centroids.t()).sub_(centroids.pow(2).sum(1)).mul_(self.tau)
            hard = logits.argmax(1)
            logits.sub_(logits.amax(1, keepdim=True))                  # row max 0: exp in (0, 1]
            probs = logits.exp()
            norm = probs.sum(1)
            probs.div_(norm.unsqueeze(1))
            neg_entropy = row_dot(probs, logits) - norm.log()           # sum p (a - logsumexp a)
        return SiteTargets(probs, neg_entropy, hard)


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
        # the offline file's tensors, and sum_k s log s of each row of ``scores`` (the targets' negative
        # entropies); sized by load()
        for name in ('scalings', 'xbar', 'centroids', 'scores', 'row_neg_entropy'):
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
        self.row_neg_entropy = torch.xlogy(self.scores, self.scores).sum(1)
        self.loaded = True

    def forward(self, t: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        z = lda_project(t, self.xbar, self.scalings)
        chosen = nearest_subclass_of_class(z, labels, self.centroids, self.k_inter)
        return self.scores[chosen], chosen

    def targets(self, t: Tensor, labels: Tensor) -> SiteTargets:
        """``forward``'s targets in float32 accuracy whatever the autocast / TF32 state, and their negative
        entropy (a per-row table of s_T, made by ``load``)."""
        with torch.autocast(t.device.type, enabled=False):
            z = lda_project(t.float(), self.xbar, self.scalings, matmul=fp32_matmul)
            chosen = nearest_subclass_of_class(z, labels, self.centroids, self.k_inter)
        return SiteTargets(self.scores[chosen], self.row_neg_entropy[chosen], chosen)


# ---------------------------------------------------------------------------------------------- deployed student

class LetKDStudent(nn.Module):
    """The deployed letKD student: ``backbone`` (a model of the zoo, its state_dict keys untouched) whose
    forward runs through the KD layers in ``kd_layers`` ('inter' and/or 'penult').

    Forward hooks at the model's KD sites (models/facts.py) replace each site's tensor F by F_hat; the scores of the last
    forward are in ``self.scores`` (role -> (B, K, H, W)). ``forward(x, is_feat=False)`` is the
    backbone's (logits, or (features, logits)); pre-activation features are not available.
    """

    def __init__(self, backbone: nn.Module, model_name: str, kd_layers: dict[str, KDLayer],
                 dataset: str | None = None) -> None:
        super().__init__()
        self.model_name = model_name
        self.backbone = backbone
        self.kd_layers = nn.ModuleDict(kd_layers)
        self.scores: dict[str, Tensor] = {}
        self.folded = False               # fold_bn() was called: inference only
        sites = kd_sites(model_name, tuple(kd_layers), dataset)
        for role in ROLES:   # forward order: on a shared tensor the intermediate layer runs first
            if role in kd_layers:
                attach(backbone, sites[role], partial(self._through_kd_layer, role))

    def _through_kd_layer(self, role: str, feature: Tensor) -> Tensor:
        feature_hat, scores = self.kd_layers[role](feature)
        if scores is not None:            # a folded layer gives none
            self.scores[role] = scores
        return feature_hat

    def fold_bn(self) -> 'LetKDStudent':
        """Fold each KD layer's BN into its predictor for inference (``KDLayer.fold_bn``): same logits,
        faster; puts the network in eval mode, after which it is for inference only (no scores, no
        training, and its state_dict is not the checkpoint's: load weights first, then fold)."""
        self.eval()
        for role, layer in list(self.kd_layers.items()):
            if isinstance(layer, KDLayer):
                self.kd_layers[role] = layer.fold_bn()
        self.folded = True
        return self

    def train(self, mode: bool = True) -> 'LetKDStudent':
        if mode and self.folded:
            raise RuntimeError('a letKD student with folded KD layers is for inference only')
        return super().train(mode)

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
    dataset = spec.get('dataset')
    return LetKDStudent(create_model(spec['model'], num_classes=spec['num_classes'], dataset=dataset), spec['model'],
                        layers, dataset)


# ---------------------------------------------------------------------------------------------- flags

def add_letkd_arguments(parser: ArgumentParser) -> None:
    """letKD's own flags (the quantizers' flags come from helper/letkd_offline.py)."""
    g = parser.add_argument_group('letKD')
    g.add_argument('--alpha_penult', type=float, default=None,
                   help="weight of the penultimate KD layer's value; default per pair: 1, ResNet50->MobileNetV2 "
                        "0.1 (cifar100) / 0.5 (tinyimagenet)")
    g.add_argument('--alpha_inter', type=float, default=None,
                   help="weight of the intermediate KD layer's value; default per pair: 1, ResNet50->MobileNetV2 "
                        "0.2 (cifar100) / 1 (tinyimagenet)")
    g.add_argument('--letkd_tau', type=float, default=1.0,
                   help='letKD: teacher codebook targets softmax(-tau * squared distance)')


def add_kd_layer_ablation_arguments(parser: ArgumentParser) -> None:
    """The flag of ``fitnet_kdlayer`` (supplementary Table 6)."""
    g = parser.add_argument_group('letKD ablations')
    g.add_argument('--kd_layer_weight', type=float, default=1.0,
                   help="fitnet_kdlayer: weight of the KD layer's KL loss (0: the layer without supervision); "
                        "-b weights FitNet's hint loss")


def default_alphas(model_t: str, model_s: str, dataset: str) -> dict[str, float]:
    """The paper's (supplementary) alpha per KD layer: 1, except ResNet50 -> MobileNetV2 on CIFAR-100
    (penult 0.1, inter 0.2) and Tiny-ImageNet (0.5, 1)."""
    if (model_t, model_s) == ('ResNet50', 'MobileNetV2'):
        per_dataset = {'cifar100': {'inter': 0.2, 'penult': 0.1}, 'tinyimagenet': {'inter': 1.0, 'penult': 0.5}}
        if dataset in per_dataset:
            return per_dataset[dataset]
    return {'inter': 1.0, 'penult': 1.0}


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
    option_groups = (add_quantizer_arguments,)

    @classmethod
    def resolve_options(cls, opt: Namespace) -> Namespace:
        check_quantizer_options(opt)
        if getattr(opt, cls.tau_flag) <= 0:
            raise UserError(f"--{cls.tau_flag} must be positive, got {getattr(opt, cls.tau_flag)}")
        return super().resolve_options(opt)

    def __init__(self, student: nn.Module, teacher: nn.Module, opt: Namespace, info: DataInfo,
                 student_shapes: dict[str, tuple[int, int, int]],
                 teacher_shapes: dict[str, tuple[int, int, int]]) -> None:
        super().__init__(student, teacher, opt, info)
        self.student_shapes, self.teacher_shapes = student_shapes, teacher_shapes
        self.pool_sizes = {role: student_shapes[role][1:] for role in self.roles}
        self.teacher_sites = kd_sites(opt.model_t, self.roles, opt.dataset)
        quantizers: dict[str, nn.Module] = {}
        if 'inter' in self.roles:
            quantizers['inter'] = SubclassQuantizer(info.num_classes, opt.k_inter, teacher_shapes['inter'][0])
        if 'penult' in self.roles:
            quantizers['penult'] = CodebookQuantizer(opt.k_penult, teacher_shapes['penult'][0],
                                                     getattr(opt, self.tau_flag))
        self.quantizers = nn.ModuleDict(quantizers)
        self.kl_weight = self.beta
        self.teacher_recorder = SiteRecorder(teacher, self.teacher_sites)   # hooks attached once, outside the step
        device = next(student.parameters()).device
        self.meters = nn.ModuleDict({role: DeviceMeters([f'{metric}_{role}' for metric in SITE_METRICS], device,
                                                        per_call=[f'perplexity_{role}']) for role in self.roles})

    def prepare(self, data: Any, *, device: torch.device, cache_dir: str, resumed: bool = False) -> None:
        """Load the teacher's quantizers from ``<cache_dir>/letkd/``, building the missing ones first
        (also on resume: the files are reused, or rebuilt identically from the same seed)."""
        tensors = ensure_quantizers(
            self.teacher, teacher_arch=self.opt.model_t, teacher_path=self.opt.path_t, roles=self.roles,
            pool_sizes=self.pool_sizes, loader=data.train_eval_loader, dataset=self.opt.dataset,
            num_classes=self.num_classes, settings=OfflineSettings.from_opt(self.opt),
            cache_dir=cache_dir, device=device)
        for role, role_tensors in tensors.items():
            self.quantizers[role].load(role_tensors)

    @torch.no_grad()
    def teacher_features(self, image: Tensor) -> tuple[dict[str, Tensor], list[Tensor], Tensor]:
        """The teacher's maps at the KD sites (pooled to the student's sizes), its feature list and its logits.

        The teacher runs in float32 even under ``--amp bf16``: its maps become the codebook / sub-class targets,
        which the offline stage computed from float32 maps."""
        with torch.autocast(image.device.type, enabled=False):
            feat_t, logit_t = self.teacher(image.float(), is_feat=True)
        maps = self.teacher_recorder.take()
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
            labels = target.view(-1, 1).expand(-1, height * width).reshape(-1)   # one label per position
            targets = self.quantizers[role].targets(flatten_positions(maps[role]), labels)
            s = flatten_positions(scores[role])
            with torch.autocast(s.device.type, enabled=False):          # targets and KL in fp32
                kl = position_kl_lse(s, targets.probs, targets.neg_entropy)
            losses[f'kl_{role}'] = self.kl_weight * kl
            self._record(role, kl, s, targets.probs, targets.hard)
        return losses

    @torch.no_grad()
    def _record(self, role: str, kl: Tensor, scores: Tensor, target: Tensor, hard: Tensor) -> None:
        """Add this batch's metrics to the device meters, in place (no host sync; traced into a compiled
        step); ``epoch_metrics`` reads them."""
        n = scores.shape[0]
        # scatter-add, not bincount: CUDA's bincount reads the input's max on the host
        histogram = torch.zeros(target.shape[1], device=hard.device).index_add_(
            0, hard, torch.ones(n, device=hard.device)) / n
        values = torch.stack([kl.detach().float(),                                      # in SITE_METRICS' order
                              (scores.argmax(1) == target.argmax(1)).float().mean() * 100.0,
                              torch.special.entr(histogram).sum().exp(),               # a mean over batches
                              target.max(1).values.float().mean()])
        self.meters[role].add(values, n)

    def epoch_metrics(self) -> dict[str, float]:
        """The epoch's weighted means (one host read per site, here only) and a reset; a site without a step
        gives none."""
        return {name: value for meters in self.meters.values() for name, value in meters.take_averages().items()}


class LetKD1(QuantizedKD):
    """letKD-1: one KD layer on the student's penultimate map (``--distill letkd1``).

    ``self.student`` is the LetKDStudent (backbone + KD layers): it is what is trained, evaluated,
    counted and saved. Flags: ``--k_penult``, ``--alpha_penult`` (default per pair), ``--letkd_tau``.
    """

    name = 'letkd1'
    roles = ('penult',)
    option_groups = (add_quantizer_arguments, add_letkd_arguments)

    @classmethod
    def resolve_options(cls, opt: Namespace) -> Namespace:
        """The quantizer/tau checks, then the paper's alpha of each KD layer of the pair where not given."""
        opt = super().resolve_options(opt)
        defaults = default_alphas(opt.model_t, opt.model_s, opt.dataset)
        return updated(opt, **{f'alpha_{role}': defaults[role] for role in cls.roles
                               if getattr(opt, f'alpha_{role}') is None})

    def __init__(self, student: nn.Module, teacher: nn.Module, opt: Namespace, info: DataInfo) -> None:
        shapes_s, shapes_t = pair_shapes(student, teacher, opt.model_s, opt.model_t, self.roles, info.image_size,
                                         opt.dataset)
        layers = {}
        for role in self.roles:
            num_words = opt.k_penult if role == 'penult' else info.num_classes * opt.k_inter
            layers[role] = KDLayer(shapes_s[role][0], num_words, getattr(opt, f'alpha_{role}'))
        super().__init__(LetKDStudent(student, opt.model_s, layers, opt.dataset), teacher, opt, info, shapes_s,
                         shapes_t)

    def forward_train(self, image: Tensor, target: Tensor, **extras: Any) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(image)
        return logits, self.kd_losses(logits, self.student.scores, image, target)

    def deploy_spec(self) -> dict[str, Any]:
        layers = {role: {'in_channels': layer.in_channels, 'num_words': layer.num_words, 'alpha': layer.alpha}
                  for role, layer in self.student.kd_layers.items()}
        return {'kind': 'letkd', 'model': self.opt.model_s, 'num_classes': self.num_classes, 'kd_layers': layers,
                'dataset': self.opt.dataset}


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
    option_groups = (add_quantizer_arguments, add_letkd_arguments, add_hint_arguments,
                     add_kd_layer_ablation_arguments)

    @classmethod
    def resolve_options(cls, opt: Namespace) -> Namespace:
        if opt.kd_layer_weight < 0:
            raise UserError(f"--kd_layer_weight must be >= 0, got {opt.kd_layer_weight}")
        return super().resolve_options(opt)

    def __init__(self, student: nn.Module, teacher: nn.Module, opt: Namespace, info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        self.kl_weight = float(opt.kd_layer_weight)
        self.hint_layer = int(opt.hint_layer)
        # the KD layer is new and still on the CPU while a caller may have put the backbone on the GPU
        self.student.kd_layers.to(next(self.student.backbone.parameters()).device)
        self.regressor = hint_regressor(self.student, teacher, self.hint_layer, self.image_size)
        self.hint_loss = HintLoss()

    def forward_train(self, image: Tensor, target: Tensor, **extras: Any) -> tuple[Tensor, dict[str, Tensor]]:
        feat_s, logits = self.student(image, is_feat=True)
        maps, feat_t, logit_t = self.teacher_features(image)
        losses = self.site_losses(logits, logit_t, self.student.scores, maps, target)
        losses['hint'] = self.beta * self.hint_loss(self.regressor(feat_s[self.hint_layer]), feat_t[self.hint_layer])
        return logits, losses
