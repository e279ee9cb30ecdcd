"""Logit standardization: Sun et al., "Logit Standardization in Knowledge Distillation" (CVPR 2024).

One switch, ``--logit_stand``, shared by ``kd``, ``dkd``, ``mlkd`` and ``ctkd``: every KL term of the method
compares the z-scores of the two networks' logits instead of the raw logits,

    standardize(z)_c = (z_c - mean(z)) / (std(z) + 1e-7),   mean / std over the classes of one sample,

with the unbiased standard deviation (torch's default, n - 1) and the epsilon added to the std, as the
``normalize`` function of the official code (sunshangquan/logit-standardization-KD,
``mdistiller/distillers/KD.py``; the same function in its ``DKD.py``, ``MLKD.py`` and ``CTKD/distiller_zoo/KD.py``).
A constant row has std 0 and becomes all zeros (a uniform softmax), never NaN.

The temperature and the KD weight change with it, as the official ``tools/train.py`` does with
``--logit-stand --base-temp --kd-weight``:

- ``kd``:   the KD weight (``-a``) is ``--kd_weight`` and the temperature ``--base_temp`` (CE weight ``-r`` unchanged);
- ``dkd``:  alpha and beta are ``--kd_weight`` x ``--dkd_alpha`` / ``--dkd_beta``, the temperature ``--base_temp``;
- ``mlkd``: the multi-level weight (``-b``) is ``--kd_weight`` and the first temperature ``--base_temp``;
  only the instance-level KL is standardized (its class- and batch-level terms are not, as in the official MLKD.py);
- ``ctkd``: the KD weight (``-a``) is ``--kd_weight``; the temperature stays the learned one (the official
  CTKD script passes ``--kd_T 2``, which its learnable temperature ignores), so ``--base_temp`` is refused.

This file holds the function, the flags (one group, listed by the four methods) and their resolution.
"""
from __future__ import annotations

import math
from argparse import ArgumentParser, Namespace
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from helper.errors import UserError

EPS = 1e-7                 # added to the standard deviation (official ``normalize``)
DEFAULT_BASE_TEMP = 2.0    # the official --base-temp default and README commands
DEFAULT_KD_WEIGHT = 9.0    # the official --kd-weight default and README commands
METHODS = ('kd', 'dkd', 'mlkd', 'ctkd')


def standardize(logits: Tensor) -> Tensor:
    """Z-score of each row of (B, C) logits: (z - mean) / (unbiased std + 1e-7), over the last dimension."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)          # unbiased (n - 1), as torch.Tensor.std by default
    return (logits - mean) / (std + EPS)


def add_logit_stand_arguments(parser: ArgumentParser) -> None:
    """The logit-standardization switch and its two values (the official --logit-stand --base-temp --kd-weight)."""
    g = parser.add_argument_group('logit standardization (kd, dkd, mlkd, ctkd)')
    g.add_argument('--logit_stand', action='store_true',
                   help='z-score each sample\'s logits (mean and unbiased std over the classes) before every KL '
                        '(Sun et al., CVPR 2024)')
    g.add_argument('--base_temp', type=float, default=None,
                   help=f'temperature with --logit_stand (default {DEFAULT_BASE_TEMP:g}; kd, dkd, mlkd; ctkd learns its own)')
    g.add_argument('--kd_weight', type=float, default=None,
                   help=f'KD weight with --logit_stand (default {DEFAULT_KD_WEIGHT:g}): -a of kd/ctkd, -b of mlkd, '
                        'a factor on --dkd_alpha/--dkd_beta')


def check_logit_stand_unused(opt: Namespace, method: str) -> None:
    """UserError when the logit-standardization flags are given to a method that does not have it."""
    if getattr(opt, 'logit_stand', False) or getattr(opt, 'base_temp', None) is not None \
            or getattr(opt, 'kd_weight', None) is not None:
        raise UserError(f"--logit_stand, --base_temp and --kd_weight apply to {', '.join(METHODS)}, not {method}")


def resolve_logit_stand(opt: Namespace, method: str, learns_temperature: bool = False) -> dict[str, Any]:
    """The resolved values of --base_temp / --kd_weight (None without --logit_stand); UserError for bad use.

    Without --logit_stand neither value may be given; with it they default to 2 and 9 (the official README).
    ``learns_temperature`` (ctkd): --base_temp is refused and stays None.
    """
    base_temp, kd_weight = opt.base_temp, opt.kd_weight
    if not opt.logit_stand:
        if base_temp is not None or kd_weight is not None:
            raise UserError("--base_temp and --kd_weight act only together with --logit_stand")
        return {'base_temp': None, 'kd_weight': None}
    if learns_temperature:
        if base_temp is not None:
            raise UserError(f"{method} learns its temperature; --base_temp has no effect there (leave it out)")
    else:
        base_temp = DEFAULT_BASE_TEMP if base_temp is None else float(base_temp)
        if not (math.isfinite(base_temp) and base_temp > 0):
            raise UserError(f"--base_temp must be a positive number, got {base_temp}")
    kd_weight = DEFAULT_KD_WEIGHT if kd_weight is None else float(kd_weight)
    if not (math.isfinite(kd_weight) and kd_weight >= 0):
        raise UserError(f"--kd_weight must be a number >= 0, got {kd_weight}")
    return {'base_temp': base_temp, 'kd_weight': kd_weight}


def kd_weight_as(flag: str, opt: Namespace, values: dict[str, Any]) -> dict[str, Any]:
    """With --logit_stand, the method's KD-weight flag (``alpha`` for -a, ``beta`` for -b) takes --kd_weight.

    An explicit, different value of that flag is refused (two weights for one term); returns the updates."""
    if not opt.logit_stand:
        return {}
    given = getattr(opt, flag)
    option = {'alpha': '-a', 'beta': '-b'}[flag]
    if given is not None and float(given) != values['kd_weight']:
        raise UserError(f"with --logit_stand the KD weight is --kd_weight ({values['kd_weight']:g}); "
                        f"leave {option} out (got {given})")
    return {flag: values['kd_weight']}


def kd_divergence(logit_s: Tensor, logit_t: Tensor, temperature: float | Tensor) -> Tensor:
    """T^2 / B * sum_b KL(softmax(z_t / T) || softmax(z_s / T)), the official ``kd_loss`` (``.sum(1).mean()``)."""
    log_p_s = F.log_softmax(logit_s / temperature, dim=1)
    log_p_t = F.log_softmax(logit_t / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction='batchmean', log_target=True) * temperature ** 2


class LogitStand:
    """Mixin for the four Distillers: ``self.logit_stand`` and ``self.stand(z)`` (z-scores when switched on).

    It also replaces the base ``logit_losses`` so that the ``-a`` KD term compares standardized logits at
    ``--base_temp`` when the switch is on (the CE term always sees the raw logits). Call ``init_logit_stand(opt)``
    in the constructor, after ``Distiller.__init__``.
    """

    has_logit_stand = True     # Distiller.resolve_options refuses the flags for methods without it
    logit_stand: bool = False

    def init_logit_stand(self, opt: Namespace) -> None:
        self.logit_stand = bool(opt.logit_stand)
        self.kd_temperature = float(opt.base_temp) if self.logit_stand and opt.base_temp is not None \
            else float(opt.kd_T)

    def summary_extras(self) -> dict[str, Any]:
        """summary.json records whether the run standardized its logits (the method's name does not say)."""
        return {'logit_stand': self.logit_stand}

    def stand(self, logits: Tensor) -> Tensor:
        return standardize(logits) if self.logit_stand else logits

    def logit_losses(self, logit_s: Tensor, logit_t: Tensor, target: Tensor) -> dict[str, Tensor]:
        if not self.logit_stand:
            return super().logit_losses(logit_s, logit_t, target)  # type: ignore[misc]
        losses = {'ce': self.gamma * F.cross_entropy(logit_s, target)}  # type: ignore[attr-defined]
        if self.alpha != 0 and self.teacher is not None:  # type: ignore[attr-defined]
            losses['kd'] = self.alpha * kd_divergence(standardize(logit_s), standardize(logit_t),  # type: ignore
                                                      self.kd_temperature)
        return losses

