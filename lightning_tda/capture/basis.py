"""Data-aware projection bases: top eigenvectors of each layer's K-FAC factors (LoGra's PCA option).

For a layer with inputs ``x_t`` and output gradients ``δ_t``, the K-FAC factors are
``A = Σ x̄ x̄^T`` (``x̄ = [x, 1]``) and ``S = Σ δ δ^T`` over tokens and examples. Projecting with their
top-``k`` eigenvectors keeps the directions in which per-example gradients actually vary, so inner
products are preserved far better than with random matrices of the same size (methods.md §4.1).
The bases are fitted once (at the first logged checkpoint) and stored in the store, so every
checkpoint and the query side share them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lightning_tda.capture.checks import _check_losses
from lightning_tda.capture.layers import DENSE, LayerSpec
from lightning_tda.capture.losses import LossFn
from lightning_tda.data.ids import ExampleIds, split_ids

Bases = dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]
"""``{layer: (P_out [O, k_out] or None, P_in [I(+1), k_in] or None)}``; ``None`` = exact side."""


class _CovarianceHooks:
    """Accumulate ``A`` and ``S`` for the projected sides of each layer."""

    def __init__(self, model: nn.Module, layers: list[LayerSpec]) -> None:
        self.model = model
        self.layers = [s for s in layers if s.kind != DENSE and not (s.exact_in and s.exact_out)]
        self.a: dict[str, torch.Tensor] = {}
        self.s: dict[str, torch.Tensor] = {}
        self.outputs: list[tuple[LayerSpec, torch.Tensor]] = []
        self.handles: list = []

    def __enter__(self) -> _CovarianceHooks:
        modules = dict(self.model.named_modules())
        for spec in self.layers:
            self.handles.append(modules[spec.name].register_forward_hook(self._hook(spec)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.outputs.clear()

    def _hook(self, spec: LayerSpec) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            if not spec.exact_in:
                x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
                if spec.has_bias:
                    x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
                self.a[spec.name] = self.a.get(spec.name, 0) + x.T @ x
            self.outputs.append((spec, output))

        return hook

    def backward(self, losses: torch.Tensor) -> None:
        need = [(s, o) for s, o in self.outputs if not s.exact_out]
        self.outputs.clear()
        if not need:
            return
        grads = torch.autograd.grad(losses.sum(), [o for _, o in need], allow_unused=True)
        for (spec, _), g in zip(need, grads, strict=True):
            if g is None:
                continue
            d = g.detach().float().reshape(-1, spec.out_features)
            self.s[spec.name] = self.s.get(spec.name, 0) + d.T @ d


def top_eigenvectors(cov: torch.Tensor, k: int) -> torch.Tensor:
    """``[dim, k]`` eigenvectors of the ``k`` largest eigenvalues, signs fixed (largest entry > 0)."""
    _, vecs = torch.linalg.eigh(cov.double())
    v = vecs[:, -k:].flip(1)
    idx = v.abs().argmax(dim=0)
    signs = torch.sign(v[idx, torch.arange(v.shape[1])])
    signs[signs == 0] = 1
    return (v * signs).float()


def fit_pca_bases(
    model: nn.Module,
    batches: Iterable[Any],
    layers: list[LayerSpec],
    loss_fn: LossFn,
    max_examples: int,
    forward_context: Callable[[], Any] | None = None,
    example_ids: ExampleIds | None = None,
) -> Bases:
    """Accumulate the K-FAC factors over up to ``max_examples`` examples and take top eigenvectors.

    The caller sets eval mode and device placement; ``batches`` yields ready batches: the user's own
    (ids read with ``example_ids``) or :class:`~lightning_tda.data.ids.PositionedBatch` es (ids the
    library added; the loss gets the batch inside). ``loss_fn`` may be a Task's ``per_example_loss``.
    """
    seen = 0
    with torch.enable_grad(), _CovarianceHooks(model, layers) as hooks:
        for item in batches:
            # the sweep's clear errors, on the first batch:
            ids, batch = split_ids(item, example_ids)
            ctx = forward_context() if forward_context is not None else contextlib.nullcontext()
            with ctx:
                losses = loss_fn(model, batch)
            _check_losses(losses, ids)
            hooks.backward(losses)
            seen += int(losses.shape[0])
            if seen >= max_examples:
                break
    out: Bases = {}
    for spec in layers:
        if spec.kind == DENSE:
            continue
        p_out = (
            None
            if spec.exact_out
            else top_eigenvectors(_get(hooks.s, spec, "output-gradient"), spec.k_out)
        )
        p_in = None if spec.exact_in else top_eigenvectors(_get(hooks.a, spec, "input"), spec.k_in)
        out[spec.name] = (p_out, p_in)
    return out


def _get(d: dict[str, torch.Tensor], spec: LayerSpec, what: str) -> torch.Tensor:
    if spec.name not in d:
        raise RuntimeError(
            f"layer {spec.name} produced no {what} statistics during the PCA basis pass; it is not used by the "
            "per-example loss. Exclude it (exclude=[...]) or use the random basis."
        )
    return d[spec.name]
