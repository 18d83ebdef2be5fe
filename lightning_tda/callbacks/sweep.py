"""``GradientLogger(mode="sweep")``: at each trigger, sweep the attribution data at the current weights.

Each checkpoint runs one extra forward and backward per batch of ``attribution_data`` (eval mode;
RNG streams, module modes, ``.grad`` and optimizer state are restored afterwards) and writes the
projected rows, optional queries, K-FAC factors, optimizer moments and trainable state. Under DDP
each rank sweeps a contiguous shard that rank zero merges (:mod:`lightning_tda.callbacks.distributed`).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lightning_tda.callbacks.context import FitContext, trainable_state
from lightning_tda.callbacks.distributed import (
    copy_shard_rows,
    full_model,
    is_distributed,
    is_fsdp1,
    is_fsdp2,
    is_sharded,
    reduce_covariances,
    shard_loader,
    shard_path,
)
from lightning_tda.callbacks.optimizer_state import (
    adam_scales,
    current_lrs,
    factored_second_moments,
    optimizer_summary,
)
from lightning_tda.callbacks.strategy import LoggingStrategy
from lightning_tda.capture.basis import Bases, CachedBatch, fit_pca_bases, reuse_budget
from lightning_tda.capture.featurize import Featurizer, preserved_training_state
from lightning_tda.capture.layers import DENSE, row_width
from lightning_tda.store import schema
from lightning_tda.store.writer import StoreWriter


class SweepLogging(LoggingStrategy):
    """Sweep ``attribution_data`` at the schedule's steps, epochs and fit start/end."""

    mode: ClassVar[str] = "sweep"
    schema_version: ClassVar[int] = schema.SCHEMA_VERSION

    def __init__(self) -> None:
        super().__init__()
        self._bases: Bases | None = None

    def bind(self, ctx: FitContext, pl_module: pl.LightningModule) -> None:
        super().bind(ctx, pl_module)
        self._bases = None  # read from the store (resume) or fitted at the first checkpoint

    # -- triggers -------------------------------------------------------------------------
    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ctx.config.schedule.log_at_fit_start:
            self.log(trainer, pl_module, "fit_start")

    def batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ctx.config.schedule.step_due(trainer.global_step):
            self.log(trainer, pl_module, "step")

    def epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ctx.config.schedule.epoch_due(trainer.current_epoch):
            self.log(trainer, pl_module, "epoch")

    def train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ctx.config.schedule.log_at_fit_end:
            self.log(trainer, pl_module, "fit_end")

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Fail in seconds on the first batch of the attribution data (not the training batch; at most
        ``CHECK_BATCH_SIZE`` examples): its ids (or positions), the task's loss and the projection, at
        the starting weights."""
        ctx = self.ctx
        with full_model(trainer, pl_module), preserved_training_state(pl_module):
            first = next(iter(ctx.check_loader(trainer)), None)
            if first is None:
                return
            ids, user = ctx.split(first)
            user = trainer.strategy.batch_to_device(user)
            positional = ids is not None
            ids = ids if positional else ctx.example_ids(user)
            ctx.check_batch(trainer, pl_module, user, ids, positional)

    # -- one checkpoint -------------------------------------------------------------------
    def log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, trigger: str) -> None:
        """Sweep and write the checkpoint of the current global step (once per step)."""
        if trainer.global_step in self.ctx.state.logged_steps:
            return
        if is_distributed(trainer):
            self._log_distributed(trainer, pl_module, trigger)
            return
        # FSDP1 in one process: the module seen unwrapped, with its full Adam state, for the sweep
        capture = self.ctx.config.capture
        fsdp1 = is_fsdp1(trainer.strategy)
        with (
            full_model(trainer, pl_module, capture.optimizer_state)
            if fsdp1
            else contextlib.nullcontext()
        ):
            self._log_single(trainer, pl_module, trigger)

    def _log_single(self, trainer: pl.Trainer, pl_module: pl.LightningModule, trigger: str) -> None:
        ctx, step, t0 = self.ctx, trainer.global_step, time.perf_counter()
        loader = ctx.attribution_loader(trainer)
        qloader = ctx.loader(trainer, ctx.query_data) if ctx.query_data is not None else None
        scales = self._scales(trainer, pl_module)
        kept: list[CachedBatch | None] = []  # the basis pass's batches, when it runs now
        feat = self._featurizer(
            pl_module, scales, self._projection_bases(trainer, pl_module, loader, kept)
        )
        n, width = len(loader.dataset), row_width(ctx.layers)
        nq = len(qloader.dataset) if qloader is not None else 0
        with (
            ctx.writer.begin_checkpoint(
                step, n, width, nq, precond=scales is not None, factors=ctx.factors
            ) as cw,
            preserved_training_state(pl_module),
        ):
            with ctx.progress(trainer, f"GradientLogger step {step}", n, "examples") as bar:
                for i, batch in enumerate(loader):
                    if i < len(kept):  # same weights, same batch: project the kept tensors
                        with self._forward_context(trainer)():  # as a recomputed batch would
                            fb, kept[i] = feat.from_kept(kept[i]), None
                    else:
                        fb = ctx.featurize(trainer, feat, batch, self._forward_context(trainer))
                    cw.write_rows(fb.ids, fb.rows, fb.losses, fb.scaled)
                    bar.advance(fb.rows.shape[0])
            self._finish_checkpoint(trainer, pl_module, cw, feat, qloader, trigger, t0)
        self._after_checkpoint(trainer, trigger, n, nq, width, t0)

    def _log_distributed(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, trigger: str
    ) -> None:
        """DDP sweep: each rank sweeps its contiguous shard into ``<store>.rank<r>.h5``; K-FAC sums are
        reduced over ranks; rank zero merges the shards into the checkpoint (dataset order) and writes
        the rank-independent rest; the shards are deleted (see :mod:`lightning_tda.callbacks.distributed`)."""
        ctx, step, strategy, t0 = (
            self.ctx,
            trainer.global_step,
            trainer.strategy,
            time.perf_counter(),
        )
        rank, world, zero = trainer.global_rank, trainer.world_size, trainer.is_global_zero
        full = ctx.attribution_loader(trainer)
        loader = shard_loader(full, rank, world, ctx.config.capture.batch_size or 64)
        fsdp2 = is_fsdp2(strategy)  # FSDP2: moments gathered on every rank, in order, first
        scales = self._scales(trainer, pl_module) if fsdp2 else None
        moments = self._moments(trainer, pl_module) if fsdp2 else None
        n, width = len(full.dataset), row_width(ctx.layers)
        shard = StoreWriter(shard_path(ctx.path, rank), ctx.writer.storage_dtype)
        shard.remove()
        with (
            full_model(trainer, pl_module, optimizer_state=ctx.config.capture.optimizer_state),
            preserved_training_state(pl_module),
        ):
            if not fsdp2:  # DDP, FSDP1: the full Adam state is in place now
                scales = self._scales(trainer, pl_module)
            feat = self._featurizer(pl_module, scales, self._shared_bases(trainer, pl_module, full))
            with shard.begin_checkpoint(
                step, len(loader.sampler), width, 0, precond=scales is not None, factors=ctx.factors
            ) as cw:
                for batch in loader:
                    fb = ctx.featurize(trainer, feat, batch, self._forward_context(trainer))
                    cw.write_rows(fb.ids, fb.rows, fb.losses, fb.scaled)
                cw.commit({"rank": rank, "world_size": world})
            if ctx.config.capture.curvature:
                reduce_covariances(strategy, feat.hooks.covariances)
            strategy.barrier("GradientLogger.sweep")
            nq = (
                self._merge_shards(trainer, pl_module, feat, scales, n, trigger, t0, moments)
                if zero
                else 0
            )
            strategy.barrier("GradientLogger.merge")
        shard.remove()
        self._after_checkpoint(trainer, trigger, n, nq, width, t0)

    def _merge_shards(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        feat: Featurizer,
        scales: Any,
        n: int,
        trigger: str,
        t0: float,
        moments: dict[str, torch.Tensor] | None = None,
    ) -> int:
        """Rank zero: copy every rank's shard rows into the checkpoint and finish it; the query count."""
        ctx, step, world = self.ctx, trainer.global_step, trainer.world_size
        qloader = ctx.loader(trainer, ctx.query_data) if ctx.query_data is not None else None
        nq = len(qloader.dataset) if qloader is not None else 0
        with ctx.writer.begin_checkpoint(
            step, n, row_width(ctx.layers), nq, precond=scales is not None, factors=ctx.factors
        ) as cw:
            for r in range(world):
                copy_shard_rows(cw, shard_path(ctx.path, r), step)
            self._finish_checkpoint(
                trainer, pl_module, cw, feat, qloader, trigger, t0, {"world_size": world}, moments
            )
        return nq

    def _finish_checkpoint(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        cw: Any,
        feat: Featurizer,
        qloader: DataLoader | None,
        trigger: str,
        t0: float,
        extra_attrs: dict[str, Any] | None = None,
        moments: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Everything of a checkpoint after the training rows: K-FAC factors, queries, optimizer
        moments (``moments``: gathered already, FSDP2), state, attributes; then commit."""
        ctx, step, optimizers = self.ctx, trainer.global_step, trainer.optimizers
        cap = ctx.config.capture
        if cap.curvature:
            cw.write_arrays(schema.KFAC, feat.take_covariances())
        if qloader is not None:
            feat.require_ids = False
            nq = len(qloader.dataset)
            with ctx.progress(trainer, f"GradientLogger step {step}", nq, "queries") as bar:
                for batch in qloader:
                    fb = ctx.featurize(trainer, feat, batch, self._forward_context(trainer))
                    cw.write_queries(fb.ids, fb.rows, fb.losses)
                    bar.advance(fb.rows.shape[0])
        if cap.optimizer_state:
            if moments is None:
                moments = self._moments(trainer, pl_module)
            cw.write_arrays(schema.OPTIMIZER, moments)
        if cap.save_state:
            # FSDP: copies, the unsharded parameters' storage is freed (resized) on reshard
            cw.write_arrays(
                schema.STATE, trainable_state(pl_module, copy=is_sharded(trainer.strategy))
            )
        cw.commit(
            {
                "epoch": trainer.current_epoch,
                "trigger": trigger,
                "lr_sum": ctx.state.lr_since_last(),
                "lr_cumsum": list(ctx.state.lr_cumsum),
                "lr_at_checkpoint": current_lrs(optimizers),
                "steps_since_previous": step - ctx.state.step_at_last,
                "optimizer": schema.to_json(optimizer_summary(optimizers)),
                "seconds": time.perf_counter() - t0,
                **(extra_attrs or {}),
            }
        )

    def _after_checkpoint(
        self, trainer: pl.Trainer, trigger: str, n: int, nq: int, width: int, t0: float
    ) -> None:
        step = trainer.global_step
        self.ctx.state.mark_logged(step)
        if self.ctx.verbose:
            rank_zero_info(
                f"GradientLogger: step {step} ({trigger}): {n} examples"
                + (f" + {nq} queries" if nq else "")
                + f", D={width}, {time.perf_counter() - t0:.2f}s -> {self.ctx.path}"
            )

    # -- featurisation --------------------------------------------------------------------
    def _moments(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        if not self.ctx.config.capture.optimizer_state:
            return {}
        return factored_second_moments(pl_module, trainer.optimizers, self.ctx.layers)

    def _scales(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if not self.ctx.config.capture.optimizer_state:
            return None
        return adam_scales(pl_module, trainer.optimizers, self.ctx.layers)

    def _featurizer(
        self, pl_module: pl.LightningModule, scales: Any, bases: Bases | None
    ) -> Featurizer:
        ctx = self.ctx
        return Featurizer(
            pl_module,
            ctx.layers,
            ctx.config.projection,
            ctx.loss_fn,
            pl_module.device,
            scales=scales[0] if scales else None,
            dense_scales=scales[1] if scales else None,
            bases=bases,
            covariances=ctx.config.capture.curvature,
            example_ids=ctx.example_ids,
            compile_loss=ctx.config.capture.compile_loss,
        )

    def _forward_context(self, trainer: pl.Trainer) -> Any:
        """The sweep's forward context: the training precision's (bf16/fp16-mixed: autocast; 32-true
        and CPU fp32: a no-op) unless ``capture.sweep_autocast`` is False (full precision)."""
        if self.ctx.config.capture.sweep_autocast:
            return trainer.precision_plugin.forward_context
        return contextlib.nullcontext

    def _shared_bases(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, full: DataLoader
    ) -> Bases | None:
        """DDP: rank zero fits (on all data) and writes the PCA bases; the other ranks read them."""
        if self.ctx.config.projection.basis != "pca":
            return None
        if self._bases is None:
            if trainer.is_global_zero:
                self._projection_bases(trainer, pl_module, full)
            trainer.strategy.barrier("GradientLogger.bases")
            if not trainer.is_global_zero:
                self._bases = self.ctx.writer.read_bases()
        return self._bases

    def _projection_bases(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        loader: DataLoader,
        kept: list | None = None,
    ) -> Bases | None:
        """The stored PCA bases; fitted (and stored) at the first checkpoint of the run. ``kept``
        receives the fitting pass's leading batches (:class:`~lightning_tda.capture.basis.CachedBatch`,
        within :func:`~lightning_tda.capture.basis.reuse_budget`) for the sweep of ``loader`` that
        follows at the same weights; left empty with a dense block."""
        ctx = self.ctx
        if ctx.config.projection.basis != "pca":
            return None
        if self._bases is None:
            self._bases = ctx.writer.read_bases()
        if self._bases is None:
            with preserved_training_state(pl_module):
                self._bases = fit_pca_bases(
                    pl_module,
                    ctx.device_batches(trainer, loader),
                    ctx.layers,
                    ctx.loss_fn,
                    ctx.config.projection.basis_examples,
                    self._forward_context(trainer),
                    example_ids=ctx.example_ids,
                    keep=None if any(s.kind == DENSE for s in ctx.layers) else kept,
                    keep_bytes=reuse_budget(pl_module.device, ctx.config.capture.basis_reuse_bytes),
                    tokens_per_example=ctx.config.projection.basis_tokens,
                    seed=ctx.config.projection.seed,
                )
            ctx.writer.write_bases(self._bases)
        return self._bases
