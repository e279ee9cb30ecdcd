"""How a step's losses become a parameter update: plain SGD, or DOT (``--trainer dot``).

``apply_update(optimizer, losses, total)`` is what both training loops call after the forward. For SGD it is
``total.backward(); optimizer.step()``. DOT (Zhao et al., "DOT: A Distillation-Oriented Trainer", ICCV 2023)
is an optimiser, not a criterion: it reads the loss terms the Distiller already names, the task term ``ce``
and the distillation terms (everything else), backpropagates them separately and gives each its own
momentum: ``momentum - delta`` for the task gradient and ``momentum + delta`` for the distillation gradient,
so the distillation direction dominates. It works with every method that has distillation terms.

The update, as mdistiller's ``DistillationOrientedTrainer`` (``mdistiller/engine/dot.py``) defines it, per
parameter p with task gradient g (weight decay wd added) and distillation gradient k:

1. task: d = g + wd p; buffer_task = d at the first step, else m_t buffer_task + d, where m_t = momentum - delta
   if p also has a distillation gradient and momentum otherwise; p -= lr buffer_task.
2. distillation (on the p of step 1): buffer_kd = k at the first step (no weight decay, as mdistiller), else
   m_k buffer_kd + k with m_k = momentum + delta if p also has a task gradient, else momentum buffer_kd +
   (k + wd p); p -= lr buffer_kd.
No dampening, no Nesterov. Both buffers live in the optimizer's state (``momentum_buffer``,
``momentum_kd_buffer``), so ``last.pth`` resumes it exactly.
"""
from __future__ import annotations

import functools
import operator
from typing import Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

TASK_TERM = 'ce'          # the Distillers' name of the task loss; every other term is distillation
TRAINERS = ('sgd', 'dot')


def apply_update(optimizer: Optimizer, losses: dict[str, Tensor], total: Tensor) -> None:
    """Backward and parameter update for one step: the optimizer's own rule if it has one (DOT), else
    ``total.backward()`` and ``optimizer.step()``."""
    own = getattr(optimizer, 'update_from_losses', None)
    if own is not None:
        own(losses)
        return
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()


class DistillationOrientedSGD(Optimizer):
    """DOT's SGD with two momentum buffers (module docstring). One parameter group.

    ``update_from_losses(losses)`` backpropagates the distillation terms (kept graph), records their gradients,
    backpropagates the task term and steps.
    """

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = 0.9, delta: float = 0.075,
                 weight_decay: float = 0.0) -> None:
        if not 0 <= delta <= momentum < 1 or momentum + delta >= 1:
            raise ValueError(f"DOT needs 0 <= delta <= momentum and momentum + delta < 1, got momentum {momentum}, "
                             f"delta {delta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay,
                                      nesterov=False))
        if len(self.param_groups) != 1:
            raise ValueError('DistillationOrientedSGD takes one parameter group')
        self._kd_grads: dict[Tensor, Tensor] = {}

    def update_from_losses(self, losses: dict[str, Tensor]) -> None:
        """The DOT step: distillation gradients first (graph kept), then the task gradient and the update."""
        distill = [value for name, value in losses.items() if name != TASK_TERM]
        if TASK_TERM not in losses or not distill:
            raise RuntimeError(f"DOT needs a task term '{TASK_TERM}' and distillation terms, got {list(losses)}")
        self.zero_grad(set_to_none=True)
        functools.reduce(operator.add, distill).backward(retain_graph=True)
        self.record_distillation_grads()
        self.zero_grad(set_to_none=True)
        losses[TASK_TERM].backward()
        self.step()

    @torch.no_grad()
    def record_distillation_grads(self) -> None:
        """Keep the current gradients as the distillation gradients of the next ``step``."""
        self._kd_grads = {p: p.grad for p in self.param_groups[0]['params'] if p.grad is not None}

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """Update with the current (task) gradients and the recorded distillation gradients."""
        group = self.param_groups[0]
        lr, momentum, delta, wd = group['lr'], group['momentum'], group['delta'], group['weight_decay']
        kd_grads, self._kd_grads = self._kd_grads, {}
        task = [p for p in group['params'] if p.grad is not None]
        self._momentum_update(task, [p.grad for p in task], 'momentum_buffer', lr,
                              lambda p: momentum - delta if p in kd_grads else momentum,
                              lambda p: wd, first_with_decay=True)
        has_task = set(task)
        kd_params = list(kd_grads)
        self._momentum_update(kd_params, [kd_grads[p] for p in kd_params], 'momentum_kd_buffer', lr,
                              lambda p: momentum + delta if p in has_task else momentum,
                              lambda p: 0.0 if p in has_task else wd, first_with_decay=False)

    def _momentum_update(self, params: list[Tensor], grads: list[Tensor], key: str, lr: float, momentum_of,
                         decay_of, first_with_decay: bool) -> None:
        """buffer = grad (+ decay) at the first step, else momentum * buffer + grad + decay * p; p -= lr * buffer.

        The parameters are grouped by (first step, momentum, decay) so each group is a few foreach kernels."""
        groups: dict[tuple[bool, float, float], tuple[list[Tensor], list[Tensor]]] = {}
        for p, g in zip(params, grads):
            first = key not in self.state[p]
            decay = decay_of(p) if (first_with_decay or not first) else 0.0
            members = groups.setdefault((first, 0.0 if first else momentum_of(p), decay), ([], []))
            members[0].append(p)
            members[1].append(g)
        for (first, m, decay), (ps, gs) in groups.items():
            steps = torch._foreach_add(gs, ps, alpha=decay) if decay else [g.clone() for g in gs]
            if first:
                for p, buffer in zip(ps, steps):
                    self.state[p][key] = buffer
                buffers = steps
            else:
                buffers = [self.state[p][key] for p in ps]
                torch._foreach_mul_(buffers, m)
                torch._foreach_add_(buffers, steps)
            torch._foreach_add_(ps, buffers, alpha=-lr)
