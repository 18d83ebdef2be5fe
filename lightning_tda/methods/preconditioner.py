"""Optimizer-aware pieces read from a store: the optimizer kind, weight decay per column, and the
per-coordinate Adam preconditioner in the projected space (methods.md §8.4).

Adam's update is ``-η (P g + λ_wd θ)`` with the elementwise preconditioner ``P = 1/(√v̂ + ε)``. The
logger stores both the projected gradient ``g̃_i = Π^T g_i`` (``train``) and the projected preconditioned
gradient ``r̃_i = Π^T (P g_i)`` (``train_precond``, from the checkpoint's second moments). Along a
projected coordinate ``j`` the preconditioner acts as

    d_j = Σ_i r̃_ij g̃_ij / Σ_i g̃_ij²

(a Rayleigh quotient of ``P`` weighted by the gradients' second moments along that direction), so
``D = diag(d)`` is the diagonal of Adam's preconditioner in the projected space, one value per stored
column rather than one mean per layer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Literal

import torch

from lightning_tda.store import schema
from lightning_tda.store.reader import StoreReader

OptimizerKind = Literal["sgd", "adam", "adamw"]


def optimizer_record(store: StoreReader) -> list[dict]:
    """The logged optimizer summaries (class, defaults, groups); ``[]`` when none was logged."""
    return json.loads(store.attrs.get("optimizers", "[]"))


def optimizer_kind(store: StoreReader) -> OptimizerKind:
    """``"adamw"`` (decoupled weight decay), ``"adam"`` (Adam family, L2 weight decay) or ``"sgd"``.

    Adam-family optimizers are recognised by their class name (Adam, AdamW, NAdam, RAdam, Adamax,
    FusedAdam, ...) or by ``betas`` in their hyper-parameters; AdamW by its name or ``decoupled_weight_decay``.
    """
    opts = optimizer_record(store)
    if not opts:
        return "sgd"
    cls = opts[0]["class"].rsplit(".", 1)[-1].lower()
    defaults = opts[0].get("defaults", {})
    if "adam" not in cls and "betas" not in defaults:
        return "sgd"
    decoupled = cls.endswith("adamw") or bool(defaults.get("decoupled_weight_decay", False))
    return "adamw" if decoupled else "adam"


def weight_decay_columns(store: StoreReader, step: int) -> torch.Tensor:
    """``[D]`` each column's param-group weight decay (0 where none was logged)."""
    opts = optimizer_record(store)
    groups = [g for o in opts for g in o.get("groups", [])]
    if not groups:
        return torch.zeros(store.width)
    wd = [float(g.get("weight_decay", 0.0) or 0.0) for g in groups]
    return store.column_weights(step, wd)


def projected_adam_diagonal(
    store: StoreReader, steps: Sequence[int], block_rows: int = 4096, floor: float = 1e-6
) -> torch.Tensor:
    """``[D]`` float64 per-coordinate Adam preconditioner ``d_j`` over the checkpoints ``steps``.

    ``d_j = Σ_{c,i} r̃_cij g̃_cij / Σ_{c,i} g̃_cij²`` from the ``train_precond`` and ``train`` rows. Values
    are floored at ``floor × max`` of the layer's block (a direction the examples never move keeps a
    small positive value instead of a zero or negative one).

    Raises:
        ValueError: a checkpoint has no preconditioned rows (needs ``GradientLogger(optimizer_state=True)``
            and an Adam-family optimizer).
    """
    num = torch.zeros(store.width, dtype=torch.float64)
    den = torch.zeros(store.width, dtype=torch.float64)
    for step in steps:
        if not store.checkpoint(step).has_precond:
            raise ValueError(
                f"checkpoint {step} has no Adam-preconditioned rows; the Adam form needs an Adam-family "
                "optimizer and GradientLogger(optimizer_state=True) (or pass optimizer='sgd')"
            )
        pairs = [(step, schema.TRAIN), (step, schema.TRAIN_PRECOND)]
        for _, _, (g, r) in store.iter_blocks(pairs, block_rows):
            g, r = g.double(), r.double()
            num += (g * r).sum(0)
            den += (g * g).sum(0)
    d = num / den.clamp_min(1e-300)
    d = torch.where(den > 0, d, torch.zeros_like(d))
    for s in store.layers:
        cols = slice(s.offset, s.offset + s.size)
        top = float(d[cols].max()) if s.size else 0.0
        d[cols] = d[cols].clamp_min(max(top, 1e-30) * floor)
    return d


__all__ = [
    "OptimizerKind",
    "optimizer_kind",
    "optimizer_record",
    "projected_adam_diagonal",
    "weight_decay_columns",
]
