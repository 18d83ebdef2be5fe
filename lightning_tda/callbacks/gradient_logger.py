"""``GradientLogger``: log projected per-example gradients at chosen checkpoints of a Lightning fit."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from lightning_tda.callbacks.distributed import (
    check_strategy,
    copy_shard_rows,
    is_distributed,
    reduce_covariances,
    shard_loader,
    shard_path,
)
from lightning_tda.callbacks.in_flight import InFlightRecorder
from lightning_tda.callbacks.optimizer_state import (
    adam_scales,
    current_lrs,
    factored_second_moments,
    optimizer_summary,
    param_group_index,
)
from lightning_tda.callbacks.schedule import LogSchedule
from lightning_tda.capture.basis import Bases, fit_pca_bases
from lightning_tda.capture.featurize import Featurizer, preserved_training_state
from lightning_tda.capture.in_flight import Reduction, check_reduction
from lightning_tda.capture.layers import LayerSpec, discover_layers, row_width
from lightning_tda.capture.losses import LossFn, resolve_loss_fn
from lightning_tda.capture.lowrank import FactorLayout
from lightning_tda.capture.projection import ProjectionConfig
from lightning_tda.errors import StoreError
from lightning_tda.progress import progress_bar
from lightning_tda.store import schema
from lightning_tda.store.batches import BatchStep, rebuild_example_ids, write_batch_steps
from lightning_tda.store.writer import StoreWriter

PRESETS: dict[str, dict[str, Any]] = {
    "accurate": {"rank": 32, "basis": "pca", "dtype": "float32"},
    "fast": {"rank": 16, "basis": "random", "dtype": "float16"},
}
"""Named capture settings; ``GradientLogger(preset=...)``."""


def _capture_settings(
    preset: str | None,
    mode: str,
    projection: str,
    rank: int | None,
    basis: str | None,
    dtype: str | None,
) -> tuple[str, Any, Any, Any]:
    """``(preset, rank, basis, dtype)``: the preset's values where an argument is ``None`` (the mode's
    default preset when ``preset`` is ``None``; exact rows default to the random basis, they need none)."""
    if preset is None:
        preset = "fast" if mode == "in_flight" else "accurate"
    if preset not in PRESETS:
        raise MisconfigurationException(
            f"preset must be one of {sorted(PRESETS)} (or None for the mode's default), got {preset!r}"
        )
    p = PRESETS[preset]
    if basis is None:
        basis = "random" if projection == "exact" else p["basis"]
    return (
        preset,
        p["rank"] if rank is None else rank,
        basis,
        p["dtype"] if dtype is None else dtype,
    )


MODES = ("sweep", "in_flight")


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

    Under DDP (``strategy="ddp"``/``"ddp_spawn"``, sweep mode) each rank sweeps a contiguous shard of
    ``attribution_data`` into ``<path>.rank<r>.h5``, K-FAC sums are reduced over ranks, and rank zero
    merges the shards into ``path``: the store equals a single-process one (docs/store.md "Distributed
    (DDP) fits"). In-flight mode, FSDP and DeepSpeed are refused with a clear error.

    Args:
        path: the ``.h5`` store to write.
        attribution_data: Dataset or DataLoader of training examples to attribute (items must carry
            example ids: wrap the dataset in :class:`~lightning_tda.IndexedDataset`). ``None`` sweeps the
            trainer's training set (in order, without shuffling).
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
        modules: names/regexes of the modules to capture (default: every eligible one).
        exclude: names/regexes of modules to skip.
        optimizer_state: record optimizer hyper-parameters, factored Adam second moments and
            preconditioned rows (for ``tracin_adam``) at each checkpoint.
        curvature: accumulate each layer's projected K-FAC factors ``A' = E[x̃ x̃^T]`` and
            ``S' = E[δ̃ δ̃^T]`` during the sweep (``k_in² + k_out²`` floats per layer and checkpoint), for
            ``influence(mode="ekfac")`` and ``source``.
        save_state: save trainable parameters and buffers at each checkpoint (needed to recompute query
            gradients later).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``; default ``model.per_example_loss(batch)``.
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
        stride: a :class:`~lightning_tda.stride.StrideConfig` to fit STRIDE operators at the last
            logged checkpoint in ``on_fit_end`` (rank zero; a Trainer of its own, see
            :func:`lightning_tda.stride.fit`); ``None`` (default) skips it.
        stride_trainer_kwargs: extra ``Trainer`` arguments of that STRIDE fit.
        mode: ``"sweep"`` (default): sweep ``attribution_data`` at each trigger; ``"in_flight"``: log the
            training batches themselves (no extra forward or backward over training data). In-flight
            logs every optimizer step by default (``every_n_train_steps=n`` or ``at_steps`` log a subset;
            step ``t`` means the weights after ``t`` optimizer steps, ``t = 0, n, 2n, ...``), takes no
            ``attribution_data``/``every_n_epochs``/``log_at_fit_*``, and supports neither ``dense_dim``,
            ``basis="pca"`` nor ``storage="lorif"``; it writes no optimizer moments, curvature or losses.
            Training must use automatic optimization and batches must carry example ids.
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
    """

    def __init__(
        self,
        path: str | os.PathLike,
        attribution_data: Dataset | DataLoader | None = None,
        query_data: Dataset | DataLoader | None = None,
        *,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        at_steps: Sequence[int] | None = None,
        log_at_fit_start: bool = False,
        log_at_fit_end: bool = False,
        projection: str = "kronecker",
        rank: int | None = None,
        dims: dict[str, tuple[int, int]] | None = None,
        distribution: str = "orthogonal",
        seed: int = 0,
        dense_dim: int = 0,
        basis: str | None = None,
        basis_examples: int = 1024,
        modules: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        optimizer_state: bool = True,
        curvature: bool = True,
        save_state: bool = True,
        loss_fn: LossFn | None = None,
        batch_size: int | None = None,
        collate_fn: Any = None,
        dtype: str | None = None,
        preset: str | None = None,
        storage: str = "dense",
        lorif_rank: int = 1,
        overwrite: bool = False,
        verbose: bool = True,
        stride: Any = None,
        stride_trainer_kwargs: dict[str, Any] | None = None,
        mode: str = "sweep",
        in_flight_reduction: Reduction = "mean",
        flush_every: int = 16,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise MisconfigurationException(
                f"mode must be 'sweep' (sweep attribution_data at each trigger) or 'in_flight' (log the "
                f"training batches themselves), got {mode!r}"
            )
        self.mode = mode
        self.preset, rank, basis, dtype = _capture_settings(
            preset, mode, projection, rank, basis, dtype
        )
        self._recorder: InFlightRecorder | None = None
        self._pending: list[BatchStep] = []
        self._query_ids: Any = None
        if mode == "in_flight":
            _check_in_flight_args(
                attribution_data=attribution_data,
                every_n_epochs=every_n_epochs,
                log_at_fit_start=log_at_fit_start,
                log_at_fit_end=log_at_fit_end,
                dense_dim=dense_dim,
                basis=basis,
                storage=storage,
                flush_every=flush_every,
            )
            try:
                check_reduction(in_flight_reduction)
            except ValueError as e:
                raise MisconfigurationException(str(e)) from None
            if every_n_train_steps is None and at_steps is None:
                every_n_train_steps = 1
            self._recorder = InFlightRecorder(in_flight_reduction)
        self.in_flight_reduction = in_flight_reduction
        self.flush_every = flush_every
        if storage not in schema.STORAGE_KINDS:
            raise MisconfigurationException(
                f"storage must be 'dense' or 'lorif' (rank-c factors per layer), got {storage!r}"
            )
        if isinstance(lorif_rank, bool) or not isinstance(lorif_rank, int) or lorif_rank < 1:
            raise MisconfigurationException(
                f"lorif_rank must be a positive int (the rank c of the stored factors), got {lorif_rank!r}"
            )
        self.storage = storage
        self.lorif_rank = lorif_rank
        self.schedule = LogSchedule(
            every_n_train_steps, every_n_epochs, at_steps, log_at_fit_start, log_at_fit_end
        )
        self.projection = ProjectionConfig(
            kind=projection,
            rank=rank,
            dims=dict(dims or {}),
            distribution=distribution,
            seed=seed,
            dense_dim=dense_dim,
            basis=basis,
            basis_examples=basis_examples,
        )
        for name, data in (("attribution_data", attribution_data), ("query_data", query_data)):
            if data is not None and not isinstance(data, (Dataset, DataLoader)):
                raise MisconfigurationException(
                    f"{name} must be a torch Dataset or DataLoader, got {type(data).__name__}"
                )
            ds = data.dataset if isinstance(data, DataLoader) else data
            if data is not None and not hasattr(ds, "__len__"):
                raise MisconfigurationException(
                    f"{name} must be a sized (map-style) dataset so every example can be stored once per checkpoint"
                )
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise MisconfigurationException(
                f"batch_size must be a positive int, got {batch_size!r}"
            )
        self.writer = StoreWriter(path, dtype)  # validates dtype and that the path is writable
        self.path = self.writer.path
        self.attribution_data = attribution_data
        self.query_data = query_data
        self.modules = _patterns("modules", modules)
        self.exclude = _patterns("exclude", exclude)
        self.optimizer_state = optimizer_state
        self.curvature = curvature
        self.save_state = save_state
        self.loss_fn = loss_fn
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.overwrite = overwrite
        self.verbose = verbose
        self.stride = stride
        self.stride_trainer_kwargs = stride_trainer_kwargs
        # run state (saved in Lightning checkpoints)
        self._lr_cumsum: list[float] = []
        self._lr_cumsum_at_last: list[float] = []
        self._step_at_last = 0
        self._logged_steps: list[int] = []
        self._resumed = False
        self._layers: list[LayerSpec] = []
        self._bases: Bases | None = None
        self._factors: FactorLayout | None = None

    # -- Lightning plumbing -----------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(path=str(self.path))

    def state_dict(self) -> dict[str, Any]:
        self._flush()  # a Lightning checkpoint is being saved: the steps it covers must be on disk
        return {
            "lr_cumsum": list(self._lr_cumsum),
            "lr_cumsum_at_last": list(self._lr_cumsum_at_last),
            "step_at_last": self._step_at_last,
            "logged_steps": list(self._logged_steps),
            "path": str(self.path),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._lr_cumsum = [float(x) for x in state_dict["lr_cumsum"]]
        self._lr_cumsum_at_last = [float(x) for x in state_dict["lr_cumsum_at_last"]]
        self._step_at_last = int(state_dict["step_at_last"])
        self._logged_steps = [int(s) for s in state_dict["logged_steps"]]
        self._resumed = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # one process, or DDP sweeps (docs/store.md "Distributed (DDP) fits")
        check_strategy(trainer, self.mode)
        self._loss_fn = resolve_loss_fn(pl_module, self.loss_fn)
        self._layers, self._other = discover_layers(
            pl_module, self.projection, self.modules, self.exclude
        )
        if not self._layers:
            raise MisconfigurationException(
                f"GradientLogger found no trainable nn.Linear / Conv1D / LoRA layer in {type(pl_module).__name__}"
                + (f" matching modules={self.modules}" if self.modules else "")
                + "; pass dense_dim>0 to project the other trainable parameters with torch.func."
            )
        self._factors = (
            FactorLayout.from_layers(self._layers, self.lorif_rank)
            if self.storage == "lorif"
            else None
        )
        if self._factors is not None:
            larger = [b.name for b in self._factors.blocks if b.size > b.dense_size]
            if larger:
                rank_zero_info(
                    f"GradientLogger: at lorif_rank={self.lorif_rank} the factors of {len(larger)} layers "
                    f"({', '.join(larger[:4])}{' ...' if len(larger) > 4 else ''}) take more space than their "
                    "dense k_out x k_in blocks (c (k_out + k_in) > k_out k_in); lower lorif_rank to save space."
                )
        if self._other:
            rank_zero_info(
                f"GradientLogger: {len(self._other)} trainable parameters outside Linear/Conv1D/LoRA layers are not "
                f"captured ({', '.join(self._other[:4])}{' ...' if len(self._other) > 4 else ''}); set dense_dim>0 to "
                "include them."
            )
        if self._recorder is not None and not getattr(pl_module, "automatic_optimization", True):
            raise MisconfigurationException(
                "GradientLogger(mode='in_flight') reads the backward Lightning runs in automatic optimization; "
                "this module uses manual optimization. Use mode='sweep'."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        zero = trainer.is_global_zero  # under DDP rank zero alone writes the main file
        if self._resumed:
            removed = (
                self.writer.prune(keep_up_to_step=max(self._logged_steps, default=-1))
                if zero
                else []
            )
            if removed:
                rank_zero_info(
                    f"GradientLogger: resumed; dropped incomplete/stale checkpoints at steps {removed}"
                )
            if zero and self._recorder is not None and self.path.exists():
                rebuild_example_ids(self.path)
        else:
            if zero and not self.overwrite and self.writer.has_complete_checkpoints():
                raise StoreError(
                    f"{self.path} already holds logged checkpoints from another fit. Pass a new path, "
                    "overwrite=True to replace it, or resume that fit with trainer.fit(..., ckpt_path=...)."
                )
            self._bases = None
            if zero:
                self.writer.remove()  # a fresh fit starts a fresh file (incomplete leftovers hold nothing of value)
            n_groups = len(current_lrs(trainer.optimizers))
            self._lr_cumsum = [0.0] * n_groups
            self._lr_cumsum_at_last = [0.0] * n_groups
            self._step_at_last = trainer.global_step
        if zero:
            self.writer.write_run_metadata(
                self._run_metadata(trainer, pl_module),
                compare=("layers", "projection", "storage", "factor_layout", schema.LOGGING_MODE),
                schema_version=(
                    schema.IN_FLIGHT_SCHEMA_VERSION
                    if self._recorder is not None
                    else schema.SCHEMA_VERSION
                ),
            )
        if is_distributed(trainer):
            trainer.strategy.barrier("GradientLogger.on_train_start")
        if self._recorder is not None:
            self._pending.clear()
            self._recorder.attach(pl_module, self._layers, self.projection, pl_module.device)
        if self.schedule.log_at_fit_start:
            self._log(trainer, pl_module, "fit_start")

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        offset = 0
        for opt in trainer.optimizers:
            if opt is optimizer:
                for j, group in enumerate(opt.param_groups):
                    self._lr_cumsum[offset + j] += float(group["lr"])
                break
            offset += len(opt.param_groups)
        if self._recorder is not None:
            self._log_in_flight(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._recorder is not None and self._in_flight_due(step):
            self._recorder.batch_start(batch, step, pl_module.device)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self._recorder is not None:
            self._recorder.before_backward(trainer)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._recorder is not None:
            self._recorder.after_backward(trainer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._recorder is not None:
            self._recorder.batch_end()
            if len(self._pending) >= self.flush_every:
                self._flush()
            return
        if self.schedule.step_due(trainer.global_step):
            self._log(trainer, pl_module, "step")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._recorder is None and self.schedule.epoch_due(trainer.current_epoch):
            self._log(trainer, pl_module, "epoch")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._recorder is not None:
            self._recorder.detach()
            try:
                self._flush()  # the steps finished before the exception are valid
            except Exception:  # noqa: BLE001 - the original exception is the one to report
                rank_zero_info("GradientLogger: could not write the last in-flight steps")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._recorder is not None:
            self._recorder.detach()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._recorder is not None:
            self._recorder.detach()
            self._flush()
        if self.schedule.log_at_fit_end:
            self._log(trainer, pl_module, "fit_end")
        if trainer.is_global_zero:
            self.writer.set_root_attrs(
                {"lr_cumsum_final": list(self._lr_cumsum), "final_global_step": trainer.global_step}
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stride is None or not trainer.is_global_zero:
            return
        from lightning_tda.stride import fit as stride_fit  # lazy: stride imports the store stack

        data = self.attribution_data
        if data is None:
            data = self._loader(trainer, None)
        stride_fit(
            self.path,
            pl_module,
            data,
            self.stride,
            trainer_kwargs=self.stride_trainer_kwargs,
            loss_fn=self.loss_fn,
            collate_fn=self.collate_fn,
            overwrite=True,
        )

    # -- the sweep --------------------------------------------------------------------------
    def _loader(self, trainer: pl.Trainer, data: Dataset | DataLoader | None) -> DataLoader:
        if isinstance(data, DataLoader):
            return data
        kwargs: dict[str, Any] = {"shuffle": False}
        if data is None:
            train = trainer.train_dataloader
            if not isinstance(train, DataLoader):
                raise MisconfigurationException(
                    "GradientLogger(attribution_data=None) sweeps the trainer's training DataLoader, but it is "
                    f"a {type(train).__name__}; pass attribution_data= explicitly."
                )
            data = train.dataset
            kwargs["batch_size"] = self.batch_size or train.batch_size or 64
            kwargs["collate_fn"] = train.collate_fn
        else:
            kwargs["batch_size"] = self.batch_size or 64
            if self.collate_fn is not None:
                kwargs["collate_fn"] = self.collate_fn
        return DataLoader(data, **kwargs)

    def _run_metadata(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        from lightning_tda._version import __version__

        groups = param_group_index(trainer.optimizers)
        named = dict(pl_module.named_parameters())
        layer_groups = {s.name: groups.get(id(named[s.params[0]]), 0) for s in self._layers}
        return {
            "library_version": __version__,
            "lightning_version": lightning.__version__,
            "torch_version": torch.__version__,
            "model_class": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            "projection": schema.to_json(self.projection.to_dict()),
            "layers": schema.to_json([s.to_dict() for s in self._layers]),
            "layer_groups": schema.to_json(layer_groups),
            "other_params": schema.to_json(self._other),
            "capture_selection": schema.to_json({"modules": self.modules, "exclude": self.exclude}),
            "loss_reduction": "per-example loss; sequence losses summed over supervised tokens",
            schema.LOGGING_MODE: self.mode,
            **(
                {
                    "in_flight_reduction": _describe(self.in_flight_reduction),
                    "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
                }
                if self._recorder is not None
                else {}
            ),
            "optimizers": schema.to_json(optimizer_summary(trainer.optimizers)),
            "schedule": schema.to_json(self.schedule.to_dict()),
            "storage": self.storage,
            **(
                {"lorif_rank": self.lorif_rank, "factor_layout": self._factors.to_json()}
                if self._factors is not None
                else {}
            ),
        }

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, trigger: str) -> None:
        step = trainer.global_step
        if step in self._logged_steps:
            return
        if is_distributed(trainer):
            self._log_distributed(trainer, pl_module, trigger)
            return
        t0 = time.perf_counter()
        loader = self._loader(trainer, self.attribution_data)
        qloader = self._loader(trainer, self.query_data) if self.query_data is not None else None
        optimizers = trainer.optimizers
        scales = adam_scales(pl_module, optimizers, self._layers) if self.optimizer_state else None
        bases = self._projection_bases(trainer, pl_module, loader)
        feat = self._featurizer(pl_module, scales, bases)
        n = len(loader.dataset)
        nq = len(qloader.dataset) if qloader is not None else 0
        width = row_width(self._layers)
        with (
            self.writer.begin_checkpoint(
                step, n, width, nq, precond=scales is not None, factors=self._factors
            ) as cw,
            preserved_training_state(pl_module),
        ):
            with self._progress(trainer, f"GradientLogger step {step}", n, "examples") as bar:
                for batch in loader:
                    fb = self._featurize(trainer, feat, batch)
                    cw.write_rows(fb.ids, fb.rows, fb.losses, fb.scaled)
                    bar.advance(fb.rows.shape[0])
            self._finish_checkpoint(trainer, pl_module, cw, feat, qloader, trigger, t0)
        self._after_checkpoint(trainer, step, trigger, n, nq, width, t0)

    def _featurizer(
        self, pl_module: pl.LightningModule, scales: Any, bases: Bases | None
    ) -> Featurizer:
        return Featurizer(
            pl_module,
            self._layers,
            self.projection,
            self._loss_fn,
            pl_module.device,
            scales=scales[0] if scales else None,
            dense_scales=scales[1] if scales else None,
            bases=bases,
            covariances=self.curvature,
        )

    def _log_distributed(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, trigger: str
    ) -> None:
        """DDP sweep: each rank sweeps its contiguous shard into ``<store>.rank<r>.h5``; K-FAC sums are
        reduced over ranks; rank zero merges the shards into the checkpoint (dataset order) and writes
        the rank-independent rest; the shards are deleted (see :mod:`lightning_tda.callbacks.distributed`)."""
        step = trainer.global_step
        strategy = trainer.strategy
        rank, world, zero = trainer.global_rank, trainer.world_size, trainer.is_global_zero
        t0 = time.perf_counter()
        full = self._loader(trainer, self.attribution_data)
        loader = shard_loader(full, rank, world, self.batch_size or 64)
        scales = (
            adam_scales(pl_module, trainer.optimizers, self._layers)
            if self.optimizer_state
            else None
        )
        if self.projection.basis == "pca" and self._bases is None:
            if zero:
                self._projection_bases(trainer, pl_module, full)  # fitted on all data, written
            strategy.barrier("GradientLogger.bases")
            if not zero:
                self._bases = self.writer.read_bases()
        bases = self._bases if self.projection.basis == "pca" else None
        feat = self._featurizer(pl_module, scales, bases)
        n = len(full.dataset)
        width = row_width(self._layers)
        shard = StoreWriter(shard_path(self.path, rank), self.writer.storage_dtype)
        shard.remove()
        with preserved_training_state(pl_module):
            with shard.begin_checkpoint(
                step,
                len(loader.sampler),
                width,
                0,
                precond=scales is not None,
                factors=self._factors,
            ) as cw:
                for batch in loader:
                    fb = self._featurize(trainer, feat, batch)
                    cw.write_rows(fb.ids, fb.rows, fb.losses, fb.scaled)
                cw.commit({"rank": rank, "world_size": world})
            if self.curvature:
                reduce_covariances(strategy, feat.hooks.covariances)
            strategy.barrier("GradientLogger.sweep")
            nq = 0
            if zero:
                qloader = (
                    self._loader(trainer, self.query_data) if self.query_data is not None else None
                )
                nq = len(qloader.dataset) if qloader is not None else 0
                with self.writer.begin_checkpoint(
                    step, n, width, nq, precond=scales is not None, factors=self._factors
                ) as cw:
                    for r in range(world):
                        copy_shard_rows(cw, shard_path(self.path, r), step)
                    self._finish_checkpoint(
                        trainer, pl_module, cw, feat, qloader, trigger, t0, {"world_size": world}
                    )
        strategy.barrier("GradientLogger.merge")
        shard.remove()
        self._after_checkpoint(trainer, step, trigger, n, nq, width, t0)

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
    ) -> None:
        """Everything of a checkpoint after the training rows: K-FAC factors, queries, optimizer
        moments, state, attributes; then commit."""
        step = trainer.global_step
        optimizers = trainer.optimizers
        nq = len(qloader.dataset) if qloader is not None else 0
        if self.curvature:
            cw.write_arrays(schema.KFAC, feat.take_covariances())
        if qloader is not None:
            feat.require_ids = False
            with self._progress(trainer, f"GradientLogger step {step}", nq, "queries") as bar:
                for batch in qloader:
                    fb = self._featurize(trainer, feat, batch)
                    cw.write_queries(fb.ids, fb.rows, fb.losses)
                    bar.advance(fb.rows.shape[0])
        if self.optimizer_state:
            cw.write_arrays(
                schema.OPTIMIZER, factored_second_moments(pl_module, optimizers, self._layers)
            )
        if self.save_state:
            cw.write_arrays(schema.STATE, _trainable_state(pl_module))
        lr_sum = [c - p for c, p in zip(self._lr_cumsum, self._lr_cumsum_at_last, strict=True)]
        cw.commit(
            {
                "epoch": trainer.current_epoch,
                "trigger": trigger,
                "lr_sum": lr_sum,
                "lr_cumsum": list(self._lr_cumsum),
                "lr_at_checkpoint": current_lrs(optimizers),
                "steps_since_previous": step - self._step_at_last,
                "optimizer": schema.to_json(optimizer_summary(optimizers)),
                "seconds": time.perf_counter() - t0,
                **(extra_attrs or {}),
            }
        )

    def _after_checkpoint(
        self, trainer: pl.Trainer, step: int, trigger: str, n: int, nq: int, width: int, t0: float
    ) -> None:
        self._logged_steps.append(step)
        self._lr_cumsum_at_last = list(self._lr_cumsum)
        self._step_at_last = step
        if self.verbose:
            rank_zero_info(
                f"GradientLogger: step {step} ({trigger}): {n} examples"
                + (f" + {nq} queries" if nq else "")
                + f", D={width}, {time.perf_counter() - t0:.2f}s -> {self.path}"
            )

    # -- in flight --------------------------------------------------------------------------
    def _in_flight_due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (weights after ``step`` updates) is logged."""
        if self._logged_steps and step <= self._logged_steps[-1]:
            return False  # already logged (steps are logged in increasing order)
        n = self.schedule.every_n_train_steps
        return step % n == 0 if n is not None else self.schedule.step_due(step)

    def _log_in_flight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the optimizer step: the weights are still ``θ_t``; keep the step's rows and state."""
        step = trainer.global_step
        taken = self._recorder.take_step(step)
        if taken is None:
            return
        ids, rows = taken
        state = (
            {k: v.detach().to("cpu", copy=True) for k, v in _trainable_state(pl_module).items()}
            if self.save_state
            else None
        )
        queries = (
            self._in_flight_queries(trainer, pl_module) if self.query_data is not None else None
        )
        lrs = current_lrs(trainer.optimizers)
        attrs = {
            "epoch": trainer.current_epoch,
            "trigger": "in_flight",
            "lr_sum": lrs,  # this one step's learning rates: the rows stand for exactly its update
            "lr_cumsum": list(self._lr_cumsum),
            "lr_at_checkpoint": lrs,
            "steps_since_previous": step - (self._logged_steps[-1] if self._logged_steps else -1),
            "micro_batches": self._recorder.micro_batches,
            "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
        }
        self._pending.append(BatchStep(step, ids.cpu(), rows.cpu(), attrs, state, queries))
        self._logged_steps.append(step)
        self._lr_cumsum_at_last = list(self._lr_cumsum)
        self._step_at_last = step

    def _in_flight_queries(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected query gradients at ``θ_t`` (eval mode; RNG, modes and ``.grad`` preserved)."""
        qloader = self._loader(trainer, self.query_data)
        feat = Featurizer(
            pl_module,
            self._layers,
            self.projection,
            self._loss_fn,
            pl_module.device,
            require_ids=False,
        )
        rows, losses, ids = [], [], []
        with preserved_training_state(pl_module):
            for batch in qloader:
                fb = self._featurize(trainer, feat, batch)
                rows.append(fb.rows.cpu())
                losses.append(fb.losses.cpu())
                ids.append(fb.ids)
        if self._query_ids is None:
            n = sum(len(r) for r in rows)
            self._query_ids = (
                torch.arange(n) if any(i is None for i in ids) else torch.cat(ids).cpu()
            )
        return torch.cat(rows), torch.cat(losses)

    def _flush(self) -> None:
        """Write the pending in-flight steps (one file open)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        t0 = time.perf_counter()
        write_batch_steps(self.path, self.writer.storage_dtype, pending, self._query_ids)
        if self.verbose:
            rows = sum(len(p.ids) for p in pending)
            rank_zero_info(
                f"GradientLogger: in flight, steps {pending[0].step}..{pending[-1].step} ({len(pending)} steps, "
                f"{rows} rows, D={row_width(self._layers)}), {time.perf_counter() - t0:.2f}s -> {self.path}"
            )

    def _projection_bases(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: DataLoader
    ) -> Bases | None:
        """The stored PCA bases; fitted (and stored) at the first checkpoint of the run."""
        if self.projection.basis != "pca":
            return None
        if self._bases is None:
            self._bases = self.writer.read_bases()
        if self._bases is None:
            with preserved_training_state(pl_module):
                batches = (trainer.strategy.batch_to_device(b) for b in loader)
                self._bases = fit_pca_bases(
                    pl_module,
                    batches,
                    self._layers,
                    self._loss_fn,
                    self.projection.basis_examples,
                    trainer.precision_plugin.forward_context,
                )
            self.writer.write_bases(self._bases)
        return self._bases

    def _progress(self, trainer: pl.Trainer, description: str, total: int, unit: str):
        """A transient bar in (or beside) the trainer's own (see :mod:`lightning_tda.progress`)."""
        return progress_bar(
            description, total, unit=unit, verbose=self.verbose, transient=True, trainer=trainer
        )

    def _featurize(self, trainer: pl.Trainer, feat: Featurizer, batch: Any):
        batch = trainer.strategy.batch_to_device(batch)
        with trainer.precision_plugin.forward_context():
            return feat(batch)


def _check_in_flight_args(**kw: Any) -> None:
    """Clear errors for sweep-only options given with ``mode="in_flight"``."""
    fixes = {
        "attribution_data": (
            kw["attribution_data"] is not None,
            "in-flight mode logs the training batches themselves; drop attribution_data (the store's examples "
            "are the example ids seen in training) or use mode='sweep'",
        ),
        "every_n_epochs": (
            kw["every_n_epochs"] is not None,
            "in-flight mode logs optimizer steps; use every_n_train_steps=n or at_steps=[...] (default: every step)",
        ),
        "log_at_fit_start": (
            kw["log_at_fit_start"],
            "in-flight mode logs no sweep; the first step's batch is logged at step 0 anyway",
        ),
        "log_at_fit_end": (
            kw["log_at_fit_end"],
            "in-flight mode logs no sweep of the final weights; use mode='sweep' for that",
        ),
        "dense_dim": (
            kw["dense_dim"] > 0,
            "the dense (torch.func) block needs an extra per-example pass; use dense_dim=0 with in-flight mode",
        ),
        "basis": (
            kw["basis"] != "random",
            "a PCA basis is fitted by a sweep; use basis='random' with in-flight mode",
        ),
        "storage": (
            kw["storage"] != "dense",
            "in-flight steps are stored dense; use storage='dense'",
        ),
        "flush_every": (
            isinstance(kw["flush_every"], bool)
            or not isinstance(kw["flush_every"], int)
            or kw["flush_every"] < 1,
            f"flush_every must be a positive int, got {kw['flush_every']!r}",
        ),
    }
    for name, (bad, fix) in fixes.items():
        if bad:
            raise MisconfigurationException(f"GradientLogger(mode='in_flight', {name}=...): {fix}.")


def _describe(reduction: Reduction) -> str:
    if isinstance(reduction, str):
        return reduction
    return f"callable:{getattr(reduction, '__qualname__', type(reduction).__name__)}"


def _trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and all buffers: what query gradients need beyond frozen weights."""
    state = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    state.update({n: b.detach() for n, b in module.named_buffers() if b is not None})
    return state


def _patterns(name: str, value: str | Sequence[str] | None) -> list[str] | None:
    """``modules``/``exclude`` as a list of names/regexes; a single string is one pattern."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]  # not list("net.0"), which would be the patterns 'n', 'e', 't', ...
    try:
        patterns = list(value)
    except TypeError:
        raise MisconfigurationException(
            f"{name} must be a list of module names/regexes (or one string), got {value!r}"
        ) from None
    if not all(isinstance(p, (str, re.Pattern)) for p in patterns):
        raise MisconfigurationException(
            f"{name} must be a list of module names/regexes (strings), got {value!r}"
        )
    return patterns
