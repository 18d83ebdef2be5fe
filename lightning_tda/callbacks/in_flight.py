"""The in-flight half of ``GradientLogger(mode="in_flight")``: micro-batches in, one row set per step out.

Lightning's automatic optimization runs, per micro-batch, ``on_train_batch_start`` -> ``training_step``
(forward) -> ``on_before_backward`` -> backward -> ``on_after_backward``, and after the last micro-batch
of an accumulation window ``on_before_optimizer_step`` -> ``optimizer.step()``. The recorder starts the
capture at batch start, reads the loss scaler's scale before backward, unscales and keeps the rows
after backward, and hands the step's merged rows to the logger before the optimizer step, while the
weights are still ``θ_t``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_info

from lightning_tda.capture.checks import _check_finite
from lightning_tda.capture.in_flight import InFlightCapture, Reduction, reduction_factor
from lightning_tda.capture.layers import LayerSpec
from lightning_tda.capture.projection import ProjectionConfig
from lightning_tda.data.ids import ExampleIds
from lightning_tda.errors import NonFiniteError


def loss_scale(trainer: Any) -> float:
    """The factor a mixed-precision loss scaler (``GradScaler``) applies before backward; 1 without one."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None:
        return 1.0
    enabled = getattr(scaler, "is_enabled", None)
    if callable(enabled) and not enabled():
        return 1.0
    return float(scaler.get_scale())


def merge_rows(ids: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort by id and sum the rows of an example that occurs twice in one step (both were in the update).

    Args:
        ids: ``[M]`` int64.
        rows: ``[M, D]``.

    Returns:
        ``(unique ascending ids [B], rows [B, D])``.
    """
    uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    if len(uniq) == len(ids):
        return uniq, rows[torch.argsort(ids).to(rows.device)]
    out = rows.new_zeros(len(uniq), rows.shape[1])
    out.index_add_(0, inverse.to(rows.device), rows)
    return uniq, out


@dataclass
class StepRows:
    """One optimizer step's rows as captured: ``ids [M]`` and ``rows [M, D]`` of its micro-batches, in
    order, on the training device (an id twice when the window held the example twice); ``scaled``:
    a loss scaler's scale was applied (a non-finite row then means the scaler skips the step)."""

    ids: torch.Tensor
    rows: torch.Tensor
    scaled: bool


def finished_rows(
    step: int, ids: torch.Tensor, rows: torch.Tensor, scaled: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Merged host rows of a step, or ``None`` for a step a GradScaler skips (non-finite scaled rows).

    Raises:
        NonFiniteError: non-finite rows without a loss scaler (naming the examples).
    """
    try:
        _check_finite(rows, ids, "in-flight gradient")
    except NonFiniteError:
        if scaled:  # the GradScaler skips this optimizer step: log nothing for it
            rank_zero_info(
                f"GradientLogger: step {step} has non-finite scaled gradients; the GradScaler skips it, "
                "so it is not logged"
            )
            return None
        raise
    return merge_rows(ids, rows)


class InFlightRecorder:
    """Per-micro-batch capture and per-optimizer-step rows for ``GradientLogger(mode="in_flight")``.

    Args:
        reduction: how ``training_step``'s loss reduces ``per_example_loss`` over a micro-batch
            (see :func:`lightning_tda.capture.in_flight.reduction_factor`).
        example_ids: where the training batches keep their ids (``GradientLogger(example_ids=...)``);
            the batch itself is left as the user's loader yields it.
    """

    def __init__(self, reduction: Reduction, example_ids: ExampleIds | None = None) -> None:
        self.reduction = reduction
        self.example_ids = example_ids if example_ids is not None else ExampleIds()
        self.capture: InFlightCapture | None = None
        self._window: int | None = None  # global step of the accumulation window being recorded
        self._ids: list[torch.Tensor] = []
        self._rows: list[torch.Tensor] = []
        self._scaled = False  # a micro-batch of the window ran under a loss scale != 1
        self._batch_ids: torch.Tensor | None = None
        self._c = 1.0
        self._scale = 1.0
        self.micro_batches = 0

    def attach(
        self,
        model: torch.nn.Module,
        layers: list[LayerSpec],
        config: ProjectionConfig,
        device: torch.device,
    ) -> None:
        self.detach()
        self.capture = InFlightCapture(model, layers, config, device)
        self.capture.attach()

    def detach(self) -> None:
        if self.capture is not None:
            self.capture.detach()
        self.capture = None

    def batch_start(self, batch: Any, step: int, device: torch.device) -> None:
        """Start capturing a micro-batch of the window of optimizer step ``step``."""
        if self.capture is None:
            raise MisconfigurationException(
                "GradientLogger(mode='in_flight') was not attached to the model"
            )
        if self._window != step:
            self._window, self._scaled, self.micro_batches = step, False, 0
            self._ids.clear()
            self._rows.clear()
        ids = self.example_ids(batch)
        self._batch_ids = ids.detach()
        self._c = reduction_factor(self.reduction, batch, len(ids))
        self._scale = 1.0
        self.capture.start(len(ids), device)

    def before_backward(self, trainer: Any) -> None:
        if self.capture is not None and self.capture.active:
            self._scale = loss_scale(trainer)

    def after_backward(self, trainer: Any) -> None:
        """Unscale and keep the micro-batch's rows ``rows · A / (c · S)`` (on the device; their
        finiteness is checked by the writer, so no host synchronisation here)."""
        if self.capture is None or not self.capture.active:
            return
        factor = float(trainer.accumulate_grad_batches) / (self._c * self._scale)
        rows = self.capture.finish(factor)
        if rows is None:
            return
        self._scaled = self._scaled or self._scale != 1.0
        self._ids.append(self._batch_ids)
        self._rows.append(rows)
        self.micro_batches += 1

    def batch_end(self) -> None:
        """A micro-batch ended; drop a capture that got no backward."""
        if self.capture is not None and self.capture.active:
            self.capture.abort()

    def take_step(self, step: int) -> StepRows | None:
        """The rows of optimizer step ``step``'s window (unmerged, on the device), or ``None``."""
        if self._window != step or not self._rows:
            self._ids.clear()
            self._rows.clear()
            return None
        out = StepRows(torch.cat(self._ids), torch.cat(self._rows), self._scaled)
        self._ids.clear()
        self._rows.clear()
        return out
