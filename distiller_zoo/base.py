"""The one abstraction of the training loop: a Distiller per method.

A Distiller owns the student, the frozen teacher (always in eval mode, never optimised) and the
method's extra modules. The loop calls only:

- ``forward_train(image, target, **extras) -> (logits, {name: weighted loss})``
- ``trainable_parameters()``  for the optimizer
- ``deployable()``            the module that is evaluated, counted and saved as "the student"
- ``prepare(data, device=..., cache_dir=..., resumed=...)``  offline / init stages (optional)
- ``start_epoch(epoch)``      per-epoch values (e.g. DKD's warm-up factor) written into buffers (optional)
- ``epoch_metrics()``         extra per-epoch scalars to log (optional)
- ``summary_extras()``        extra values for summary.json (optional)

Options contract: a method lists the declarations of its flags in ``option_groups`` (functions that add
an argument group to a parser; train_student.py's parser is built from the registry, each group once),
and checks its flags and resolves its defaults in ``resolve_options``, which runs before any data is
read and returns the options that args.json records. Constructors get those options read-only, plus the
data's facts (``DataInfo``: num_classes, n_data, image_size).

One graph per step (the fast path compiles ``forward_train``, CUDA graphs on a GPU): nothing in
``forward_train`` registers hooks, reads a tensor on the host or depends on a Python number that changes
between steps; set-up happens in the constructor or ``prepare``, per-epoch factors live in buffers that
``start_epoch`` fills in place, and per-step statistics are added to buffers in place (helper/meters.py).

Loss weights follow RepDistiller: ``-r`` (gamma) for CE, ``-a`` (alpha) for logit KD and ``-b``
(beta) for the method's own loss.
"""
from __future__ import annotations

from argparse import ArgumentParser, Namespace
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from dataset import DataInfo
from distiller_zoo.KD import DistillKL
from distiller_zoo.logit_stand import check_logit_stand_unused
from helper.options import updated

OptionGroup = Callable[[ArgumentParser], Any]   # adds one argument group of flags to a parser


@torch.no_grad()
def probe_features(model: nn.Module, image_size: int, preact: bool = False) -> list[torch.Tensor]:
    """Feature maps of a dummy (2, 3, S, S) batch, to read shapes; the model's mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats, _ = model(torch.zeros(2, 3, image_size, image_size, device=device), is_feat=True, preact=preact)
    model.train(was_training)
    return list(feats)


class Distiller(nn.Module):
    """Base class. Subclasses set ``name`` and implement ``method_loss`` (or override ``forward_train``).

    The default ``forward_train`` runs student and teacher with ``is_feat=True``, computes
    ``gamma * CE`` and ``alpha * KL_T`` on the logits, and adds ``beta * method_loss(...)``.
    """

    name = 'base'
    data_mode = 'instance'   # which training loader the method needs: 'plain', 'instance' or 'crd'
    needs_teacher = True
    preact = False           # feature flavour asked of both networks (only AB uses pre-activations)
    default_weights = (1.0, 0.0, 0.0)   # published (-r, -a, -b), used when the flags are not given
    option_groups: tuple[OptionGroup, ...] = ()   # declarations of the flags the method reads
    has_logit_stand = False  # --logit_stand applies (distiller_zoo/logit_stand.py LogitStand sets it)
    # DDP under torchrun: True only for a method some of whose trainable parameters get no gradient in some steps
    find_unused_parameters = False
    # under torchrun: True when ``prepare`` is collective (AB/FT/FSP's init stage trains on every rank's shard at
    # once); False: rank 0 prepares first (building caches) and the others then load what it wrote
    collective_prepare = False

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace, info: DataInfo) -> None:
        super().__init__()
        self.opt = opt
        self.info = info
        self.num_classes = info.num_classes
        self.image_size = info.image_size
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.gamma = float(opt.gamma)
        self.alpha = float(opt.alpha)
        self.beta = float(opt.beta)
        self.criterion_cls = nn.CrossEntropyLoss()
        self.criterion_div = DistillKL(opt.kd_T)

    # ----------------------------------------------------------------- the loop's interface
    @classmethod
    def resolve_options(cls, opt: Namespace) -> Namespace:
        """Check the method's flags (UserError) and resolve its defaults, before any data is read.

        Returns a new Namespace: ``opt`` with the published ``-r/-a/-b`` filled in where they were not
        given. Subclasses extend it (``opt = super().resolve_options(opt)``, checks, ``updated(opt, ...)``)
        for per-pair defaults; never write into ``opt``.
        """
        if not cls.has_logit_stand:
            check_logit_stand_unused(opt, cls.name)
        weights = dict(zip(('gamma', 'alpha', 'beta'), cls.default_weights))
        return updated(opt, **{flag: value for flag, value in weights.items() if getattr(opt, flag, None) is None})

    def train(self, mode: bool = True) -> 'Distiller':
        """Like nn.Module.train, but the teacher always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **extras: Any
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One training step's forward: returns the student's logits (B, classes) and the weighted losses."""
        feat_s, logit_s = self.student(image, is_feat=True, preact=self.preact)
        feat_t, logit_t = self.teacher_forward(image)
        losses = self.logit_losses(logit_s, logit_t, target)
        method = self.method_loss(feat_s, feat_t, logit_s, logit_t, target, **extras)
        if method is not None:
            losses[self.name] = self.beta * method
        return logit_s, losses

    def method_loss(self, feat_s: list[torch.Tensor], feat_t: list[torch.Tensor], logit_s: torch.Tensor,
                    logit_t: torch.Tensor, target: torch.Tensor, **extras: Any) -> torch.Tensor | None:
        """The method's own (unweighted) loss; ``None`` for methods that have none."""
        return None

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Everything that requires grad, except the teacher (frozen parts set requires_grad=False)."""
        for name, p in self.named_parameters():
            if p.requires_grad and not name.startswith('teacher.'):
                yield p

    def deployable(self) -> nn.Module:
        """The network that is evaluated, counted and saved as the student."""
        return self.student

    def deploy_spec(self) -> dict[str, Any]:
        """How to rebuild ``deployable()`` from a checkpoint (see distiller_zoo/deploy.py)."""
        # train_teacher.py names its model --model, train_student.py --model_s
        name = getattr(self.opt, 'model_s', None) or self.opt.model
        return {'kind': 'plain', 'model': name, 'num_classes': self.num_classes, 'dataset': self.opt.dataset}

    def prepare(self, data: Any, *, device: torch.device, cache_dir: str, resumed: bool = False) -> None:
        """Offline or init stage before training (quantizers, class trees, AB/FT/FSP init). Default: none."""

    def start_epoch(self, epoch: int) -> None:
        """Called by the loops before each (1-indexed) epoch: write per-epoch values into buffers in place,
        never into Python attributes a compiled step reads. Default: nothing."""

    def epoch_metrics(self) -> dict[str, float]:
        """Extra scalars for this epoch's log line (and reset their accumulators). Default: none."""
        return {}

    def summary_extras(self) -> dict[str, Any]:
        """Extra JSON values the method adds to summary.json (e.g. TDD's groups per stage). Default: none."""
        return {}

    # ----------------------------------------------------------------- helpers for subclasses
    @torch.no_grad()
    def teacher_forward(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The teacher's features and logits, without grad."""
        if self.teacher is None:
            return [], torch.empty(0, device=image.device)
        feat_t, logit_t = self.teacher(image, is_feat=True, preact=self.preact)
        return [f.detach() for f in feat_t], logit_t.detach()

    def logit_losses(self, logit_s: torch.Tensor, logit_t: torch.Tensor, target: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
        """``{'ce': gamma * CE}`` plus ``{'kd': alpha * KL_T}`` when alpha is non-zero."""
        losses = {'ce': self.gamma * self.criterion_cls(logit_s, target)}
        if self.alpha != 0 and self.teacher is not None:
            losses['kd'] = self.alpha * self.criterion_div(logit_s, logit_t)
        return losses

    def state_dict_without_teacher(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume the method (student, extra modules, buffers), minus the teacher."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith('teacher.')}

    def load_state_dict_without_teacher(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith('teacher.')]
        if missing or unexpected:
            raise RuntimeError(f"distiller state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
