"""Per-example losses: the quantity whose gradient is logged, one value per example.

Sequence losses are SUMMED over supervised tokens (methods.md §14.4): a mean would rescale every
example by 1/T_i and reorder examples of different lengths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""``loss_fn(model, batch) -> Tensor[B]``: per-example losses of a collated batch."""


def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy.

    Args:
        logits: ``[B, C]``.
        targets: ``[B]`` class indices.

    Returns:
        ``[B]`` losses.

    Example:
        >>> classification_loss(torch.zeros(2, 4), torch.tensor([0, 3])).round(decimals=4)
        tensor([1.3863, 1.3863])
    """
    return F.cross_entropy(logits.float(), targets, reduction="none")


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, shift: bool = True
) -> torch.Tensor:
    """Per-sequence next-token loss, summed over supervised tokens.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` token ids; ``ignore_index`` marks prompt and padding positions.
        ignore_index: label value excluded from the loss.
        shift: predict ``labels[:, t+1]`` from ``logits[:, t]`` (Hugging Face convention).

    Returns:
        ``[B]`` summed token losses (0 for a sequence with no supervised token).

    Example:
        >>> causal_lm_loss(torch.zeros(1, 3, 2), torch.tensor([[0, 1, -100]])).round(decimals=4)
        tensor([0.6931])
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    b, t, v = logits.shape
    tok = F.cross_entropy(
        logits.reshape(b * t, v).float(),
        labels.reshape(b * t),
        ignore_index=ignore_index,
        reduction="none",
    )
    return tok.view(b, t).sum(dim=1)


def resolve_loss_fn(model: nn.Module, loss_fn: LossFn | None) -> LossFn:
    """The per-example loss to differentiate: ``loss_fn`` if given, else ``model.per_example_loss``."""
    if loss_fn is not None:
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable as loss_fn(model, batch) -> Tensor[B], got {loss_fn!r}"
            )
        return loss_fn
    if callable(getattr(model, "per_example_loss", None)):
        return _call_per_example_loss
    raise ValueError(
        f"{type(model).__name__} has no per_example_loss(batch) -> Tensor[B]. Define it on the LightningModule "
        "(sequence losses summed over supervised tokens; see lightning_tda.capture.losses helpers) or pass "
        "loss_fn=lambda model, batch: ... to GradientLogger / AttributionStore.attribute."
    )


def _call_per_example_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return model.per_example_loss(batch)
