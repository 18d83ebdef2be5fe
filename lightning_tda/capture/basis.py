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
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import scipy.linalg
import torch
from torch import nn

from lightning_tda.capture.checks import _check_losses
from lightning_tda.capture.layers import DENSE, LayerSpec, unwrapped_module_names
from lightning_tda.capture.losses import LossFn
from lightning_tda.data.ids import ExampleIds, split_ids

Bases = dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]
"""``{layer: (P_out [O, k_out] or None, P_in [I(+1), k_in] or None)}``; ``None`` = exact side."""


LayerCalls = dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]]
"""``{layer: [(input [B, ..., I], output gradient [B, ..., O] or None), ...]}``, one pair per call."""


@dataclass
class CachedBatch:
    """One batch of the basis pass kept for the sweep that follows it at the same weights.

    The sweep projects ``calls`` (raw layer inputs and output gradients, exactly what its own forward
    and backward would produce) instead of running them again (:meth:`LayerGradientHooks.rows_from`).

    Attributes:
        ids: ``[B]`` example ids of the batch.
        losses: ``[B]`` detached per-example losses.
        calls: the captured layers' inputs and output gradients, in call order.
    """

    ids: torch.Tensor | None
    losses: torch.Tensor
    calls: LayerCalls


class _CovarianceHooks:
    """Accumulate ``A`` and ``S`` for the projected sides of each layer; with ``keep``, also hand
    back each batch's layer inputs and output gradients (every captured layer) for reuse."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[LayerSpec],
        keep: bool = False,
        tokens_per_example: int | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.keep = keep
        self.tokens_per_example = tokens_per_example
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self.layers = [
            s for s in layers if s.kind != DENSE and (keep or not (s.exact_in and s.exact_out))
        ]
        self.a: dict[str, torch.Tensor] = {}
        self.s: dict[str, torch.Tensor] = {}
        self.outputs: list[tuple[LayerSpec, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.handles: list = []

    def __enter__(self) -> _CovarianceHooks:
        modules = unwrapped_module_names(self.model)  # (FSDP1 / checkpoint wrappers looked through)
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
            x = inputs[0].detach()
            pick = self._positions(x)
            if not spec.exact_in:
                _add_gram(self.a, spec.name, _tokens(x.float(), pick), bias=spec.has_bias)
            self.outputs.append((spec, x, output, pick))

        return hook

    def _positions(self, x: torch.Tensor) -> torch.Tensor | None:
        """``[B, c]`` random token positions per example of a layer input ``[B, ..., I]`` (``c =
        tokens_per_example``), or ``None`` to use every position."""
        b, t = x.shape[0], x[0, ..., 0].numel()
        if self.tokens_per_example is None or t <= self.tokens_per_example:
            return None
        if x.device not in self._generators:
            self._generators[x.device] = torch.Generator(x.device).manual_seed(self.seed)
        noise = torch.rand(b, t, generator=self._generators[x.device], device=x.device)
        return noise.argsort(dim=1)[:, : self.tokens_per_example]

    def backward(self, losses: torch.Tensor) -> LayerCalls:
        """Accumulate ``S`` from the output gradients of ``losses.sum()``; with ``keep``, the batch's
        ``{layer: [(input, output gradient), ...]}`` (else ``{}``)."""
        need = [(s, x, o, p) for s, x, o, p in self.outputs if self.keep or not s.exact_out]
        self.outputs.clear()
        if not need:
            return {}
        grads = torch.autograd.grad(losses.sum(), [o for _, _, o, _ in need], allow_unused=True)
        calls: LayerCalls = {}
        for (spec, x, _, pick), g in zip(need, grads, strict=True):
            if self.keep:
                calls.setdefault(spec.name, []).append((x, g))
            if g is None or spec.exact_out:
                continue
            _add_gram(self.s, spec.name, _tokens(g.detach().float(), pick))
        return calls


def _tokens(x: torch.Tensor, pick: torch.Tensor | None) -> torch.Tensor:
    """``[N, F]`` token rows of ``x`` ``[B, ..., F]``: all of them, or the ``[B, c]`` positions ``pick``."""
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    if pick is not None:
        x = x.gather(1, pick[..., None].expand(-1, -1, x.shape[-1]))
    return x.reshape(-1, x.shape[-1])


def _add_gram(acc: dict[str, torch.Tensor], name: str, x: torch.Tensor, bias: bool = False) -> None:
    """``acc[name] += x̄ᵀ x̄`` in place for ``x`` ``[N, I]`` (``x̄ = [x, 1]`` with ``bias``).

    The bias column is never materialised: its block is the column sums and the row count.
    """
    i = x.shape[1]
    if name not in acc:
        acc[name] = x.new_zeros(i + bias, i + bias)
    a = acc[name]
    if not bias:
        a.addmm_(x.T, x)
        return
    a[:i, :i].addmm_(x.T, x)
    col = x.sum(dim=0)
    a[:i, i] += col
    a[i, :i] += col
    a[i, i] += x.shape[0]


PARTIAL_EIGH_MIN_DIM = 512
"""CPU factors at least this wide take only their top-``k`` eigenpairs (LAPACK ``syevr``, same double
precision; 2-3x faster than the full ``syevd`` at 1,536 x 1,536)."""


def top_eigenvectors(cov: torch.Tensor, k: int) -> torch.Tensor:
    """``[dim, k]`` eigenvectors of the ``k`` largest eigenvalues, signs fixed (largest entry > 0)."""
    n = cov.shape[0]
    if cov.device.type == "cpu" and n >= PARTIAL_EIGH_MIN_DIM and k < n:
        _, top = scipy.linalg.eigh(
            cov.double().numpy(), subset_by_index=[n - k, n - 1], driver="evr", check_finite=False
        )
        v = torch.from_numpy(top).flip(1)
    else:
        _, vecs = torch.linalg.eigh(cov.double())
        v = vecs[:, -k:].flip(1)
    idx = v.abs().argmax(dim=0)
    signs = torch.sign(v[idx, torch.arange(v.shape[1])])
    signs[signs == 0] = 1
    return (v * signs).float()


HOST_REUSE_CAP = 1 << 30
"""Most bytes the sweep keeps for reuse in host memory. Kept tensors hold fresh pages the process must
first touch (about 3 GB/s on the 2-core benchmark machine, against ~40 GB/s for reused memory):
keeping gpt10m's 4.8 GB slowed its basis pass by ~10 s, more than the 8 s of forward+backward saved,
while 1 GiB or less (the tiny GPT's ~0.6 GB) pays off."""


def reuse_budget(device: torch.device, requested: int | None = None) -> int:
    """Bytes of basis-pass tensors the sweep may keep for reuse: ``requested``, else a quarter of the
    device's free memory (CUDA ``mem_get_info``); on the host a quarter of the available RAM, at most
    :data:`HOST_REUSE_CAP`."""
    if requested is not None:
        return max(0, int(requested))
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        free = HOST_REUSE_CAP
    return min(free, HOST_REUSE_CAP)


def _calls_bytes(calls: LayerCalls) -> int:
    return sum(
        t.numel() * t.element_size()
        for pairs in calls.values()
        for p in pairs
        for t in p
        if t is not None
    )


def fit_pca_bases(
    model: nn.Module,
    batches: Iterable[Any],
    layers: list[LayerSpec],
    loss_fn: LossFn,
    max_examples: int,
    forward_context: Callable[[], Any] | None = None,
    example_ids: ExampleIds | None = None,
    keep: list[CachedBatch] | None = None,
    keep_bytes: int = 0,
    tokens_per_example: int | None = None,
    seed: int = 0,
) -> Bases:
    """Accumulate the K-FAC factors over up to ``max_examples`` examples and take top eigenvectors.

    The caller sets eval mode and device placement; ``batches`` yields ready batches: the user's own
    (ids read with ``example_ids``) or :class:`~lightning_tda.data.ids.PositionedBatch` es (ids the
    library added; the loss gets the batch inside). ``loss_fn`` may be a Task's ``per_example_loss``.
    ``keep``: a list that receives the leading batches' :class:`CachedBatch` es while their tensors
    fit in ``keep_bytes`` (the sweep at the same weights projects them instead of recomputing).
    ``tokens_per_example``: the factors use that many random token positions of each example
    (``seed``-ed; ``None`` or shorter sequences: every position).
    """
    seen, kept, keeping = 0, 0, keep is not None and keep_bytes > 0
    covariances = _CovarianceHooks(model, layers, keeping, tokens_per_example, seed)
    with torch.enable_grad(), covariances as hooks:
        for item in batches:
            # the sweep's clear errors, on the first batch:
            ids, batch = split_ids(item, example_ids)
            ctx = forward_context() if forward_context is not None else contextlib.nullcontext()
            with ctx:
                losses = loss_fn(model, batch)
            _check_losses(losses, ids)
            calls = hooks.backward(losses)
            if keeping:
                kept += _calls_bytes(calls)
                keeping = hooks.keep = kept <= keep_bytes
                if keeping:
                    keep.append(CachedBatch(ids, losses.detach(), calls))
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
