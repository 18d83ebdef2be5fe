"""Per-example loss and gradient checks shared by every pass over the data (basis, sweep, in-flight)."""

from __future__ import annotations

from typing import Any

import torch

from lightning_tda.errors import NonFiniteError  # noqa: F401 (re-exported)


def _check_losses(losses: Any, ids: torch.Tensor | None) -> None:
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(
            f"the per-example loss must be a 1-D tensor [B], got {shape}. Return one loss per example "
            "(reduction='none'; sequence losses summed over supervised tokens), not a batch mean."
        )
    if ids is not None and losses.shape[0] != ids.shape[0]:
        raise ValueError(
            f"the per-example loss has {losses.shape[0]} values for a batch of {ids.shape[0]} examples"
        )
    _check_finite(losses.detach(), ids, "loss")


def _check_finite(t: torch.Tensor, ids: torch.Tensor | None, what: str) -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        rows = bad.reshape(t.shape[0], -1).any(dim=1).nonzero().flatten().cpu()
        who = (ids.cpu()[rows] if ids is not None else rows).tolist()[:10]
        raise NonFiniteError(
            f"non-finite per-example {what} (NaN/Inf) for example ids {who}: nothing was written for this "
            "checkpoint. Check those inputs and labels, lower the learning rate or add gradient clipping, "
            "or exclude the examples from attribution_data."
        )


__all__ = ["NonFiniteError", "_check_finite", "_check_losses"]
