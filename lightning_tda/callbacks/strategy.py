"""The interface between ``GradientLogger``'s Lightning hooks and how a mode logs.

A :class:`LoggingStrategy` gets every training hook the logger receives; each default does
nothing. :class:`~lightning_tda.callbacks.sweep.SweepLogging` sweeps the attribution data at the
schedule's triggers, :class:`~lightning_tda.callbacks.in_flight_logging.InFlightLogging` records
the training batches themselves.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch

from lightning_tda.callbacks.context import FitContext


class LoggingStrategy:
    """How one logging mode turns a fit into store checkpoints (no-op hooks by default)."""

    mode: ClassVar[str]
    schema_version: ClassVar[int]
    """The store layout version this mode writes (and expects on resume)."""

    def __init__(self) -> None:
        self._ctx: FitContext | None = None
        self._checked = False

    @property
    def ctx(self) -> FitContext:
        if self._ctx is None:
            raise RuntimeError("the logging strategy is used before GradientLogger.setup")
        return self._ctx

    def bind(self, ctx: FitContext, pl_module: pl.LightningModule) -> None:
        """Start a fit with ``ctx`` (``setup``); raise here for a model this mode cannot log."""
        self._ctx = ctx
        self._checked = False

    def run_metadata(self, trainer: pl.Trainer) -> dict[str, Any]:
        """The mode's root attributes, beyond the shared ones."""
        return {}

    def on_resume(self, trainer: pl.Trainer) -> None:
        """Rank zero, after a resumed fit pruned the store."""

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``on_train_start``, after the run metadata is written."""

    def first_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """``on_train_batch_start``: run :meth:`check` on the fit's first batch (once per fit)."""
        if not self._checked:
            self._checked = True
            self.check(trainer, pl_module, batch)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Fail in seconds: ids, loss and projection on one batch, before the first optimizer step."""

    def batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        pass

    def before_backward(self, trainer: pl.Trainer) -> None:
        pass

    def after_backward(self, trainer: pl.Trainer) -> None:
        pass

    def before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        pass

    def batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def flush(self) -> None:
        """Put everything logged so far on disk (a Lightning checkpoint is being saved)."""

    def on_exception(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``on_train_end``, before the final root attributes are written."""
