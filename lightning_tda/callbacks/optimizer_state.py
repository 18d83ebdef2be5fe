"""Learning rates and optimizer state: what TracIn weights and preconditioned variants need."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Number
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_tda.capture.hooks import Scales
from lightning_tda.capture.layers import CONV1D, DENSE, LayerSpec


def param_group_index(optimizers: Sequence[torch.optim.Optimizer]) -> dict[int, int]:
    """``id(param) -> global group index`` (groups numbered across optimizers in order)."""
    out: dict[int, int] = {}
    g = 0
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                out[id(p)] = g
            g += 1
    return out


def current_lrs(optimizers: Sequence[torch.optim.Optimizer]) -> list[float]:
    return [float(group["lr"]) for opt in optimizers for group in opt.param_groups]


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bool, str)) or v is None:
        return v
    if isinstance(v, Number):
        return float(v) if not isinstance(v, int) else v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v)
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return repr(v)


def optimizer_summary(optimizers: Sequence[torch.optim.Optimizer]) -> list[dict]:
    """Class, defaults and per-group hyper-parameters (lr, betas, eps, momentum, weight decay, ...)."""
    out = []
    for opt in optimizers:
        groups = [
            {k: _jsonable(v) for k, v in g.items() if k != "params"} for g in opt.param_groups
        ]
        defaults = {k: _jsonable(v) for k, v in opt.defaults.items()}
        out.append(
            {
                "class": f"{type(opt).__module__}.{type(opt).__qualname__}",
                "defaults": defaults,
                "groups": groups,
            }
        )
    return out


def _state_of(
    optimizers: Sequence[torch.optim.Optimizer], p: torch.Tensor
) -> tuple[dict, dict] | None:
    for opt in optimizers:
        if p in opt.state:
            for g in opt.param_groups:
                if any(q is p for q in g["params"]):
                    return opt.state[p], g
    return None


def _step(state: dict) -> float:
    s = state.get("step", 0)
    return float(s) if not isinstance(s, torch.Tensor) else float(s.item())


def _second_moment(
    optimizers: Sequence[torch.optim.Optimizer], p: torch.Tensor
) -> tuple[torch.Tensor, dict, float] | None:
    """``(exp_avg_sq as fp32, its param group, step)`` of a parameter, or ``None`` (no Adam state)."""
    st = _state_of(optimizers, p)
    if st is None or "exp_avg_sq" not in st[0]:
        return None
    v = st[0]["exp_avg_sq"]
    if isinstance(v, DTensor):  # FSDP2: the full moment (collective: every rank asks, in order)
        v = v.full_tensor()
    return v.float(), st[1], _step(st[0])


def factored_second_moments(
    model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], layers: Sequence[LayerSpec]
) -> dict[str, torch.Tensor]:
    """Adam ``exp_avg_sq`` per captured layer, reduced to row and column means of ``[v_W | v_b]``.

    Keys: ``"<layer>/row"`` ``[O]``, ``"<layer>/col"`` ``[I(+1)]``, ``"<layer>/step"``; the
    ``<dense>`` block stores each parameter's row/col means (2-D) or the full vector (1-D).
    Returns ``{}`` when the optimizer keeps no second moments (e.g. SGD).
    """
    named = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for s in layers:
        if s.kind == DENSE:
            for n in s.params:
                sm = _second_moment(optimizers, named[n])
                if sm is None:
                    continue
                v, _, step = sm
                key = f"{s.name}/{n}"
                if v.dim() >= 2:
                    v2 = v.reshape(v.shape[0], -1)
                    out[f"{key}/row"], out[f"{key}/col"] = v2.mean(1), v2.mean(0)
                else:
                    out[f"{key}/full"] = v
                out[f"{key}/step"] = torch.tensor(step)
            continue
        v = _augmented_v(named, optimizers, s)
        if v is None:
            continue
        vm, step = v
        out[f"{s.name}/row"] = vm.mean(1)
        out[f"{s.name}/col"] = vm.mean(0)
        out[f"{s.name}/step"] = torch.tensor(step)
    return out


def _augmented_v(
    named: dict[str, torch.Tensor], optimizers: Sequence[torch.optim.Optimizer], s: LayerSpec
) -> tuple[torch.Tensor, float] | None:
    sm = _second_moment(optimizers, named[s.params[0]])
    if sm is None:
        return None
    v, _, step = sm
    v = v.T if s.kind == CONV1D else v  # -> [O, I]
    if s.has_bias:
        sb = _second_moment(optimizers, named[s.params[1]])
        vb = sb[0] if sb is not None else torch.zeros(v.shape[0], device=v.device)
        v = torch.cat([v, vb[:, None]], dim=1)
    return v, step


def adam_scales(
    model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], layers: Sequence[LayerSpec]
) -> tuple[Scales, dict[str, torch.Tensor]] | None:
    """Factor-wise Adam preconditioner ``a b^T ≈ 1 / (sqrt(v̂) + eps)`` per layer (methods.md §2.3).

    With bias-corrected row/column means ``r``, ``c`` of ``v̂`` (Adafactor: ``v̂ ≈ r c^T / mean(r)``),
    ``a = 1 / (sqrt(r / mean(r)) + sqrt(eps))`` and ``b = 1 / (sqrt(c) + sqrt(eps))``, so
    ``G ⊙ a b^T = Σ_t (a ⊙ δ_t)(b ⊙ x_t)^T`` can be projected factor-wise. Dense parameters get the exact
    elementwise ``1 / (sqrt(v̂) + eps)``.

    Returns:
        ``(layer scales, dense scales)``, or ``None`` when the optimizer keeps no second moments
        (or a captured layer has no state yet, e.g. before the first step).
    """
    named = dict(model.named_parameters())
    scales: Scales = {}
    dense: dict[str, torch.Tensor] = {}
    for s in layers:
        if s.kind == DENSE:
            for n in s.params:
                sm = _second_moment(optimizers, named[n])
                if sm is None:
                    return None
                v, group, step = sm
                beta2, eps = _beta2_eps(group)
                dense[n] = 1.0 / ((v / _bias_correction(beta2, step)).sqrt() + eps)
            continue
        v = _augmented_v(named, optimizers, s)
        if v is None:
            return None
        vm, step = v
        beta2, eps = _beta2_eps(_state_of(optimizers, named[s.params[0]])[1])
        vhat = vm / _bias_correction(beta2, step)
        r, c = vhat.mean(1), vhat.mean(0)
        root_eps = math.sqrt(eps)
        a = 1.0 / ((r / r.mean().clamp_min(1e-30)).sqrt() + root_eps)
        b = 1.0 / (c.sqrt() + root_eps)
        scales[s.name] = (a, b)
    return scales, dense


def _beta2_eps(group: dict) -> tuple[float, float]:
    betas = group.get("betas", (0.9, 0.999))
    return float(betas[1]), float(group.get("eps", 1e-8))


def _bias_correction(beta2: float, step: float) -> float:
    return 1.0 - beta2**step if step > 0 else 1.0
