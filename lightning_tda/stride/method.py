"""``Stride``: attribution by steering-operator measurements and sparse recovery.

Unlike the gradient methods it measures queries with the model itself: ``AttributionStore.attribute``
sees ``measures_queries = True`` and calls :meth:`Stride.scores` instead of computing projected query
gradients. Checkpoint-aware: with several fitted checkpoints the recovered influences are combined with
weights proportional to each checkpoint's learning-rate sum (``lr_weights``, averaged over groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_tda.capture.losses import LossFn, resolve_loss_fn
from lightning_tda.capture.replay import as_loader, loaded_state
from lightning_tda.errors import StoreError
from lightning_tda.methods.base import AttributionMethod, Interval, lr_weights
from lightning_tda.methods.scoring import ScoreTerm, SelfTerm
from lightning_tda.store.reader import CheckpointInfo, StoreReader
from lightning_tda.stride.fit import fitted_steps, load
from lightning_tda.stride.operator import TargetsFn, extract
from lightning_tda.stride.recover import SparseOperator, recover


@dataclass
class Stride(AttributionMethod):
    """STRIDE (methods.md §12).

    Args:
        checkpoints: fitted checkpoints to use (default: the last fitted one; ``"all"`` for every
            fitted checkpoint, combined by lr weights).
        alpha: Lasso penalty as a fraction of ``λ_max`` (default: the value chosen at fit time on
            held-out training examples).
        positive: non-negative Lasso (default: as fitted).
        interval: which learning-rate sum weighs a checkpoint (see ``lr_weights``).
        targets_fn: ``targets_fn(batch) -> Tensor`` for batches that are not ``(x, y)`` / ``labels``.
    """

    checkpoints: list[int] | str | None = None
    alpha: float | None = None
    positive: bool | None = None
    interval: Interval = "previous"
    targets_fn: TargetsFn | None = None

    name: ClassVar[str] = "stride"
    supports_self_influence: ClassVar[bool] = False
    measures_queries: ClassVar[bool] = True

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

    def score_terms(self, store: StoreReader, queries: dict[int, torch.Tensor]) -> list[ScoreTerm]:
        raise TypeError("STRIDE measures queries with the model; use Stride.scores")

    def self_terms(self, store: StoreReader) -> list[SelfTerm]:
        raise ValueError(
            "STRIDE recovers influence on queries measured through its operators and defines no "
            "self-influence; use store.self_influence(method='influence') or 'tracin'"
        )

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
        *,
        loss_fn: LossFn | None = None,
        batch_size: int = 64,
        collate_fn: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(y [Q, K], query ids)`` at one fitted checkpoint."""
        res = load(store.path, step)
        fn = resolve_loss_fn(model, loss_fn)
        ys, ids = [], []
        with loaded_state(model, store.state(step)):
            for batch in as_loader(queries, batch_size, collate_fn):
                f = extract(model, batch, res.layer, res.output_module, fn, self.targets_fn)
                ys.append(res.operators.measure(f))
                ids.append(f.ids)
        if not ys:
            raise ValueError("the query data is empty")
        qids = None if any(i is None for i in ids) else torch.cat(ids)
        return torch.cat(ys), qids

    def scores(
        self,
        store: StoreReader,
        queries: Any,
        model: nn.Module | None,
        *,
        loss_fn: LossFn | None = None,
        batch_size: int = 64,
        collate_fn: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([Q, N] scores in store row order, query ids)``; score > 0: the example lowers the loss."""
        if model is None:
            raise ValueError("STRIDE measures the queries with the model: pass model=")
        precomputed = (
            isinstance(queries, dict) and queries and all(isinstance(k, int) for k in queries)
        )
        if isinstance(queries, str) or precomputed:
            raise ValueError("STRIDE needs the queries as data (a Dataset, DataLoader or batch)")
        steps = self.fitted(store)
        out, qids = None, None
        for step, w in zip(steps, self.weights(store, steps), strict=True):
            res = load(store.path, step)
            if not torch.equal(torch.from_numpy(res.design.ids), store.example_ids):
                raise StoreError("the STRIDE design does not match the store's example ids")
            y, qids = self.measurements(
                store,
                queries,
                model,
                step,
                loss_fn=loss_fn,
                batch_size=batch_size,
                collate_fn=collate_fn,
            )
            alpha = res.alpha if self.alpha is None else float(self.alpha)
            positive = res.config.positive if self.positive is None else bool(self.positive)
            op = SparseOperator(res.design.matrix)
            s = w * recover(op, y, alpha, positive, res.config.lasso_iters)
            out = s if out is None else out + s
        return out, qids
