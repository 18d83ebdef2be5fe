"""What a logging strategy works with during one fit: the resolved config, the writer, the captured
layers, the resolved loss and the run state that Lightning checkpoints save."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from lightning_tda.callbacks.config import LoggerConfig
from lightning_tda.capture.featurize import FeatureBatch, Featurizer, preserved_rng
from lightning_tda.capture.first_batch import check_first_batch
from lightning_tda.capture.layers import LayerSpec, discover_layers
from lightning_tda.capture.losses import LossFn
from lightning_tda.capture.lowrank import FactorLayout
from lightning_tda.capture.task import Task
from lightning_tda.data.ids import ExampleIds, PositionedBatch, with_positions
from lightning_tda.errors import ConfigError
from lightning_tda.progress import progress_bar
from lightning_tda.store.writer import StoreWriter


@dataclass
class RunState:
    """The logger's resume point (saved in Lightning checkpoints).

    Attributes:
        lr_cumsum: per param group, the learning rates summed over every optimizer step so far.
        lr_cumsum_at_last: ``lr_cumsum`` at the last logged checkpoint.
        step_at_last: global step of the last logged checkpoint.
        logged_steps: global steps logged so far, increasing.
        resumed: restored from a Lightning checkpoint (the store is continued, not replaced).
    """

    lr_cumsum: list[float] = field(default_factory=list)
    lr_cumsum_at_last: list[float] = field(default_factory=list)
    step_at_last: int = 0
    logged_steps: list[int] = field(default_factory=list)
    resumed: bool = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr_cumsum": list(self.lr_cumsum),
            "lr_cumsum_at_last": list(self.lr_cumsum_at_last),
            "step_at_last": self.step_at_last,
            "logged_steps": list(self.logged_steps),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr_cumsum = [float(x) for x in state["lr_cumsum"]]
        self.lr_cumsum_at_last = [float(x) for x in state["lr_cumsum_at_last"]]
        self.step_at_last = int(state["step_at_last"])
        self.logged_steps = [int(s) for s in state["logged_steps"]]
        self.resumed = True

    def start_fresh(self, n_groups: int, step: int) -> None:
        self.lr_cumsum = [0.0] * n_groups
        self.lr_cumsum_at_last = [0.0] * n_groups
        self.step_at_last = step

    def add_step_lrs(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        """Count ``optimizer``'s current learning rates (one optimizer step) into ``lr_cumsum``."""
        offset = 0
        for opt in trainer.optimizers:
            if opt is optimizer:
                for j, group in enumerate(opt.param_groups):
                    self.lr_cumsum[offset + j] += float(group["lr"])
                return
            offset += len(opt.param_groups)

    def lr_since_last(self) -> list[float]:
        return [c - p for c, p in zip(self.lr_cumsum, self.lr_cumsum_at_last, strict=True)]

    def mark_logged(self, step: int) -> None:
        self.logged_steps.append(step)
        self.lr_cumsum_at_last = list(self.lr_cumsum)
        self.step_at_last = step


@dataclass
class FitContext:
    """One fit's settings and layout, shared by the logger and its strategy (built at ``setup``)."""

    config: LoggerConfig
    writer: StoreWriter
    attribution_data: Dataset | DataLoader | None
    query_data: Dataset | DataLoader | None
    loss_fn: LossFn
    layers: list[LayerSpec]
    other: list[str]
    factors: FactorLayout | None
    state: RunState
    verbose: bool
    task: Task = field(default_factory=Task)
    example_ids: ExampleIds = field(default_factory=ExampleIds)
    positional: bool | None = None
    """Whether the attribution data carries no ids and is numbered by position (``None``: not known yet)."""

    @classmethod
    def build(
        cls,
        config: LoggerConfig,
        writer: StoreWriter,
        pl_module: pl.LightningModule,
        data: tuple[Any, Any],
        state: RunState,
        verbose: bool,
    ) -> FitContext:
        """Discover the captured layers of ``pl_module`` and resolve its task (per-example loss)."""
        cap = config.capture
        task = cap.resolved_task()
        _check_module_loss(task, pl_module)
        layers, other = discover_layers(pl_module, config.projection, cap.modules, cap.exclude)
        if not layers:
            raise ConfigError(
                f"GradientLogger found no trainable nn.Linear / Conv1D / LoRA layer in {type(pl_module).__name__}"
                + (f" matching modules={cap.modules}" if cap.modules else "")
                + "; pass dense_dim>0 to project the other trainable parameters with torch.func."
            )
        storage = config.storage
        factors = (
            FactorLayout.from_layers(layers, storage.lorif_rank)
            if storage.kind == "lorif"
            else None
        )
        _explain_layout(layers, other, factors, storage.lorif_rank)
        loss_fn = task.per_example_loss
        return cls(
            config, writer, *data, loss_fn, layers, other, factors, state, verbose, task, cap.ids()
        )

    @property
    def path(self) -> Path:
        return self.writer.path

    def loader(self, trainer: pl.Trainer, data: Dataset | DataLoader | None) -> DataLoader:
        """``data`` in order (a DataLoader as is); ``None``: the trainer's training set, unshuffled."""
        if isinstance(data, DataLoader):
            return data
        batch_size = self.config.capture.batch_size
        kwargs: dict[str, Any] = {"shuffle": False}
        if data is None:
            train = trainer.train_dataloader
            if not isinstance(train, DataLoader):
                raise ConfigError(
                    "GradientLogger(attribution_data=None) sweeps the trainer's training DataLoader, but it is "
                    f"a {type(train).__name__}; pass attribution_data= explicitly."
                )
            data = train.dataset
            kwargs["batch_size"] = sweep_batch_size(batch_size, train.batch_size)
            kwargs["collate_fn"] = train.collate_fn
        else:
            kwargs["batch_size"] = batch_size or 64
            if self.config.capture.collate_fn is not None:
                kwargs["collate_fn"] = self.config.capture.collate_fn
        return DataLoader(data, **kwargs)

    def attribution_loader(self, trainer: pl.Trainer) -> DataLoader:
        """The attribution data in order; numbered by position (batches :class:`PositionedBatch`) when
        its batches carry no ids and ``example_ids`` was not given."""
        return self._numbered(self.loader(trainer, self.attribution_data))

    def check_loader(self, trainer: pl.Trainer) -> DataLoader:
        """:meth:`attribution_loader` batched by at most ``CHECK_BATCH_SIZE`` (same data, order and
        collate), so the first-batch check costs a few examples, not a sweep batch; a user's
        DataLoader is kept as it is."""
        loader = self.loader(trainer, self.attribution_data)
        small = (
            not isinstance(self.attribution_data, DataLoader)
            and loader.batch_size is not None
            and loader.batch_size > CHECK_BATCH_SIZE
        )
        if small:
            loader = DataLoader(
                loader.dataset,
                batch_size=CHECK_BATCH_SIZE,
                shuffle=False,
                collate_fn=loader.collate_fn,
            )
        return self._numbered(loader)

    def _numbered(self, loader: DataLoader) -> DataLoader:
        """``loader``, its batches :class:`PositionedBatch` es when the data carries no ids."""
        if self.positional is None:
            self.positional = self._without_ids(loader)
        return with_positions(loader) if self.positional else loader

    def _without_ids(self, loader: DataLoader) -> bool:
        with preserved_rng():  # a DataLoader iterator draws its base seed from torch's generator
            first = next(iter(loader), None)
        if first is None:
            return False
        if not self.example_ids.is_default:
            self.example_ids(first)  # an explicit spec must find its ids: the clear error otherwise
            return False
        return self.example_ids.find(first) is None

    def ids_record(self, trainer: pl.Trainer) -> dict[str, Any]:
        """The ``example_ids`` root attribute: the spec and where this run's ids come from."""
        source = "batch"
        if self.config.mode == "sweep":
            self.attribution_loader(trainer)
            source = "position" if self.positional else "batch"
        return {**self.example_ids.describe(), "source": source}

    def split(self, batch: Any) -> tuple[torch.Tensor | None, Any]:
        """``(ids or None, the user's batch)``: the library's positions split off, else ``None`` (the
        featurizer reads the ids from the batch)."""
        if isinstance(batch, PositionedBatch):
            return batch.ids, batch.batch
        return None, batch

    def featurize(
        self, trainer: pl.Trainer, feat: Featurizer, batch: Any, forward_context: Any = None
    ) -> FeatureBatch:
        """``feat`` of one loader batch on the device, under ``forward_context()`` (default: the
        training precision's, e.g. bf16/fp16 autocast)."""
        ids, batch = self.split(batch)
        batch = trainer.strategy.batch_to_device(batch)
        with (forward_context or trainer.precision_plugin.forward_context)():
            return feat(batch, ids)

    def device_batches(self, trainer: pl.Trainer, loader: DataLoader):
        """``loader``'s batches on the device, the library's positions kept beside them."""
        for batch in loader:
            ids, user = self.split(batch)
            user = trainer.strategy.batch_to_device(user)
            yield user if ids is None else PositionedBatch(ids, user)

    def check_batch(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        ids: torch.Tensor,
        positional: bool = False,
    ) -> None:
        """The first-batch check (:func:`~lightning_tda.capture.first_batch.check_first_batch`) of the
        user's device ``batch`` with its ``[B]`` ``ids`` (``positional``: numbered by the library). The
        caller preserves the training state."""
        with trainer.precision_plugin.forward_context():
            check_first_batch(
                pl_module,
                self.layers,
                self.config.projection,
                self.loss_fn,
                batch,
                ids,
                pl_module.device,
                positional=positional,
            )

    def progress(self, trainer: pl.Trainer, description: str, total: int, unit: str):
        """A transient bar in (or beside) the trainer's own (see :mod:`lightning_tda.progress`)."""
        return progress_bar(
            description, total, unit=unit, verbose=self.verbose, transient=True, trainer=trainer
        )


def _check_module_loss(task: Task, module: pl.LightningModule) -> None:
    """The module default task needs ``per_example_loss`` on the module: refused at ``setup``."""
    if type(task) is Task and not callable(getattr(module, "per_example_loss", None)):
        raise ConfigError(
            f"{type(module).__name__} has no per_example_loss(batch) -> Tensor[B]. Define it on the "
            "LightningModule (sequence losses summed over supervised tokens; see lightning_tda.capture.losses "
            "helpers), pass a task (task=ClassificationTask() / CausalLMTask(labels='hf' | 'shifted')) or "
            "loss_fn=lambda model, batch: ... to GradientLogger / AttributionStore.attribute."
        )


def _explain_layout(
    layers: list[LayerSpec], other: list[str], factors: FactorLayout | None, lorif_rank: int
) -> None:
    """One line each on factors larger than their dense blocks and on trainable parameters left out."""
    if factors is not None:
        larger = [b.name for b in factors.blocks if b.size > b.dense_size]
        if larger:
            rank_zero_info(
                f"GradientLogger: at lorif_rank={lorif_rank} the factors of {len(larger)} layers "
                f"({', '.join(larger[:4])}{' ...' if len(larger) > 4 else ''}) take more space than their "
                "dense k_out x k_in blocks (c (k_out + k_in) > k_out k_in); lower lorif_rank to save space."
            )
    if other:
        rank_zero_info(
            f"GradientLogger: {len(other)} trainable parameters outside Linear/Conv1D/LoRA layers are not "
            f"captured ({', '.join(other[:4])}{' ...' if len(other) > 4 else ''}); set dense_dim>0 to "
            "include them."
        )


CHECK_BATCH_SIZE = 4
"""Examples in the first-batch check (fail in seconds, whatever the sweep or training batch size)."""

SWEEP_BATCH_SIZE = 64
"""The sweep's batch size when neither the user nor a training DataLoader gives one."""


def sweep_batch_size(given: int | None, train_batch_size: int | None) -> int:
    """The batch size a sweep of the training set uses: ``given``, else the training batch size raised
    for throughput to ``SWEEP_BATCH_SIZE`` but at most 8x (the sweep keeps no weight gradients or
    optimizer update, and its backward stops at the captured layers, so a batch a few times the
    training one fits where training fits), else ``SWEEP_BATCH_SIZE``.

    >>> sweep_batch_size(None, 8), sweep_batch_size(None, 1), sweep_batch_size(None, 256), sweep_batch_size(5, 256)
    (64, 8, 256, 5)
    """
    if given is not None:
        return given
    if not train_batch_size:
        return SWEEP_BATCH_SIZE
    return max(train_batch_size, min(SWEEP_BATCH_SIZE, 8 * train_batch_size))


def trainable_state(module: torch.nn.Module, copy: bool = False) -> dict[str, torch.Tensor]:
    """Trainable parameters and all buffers: what query gradients need beyond frozen weights
    (``copy``: cloned, not views of the module's storage)."""
    state = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    state.update({n: b.detach() for n, b in module.named_buffers() if b is not None})
    return {n: t.clone() for n, t in state.items()} if copy else state
