"""``GradientLogger``: log projected per-example gradients at chosen checkpoints of a Lightning fit.

The callback holds a resolved :class:`~lightning_tda.callbacks.config.LoggerConfig` and a logging
strategy (:class:`~lightning_tda.callbacks.sweep.SweepLogging` or
:class:`~lightning_tda.callbacks.in_flight_logging.InFlightLogging`) that its Lightning hooks delegate to.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from lightning_tda.callbacks.config import (
    GROUPS,
    MODES,
    PRESETS,
    CaptureConfig,
    InFlightConfig,
    LoggerConfig,
    Mode,
    Preset,
    StorageConfig,
    StorageDtype,
    StorageKind,
)
from lightning_tda.callbacks.context import FitContext, RunState
from lightning_tda.callbacks.distributed import (
    check_strategy,
    full_model,
    is_distributed,
    is_fsdp1,
    is_sharded,
)
from lightning_tda.callbacks.in_flight_logging import InFlightLogging
from lightning_tda.callbacks.metadata import COMPARED, check_saved_arguments, run_metadata
from lightning_tda.callbacks.optimizer_state import current_lrs
from lightning_tda.callbacks.paths import check_store_path
from lightning_tda.callbacks.post_fit import PostFitStage, check_post_fit_stage
from lightning_tda.callbacks.schedule import ScheduleConfig
from lightning_tda.callbacks.shorthands import SHORTHANDS, given_shorthands, resolve_config
from lightning_tda.callbacks.strategy import LoggingStrategy
from lightning_tda.callbacks.sweep import SweepLogging
from lightning_tda.capture.fingerprint import fingerprint_attrs
from lightning_tda.capture.in_flight import Reduction
from lightning_tda.capture.losses import LossFn
from lightning_tda.capture.projection import Basis, Distribution, ProjectionConfig, ProjectionKind
from lightning_tda.capture.task import Task
from lightning_tda.data.ids import IdsSpec
from lightning_tda.errors import ConfigError, StoreError
from lightning_tda.store.writer import StoreWriter

__all__ = ["MODES", "PRESETS", "GradientLogger"]


class _Setting:
    """Read-only view of one resolved setting: ``logger.curvature`` is ``logger.config.capture.curvature``."""

    def __init__(self, group: str | None, name: str) -> None:
        self.group, self.name = group, name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        config = obj.config if self.group is None else getattr(obj.config, self.group)
        return getattr(config, self.name)


class GradientLogger(pl.Callback):
    r"""Log per-example projected gradients, learning rates and optimizer state to one HDF5 file.

    At each trigger the callback sweeps ``attribution_data`` at the current weights (eval mode, one
    extra forward and backward per batch), captures every trainable ``nn.Linear``, GPT-2 ``Conv1D``
    and PEFT LoRA linear, and stores ``P_out^T [∇W | ∇b] P_in`` per example (never materialising the
    per-example gradient). The sweep leaves training untouched: RNG streams, module modes, ``.grad``
    and optimizer state are as before, so a seeded fit ends with bit-identical weights.

    With ``mode="in_flight"`` nothing is swept: the hooks capture the user's own ``training_step``
    forward and backward, and every logged optimizer step ``t`` becomes a batch checkpoint holding the
    rows of that step's examples at the weights ``θ_t`` the step started from, its learning rate and
    (``save_state``) ``θ_t`` itself, so ``method="tracin"`` is the ideal per-step TracIn
    ``Σ_t η_t <g_q(θ_t), g_z(θ_t)>`` (docs/store.md "In-flight stores"). The hooked gradients are of the
    training loss; they are divided by ``c · S / A`` (``in_flight_reduction``'s ``c``, the loss scaler's
    ``S``, ``accumulate_grad_batches`` ``A``), so a row is the gradient of the example's own
    ``per_example_loss`` as in a sweep. Training is untouched (no RNG, ``.grad`` or mode change).

    Under DDP (``strategy="ddp"``/``"ddp_spawn"``) each rank sweeps a contiguous shard of
    ``attribution_data`` into ``<path>.rank<r>.h5``, K-FAC sums are reduced over ranks, and rank zero
    merges the shards into ``path``: the store equals a single-process one (docs/store.md "Distributed
    (DDP, FSDP) fits"). FSDP1 (``strategy="fsdp"``, ``use_orig_params=True``) and FSDP2 (Lightning's
    ``ModelParallelStrategy`` with ``tensor_parallel_size=1``) work the same way, parameters
    all-gathered once per checkpoint. In flight, every rank's rows of a step are gathered and rank
    zero writes them (:mod:`lightning_tda.callbacks.step_gather`). Tensor parallelism, FSDP1 with
    flattened parameters or hybrid sharding, and DeepSpeed are refused with a clear error.

    Fail in seconds: at the first ``on_train_batch_start`` of a fit, before any optimizer step, one
    batch is checked (in flight the training batch, in a sweep the first batch of ``attribution_data``):
    its example ids are readable, the task's loss is a finite ``[B]`` tensor, it reaches every captured
    layer and the projected rows are finite (:mod:`lightning_tda.capture.first_batch`). The check runs in
    eval mode with RNG streams and modes restored, so training is unchanged.

    Settings are grouped in typed configs (:mod:`lightning_tda.callbacks.config`), each validated when
    built (:class:`~lightning_tda.errors.ConfigError`) and saved in the store's ``logger_config``
    root attribute; a resumed fit whose settings differ in one that shapes the rows is refused, naming
    the field. Every flat keyword below is a shorthand of one config field
    (:data:`~lightning_tda.callbacks.shorthands.SHORTHANDS`): a keyword that differs from its default
    overrides that field of the config object given, one left at its default leaves it alone, so
    ``GradientLogger(path, projection=ProjectionConfig(rank=8), seed=3)`` is rank 8, seed 3.

    Config arguments:
        mode: ``"sweep"`` or ``"in_flight"`` (below).
        preset: the defaults of ``rank``/``basis``/``dtype`` (below).
        schedule: a :class:`~lightning_tda.callbacks.schedule.ScheduleConfig` (the trigger shorthands).
        projection: a :class:`~lightning_tda.capture.projection.ProjectionConfig` (taken as written: the
            preset fills nothing in it), or its ``kind`` as a string (below).
        storage: a :class:`~lightning_tda.callbacks.config.StorageConfig` (its ``dtype=None`` takes the
            preset's), or its ``kind`` as a string (below).
        capture: a :class:`~lightning_tda.callbacks.config.CaptureConfig` (``modules`` ... ``collate_fn``).
        in_flight: an :class:`~lightning_tda.callbacks.config.InFlightConfig` (``in_flight_reduction``,
            ``flush_every``).

    Args:
        path: the ``.h5`` store to write (checked now; directories are created at ``setup``).
        attribution_data: Dataset or DataLoader of training examples to attribute, read in dataset
            order. Its batches keep their ids where ``example_ids`` says; data without any id is
            numbered by position (``0..N-1``) by the logger, which strips what it added, so the loss
            always sees the batches as the data yields them. ``None`` sweeps the trainer's training
            set (in order, without shuffling).
        query_data: optional Dataset/DataLoader of queries known in advance; logged at every checkpoint.
        every_n_train_steps: log after every n-th optimizer step.
        every_n_epochs: log at the end of every n-th epoch (the default, ``1``, when no trigger is given).
        at_steps: log after exactly these global steps.
        log_at_fit_start: also log the starting weights (global step 0).
        log_at_fit_end: also log the final weights.
        projection: ``"kronecker"`` (two-sided LoGra projection) or ``"exact"`` (no projection).
        rank: projected size per side of each layer (``k_out = k_in = rank``); default from ``preset``.
        dims: per-layer ``{module_name: (k_out, k_in)}`` overrides.
        distribution: ``"orthogonal"`` (default), ``"gaussian"`` or ``"rademacher"`` projection matrices.
        seed: projection seed; matrices are regenerated from ``(seed, module name)`` on the query side.
        dense_dim: project the remaining trainable parameters (embeddings, norms) to this many dims via
            ``torch.func``; ``0`` (default) skips them (listed in the store).
        basis: ``"random"`` (seeded matrices, nothing stored) or ``"pca"``: top eigenvectors of each
            layer's K-FAC factors, fitted once at the first checkpoint and stored (much better fidelity
            at small ``rank``, one extra pass over ``basis_examples`` examples); default from ``preset``.
        basis_examples: examples used to fit the ``"pca"`` basis.
        basis_tokens: random token positions per example the ``"pca"`` basis's factors use
            (``None``: every position).
        modules: names/regexes of the modules to capture (default: every eligible one).
        exclude: names/regexes of modules to skip.
        optimizer_state: record optimizer hyper-parameters, factored Adam second moments and
            preconditioned rows (for ``tracin_adam``) at each checkpoint.
        curvature: accumulate each layer's projected K-FAC factors ``A' = E[x̃ x̃^T]`` and
            ``S' = E[δ̃ δ̃^T]`` during the sweep (``k_in² + k_out²`` floats per layer and checkpoint), for
            ``influence(mode="ekfac")`` and ``source``.
        save_state: save trainable parameters and buffers ``θ_t`` (needed to recompute query gradients
            later): ``True`` at every checkpoint, ``False`` never, ``"auto"`` (default) at every sweep
            checkpoint and, in flight, at logged steps such that the state written stays within the
            rows written (``CaptureConfig.save_state``).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``; default ``model.per_example_loss(batch)``; a
            shorthand of ``task=LossFnTask(loss_fn)``.
        task: a :class:`~lightning_tda.capture.task.Task` (``ClassificationTask()``,
            ``CausalLMTask(labels=...)``, ...) whose ``per_example_loss`` every row differentiates (sweep,
            PCA basis, dense block, queries, the first-batch check); recorded as the store's ``task``
            root attribute. ``None``: ``loss_fn``, else the module's own ``per_example_loss``.
        example_ids: where the user's batches keep their example ids: a tuple position (``2`` for
            ``(x, y, idx)``), a mapping key (``"idx"``) or ``fn(batch) -> Tensor[B]``; ``None`` recognises
            ``Indexed`` batches and the keys ``example_id``, ``idx``, ``index``, ``id``. Recorded as the
            ``example_ids`` root attribute. In flight the training batches must carry ids.
        batch_size: sweep batch size when ``attribution_data``/``query_data`` is a Dataset (default 64).
        collate_fn: collate function for Dataset inputs.
        dtype: storage dtype of rows: ``"float16"``, ``"bfloat16"`` or ``"float32"``; default from
            ``preset``.
        preset: the capture defaults for ``rank``/``basis``/``dtype`` (explicit arguments win):
            ``"accurate"`` (default in sweep mode: rank 32, PCA basis, float32 rows) or ``"fast"``
            (default in-flight: rank 16, random basis, float16 rows, 8x less storage per layer). Both
            were chosen on the benchmark banks (BENCHMARKS.md "Defaults"); README "Presets" lists what
            each costs and scores.
        storage: ``"dense"`` (default) stores each example's projected gradient as is (``train``,
            ``k_out·k_in`` values per layer); ``"lorif"`` stores rank-``c`` factors ``U√S``, ``V√S`` of
            each layer's ``[k_out, k_in]`` block from a per-example truncated SVD (``train_factors``,
            ``c·(k_out + k_in)`` values per layer; LoRIF, methods.md §5). Queries stay dense. Every method
            reads the reconstruction ``U V^T``; ``method="lorif"`` works on the factors directly.
        lorif_rank: ``c`` for ``storage="lorif"`` (per layer ``min(lorif_rank, k_out, k_in)``). A
            non-sequence layer's per-example gradient has rank 1, so ``1`` is exact there; a
            sequence of ``T`` tokens has rank ``<= T``.
        overwrite: replace an existing store at ``path`` on a fresh (not resumed) fit.
        verbose: print one line per logged checkpoint and show a progress bar during each sweep (in
            the trainer's own progress bar; none when it is disabled, see :mod:`lightning_tda.progress`).
        stride: a post-fit stage run on rank zero in ``on_fit_end``: any object implementing
            :class:`~lightning_tda.callbacks.post_fit.PostFitStage`, e.g. a
            :class:`~lightning_tda.stride.StrideConfig` to fit STRIDE operators at the last logged
            checkpoint (a Trainer of its own, see :func:`lightning_tda.stride.fit`); ``None`` (default)
            skips it.
        stride_trainer_kwargs: extra ``Trainer`` arguments of that stage.
        mode: ``"sweep"`` (default): sweep ``attribution_data`` at each trigger; ``"in_flight"``: log the
            training batches themselves (no extra forward or backward over training data). In-flight
            logs every optimizer step by default (``every_n_train_steps=n`` or ``at_steps`` log a subset;
            step ``t`` means the weights after ``t`` optimizer steps, ``t = 0, n, 2n, ...``), takes no
            ``attribution_data``/``every_n_epochs``/``log_at_fit_*``, and supports neither ``dense_dim``,
            ``basis="pca"`` nor ``storage="lorif"``; it writes no optimizer moments, curvature or losses.
            Training must use automatic optimization and batches must carry example ids
            (``example_ids``).
        in_flight_reduction: how ``training_step``'s loss reduces ``per_example_loss`` over a (micro-)batch:
            ``"mean"`` (default: ``c = 1/B``), ``"sum"`` (``c = 1``) or ``fn(batch) -> c`` with
            ``loss = c · Σ_b per_example_loss_b`` (e.g. :func:`~lightning_tda.capture.in_flight.token_mean`
            for a mean over the batch's supervised tokens). The rows are divided by ``c``, by the loss
            scaler's scale and multiplied by ``accumulate_grad_batches``; a wrong ``c`` rescales every row
            of a batch (a per-example-weighted loss, e.g. a mean of per-sequence token means, is not of this
            form and is not supported).
        flush_every: in-flight mode writes logged steps in groups of this many (one file open per group;
            also at every Lightning checkpoint save, at the end of fit and on an exception).

    Example::

        logger = GradientLogger("runs/tda.h5", attribution_data=IndexedDataset(train), every_n_epochs=1)
        trainer = L.Trainer(max_epochs=10, callbacks=[logger])
        # the same with config objects:
        GradientLogger("runs/tda.h5", attribution_data=IndexedDataset(train),
                       schedule=ScheduleConfig(every_n_epochs=1), projection=ProjectionConfig(rank=16))
    """

    mode = _Setting(None, "mode")
    preset = _Setting(None, "preset")
    schedule = _Setting(None, "schedule")
    projection = _Setting(None, "projection")
    storage = _Setting(
        "storage", "kind"
    )  # the kind string, as before; config.storage is the config
    lorif_rank = _Setting("storage", "lorif_rank")
    overwrite = _Setting("storage", "overwrite")
    modules = _Setting("capture", "modules")
    exclude = _Setting("capture", "exclude")
    optimizer_state = _Setting("capture", "optimizer_state")
    curvature = _Setting("capture", "curvature")
    save_state = _Setting("capture", "save_state")
    loss_fn = _Setting("capture", "loss_fn")
    batch_size = _Setting("capture", "batch_size")
    collate_fn = _Setting("capture", "collate_fn")
    example_ids = _Setting("capture", "example_ids")
    task = _Setting("capture", "task")
    in_flight_reduction = _Setting("in_flight", "reduction")
    flush_every = _Setting("in_flight", "flush_every")

    def __init__(
        self,
        path: str | os.PathLike,
        attribution_data: Dataset | DataLoader | None = None,
        query_data: Dataset | DataLoader | None = None,
        *,
        mode: Mode = "sweep",
        preset: Preset | None = None,
        schedule: ScheduleConfig | None = None,
        projection: ProjectionConfig | ProjectionKind = "kronecker",
        storage: StorageConfig | StorageKind = "dense",
        capture: CaptureConfig | None = None,
        in_flight: InFlightConfig | None = None,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        at_steps: Sequence[int] | None = None,
        log_at_fit_start: bool = False,
        log_at_fit_end: bool = False,
        rank: int | None = None,
        dims: dict[str, tuple[int, int]] | None = None,
        distribution: Distribution = "orthogonal",
        seed: int = 0,
        dense_dim: int = 0,
        basis: Basis | None = None,
        basis_examples: int = 1024,
        basis_tokens: int | None = 16,
        modules: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        optimizer_state: bool = True,
        curvature: bool = True,
        save_state: bool | str = "auto",
        loss_fn: LossFn | None = None,
        batch_size: int | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        example_ids: IdsSpec = None,
        task: Task | None = None,
        dtype: StorageDtype | None = None,
        lorif_rank: int = 1,
        overwrite: bool = False,
        in_flight_reduction: Reduction = "mean",
        flush_every: int = 16,
        verbose: bool = True,
        stride: PostFitStage | None = None,
        stride_trainer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.config: LoggerConfig = _config_from_arguments(locals())
        self._strategy = _strategy_for(self.config, attribution_data)
        _check_data(attribution_data=attribution_data, query_data=query_data)
        self.path = check_store_path(path)
        self.attribution_data, self.query_data = attribution_data, query_data
        self.verbose = verbose
        self.stride = check_post_fit_stage(stride)
        self.stride_trainer_kwargs = stride_trainer_kwargs
        self._run = RunState()
        self._writer: StoreWriter | None = None
        self._ctx: FitContext | None = None

    # -- state ------------------------------------------------------------------------------
    @property
    def writer(self) -> StoreWriter:
        """The store's writer: created at ``setup`` (directories, rollback of a dead writer's commit),
        or on first use before it."""
        if self._writer is None:
            self._writer = StoreWriter(self.path, self.config.storage.dtype)
        return self._writer

    @property
    def _logged_steps(self) -> list[int]:
        return self._run.logged_steps

    @property
    def _resumed(self) -> bool:
        return self._run.resumed

    @property
    def state_key(self) -> str:
        return self._generate_state_key(path=str(self.path))

    def state_dict(self) -> dict[str, Any]:
        self._strategy.flush()  # a Lightning checkpoint is being saved: what it covers must be on disk
        return {**self._run.state_dict(), "path": str(self.path)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._run.load_state_dict(state_dict)

    # -- Lightning hooks --------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, self.mode)  # one process, DDP or FSDP2 (docs/store.md)
        self._writer = StoreWriter(self.path, self.config.storage.dtype)
        data = (self.attribution_data, self.query_data)
        self._ctx = FitContext.build(
            self.config, self._writer, pl_module, data, self._run, self.verbose
        )
        self._strategy.bind(self._ctx, pl_module)
        if self.stride is not None:  # a post-fit stage that cannot run should fail now, not after
            self.stride.check_before_fit(pl_module, task=self.config.capture.resolved_task())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        zero = trainer.is_global_zero  # under DDP rank zero alone writes the main file
        if self._run.resumed:
            self._continue_store(trainer, zero)
        else:
            self._start_store(trainer, zero)
        # FSDP: frozen weights are gathered to fingerprint them, a collective of every rank
        # (FSDP1: the model is seen unwrapped for the block, see distributed.fsdp1_full_model)
        fsdp1 = is_fsdp1(trainer.strategy)
        with full_model(trainer, pl_module) if fsdp1 else contextlib.nullcontext():
            sharded = is_sharded(trainer.strategy)
            prints = fingerprint_attrs(pl_module, self._ctx.layers) if sharded else None
            if zero:
                check_saved_arguments(self._ctx)
                self.writer.write_run_metadata(
                    {
                        **run_metadata(self._ctx, trainer, pl_module, prints),
                        **self._strategy.run_metadata(trainer),
                    },
                    compare=COMPARED,
                    schema_version=self._strategy.schema_version,
                )
        if is_distributed(trainer):
            trainer.strategy.barrier("GradientLogger.on_train_start")
        self._strategy.start(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._strategy.first_batch(trainer, pl_module, batch)  # fail in seconds, once per fit
        self._strategy.batch_start(trainer, pl_module, batch)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        self._strategy.before_backward(trainer)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._strategy.after_backward(trainer)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._run.add_step_lrs(trainer, optimizer)
        self._strategy.before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._strategy.batch_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._strategy.epoch_end(trainer, pl_module)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._strategy.on_exception()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._strategy.teardown()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._strategy.train_end(trainer, pl_module)
        if trainer.is_global_zero:
            self.writer.set_root_attrs(
                {
                    "lr_cumsum_final": list(self._run.lr_cumsum),
                    "final_global_step": trainer.global_step,
                }
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the post-fit stage (``stride=``) on rank zero over the logged data."""
        if self.stride is None or not trainer.is_global_zero:
            return
        data = self.attribution_data
        if data is None:
            data = self._ctx.loader(trainer, None)  # the training set, in order
        self.stride.run_after_fit(
            self.path,
            pl_module,
            data,
            trainer_kwargs=self.stride_trainer_kwargs,
            loss_fn=self.loss_fn,
            collate_fn=self.collate_fn,
            task=self.task,
        )

    # -- the store at fit start ---------------------------------------------------------------
    def _continue_store(self, trainer: pl.Trainer, zero: bool) -> None:
        """A resumed fit: drop checkpoints after the resume point and incomplete ones."""
        if not zero:
            return
        removed = self.writer.prune(keep_up_to_step=max(self._run.logged_steps, default=-1))
        if removed:
            rank_zero_info(
                f"GradientLogger: resumed; dropped incomplete/stale checkpoints at steps {removed}"
            )
        self._strategy.on_resume(trainer)

    def _start_store(self, trainer: pl.Trainer, zero: bool) -> None:
        """A fresh fit starts a fresh file (refusing to replace logged checkpoints without overwrite)."""
        if zero and not self.overwrite and self.writer.has_complete_checkpoints():
            raise StoreError(
                f"{self.path} already holds logged checkpoints from another fit. Pass a new path, "
                "overwrite=True to replace it, or resume that fit with trainer.fit(..., ckpt_path=...)."
            )
        if zero:
            self.writer.remove()  # incomplete leftovers hold nothing of value
        n_groups = len(current_lrs(trainer.optimizers))
        self._run.start_fresh(n_groups, trainer.global_step)


@functools.cache
def _shorthand_defaults() -> dict[str, Any]:
    """The signature default of every shorthand keyword (a keyword at its default is "not given")."""
    params = inspect.signature(GradientLogger.__init__).parameters
    return {name: params[name].default for name in SHORTHANDS}


def _config_from_arguments(arguments: dict[str, Any]) -> LoggerConfig:
    """The :class:`LoggerConfig` of ``GradientLogger.__init__``'s arguments (its ``locals()``): the config
    groups, mode and preset as given, plus the shorthand keywords that differ from their defaults."""
    return resolve_config(
        mode=arguments["mode"],
        preset=arguments["preset"],
        given=given_shorthands(arguments, _shorthand_defaults()),
        **{group: arguments[group] for group in GROUPS},
    )


def _strategy_for(config: LoggerConfig, attribution_data: Any) -> LoggingStrategy:
    if config.mode == "in_flight":
        InFlightLogging.check_data(attribution_data)
        return InFlightLogging(config.in_flight.reduction)
    return SweepLogging()


def _check_data(**data: Dataset | DataLoader | None) -> None:
    """Attribution and query data must be sized map-style Datasets or DataLoaders over one."""
    for name, value in data.items():
        if value is None:
            continue
        if not isinstance(value, (Dataset, DataLoader)):
            raise ConfigError(
                f"{name} must be a torch Dataset or DataLoader, got {type(value).__name__}"
            )
        ds = value.dataset if isinstance(value, DataLoader) else value
        if not hasattr(ds, "__len__"):
            raise ConfigError(
                f"{name} must be a sized (map-style) dataset so every example can be stored once per checkpoint"
            )
