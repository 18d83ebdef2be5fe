"""Fitting steering operators with a Lightning ``Trainer`` of their own (methods.md §12.3, §12.6).

``fit(store, model, train_data, config)`` loads a checkpoint's saved state into ``model``, reads the
chosen layer's activations and the logits of every training example (cached in fp16 when they fit in
``config.cache_bytes``, else recomputed per batch), trains the shared basis and the per-subset heads
with the fidelity, stability and linearity losses, chooses the Lasso penalty on held-out *training*
examples, and writes operators, design, config and the task (``task.settings()``) into the store's
``stride/`` group.

The targets come from the task (``task.targets(model, batch) -> Targets(values, shift)``, default:
the task recorded in the store, else the module's own ``targets(batch)``); nothing is inferred from
the batch's shape (:mod:`lightning_tda.stride.operator`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

from lightning_tda.capture.losses import LossFn
from lightning_tda.capture.replay import as_loader, loaded_state, model_device
from lightning_tda.capture.task import Task, resolve_task, task_from_settings
from lightning_tda.data.ids import ExampleIds, IdsSpec, batches_with_ids
from lightning_tda.errors import StoreError
from lightning_tda.store.extension import ExtensionGroup
from lightning_tda.store.fingerprints import check_model_matches
from lightning_tda.store.reader import StoreReader
from lightning_tda.store.writer import open_for_reading
from lightning_tda.stride.design import GROUP, SubsetDesign
from lightning_tda.stride.operator import (
    IGNORE,
    Features,
    SteeringOperators,
    TargetsFn,
    check_targets_declared,
    default_layer,
    extract,
    feature_forward,
    output_module_name,
    token_ce,
)
from lightning_tda.stride.recover import ALPHA_GRID, choose_alpha


@dataclass
class StrideConfig:
    """Hyper-parameters of STRIDE (saved as JSON next to the operators).

    Attributes:
        num_subsets: ``K`` subsets (operators).
        degree: ``d`` subsets per example.
        rank: ``r`` of the shared basis ``B_ψ``.
        head_rank: ``r'`` of factored heads (``None``: full ``[r, C]`` heads while ``K·r·C ≤ 2^24``).
        layer: module whose output is ``h`` (``"<name>:input"`` for its input); ``None``: see
            :func:`~lightning_tda.stride.operator.default_layer`.
        output_module: module whose output are the logits (default: the last Linear/Conv1D).
        fidelity_weight, stability_weight, linearity_weight: loss weights.
        lr: Adam learning rate.
        steps: optimisation steps.
        subsets_per_step: subsets sampled per step.
        members_per_subset: members (fidelity) and non-members (stability) sampled per subset.
        reference_per_subset: non-members in the stability term's reference batch per subset
            (``None``: ``members_per_subset``); larger averages out its sampling noise.
        holdout: training examples held out of fidelity/stability; used by the linearity loss and to
            choose the Lasso penalty.
        linearity_batch: held-out examples measured per step for the linearity loss.
        linearity_subsets: operators sampled per step for the linearity loss (the ridge fit of the
            responses on the sketched membership rows of those operators); ``None``: all ``K``, whose
            cost per step grows with ``K·C``.
        sketch_dim: ``q`` columns of the JL sketch ``M̃ = M R``.
        ridge: ``γ`` of the linearity loss.
        seed: seed of the design, the sketch, the sampling and the hold-out split.
        alpha: Lasso penalty as a fraction of ``λ_max``; ``None`` chooses it from ``alpha_grid``.
        alpha_grid: candidates for ``alpha``.
        positive: non-negative Lasso (only proponents) instead of the two-sided one.
        lasso_iters: FISTA iterations.
        cache_bytes: cache features (fp16) when ``n·T·(d_h + C)·2`` bytes fit in this budget.
        batch_size: batch size of the feature sweep.
    """

    num_subsets: int = 300
    degree: int = 10
    rank: int = 16
    head_rank: int | None = None
    layer: str | None = None
    output_module: str | None = None
    fidelity_weight: float = 1.0
    stability_weight: float = 1.0
    linearity_weight: float = 1.0
    lr: float = 1e-2
    steps: int = 200
    subsets_per_step: int = 16
    members_per_subset: int = 16
    reference_per_subset: int | None = None
    holdout: int = 64
    linearity_batch: int = 8
    linearity_subsets: int | None = None
    sketch_dim: int = 64
    ridge: float = 1.0
    seed: int = 0
    alpha: float | None = None
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    positive: bool = False
    lasso_iters: int = 500
    cache_bytes: int = 2**30
    batch_size: int = 64

    def validate(self, n: int) -> None:
        for name in (
            "num_subsets",
            "degree",
            "rank",
            "steps",
            "subsets_per_step",
            "members_per_subset",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"StrideConfig.{name} must be a positive int, got {v!r}")
        rp = self.reference_per_subset
        if rp is not None and (not isinstance(rp, int) or isinstance(rp, bool) or rp < 1):
            raise ValueError(
                f"StrideConfig.reference_per_subset must be None or a positive int, got {rp!r}"
            )
        ls = self.linearity_subsets
        if ls is not None and (not isinstance(ls, int) or isinstance(ls, bool) or ls < 2):
            raise ValueError(
                f"StrideConfig.linearity_subsets must be None (all K) or an int >= 2, got {ls!r}"
            )
        if self.num_subsets < self.degree:
            raise ValueError(
                f"StrideConfig: K={self.num_subsets} subsets < d={self.degree} subsets per example; "
                "every example must be in d distinct subsets"
            )
        if not 0 <= self.holdout < n:
            raise ValueError(f"StrideConfig.holdout={self.holdout} must be in [0, n={n})")
        if self.alpha is not None and not 0 < self.alpha < 1:
            raise ValueError(f"StrideConfig.alpha must be in (0, 1), got {self.alpha!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> StrideConfig:
        d = json.loads(s)
        d["alpha_grid"] = tuple(d.get("alpha_grid", ALPHA_GRID))
        return cls(**d)

    def check_before_fit(self, pl_module: nn.Module, *, task: Task | None = None) -> None:
        """Raise when training starts, not after it, if the post-fit STRIDE fit will not know the
        targets: ``task`` (the logger's) is the module's own and ``pl_module`` declares no
        ``targets(batch)`` (:func:`~lightning_tda.stride.operator.check_targets_declared`)."""
        check_targets_declared(pl_module, task)

    def run_after_fit(
        self,
        path: str | os.PathLike,
        pl_module: pl.LightningModule,
        data: Any,
        *,
        trainer_kwargs: dict[str, Any] | None = None,
        loss_fn: LossFn | None = None,
        collate_fn: Any = None,
        task: Task | None = None,
    ) -> StrideResult | list[StrideResult] | None:
        """The post-fit stage of ``GradientLogger(stride=self)`` (:class:`~lightning_tda.callbacks.post_fit.PostFitStage`):
        :func:`fit` at the store's last checkpoint, replacing operators already stored for it
        (``task``: the logger's task; default the one recorded in the store)."""
        return fit(
            path,
            pl_module,
            data,
            self,
            trainer_kwargs=trainer_kwargs,
            loss_fn=loss_fn,
            collate_fn=collate_fn,
            overwrite=True,
            task=task,
        )


# -- features ---------------------------------------------------------------------------------
class FeatureSource:
    """Features of training examples by store row position: cached fp16 or recomputed."""

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        store_ids: torch.Tensor,
        layer: str,
        output: str,
        loss_fn: LossFn,
        targets_fn: TargetsFn | None,
        batch_size: int,
        collate_fn: Any,
        cache_bytes: int,
        *,
        task: Task | None = None,
        ids: tuple[ExampleIds, bool] | None = None,
    ) -> None:
        self.model, self.layer, self.output = model, layer, output
        self.loss_fn, self.targets_fn, self.task = loss_fn, targets_fn, task
        self.example_ids, positional = ids if ids is not None else (ExampleIds(), False)
        self.device = model_device(model)
        self.collate = collate_fn or getattr(data, "collate_fn", None) or default_collate
        self.dataset = data.dataset if isinstance(data, DataLoader) else data
        n = len(store_ids)
        pos = {int(i): r for r, i in enumerate(store_ids.tolist())}
        hs, os_, ts, ids = [], [], [], []
        self.cached = True
        loader = as_loader(data, batch_size, collate_fn)
        batches = batches_with_ids(loader, self.example_ids, positional)
        for given, batch in batches:
            f = self._extract(batch, given)
            if f.ids is None:
                raise StoreError(
                    "the training data carries no example ids where the store's record says; pass "
                    "example_ids= (a tuple position, a key or batch -> Tensor[B]) or wrap it in "
                    "IndexedDataset"
                )
            if not hs:
                per = f.h.shape[1] * (f.h.shape[2] + f.o.shape[2]) * 2
                if n * per > cache_bytes:
                    self.cached = False
                    break
            hs.append(f.h.half())
            os_.append(f.o.half())
            ts.append(f.targets)
            ids.append(f.ids)
        if self.cached:
            self.h, self.o, self.t = _pad_cat(hs, 0.0), _pad_cat(os_, 0.0), _pad_cat(ts, IGNORE)
            got = torch.cat(ids)
            order = _order(got, store_ids)
            self.h, self.o, self.t = self.h[order], self.o[order], self.t[order]
            self.d_h, self.num_outputs = self.h.shape[-1], self.o.shape[-1]
        else:
            ds_ids = range(len(self.dataset)) if positional else getattr(self.dataset, "ids", None)
            if ds_ids is None:
                raise ValueError(
                    "features exceed cache_bytes and the data has no .ids to look examples up by id; "
                    "raise StrideConfig.cache_bytes or pass an IndexedDataset"
                )
            dpos = {int(i): r for r, i in enumerate(ds_ids)}
            self.index = torch.tensor([dpos[int(i)] for i in store_ids.tolist()])
            self.d_h, self.num_outputs = f.h.shape[-1], f.o.shape[-1]
        del pos

    def _extract(self, batch: Any, ids: torch.Tensor | None = None) -> Features:
        """Features of the user's ``batch``; its ids are ``ids`` (the library's positions) or read
        with the store's ``example_ids`` spec (``None`` when the batch holds none)."""
        if ids is None:
            ids = self.example_ids.find(batch)
        batch = move_data_to_device(batch, self.device)
        f = extract(
            self.model,
            batch,
            self.layer,
            self.output,
            self.loss_fn,
            self.targets_fn,
            task=self.task,
        )
        f.ids = None if ids is None else ids.reshape(-1).cpu()
        return f

    def get(self, positions: torch.Tensor) -> Features:
        """Features (fp32, CPU) of store rows ``positions`` (1-D)."""
        positions = positions.cpu()
        if self.cached:
            return Features(
                self.h[positions].float(), self.o[positions].float(), self.t[positions], None
            )
        items = [self.dataset[int(i)] for i in self.index[positions].tolist()]
        f = self._extract(self.collate(items))
        return Features(f.h.cpu(), f.o.cpu(), f.targets.cpu(), f.ids)


def _pad_cat(xs: list[torch.Tensor], value: float) -> torch.Tensor:
    t = max(x.shape[1] for x in xs)
    return torch.cat(
        [F.pad(x, (0, 0) * (x.dim() - 2) + (0, t - x.shape[1]), value=value) for x in xs]
    )


def _order(ids: torch.Tensor, store_ids: torch.Tensor) -> torch.Tensor:
    pos = {int(i): r for r, i in enumerate(ids.tolist())}
    missing = [int(i) for i in store_ids.tolist() if int(i) not in pos]
    if missing or len(pos) != len(store_ids):
        raise StoreError(
            f"the training data must hold exactly the store's {len(store_ids)} examples (missing ids "
            f"{missing[:5]}, {len(pos)} given); pass the attribution data that was logged"
        )
    return torch.tensor([pos[int(i)] for i in store_ids.tolist()])


# -- losses -----------------------------------------------------------------------------------
def responses(ops: SteeringOperators, f: Features, ks: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, S]`` differentiable ``loss_base - loss_k`` of examples ``f`` under operators ``ks``."""
    ks = torch.arange(ops.num_subsets, device=f.h.device) if ks is None else ks
    base = token_ce(f.o, f.targets)
    logits = f.o.unsqueeze(0) + torch.einsum("btr,krc->kbtc", ops.basis(f.h), ops.head(ks))
    return (base.unsqueeze(0) - token_ce(logits, f.targets.unsqueeze(0))).T


def kl_base_steered(o: torch.Tensor, steered: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(o) ‖ softmax(õ))`` summed over supervised tokens -> ``[...]``."""
    lp, lq = F.log_softmax(o, -1), F.log_softmax(steered, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return (kl * (targets != IGNORE).to(kl.dtype)).sum(-1)


def ridge_hat(sketch: torch.Tensor, ridge: float) -> torch.Tensor:
    """``[S, S]`` hat matrix ``M̃ (M̃ᵀM̃ + γI)⁻¹ M̃ᵀ`` of sketched membership rows ``M̃`` ``[S, q]``."""
    gram = sketch.T @ sketch + ridge * torch.eye(sketch.shape[1])
    return sketch @ torch.linalg.solve(gram, sketch.T)


class StrideFitModule(pl.LightningModule):
    """Trains the shared basis and all heads jointly; the base model stays frozen (outside this module)."""

    def __init__(
        self,
        operators: SteeringOperators,
        source: FeatureSource,
        design: SubsetDesign,
        config: StrideConfig,
        holdout: torch.Tensor,
    ) -> None:
        super().__init__()
        self.operators = operators
        self.source, self.design, self.config = source, design, config
        n, k = design.num_examples, design.num_subsets
        self.holdout = holdout
        is_train = torch.ones(n, dtype=torch.bool)
        is_train[holdout] = False
        self.train_positions = torch.nonzero(is_train).squeeze(1)
        self.is_train = is_train
        # padded member lists per subset (training positions only)
        m = design.matrix
        lists = [
            torch.from_numpy(m.indices[m.indptr[j] : m.indptr[j + 1]].astype(np.int64))
            for j in range(k)
        ]
        lists = [x[is_train[x]] for x in lists]
        self.member_len = torch.tensor([len(x) for x in lists])
        width = max(1, int(self.member_len.max()))
        self.members = torch.zeros(k, width, dtype=torch.long)
        for j, x in enumerate(lists):
            self.members[j, : len(x)] = x
        self.table = torch.from_numpy(design.table)
        g = torch.Generator().manual_seed(config.seed + 1)
        r = torch.randn(n, config.sketch_dim, generator=g) / config.sketch_dim**0.5
        self.sketch = torch.from_numpy(m @ r.numpy()).float()  # [K, q] sketched membership
        self.proj = ridge_hat(self.sketch, config.ridge)  # [K, K]
        self.gen = torch.Generator().manual_seed(config.seed + 2)

    def train_dataloader(self) -> DataLoader:
        ks = torch.arange(self.design.num_subsets)
        return DataLoader(
            TensorDataset(ks),
            batch_size=self.config.subsets_per_step,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.config.seed + 3),
        )

    def _features(self, positions: torch.Tensor) -> Features:
        f = self.source.get(positions.reshape(-1))
        return Features(f.h.to(self.device), f.o.to(self.device), f.targets.to(self.device), None)

    def losses(self, ks: torch.Tensor) -> dict[str, torch.Tensor]:
        c, ops = self.config, self.operators
        ks = ks.cpu()
        s, m = len(ks), c.members_per_subset
        out: dict[str, torch.Tensor] = {}
        lens = self.member_len[ks].clamp_min(1)
        pick = (torch.rand(s, m, generator=self.gen) * lens.unsqueeze(1)).long()
        mem = torch.gather(self.members[ks], 1, pick)  # [S, m]
        has = (self.member_len[ks] > 0).float().to(self.device)
        kd = ks.to(self.device)
        f = self._features(mem)
        shp = (s, m)
        h, o, t = (x.view(*shp, *x.shape[1:]) for x in (f.h, f.o, f.targets))
        fid = token_ce(ops.steered(o, h, kd), t).mean(1)
        out["fidelity"] = (fid * has).sum() / has.sum().clamp_min(1)
        tp, rm = self.train_positions, c.reference_per_subset or m
        non = tp[torch.randint(len(tp), (s, rm), generator=self.gen)]
        keep = ~(self.table[non] == ks.view(s, 1, 1)).any(-1)  # [S, rm] not in subset k
        f = self._features(non)
        h, o, t = (x.view(s, rm, *x.shape[1:]) for x in (f.h, f.o, f.targets))
        kl = kl_base_steered(o, ops.steered(o, h, kd), t)
        w = keep.float().to(self.device)
        out["stability"] = (kl * w).sum() / w.sum().clamp_min(1)
        if c.linearity_weight > 0 and len(self.holdout):
            b = self.holdout[
                torch.randint(len(self.holdout), (c.linearity_batch,), generator=self.gen)
            ]
            out["linearity"] = self._linearity(self._features(b))
        return out

    def _linearity(self, f: Features) -> torch.Tensor:
        """Mean squared residual of the responses ``[B, S]`` of ``S`` operators (all ``K``, or
        ``linearity_subsets`` sampled) after the ridge fit on those operators' sketched rows."""
        c, k = self.config, self.design.num_subsets
        if c.linearity_subsets is None or c.linearity_subsets >= k:
            y, proj = responses(self.operators, f), self.proj
        else:
            ks = torch.randperm(k, generator=self.gen)[: c.linearity_subsets]
            y = responses(self.operators, f, ks.to(self.device))
            proj = ridge_hat(self.sketch[ks], c.ridge)
        res = y @ proj.to(y).T - y
        return (res**2).sum(1).mean() / y.shape[1]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        c = self.config
        parts = self.losses(batch[0])
        weights = {"fidelity": c.fidelity_weight, "stability": c.stability_weight}
        weights["linearity"] = c.linearity_weight
        loss = sum(weights[k] * v for k, v in parts.items())
        for k, v in parts.items():
            self.log(f"stride/{k}", v.detach(), prog_bar=True, on_step=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.operators.parameters(), lr=self.config.lr)


# -- entry point ------------------------------------------------------------------------------
@dataclass
class StrideResult:
    """One fitted set of operators. ``alpha``: the Lasso penalty fraction used by ``Stride``."""

    step: int
    operators: SteeringOperators
    design: SubsetDesign
    config: StrideConfig
    layer: str
    output_module: str
    alpha: float
    alpha_scores: dict[float, float] = field(default_factory=dict)
    fit_seconds: float = 0.0
    task: dict[str, Any] | None = None
    """``Task.settings()`` of the task whose targets were measured (``None``: fitted before tasks)."""


def step_group(step: int) -> str:
    return f"{int(step):010d}"


def _resolve_steps(
    reader: StoreReader, checkpoint: int | None, checkpoints: list[int] | None
) -> list[int]:
    """The global steps to fit at (``checkpoints``, else ``checkpoint``, else the last); raises for
    unknown steps."""
    if checkpoints is not None and checkpoint is not None:
        raise ValueError("pass checkpoint= or checkpoints=, not both")
    steps = (
        [int(s) for s in checkpoints]
        if checkpoints is not None
        else [reader.checkpoint(checkpoint).global_step]
    )
    for s in steps:
        reader.checkpoint(s)  # raises for unknown steps
    return steps


def _ensure_design(reader: StoreReader, config: StrideConfig) -> SubsetDesign:
    """The store's subset design, (re)drawn and saved when ``config`` asks for another one."""
    design = SubsetDesign.load(reader.path)
    if design is None or (design.num_subsets, design.degree, design.seed) != (
        config.num_subsets,
        config.degree,
        config.seed,
    ):
        design = SubsetDesign.draw(
            reader.example_ids, config.num_subsets, config.degree, config.seed
        )
        design.save(reader.path, overwrite=True)
    elif not np.array_equal(design.ids, reader.example_ids.numpy()):
        raise StoreError("the stored STRIDE design does not cover the store's example ids")
    return design


@dataclass
class _FitJob:
    """Everything one checkpoint's fit needs besides the step."""

    reader: StoreReader
    model: nn.Module
    data: Any
    config: StrideConfig
    design: SubsetDesign
    layer: str
    output: str
    forward: LossFn
    task: Task
    targets_fn: TargetsFn | None
    collate_fn: Any
    trainer_kwargs: dict[str, Any] | None
    ckpt_path: str | None
    overwrite: bool
    ids: tuple[ExampleIds, bool] = (ExampleIds(), False)


def _data_ids(reader: StoreReader, example_ids: ExampleIds | IdsSpec) -> tuple[ExampleIds, bool]:
    """``(spec, positional)``: ``example_ids`` as given, else the store's record."""
    if example_ids is not None:
        return ExampleIds.resolve(example_ids), False
    return reader.recorded_ids()


def store_task(reader: StoreReader) -> Task:
    """The task recorded in the store (a built-in rebuilt from its settings), else the module's own
    (STRIDE needs only targets, so a recorded ``loss_fn`` task means the module's own targets)."""
    record = reader.record("task")
    built = task_from_settings(record) if record else None
    return Task() if built is None else built


def fit(
    store: Any,
    model: nn.Module,
    train_data: Any,
    config: StrideConfig | None = None,
    checkpoint: int | None = None,
    *,
    checkpoints: list[int] | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    ckpt_path: str | None = None,
    loss_fn: LossFn | None = None,
    targets_fn: TargetsFn | None = None,
    collate_fn: Any = None,
    overwrite: bool = False,
    task: Task | None = None,
    example_ids: ExampleIds | IdsSpec = None,
    check_model: bool = True,
) -> StrideResult | list[StrideResult] | None:
    """Fit STRIDE operators at one checkpoint (default: the last) or at each of ``checkpoints``.

    Args:
        store: path of the attribution store or a :class:`StoreReader`.
        model: the trained model class (each checkpoint's saved state is loaded temporarily).
        train_data: the attribution data that was logged (every example once, with ids).
        config: :class:`StrideConfig`.
        checkpoint: global step to fit at (default: the last complete checkpoint).
        checkpoints: several global steps (checkpoint-aware STRIDE); returns a list.
        trainer_kwargs: extra ``lightning.pytorch.Trainer`` arguments (``enable_checkpointing``,
            ``enable_progress_bar``, ``default_root_dir``, ``accelerator`` ...).
        ckpt_path: resume the operator fit from a Lightning checkpoint of an interrupted run.
        loss_fn: the forward run once per batch to fire the hooks (default: the module's
            ``per_example_loss``, else the task's loss).
        targets_fn: an explicit override of the targets, ``targets_fn(batch) -> Targets``.
        task: gives the targets and their label convention (``task.targets``), e.g.
            ``CausalLMTask(labels="hf" | "shifted")`` or ``ClassificationTask()``; default: the task
            recorded in the store, else the module's own ``targets(batch)`` (a module that declares
            none raises a ``ConfigError`` naming these tasks). Recorded in ``stride/<step>``.
        overwrite: replace operators already stored for the step.
        example_ids: where ``train_data``'s batches keep their ids (as ``GradientLogger(example_ids=)``);
            default: as the store records it (``example_ids`` root attribute), including data the
            logger numbered by position.
        check_model: first compare ``model``'s frozen weights and architecture with the store's
            fingerprints (a ``StoreError`` naming what differs); ``False`` skips it.

    Returns:
        A :class:`StrideResult` (a list with ``checkpoints=``); ``None`` on non-zero ranks.
    """
    reader = store if isinstance(store, StoreReader) else StoreReader(store)
    config = config or StrideConfig()
    if not reader.steps:
        raise StoreError(
            f"{reader.path} holds no complete checkpoint to fit STRIDE at; train with the "
            "GradientLogger until it logs one (or resume the interrupted fit)"
        )
    config.validate(reader.num_examples)
    if check_model:
        check_model_matches(reader, model)
    steps = _resolve_steps(reader, checkpoint, checkpoints)
    task = resolve_task(task, None, store_task(reader))
    check_targets_declared(model, task, targets_fn)  # before anything is written
    design = _ensure_design(reader, config)
    output = config.output_module or output_module_name(model)
    layer = config.layer or default_layer(model, output)
    forward = feature_forward(model, task, loss_fn)
    job = _FitJob(
        reader, model, train_data, config, design, layer, output, forward, task, targets_fn,
        collate_fn, trainer_kwargs, ckpt_path, overwrite, _data_ids(reader, example_ids),
    )  # fmt: skip
    results = [_fit_one(job, s) for s in steps]
    if any(r is None for r in results):
        return None
    return results if checkpoints is not None else results[0]


def _fit_one(job: _FitJob, step: int) -> StrideResult | None:
    """Fit, choose the Lasso penalty and save the operators at ``step`` (``None`` off rank zero)."""
    t0, reader, config, design = time.perf_counter(), job.reader, job.config, job.design
    if exists(reader.path, step) and not job.overwrite:
        raise StoreError(
            f"{reader.path} already holds STRIDE operators for checkpoint {step}; pass overwrite=True"
        )
    torch.manual_seed(config.seed)
    with loaded_state(job.model, reader.state(step)):
        source = FeatureSource(
            job.model, job.data, reader.example_ids, job.layer, job.output, job.forward,
            job.targets_fn, config.batch_size, job.collate_fn, config.cache_bytes, task=job.task,
            ids=job.ids,
        )  # fmt: skip
        ops = SteeringOperators(
            config.num_subsets, source.d_h, source.num_outputs, config.rank, config.head_rank
        )
        perm = np.random.default_rng(config.seed).permutation(design.num_examples)
        holdout = torch.from_numpy(np.sort(perm[: config.holdout]))
        module = StrideFitModule(ops, source, design, config, holdout)
        trainer = _trainer(config, job.trainer_kwargs)
        trainer.fit(module, ckpt_path=job.ckpt_path)
        if not trainer.is_global_zero:
            return None
        ops = module.operators.cpu().eval()
        alpha, scores = config.alpha, {}
        if alpha is None:
            alpha, scores = _choose_alpha(ops, source, design, config, holdout)
    settings = job.task.settings()
    if job.targets_fn is not None:
        settings = {**settings, "targets_fn": getattr(job.targets_fn, "__qualname__", "custom")}
    res = StrideResult(
        step, ops, design, config, job.layer, job.output, float(alpha), scores,
        time.perf_counter() - t0, settings,
    )  # fmt: skip
    save(reader.path, res, job.overwrite)
    return res


def _trainer(config: StrideConfig, trainer_kwargs: dict[str, Any] | None) -> pl.Trainer:
    kw = dict(
        max_steps=config.steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=True,
        num_sanity_val_steps=0,
    )
    kw.update(trainer_kwargs or {})
    return pl.Trainer(**kw)


def _choose_alpha(
    ops: SteeringOperators,
    source: FeatureSource,
    design: SubsetDesign,
    config: StrideConfig,
    holdout: torch.Tensor,
) -> tuple[float, dict[float, float]]:
    """The Lasso penalty fraction chosen on the held-out training examples' measurements."""
    if len(holdout) < 2:
        raise ValueError("choosing alpha needs StrideConfig.holdout >= 2 held-out examples")
    y = torch.cat(
        [ops.measure(source.get(holdout[i : i + 64])) for i in range(0, len(holdout), 64)]
    )
    return choose_alpha(
        design.matrix, y, config.alpha_grid, positive=config.positive, seed=config.seed
    )


def exists(path: str | os.PathLike, step: int) -> bool:
    with open_for_reading(path) as f:
        return f"{GROUP}/{step_group(step)}" in f


def fitted_steps(path: str | os.PathLike) -> list[int]:
    with open_for_reading(path) as f:
        g = f.get(GROUP)
        return [] if g is None else sorted(int(k) for k in g if k.isdigit())


def save(path: str | os.PathLike, res: StrideResult, overwrite: bool = False) -> None:
    """Write operators + config under ``stride/<step>``, visible only once complete."""
    name = step_group(res.step)
    with ExtensionGroup(path, GROUP) as ext:
        if name in ext.group:
            if not overwrite:
                raise StoreError(f"{path} already holds STRIDE operators for step {res.step}")
            del ext.group[name]
        sg = ext.partial(name).create_group(name)
        og = sg.create_group("operator")
        for k, v in res.operators.state_dict().items():
            og.create_dataset(k, data=v.detach().cpu().float().numpy(), track_times=False)
        sg.attrs["config"] = res.config.to_json()
        sg.attrs["layer"] = res.layer
        sg.attrs["output_module"] = res.output_module
        sg.attrs["alpha"] = res.alpha
        sg.attrs["alpha_scores"] = json.dumps({str(k): v for k, v in res.alpha_scores.items()})
        sg.attrs["d_h"] = res.operators.basis.in_features
        sg.attrs["num_outputs"] = res.operators.num_outputs
        sg.attrs["design_seed"] = res.design.seed
        sg.attrs["fit_seconds"] = res.fit_seconds
        if res.task is not None:
            sg.attrs["task"] = json.dumps(res.task, sort_keys=True)
        ext.publish(name)


def load(path: str | os.PathLike, step: int) -> StrideResult:
    """Operators fitted at ``step`` (raises naming ``lightning_tda.stride.fit`` when absent)."""
    design = SubsetDesign.load(path)
    with open_for_reading(path) as f:
        g = f.get(f"{GROUP}/{step_group(step)}")
        if g is None or design is None:
            have = fitted_steps(path) if GROUP in f else []
            raise StoreError(
                f"no STRIDE operators for checkpoint {step} in {path} (fitted: {have or 'none'}); "
                "run lightning_tda.stride.fit(store, model, train_data, config) first"
            )
        config = StrideConfig.from_json(str(g.attrs["config"]))
        state = {k: torch.from_numpy(g["operator"][k][()]) for k in g["operator"]}
        ops = SteeringOperators(
            config.num_subsets,
            int(g.attrs["d_h"]),
            int(g.attrs["num_outputs"]),
            config.rank,
            config.head_rank if "out" not in state else state["out"].shape[0],
        )
        if "out" not in state:
            ops.out = None
            ops.heads = nn.Parameter(torch.zeros_like(state["heads"]))
        ops.load_state_dict(state)
        scores = {float(k): v for k, v in json.loads(str(g.attrs["alpha_scores"])).items()}
        return StrideResult(
            step,
            ops.eval(),
            design,
            config,
            str(g.attrs["layer"]),
            str(g.attrs["output_module"]),
            float(g.attrs["alpha"]),
            scores,
            float(g.attrs["fit_seconds"]),
            json.loads(str(g.attrs["task"])) if "task" in g.attrs else None,
        )
