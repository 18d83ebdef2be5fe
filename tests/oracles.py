"""Independent references: exact per-example gradients from torch.func, projected by hand."""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from lightning_tda.capture.layers import CONV1D, LayerSpec
from lightning_tda.capture.projection import ProjectionConfig, projection_matrix


def per_example_grads(model, loss_fn, batch, param_names, use_vmap=True):
    """``{name: [B, *shape]}`` exact per-example gradients of ``loss_fn(model, batch_of_one)``."""
    params = {n: p.detach() for n, p in model.named_parameters() if n in param_names}
    b = next(v for v in _tensors(batch)).shape[0]

    if use_vmap:
        return vmap(
            lambda p, sub: grad(lambda q: _loss(model, q, loss_fn, _unsqueeze(sub)))(p),
            in_dims=(None, 0),
        )(params, batch)
    outs = [
        grad(lambda q, i=i: _loss(model, q, loss_fn, _index(batch, i)))(params) for i in range(b)
    ]
    return {n: torch.stack([o[n] for o in outs]) for n in params}


class _Wrap(torch.nn.Module):
    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def _loss(model, params, loss_fn, batch):
    w = _Wrap(model, loss_fn)
    return functional_call(w, {f"model.{k}": v for k, v in params.items()}, (batch,))[0]


def _tensors(batch):
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            yield from _tensors(v)


def _map(batch, fn):
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: _map(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_map(v, fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map(v, fn) for v in batch)
    return batch


def _index(batch, i):
    return _map(batch, lambda t: t[i : i + 1])


def _unsqueeze(batch):
    return _map(batch, lambda t: t.unsqueeze(0))


def augmented_gradient(spec: LayerSpec, grads: dict) -> torch.Tensor:
    """``[B, O, I(+1)]`` gradient of ``[W | b]`` in the store's orientation."""
    w = grads[spec.params[0]]
    if spec.kind == CONV1D:
        w = w.transpose(1, 2)
    if spec.has_bias:
        w = torch.cat([w, grads[spec.params[1]][:, :, None]], dim=2)
    return w


def project_reference(spec: LayerSpec, g: torch.Tensor, config: ProjectionConfig) -> torch.Tensor:
    """``P_out^T G P_in`` flattened: ``[B, k_out * k_in]``."""
    if not spec.exact_out:
        g = (
            projection_matrix(
                config.seed, spec.name, "out", spec.out_features, spec.k_out, config.distribution
            ).T
            @ g
        )
    if not spec.exact_in:
        g = g @ projection_matrix(
            config.seed, spec.name, "in", spec.in_features, spec.k_in, config.distribution
        )
    return g.reshape(g.shape[0], -1)


def reference_rows(model, loss_fn, batch, layers, config, use_vmap=True) -> torch.Tensor:
    names = {n for s in layers for n in s.params}
    grads = per_example_grads(model, loss_fn, batch, names, use_vmap=use_vmap)
    return torch.cat(
        [project_reference(s, augmented_gradient(s, grads), config) for s in layers], dim=1
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
