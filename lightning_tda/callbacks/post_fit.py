"""The post-fit stage protocol: work the logger hands its store to at the end of a fit (e.g. STRIDE).

The callbacks layer does not import the stages it runs: any object with ``run_after_fit`` will do.
:class:`lightning_tda.stride.StrideConfig` implements it (``GradientLogger(stride=StrideConfig(...))``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl

from lightning_tda.capture.losses import LossFn
from lightning_tda.errors import ConfigError


@runtime_checkable
class PostFitStage(Protocol):
    """Runs once on rank zero in ``on_fit_end``, after the last checkpoint is logged."""

    def run_after_fit(
        self,
        path: Path,
        pl_module: pl.LightningModule,
        data: Any,
        *,
        trainer_kwargs: dict[str, Any] | None,
        loss_fn: LossFn | None,
        collate_fn: Any,
    ) -> Any:
        """Work on the finished store ``path`` with the trained ``pl_module`` and the logged ``data``
        (the attribution Dataset/DataLoader); ``trainer_kwargs`` configure a Trainer of its own."""


def check_post_fit_stage(stage: Any) -> PostFitStage | None:
    """``stage`` if it is ``None`` or implements :class:`PostFitStage`; else a :class:`ConfigError`."""
    if stage is not None and not callable(getattr(stage, "run_after_fit", None)):
        raise ConfigError(
            "stride must implement run_after_fit(path, pl_module, data, *, trainer_kwargs, loss_fn, "
            f"collate_fn), e.g. lightning_tda.stride.StrideConfig(...); got {type(stage).__name__}"
        )
    return stage
