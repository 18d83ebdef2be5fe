"""``GradientLogger(mode="in_flight")``: every logged optimizer step becomes a batch checkpoint.

The :class:`~lightning_tda.callbacks.in_flight.InFlightRecorder` captures the user's own
``training_step`` forward and backward; before the optimizer step (weights still ``θ_t``) this
strategy keeps the step's merged rows, learning rates, state and query rows, and writes them in
groups of ``flush_every`` steps (docs/store.md "In-flight stores").
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_tda.callbacks.config import describe
from lightning_tda.callbacks.context import CHECK_BATCH_SIZE, FitContext, trainable_state
from lightning_tda.callbacks.distributed import full_model, is_distributed, is_sharded
from lightning_tda.callbacks.in_flight import InFlightRecorder
from lightning_tda.callbacks.in_flight_steps import LoggedStep, StatePolicy, write_logged_steps
from lightning_tda.callbacks.optimizer_state import current_lrs
from lightning_tda.callbacks.step_gather import StepRowGather
from lightning_tda.callbacks.strategy import LoggingStrategy
from lightning_tda.capture.featurize import Featurizer, preserved_training_state
from lightning_tda.capture.first_batch import first_examples
from lightning_tda.capture.in_flight import Reduction
from lightning_tda.capture.layers import row_width
from lightning_tda.errors import ConfigError
from lightning_tda.store import schema
from lightning_tda.store.background import BackgroundWriter
from lightning_tda.store.batches import rebuild_example_ids


class InFlightLogging(LoggingStrategy):
    """Log the training batches themselves (no extra pass over training data).

    Args:
        reduction: how the training loss reduces ``per_example_loss`` (``InFlightConfig.reduction``).
    """

    mode: ClassVar[str] = "in_flight"
    schema_version: ClassVar[int] = schema.IN_FLIGHT_SCHEMA_VERSION

    def __init__(self, reduction: Reduction) -> None:
        super().__init__()
        self.recorder = InFlightRecorder(reduction)
        self._pending: list[LoggedStep] = []
        self._query_ids: Any = None
        self._writer: BackgroundWriter | None = None
        self._states = StatePolicy(False, 0, 0)
        self._gather: StepRowGather | None = None  # several processes: every rank's rows, to rank 0
        self._writes = True  # this process writes the store (rank zero)
        self._sharded = False  # FSDP1/FSDP2: the saved state is copied out of gathered parameters

    @staticmethod
    def check_data(attribution_data: Any) -> None:
        if attribution_data is not None:
            raise ConfigError(
                "GradientLogger(mode='in_flight', attribution_data=...): in-flight mode logs the training "
                "batches themselves; drop attribution_data (the store's examples are the example ids seen "
                "in training) or use mode='sweep'."
            )

    def bind(self, ctx: FitContext, pl_module: pl.LightningModule) -> None:
        if not getattr(pl_module, "automatic_optimization", True):
            raise ConfigError(
                "GradientLogger(mode='in_flight') reads the backward Lightning runs in automatic optimization; "
                "this module uses manual optimization. Use mode='sweep'."
            )
        super().bind(ctx, pl_module)
        self.recorder.example_ids = ctx.example_ids

    def run_metadata(self, trainer: pl.Trainer) -> dict[str, Any]:
        return {
            "in_flight_reduction": describe(self.ctx.config.in_flight.reduction),
            "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
        }

    def on_resume(self, trainer: pl.Trainer) -> None:
        if self.ctx.path.exists():
            rebuild_example_ids(self.ctx.path)

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ctx = self.ctx
        self._pending.clear()
        self.recorder.attach(pl_module, ctx.layers, ctx.config.projection, pl_module.device)
        state_bytes = sum(t.numel() * t.element_size() for t in trainable_state(pl_module).values())
        row_bytes = row_width(ctx.layers) * schema.storage_itemsize(ctx.writer.storage_dtype)
        self._states = StatePolicy(ctx.config.capture.save_state, state_bytes, row_bytes)
        flight = ctx.config.in_flight
        self._close_writer()
        self._writes, self._sharded = trainer.is_global_zero, is_sharded(trainer.strategy)
        self._gather = StepRowGather(trainer.strategy) if is_distributed(trainer) else None
        background = flight.background_for(pl_module.device) and self._writes
        self._writer = BackgroundWriter(flight.max_pending) if background else None

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Fail in seconds on the first training batch: its ids, the task's loss and the projection."""
        # MissingExampleIdsError naming GradientLogger(example_ids=...) and IndexedDataset:
        ids = self.ctx.example_ids(batch)
        batch, ids = first_examples(batch, ids, CHECK_BATCH_SIZE)  # a few examples fail as clearly
        with self._full_weights(trainer, pl_module, True), preserved_training_state(pl_module):
            self.ctx.check_batch(trainer, pl_module, batch, ids)

    # -- the recorder's hooks -------------------------------------------------------------
    def batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        step = trainer.global_step
        if self._due(step):
            self.recorder.batch_start(batch, step, pl_module.device)

    def before_backward(self, trainer: pl.Trainer) -> None:
        self.recorder.before_backward(trainer)

    def after_backward(self, trainer: pl.Trainer) -> None:
        self.recorder.after_backward(trainer)

    def before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._keep_step(trainer, pl_module)

    def batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.recorder.batch_end()
        if self._writer is not None:
            self._writer.check()  # a failed write (or non-finite rows) surfaces here, lazily
        if len(self._pending) >= self.ctx.config.in_flight.flush_every:
            self._submit()

    def on_exception(self) -> None:
        self.recorder.detach()
        try:
            self.flush()  # the steps finished before the exception are valid
        except Exception:  # noqa: BLE001 - the original exception is the one to report
            rank_zero_info("GradientLogger: could not write the last in-flight steps")
        finally:
            self._close_writer(raise_error=False)

    def teardown(self) -> None:
        self.recorder.detach()
        self._close_writer(raise_error=False)

    def train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.recorder.detach()
        self.flush()
        self._close_writer()

    # -- steps ----------------------------------------------------------------------------
    def _due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (weights after ``step`` updates) is logged."""
        logged = self.ctx.state.logged_steps
        if logged and step <= logged[-1]:
            return False  # already logged (steps are logged in increasing order)
        schedule = self.ctx.config.schedule
        n = schedule.every_n_train_steps
        return step % n == 0 if n is not None else schedule.step_due(step)

    def _keep_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the optimizer step: the weights are still ``θ_t``; keep the step's rows and state
        (host copies queued, no synchronisation with the device). Several processes: every rank's
        rows are gathered (a collective of every rank) and rank zero keeps the step."""
        ctx, step = self.ctx, trainer.global_step
        taken = self.recorder.take_step(step)
        if self._gather is not None:
            taken = self._gather(step, taken, pl_module.device)
        if taken is None:
            return
        save = self._states.due(step, taken.ids.shape[0])  # the same decision on every rank
        has_queries = ctx.query_data is not None
        state = queries = None
        with self._full_weights(trainer, pl_module, save or has_queries):
            if save and self._writes:  # FSDP: a copy, the gathered storage is freed after
                state = trainable_state(pl_module, copy=self._sharded)
            if has_queries and self._writes:
                queries = self._queries(trainer, pl_module)
        if self._writes:
            attrs = self._step_attrs(trainer, step)
            self._pending.append(LoggedStep.keep(step, taken, attrs, state, queries))
        ctx.state.mark_logged(step)

    def _full_weights(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, needed: bool
    ) -> Any:
        """FSDP and ``needed``: the parameters all-gathered for the block, forwards rank-local (a
        collective of every rank, see :func:`~lightning_tda.callbacks.distributed.full_model`);
        else a no-op."""
        if needed:  # (a no-op without FSDP)
            return full_model(trainer, pl_module)
        return contextlib.nullcontext()

    def _step_attrs(self, trainer: pl.Trainer, step: int) -> dict[str, Any]:
        lrs = current_lrs(trainer.optimizers)
        logged = self.ctx.state.logged_steps
        attrs = {
            "epoch": trainer.current_epoch,
            "trigger": "in_flight",
            "lr_sum": lrs,  # this one step's learning rates: the rows stand for exactly its update
            "lr_cumsum": list(self.ctx.state.lr_cumsum),
            "lr_at_checkpoint": lrs,
            "steps_since_previous": step - (logged[-1] if logged else -1),
            "micro_batches": self.recorder.micro_batches,
            "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
        }
        if trainer.world_size > 1:
            attrs["world_size"] = trainer.world_size
        if self._states.last is not None and self._states.save_state is not False:
            attrs[schema.STATE_STEP] = self._states.last
        return attrs

    def _queries(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected query gradients ``[Q, D]`` and losses ``[Q]`` at ``θ_t`` (eval mode; RNG, modes
        and ``.grad`` preserved)."""
        ctx = self.ctx
        qloader = ctx.loader(trainer, ctx.query_data)
        feat = Featurizer(
            pl_module,
            ctx.layers,
            ctx.config.projection,
            ctx.loss_fn,
            pl_module.device,
            require_ids=False,
            example_ids=ctx.example_ids,
        )
        rows, losses, ids = [], [], []
        with preserved_training_state(pl_module):
            for batch in qloader:
                fb = ctx.featurize(trainer, feat, batch)
                rows.append(fb.rows)
                losses.append(fb.losses)
                ids.append(fb.ids)
        if self._query_ids is None:
            n = sum(len(r) for r in rows)
            self._query_ids = (
                torch.arange(n) if any(i is None for i in ids) else torch.cat(ids).cpu()
            )
        return torch.cat(rows), torch.cat(losses)

    def _submit(self) -> None:
        """Hand the pending steps to the writer (or write them now without one): one commit."""
        if not self._pending:
            return
        ctx = self.ctx
        pending, self._pending = self._pending, []
        job = (ctx.path, ctx.writer.storage_dtype, pending, self._query_ids, ctx.verbose)
        if self._writer is None:
            write_logged_steps(*job)
        else:
            self._writer.submit(write_logged_steps, *job)

    def flush(self) -> None:
        """Write the pending in-flight steps and wait until every logged step is on disk."""
        self._submit()
        if self._writer is not None:
            self._writer.drain()

    def _close_writer(self, raise_error: bool = True) -> None:
        writer, self._writer = getattr(self, "_writer", None), None
        if writer is None:
            return
        try:
            writer.close()
        except Exception:
            if raise_error:
                raise
