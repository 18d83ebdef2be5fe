"""The post-fit stage protocol: work the logger hands its store to at the end of a fit (e.g. STRIDE).

The callbacks layer does not import the stages it runs: any object with ``run_after_fit`` will do.
:class:`lightning_tda.stride.StrideConfig` implements it (``GradientLogger(stride=StrideConfig(...))``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl

from lightning_tda.capture.losses import LossFn
from lightning_tda.capture.task import Task
from lightning_tda.errors import ConfigError


@runtime_checkable
class PostFitStage(Protocol):
    """Checked at ``setup`` (fail in seconds), run once on rank zero in ``on_fit_end``, after the
    last checkpoint is logged."""

    def check_before_fit(self, pl_module: pl.LightningModule, *, task: Task | None) -> None:
        """Raise now if the stage will not be able to run on this module and task (e.g. STRIDE
        without declared targets), instead of after training."""

    def run_after_fit(
        self,
        path: Path,
        pl_module: pl.LightningModule,
        data: Any,
        *,
        trainer_kwargs: dict[str, Any] | None,
        loss_fn: LossFn | None,
        collate_fn: Any,
        task: Task | None,
    ) -> Any:
        """Work on the finished store ``path`` with the trained ``pl_module`` and the logged ``data``
        (the attribution Dataset/DataLoader); ``trainer_kwargs`` configure a Trainer of its own;
        ``task``: the logger's explicit task (``None``: the one the store records)."""


def check_post_fit_stage(stage: Any) -> PostFitStage | None:
    """``stage`` if it is ``None`` or implements :class:`PostFitStage`; else a :class:`ConfigError`."""
    if stage is not None and not isinstance(stage, PostFitStage):
        raise ConfigError(
            "stride must implement check_before_fit(pl_module, *, task) and run_after_fit(path, "
            "pl_module, data, *, trainer_kwargs, loss_fn, collate_fn, task), e.g. "
            f"lightning_tda.stride.StrideConfig(...); got {type(stage).__name__}"
        )
    return stage
