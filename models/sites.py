"""Named places inside a model (``Site``) and forward hooks that read or replace the tensor there.

A site is the output of a submodule (dotted path), or its first input. Hooks leave the model's
state_dict untouched, so checkpoints keep RepDistiller's keys.

    with tap(model, {'penult': Site('layer3')}) as maps:
        model(x)
    maps['penult']            # (B, C, H, W)

Inside a compiled training step, hooks must not be registered or removed (torch.compile breaks its graph
there): a ``SiteRecorder`` attaches its hooks once and hands over the tensors of each forward with ``take()``.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle


@dataclass(frozen=True)
class Site:
    """The output of the submodule ``module`` (dotted path), or its first input if ``on_input``."""

    module: str
    on_input: bool = False


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


class SiteRecorder:
    """Read-only hooks attached once: every forward of ``model`` stores the tensor at each site, ``take()``
    returns them (role -> tensor) and forgets them, so the recorder keeps nothing alive between steps.

    For a training step (compiled or not) that reads a model's inner maps each step; ``remove()`` detaches it.
    """

    def __init__(self, model: nn.Module, sites: dict[str, Site]) -> None:
        self.sites = dict(sites)
        self.maps: dict[str, Tensor] = {}
        self.handles = [attach(model, site, partial(_store, self.maps, role)) for role, site in self.sites.items()]

    def take(self) -> dict[str, Tensor]:
        """The maps of the last forward (every site), emptying the store."""
        maps = {role: self.maps[role] for role in self.sites}
        self.maps.clear()
        return maps

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.maps.clear()


class _AllSitesSeen(Exception):
    """Raised by ``site_shapes``' hooks to end a probing forward once every site has been seen."""


@torch.no_grad()
def site_shapes(model: nn.Module, sites: dict[str, Site], image_size: int) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of the tensor at each site for (image_size x image_size) inputs (dummy batch, eval mode).

    The probing forward stops once every site has been seen (the layers after them, e.g. the classifier, do
    not run).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    shapes: dict[str, tuple[int, int, int]] = {}

    def record(role: str, tensor: Tensor) -> None:
        shapes[role] = tuple(tensor.shape[1:])
        if len(shapes) == len(sites):
            raise _AllSitesSeen

    handles = [attach(model, site, partial(record, role)) for role, site in sites.items()]
    try:
        model(torch.zeros(2, 3, image_size, image_size, device=device))
    except _AllSitesSeen:
        pass
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {role: shapes[role] for role in sites}
