"""``Stride``: attribution by steering-operator measurements and sparse recovery.

Unlike the gradient methods it measures queries with the model itself: it is a
:class:`~lightning_tda.methods.base.ModelMethod` (``kind = "model"``), so ``AttributionStore.attribute``
calls :meth:`Stride.scores` instead of computing projected query gradients. Checkpoint-aware: with
several fitted checkpoints the recovered influences are combined with weights proportional to each
checkpoint's learning-rate sum (``lr_weights``, averaged over groups).

The queries' targets come from a task, never from the batch's shape: ``Stride(task=...)``, else the
``task=`` given to ``attribute``, else the task recorded when the operators were fitted
(``stride/<step>``), else the store's recorded task, else the module's own ``targets(batch)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_tda.capture.query_spec import QuerySpec
from lightning_tda.capture.replay import loaded_state
from lightning_tda.capture.task import LossFnTask, Task, task_from_settings
from lightning_tda.errors import StoreError
from lightning_tda.methods.base import Interval, ModelMethod, lr_weights
from lightning_tda.store.reader import CheckpointInfo, StoreReader
from lightning_tda.stride.fit import StrideResult, fitted_steps, load, store_task
from lightning_tda.stride.operator import TargetsFn, extract, feature_forward
from lightning_tda.stride.recover import SparseOperator, recover


@dataclass
class Stride(ModelMethod):
    """STRIDE (methods.md §12).

    Args:
        checkpoints: fitted checkpoints to use (default: the last fitted one; ``"all"`` for every
            fitted checkpoint, combined by lr weights).
        alpha: Lasso penalty as a fraction of ``λ_max`` (default: the value chosen at fit time on
            held-out training examples).
        positive: non-negative Lasso (default: as fitted).
        interval: which learning-rate sum weighs a checkpoint (see ``lr_weights``).
        targets_fn: an explicit override of the task's targets, ``targets_fn(batch) -> Targets``.
        task: gives the queries' targets and their label convention (default: see the module
            docstring; the fitted one is the natural choice).
    """

    checkpoints: list[int] | str | None = None
    alpha: float | None = None
    positive: bool | None = None
    interval: Interval = "previous"
    targets_fn: TargetsFn | None = None
    task: Task | None = None

    name: ClassVar[str] = "stride"
    supports_self_influence: ClassVar[bool] = False
    self_influence_note: ClassVar[str] = (
        "STRIDE recovers influence on queries measured through its operators and defines no "
        "self-influence; use store.self_influence(method='influence') or 'tracin'"
    )

    def fitted(self, store: StoreReader) -> list[int]:
        have = fitted_steps(store.path)
        if not have:
            raise StoreError(
                f"STRIDE is not fitted for {store.path}: run lightning_tda.stride.fit(store, model, "
                "train_data, StrideConfig(...)) first"
            )
        if self.checkpoints is None:
            return have[-1:]
        if self.checkpoints == "all":
            return have
        missing = [int(s) for s in self.checkpoints if int(s) not in have]
        if missing:
            raise StoreError(
                f"STRIDE operators are not fitted at checkpoints {missing} (fitted: {have}); run "
                "lightning_tda.stride.fit(..., checkpoints=[...])"
            )
        return [int(s) for s in self.checkpoints]

    def used_checkpoints(self, store: StoreReader) -> list[CheckpointInfo]:
        return [store.checkpoint(s) for s in self.fitted(store)]

    def weights(self, store: StoreReader, steps: list[int]) -> list[float]:
        if len(steps) == 1:
            return [1.0]
        w = [float(lr_weights(store, store.checkpoint(s), self.interval).mean()) for s in steps]
        total = sum(w)
        if total <= 0:
            raise ValueError(f"checkpoints {steps} have zero learning-rate weight")
        return [x / total for x in w]

    def measurements(
        self,
        store: StoreReader,
        queries: Any,
        model: nn.Module,
        step: int,
        spec: QuerySpec | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(y [Q, K], query ids)`` at one fitted checkpoint (``spec``: batching and task)."""
        spec = QuerySpec() if spec is None else spec
        res = load(store.path, step)
        task = self.targets_task(store, res, spec)
        fn = feature_forward(model, spec.task_or(task), spec.loss_fn)
        ys, ids = [], []
        with loaded_state(model, store.state(step)):
            for batch in spec.loader(queries):
                f = extract(
                    model, batch, res.layer, res.output_module, fn, self.targets_fn, task=task
                )
                ys.append(res.operators.measure(f))
                ids.append(f.ids)
        if not ys:
            raise ValueError("the query data is empty")
        qids = None if any(i is None for i in ids) else torch.cat(ids)
        return torch.cat(ys), qids

    def targets_task(self, store: StoreReader, res: StrideResult, spec: QuerySpec) -> Task:
        """The task whose ``targets`` the queries are measured against (module docstring order)."""
        if self.task is not None:
            return self.task
        if spec.task is not None and not isinstance(spec.task, LossFnTask):
            return spec.task
        fitted = task_from_settings(res.task) if res.task is not None else None
        if fitted is not None or res.task is not None:
            return Task() if fitted is None else fitted
        return store_task(store)

    def scores(
        self,
        store: StoreReader,
        queries: Any,
        model: nn.Module | None,
        spec: QuerySpec | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([Q, N] scores in store row order, query ids)``; score > 0: the example lowers the loss."""
        if model is None:
            raise ValueError("STRIDE measures the queries with the model: pass model=")
        precomputed = (
            isinstance(queries, dict) and queries and all(isinstance(k, int) for k in queries)
        )
        if isinstance(queries, str) or precomputed:
            raise ValueError("STRIDE needs the queries as data (a Dataset, DataLoader or batch)")
        spec = QuerySpec() if spec is None else spec
        steps = self.fitted(store)
        out, qids = None, None
        for step, w in zip(steps, self.weights(store, steps), strict=True):
            res = load(store.path, step)
            if not torch.equal(torch.from_numpy(res.design.ids), store.example_ids):
                raise StoreError("the STRIDE design does not match the store's example ids")
            y, qids = self.measurements(store, queries, model, step, spec)
            alpha = res.alpha if self.alpha is None else float(self.alpha)
            positive = res.config.positive if self.positive is None else bool(self.positive)
            op = SparseOperator(res.design.matrix)
            s = w * recover(op, y, alpha, positive, res.config.lasso_iters)
            out = s if out is None else out + s
        return out, qids
