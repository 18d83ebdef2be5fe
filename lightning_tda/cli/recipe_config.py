"""A logged run rebuilt from the LightningCLI config that trained it (for post-fit CLI commands)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any


@dataclass
class LoggedRun:
    """``model`` and ``datamodule`` built from the config (untrained), the store path and the
    training data the GradientLogger swept."""

    model: Any
    datamodule: Any
    store_path: Any
    train_data: Any


def _instantiate(config: str) -> tuple[Any, Any, Any]:
    """``(model, datamodule, gradient_logger or None)`` from a LightningCLI config, no training."""
    from unittest import mock

    from lightning.pytorch.cli import LightningCLI

    from lightning_tda.callbacks.gradient_logger import GradientLogger

    with mock.patch.object(sys, "argv", sys.argv[:1]):  # args= is the whole command line
        cli = LightningCLI(
            args=["--config", config, "--trainer.logger", "false"],
            run=False,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=None,
        )
    loggers = [c for c in cli.trainer.callbacks if isinstance(c, GradientLogger)]
    return cli.model, cli.datamodule, (loggers[0] if loggers else None)


def load_logged_run(config: str, store: str | None = None) -> LoggedRun:
    """Rebuild the run of ``config``; ``store`` overrides the config's GradientLogger path."""
    model, dm, logger = _instantiate(config)
    path = store or (logger.path if logger is not None else None)
    if path is None:
        raise ValueError(
            f"{config} has no GradientLogger callback to take the store path from; pass --store"
        )
    data = logger.attribution_data if logger is not None else None
    if data is None:
        if dm is None:
            raise ValueError(
                f"{config} defines no data module; the training data that was logged is needed"
            )
        dm.setup("fit")
        data = dm.train_dataloader().dataset  # the logger swept it in order when not given
    return LoggedRun(model, dm, path, data)
