"""Dense fallback: per-example gradients of the remaining trainable parameters via ``torch.func``.

Parameters outside the hooked layers (embeddings, norms, tied weights) are differentiated with
``vmap(grad(...))`` through ``functional_call`` and projected with seeded dense matrices
``P_p`` (``[numel_p, k]``, seeded from ``(seed, "dense", name)``): ``g̃ = Σ_p P_p^T g_p``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_tda.capture.layers import LayerSpec
from lightning_tda.capture.losses import LossFn
from lightning_tda.capture.projection import ProjectionConfig, projection_matrix
from lightning_tda.capture.task import Task


class _LossModule(nn.Module):
    """``forward(batch)``: the task's per-example loss ``[B]`` of the wrapped model."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | Task) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn.per_example_loss if isinstance(loss_fn, Task) else loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


class DenseProjector:
    """Projected per-example gradients ``[B, k]`` of the parameters listed in a ``dense`` LayerSpec."""

    def __init__(
        self, model: nn.Module, spec: LayerSpec, config: ProjectionConfig, device: torch.device
    ) -> None:
        self.model = model
        self.spec = spec
        named = dict(model.named_parameters())
        self.names = list(spec.params)
        self.exact = spec.k_in == spec.in_features
        self.mats = (
            {}
            if self.exact
            else {
                n: projection_matrix(
                    config.seed,
                    "dense",
                    n,
                    named[n].numel(),
                    spec.k_in,
                    config.distribution,
                    device,
                )
                for n in self.names
            }
        )

    def __call__(
        self, loss_fn: LossFn | Task, batch: Any, scales: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(rows, scaled_rows)``, each ``[B, k]``; ``scales[name]`` multiplies that gradient."""
        wrapper = _LossModule(self.model, loss_fn)
        named = dict(self.model.named_parameters())
        params = {f"model.{n}": named[n].detach() for n in self.names}
        leaves, spec = tree_flatten(batch)
        t_idx = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        if not t_idx:
            raise ValueError("the dense gradient path needs at least one tensor in the batch")

        def one(p: dict[str, torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
            items = list(leaves)
            for i, t in zip(t_idx, tensors, strict=True):
                items[i] = t.unsqueeze(0)
            return functional_call(wrapper, p, (tree_unflatten(items, spec),))[0]

        grads = vmap(grad(one), in_dims=(None, *[0] * len(t_idx)))(
            params, *[leaves[i] for i in t_idx]
        )
        return self._project(grads, None), (
            self._project(grads, scales) if scales is not None else None
        )

    def _project(
        self, grads: dict[str, torch.Tensor], scales: dict[str, torch.Tensor] | None
    ) -> torch.Tensor:
        parts = []
        total = None
        for n in self.names:
            g = grads[f"model.{n}"].detach().float()
            if scales is not None:
                g = g * scales[n]
            g = g.reshape(g.shape[0], -1)
            if self.exact:
                parts.append(g)
            else:
                y = g @ self.mats[n]
                total = y if total is None else total + y
        return torch.cat(parts, dim=1) if self.exact else total
