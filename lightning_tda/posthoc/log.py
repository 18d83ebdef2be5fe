"""``log_checkpoints``: sweep the saved Lightning checkpoints of a finished run into one store.

Each checkpoint is restored by Lightning itself (``Trainer.fit(model, ckpt_path=...)``: weights from
its ``state_dict``, optimizer state from ``optimizer_states``, LR schedulers, loop counters), and at
``on_train_start`` the :class:`~lightning_tda.GradientLogger` sweeps it exactly as it would have
during the fit at that step: the store is continued checkpoint after checkpoint like a resumed
fit, with the learning-rate sums of :mod:`lightning_tda.posthoc.lr_replay`; then the fit is
stopped before its first batch. The model is used as it is (never wrapped).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, Dataset

from lightning_tda.callbacks.gradient_logger import GradientLogger
from lightning_tda.callbacks.schedule import ScheduleConfig
from lightning_tda.errors import ConfigError, StoreError
from lightning_tda.posthoc.ckpt_files import CheckpointFile, checkpoint_files
from lightning_tda.posthoc.lr_replay import LrSums, lr_sums
from lightning_tda.store import schema

LOGGED_FROM_CHECKPOINTS = "logged_from_checkpoints"
"""Root attribute: JSON ``{"checkpoints": {step: file name}, "lr_sums": method, "lr_note": why}``."""

REFUSED = (
    "mode",
    "schedule",
    "every_n_train_steps",
    "every_n_epochs",
    "at_steps",
    "log_at_fit_start",
    "log_at_fit_end",
    "stride",
    "stride_trainer_kwargs",
)
"""Logger keywords the checkpoint files decide (or that need a live fit)."""

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
}
IGNORED_WARNINGS = (
    ".*callbacks used to create the checkpoint.*",  # the fit's own GradientLogger, ModelCheckpoint
    ".*resuming from a checkpoint that ended before the epoch ended.*",  # no batch is trained on
)
TRAINER_FIXED = ("callbacks", "max_epochs", "max_steps", "max_time", "min_epochs", "min_steps")


@dataclass
class _Run:
    """What the per-checkpoint sweeps share."""

    path: Path
    data: tuple[Any, Any]
    logger_kwargs: dict[str, Any]
    ckpts: list[CheckpointFile]
    end: int | None = None
    sums: LrSums | None = None
    logged: list[int] = field(default_factory=list)


class _CheckpointSweep(pl.Callback):
    """Drives one :class:`GradientLogger` through a fit restored from checkpoint ``k`` of ``run``."""

    def __init__(self, run: _Run, k: int) -> None:
        self.run, self.k, ck = run, k, run.ckpts[k]
        schedule = (
            ScheduleConfig(every_n_epochs=1)
            if ck.at_epoch_end
            else ScheduleConfig(at_steps=[ck.global_step])
        )
        self.logger = GradientLogger(run.path, *run.data, schedule=schedule, **run.logger_kwargs)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.logger.setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            self._sweep(trainer, pl_module)
        finally:
            trainer.should_stop = True  # restored and swept: no training batch runs

    def _sweep(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run, k, ck = self.run, self.k, self.run.ckpts[self.k]
        if trainer.global_step != ck.global_step:
            raise StoreError(
                f"{ck.path} restored to step {trainer.global_step}, not {ck.global_step}"
            )
        if run.sums is None:
            run.sums = lr_sums(trainer, pl_module, run.ckpts, run.end)
        prev = run.ckpts[k - 1].global_step if k else 0
        zero = [0.0] * len(run.sums.cumsums[ck.global_step])
        state = {
            "lr_cumsum": run.sums.cumsums[ck.global_step],
            "lr_cumsum_at_last": run.sums.cumsums[prev] if k else zero,
            "step_at_last": prev,
            "logged_steps": list(run.logged),
        }
        if k:
            self.logger.load_state_dict(state)  # continue the store like a resumed fit
        self.logger.on_train_start(trainer, pl_module)
        self.logger.load_state_dict(state)
        if ck.at_epoch_end:  # the epoch as the fit saw it when the checkpoint was saved
            trainer.fit_loop.epoch_progress.current.completed = ck.epoch
            self.logger.on_train_epoch_end(trainer, pl_module)
        else:
            self.logger.on_train_batch_end(trainer, pl_module, None, None, 0)
        run.logged.append(ck.global_step)
        if k == len(run.ckpts) - 1:
            self.logger.on_train_end(trainer, pl_module)  # lr_cumsum_final, final_global_step
            end = max(run.sums.cumsums)  # the fit's end: the last checkpoint unless fit_end_step
            final = {"lr_cumsum_final": run.sums.cumsums[end], "final_global_step": end}
            self.logger.writer.set_root_attrs({**final, LOGGED_FROM_CHECKPOINTS: _provenance(run)})

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.logger.on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.logger.teardown(trainer, pl_module, stage)


def _provenance(run: _Run) -> str:
    sums = run.sums
    return schema.to_json(
        {
            "checkpoints": {str(c.global_step): c.path.name for c in run.ckpts},
            "lr_sums": sums.method if sums else None,
            "lr_note": sums.note if sums else "",
        }
    )


def _check_arguments(
    model: pl.LightningModule,
    logger_kwargs: dict[str, Any],
    trainer_kwargs: dict[str, Any] | None,
    no_data: bool,
) -> None:
    """Refuse what the checkpoint files decide, what the restoring fits set, and missing train data."""
    bad = sorted(set(logger_kwargs) & set(REFUSED))
    if bad:
        raise ConfigError(
            f"log_checkpoints takes no {', '.join(bad)}: the saved .ckpt files decide which steps are "
            "logged (in sweep mode); fit STRIDE afterwards with lightning_tda.stride.fit"
        )
    fixed = sorted(set(trainer_kwargs or {}) & set(TRAINER_FIXED))
    if fixed:
        raise ConfigError(
            f"trainer_kwargs may not set {', '.join(fixed)} (log_checkpoints sets them)"
        )
    if no_data and not is_overridden("train_dataloader", model):
        raise ConfigError(
            "log_checkpoints needs the fit's training data (train_dataloaders= or datamodule=): its "
            "length gives the epoch boundaries of the learning-rate schedule; no batch is trained on"
        )


def log_checkpoints(
    path: str | os.PathLike,
    model: pl.LightningModule,
    ckpt_paths: str | os.PathLike | Iterable[str | os.PathLike],
    attribution_data: Dataset | DataLoader | None = None,
    query_data: Dataset | DataLoader | None = None,
    *,
    train_dataloaders: Any = None,
    datamodule: pl.LightningDataModule | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    fit_end_step: int | None = None,
    **logger_kwargs: Any,
) -> Path:
    """Log a finished run from its saved Lightning checkpoints into one store at ``path``.

    Every ``.ckpt`` of ``ckpt_paths`` (files or a directory; sorted by global step, one per step)
    becomes one store checkpoint, written as :class:`~lightning_tda.GradientLogger` would have
    written it during the fit at that step: the sweep of ``attribution_data`` at the saved weights,
    Adam moments and preconditioned rows from the saved optimizer state, K-FAC factors, trainable
    state, and the learning-rate sums since the previous checkpoint (replayed from
    ``configure_optimizers``, else approximated; see :mod:`lightning_tda.posthoc.lr_replay`).

    Args:
        path: the store to write (``overwrite=True`` replaces one holding checkpoints).
        model: the trained LightningModule's class, built as for the fit (any weights: each
            checkpoint is loaded into it in turn; it ends holding the last one).
        ckpt_paths: the ``.ckpt`` files, or a directory of them.
        attribution_data: training examples to attribute (``None``: the training set, in order).
        query_data: optional queries to log at every checkpoint.
        train_dataloaders: the fit's training data (or ``datamodule``; not needed when ``model``
            defines ``train_dataloader``): its length gives the epoch boundaries the schedule
            replay needs. No training batch is run.
        datamodule: instead of ``train_dataloaders``.
        trainer_kwargs: ``Trainer`` arguments of the restoring fits: ``accelerator``,
            ``precision``, and the fit's ``accumulate_grad_batches`` / ``limit_train_batches``.
        fit_end_step: the global step the fit ended at when it trained on after its last
            checkpoint (the store's ``lr_cumsum_final``, used by ``interval="next"`` weights, sums
            the rates up to it); default: the last checkpoint's step.
        **logger_kwargs: :class:`~lightning_tda.GradientLogger` keywords (``rank``, ``preset``,
            ``curvature``, ``loss_fn``, ``batch_size``, ``collate_fn``, ``overwrite`` ...); the
            schedule comes from the checkpoints.

    Returns:
        ``path``, to open with :class:`~lightning_tda.AttributionStore`.
    """
    _check_arguments(
        model, logger_kwargs, trainer_kwargs, train_dataloaders is None and datamodule is None
    )
    ckpts = checkpoint_files(ckpt_paths)
    run = _Run(Path(path), (attribution_data, query_data), logger_kwargs, ckpts, fit_end_step)
    for k, ck in enumerate(run.ckpts):
        trainer = pl.Trainer(
            **{**TRAINER_DEFAULTS, **(trainer_kwargs or {})},
            callbacks=[_CheckpointSweep(run, k)],
            max_epochs=-1,
            max_steps=-1,
        )
        with warnings.catch_warnings():
            for message in IGNORED_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            trainer.fit(model, train_dataloaders, datamodule=datamodule, ckpt_path=str(ck.path))
        if ck.global_step not in run.logged:
            raise StoreError(
                f"the fit restored from {ck.path} did not start, so nothing was swept: the training "
                "data has no training batch (an empty train_dataloaders, limit_train_batches=0?)"
            )
    return run.path
