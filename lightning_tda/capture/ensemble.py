"""Seeded dropout sub-networks of a trained model, for dropout ensembles (methods.md §10).

Efficient Ensembles (Deng et al., 2024) replace independently trained models by one checkpoint seen
through ``M`` random dropout masks. Here member ``m`` is one fixed sub-network: every captured
layer's input units are kept with probability ``1 - p`` (and scaled by ``1/(1 - p)``), with the mask
drawn from ``(seed, member, layer name)`` on the CPU. The same mask applies to every example, so the
train rows and the query gradients of a member come from the same sub-network, on any device and
without storing masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lightning_tda.capture.layers import DENSE, LayerSpec
from lightning_tda.capture.projection import stable_seed


def member_mask(seed: int, member: int, name: str, width: int, p: float) -> torch.Tensor:
    """``[width]`` keep-mask of one layer's inputs, scaled by ``1/(1-p)``."""
    g = torch.Generator().manual_seed(stable_seed(seed, "dropout", str(member), name))
    keep = (torch.rand(width, generator=g) >= p).float()
    return keep / (1.0 - p)


@contextlib.contextmanager
def dropout_member(
    model: nn.Module, layers: list[LayerSpec], p: float, seed: int, member: int
) -> Iterator[None]:
    """Run ``model`` as sub-network ``member``: inputs of each captured layer masked (pre-hooks)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability must be in (0, 1), got {p!r}")
    modules = dict(model.named_modules())
    handles = []
    for spec in layers:
        if spec.kind == DENSE:
            continue
        module = modules[spec.name]

        def pre_hook(mod: nn.Module, args: tuple, spec: LayerSpec = spec):
            x = args[0]
            mask = member_mask(seed, member, spec.name, x.shape[-1], p).to(x.device, x.dtype)
            return (x * mask, *args[1:])

        handles.append(module.register_forward_pre_hook(pre_hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
