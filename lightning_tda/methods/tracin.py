"""Gradient-similarity methods: GradDot, GradCos, TracIn-CP and Adam-preconditioned TracIn.

All follow the library sign: score > 0 means the training example's gradient step lowers the
query loss (a proponent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch

from lightning_tda.methods.base import AttributionMethod, Interval, lr_weights, select_checkpoints
from lightning_tda.methods.scoring import ScoreTerm, SelfTerm
from lightning_tda.store import schema
from lightning_tda.store.batches import batch_pairs, batch_scores, in_flight_refusal
from lightning_tda.store.reader import CheckpointInfo, StoreReader


def score_term(
    ck: CheckpointInfo, dataset: str, query: torch.Tensor, normalize: bool = False
) -> ScoreTerm:
    """``<query, row>`` over a checkpoint's rows; a batch (in-flight) checkpoint scores only its batch."""
    if not ck.in_flight:
        return ScoreTerm(ck.global_step, dataset, query, normalize_train=normalize)
    return ScoreTerm(
        ck.global_step,
        schema.batch_view(dataset),
        query,
        score_fn=partial(batch_scores, normalize=normalize),
    )


def self_term(ck: CheckpointInfo, a: str, b: str, weight: torch.Tensor) -> SelfTerm:
    """``<weight ⊙ a_i, b_i>`` at one checkpoint (zero off the batch of an in-flight checkpoint)."""
    if not ck.in_flight:
        return SelfTerm(ck.global_step, a, b, weight)
    return SelfTerm(
        ck.global_step,
        schema.batch_view(a),
        schema.batch_view(b),
        weight,
        pair_fn=partial(batch_pairs, weight=weight),
    )


def batch_steps_term(steps: list[int], dataset: str, queries: torch.Tensor) -> ScoreTerm:
    """One term over many batch checkpoints: ``Σ_j <queries[:, j], row_{j,i}>`` (``queries`` ``[Q, T, D]``).

    The streaming scorer then reads every store block once and each step's rows once, instead of
    one term (and one pass over the store) per optimizer step."""
    return ScoreTerm(steps[0], schema.batch_view(dataset, steps), queries, score_fn=batch_scores)


@dataclass
class GradDot(AttributionMethod):
    """``<g_q, g_i>`` at one checkpoint.

    Args:
        checkpoint: global step to use; ``None`` = the last logged checkpoint.
    """

    checkpoint: int | None = None
    name: ClassVar[str] = "graddot"

    def used_checkpoints(self, store: StoreReader) -> list[CheckpointInfo]:
        return [store.checkpoint(self.checkpoint)]

    def score_terms(self, store: StoreReader, queries: dict[int, torch.Tensor]) -> list[ScoreTerm]:
        (ck,) = self.used_checkpoints(store)
        return [score_term(ck, schema.TRAIN, queries[ck.global_step])]

    def self_terms(self, store: StoreReader) -> list[SelfTerm]:
        (ck,) = self.used_checkpoints(store)
        return [self_term(ck, schema.TRAIN, schema.TRAIN, torch.ones(store.width))]


@dataclass
class GradCos(GradDot):
    """Cosine similarity ``<g_q, g_i> / (|g_q| |g_i|)`` at one checkpoint (in the projected space).

    Args:
        checkpoint: global step to use; ``None`` = the last logged checkpoint.
    """

    name: ClassVar[str] = "gradcos"
    supports_self_influence: ClassVar[bool] = False

    def score_terms(self, store: StoreReader, queries: dict[int, torch.Tensor]) -> list[ScoreTerm]:
        (ck,) = self.used_checkpoints(store)
        q = queries[ck.global_step]
        return [score_term(ck, schema.TRAIN, _unit(q), normalize=True)]

    def self_terms(self, store: StoreReader) -> list[SelfTerm]:
        raise ValueError(
            "gradcos self-influence is 1 for every example; use method='tracin' or 'graddot'"
        )


@dataclass
class TracIn(AttributionMethod):
    """TracIn-CP: ``Σ_c η̄_c <g_q(θ_c), g_i(θ_c)>`` (methods.md §2.1).

    ``η̄_c`` is the learning-rate sum of the interval checkpoint ``c`` stands for, logged per parameter
    group (each layer weighted by its group's sum). On an in-flight store (``GradientLogger(mode=
    "in_flight")``) every checkpoint is one optimizer step ``t`` holding only its batch's rows, so the
    score is the ideal per-step TracIn ``Σ_t η_t <g_q(θ_t), g_i(θ_t)>`` over the logged steps whose batch
    held example ``i``.

    Args:
        checkpoints: global steps to use; ``None`` = all complete checkpoints.
        interval: ``"previous"`` (steps since the previous checkpoint) or ``"next"``.
    """

    checkpoints: Sequence[int] | None = None
    interval: Interval = "previous"
    name: ClassVar[str] = "tracin"
    train_dataset: ClassVar[str] = schema.TRAIN

    def __post_init__(self) -> None:
        if self.interval not in ("previous", "next"):
            raise ValueError(f"interval must be 'previous' or 'next', got {self.interval!r}")
        if self.checkpoints is not None:
            self.checkpoints = [int(s) for s in self.checkpoints]

    def used_checkpoints(self, store: StoreReader) -> list[CheckpointInfo]:
        return select_checkpoints(store, self.checkpoints)

    def _weighted(self, store: StoreReader) -> list[tuple[CheckpointInfo, torch.Tensor]]:
        out = [(ck, lr_weights(store, ck, self.interval)) for ck in self.used_checkpoints(store)]
        if all(float(w.abs().max()) == 0.0 for _, w in out):
            raise ValueError(
                "every selected checkpoint has a zero learning-rate weight (e.g. only a fit-start checkpoint with "
                "interval='previous'); use interval='next', other checkpoints, or method='graddot'"
            )
        return out

    def score_terms(self, store: StoreReader, queries: dict[int, torch.Tensor]) -> list[ScoreTerm]:
        weighted = self._weighted(store)
        terms = [
            ScoreTerm(
                ck.global_step,
                self.train_dataset,
                queries[ck.global_step] * w.to(queries[ck.global_step].device),
            )
            for ck, w in weighted
            if not ck.in_flight
        ]
        flight = [(ck, w) for ck, w in weighted if ck.in_flight]
        if flight:  # in-flight steps: one term, each step's rows against its own weighted query
            q = torch.stack([queries[ck.global_step] for ck, _ in flight])  # [T, Q, D]
            q.mul_(torch.stack([w for _, w in flight]).to(q.device)[:, None, :])
            # [Q, T, D] view whose per-step slices q[:, j] are contiguous
            terms.append(
                batch_steps_term(
                    [ck.global_step for ck, _ in flight], self.train_dataset, q.permute(1, 0, 2)
                )
            )
        return terms

    def self_terms(self, store: StoreReader) -> list[SelfTerm]:
        weighted = self._weighted(store)
        terms = [
            SelfTerm(ck.global_step, schema.TRAIN, self.train_dataset, w)
            for ck, w in weighted
            if not ck.in_flight
        ]
        flight = [(ck, w) for ck, w in weighted if ck.in_flight]
        if flight:
            steps = [ck.global_step for ck, _ in flight]
            if self.train_dataset != schema.TRAIN:
                raise ValueError(f"{self.name} has no in-flight self-influence")
            view = schema.batch_view(schema.TRAIN, steps)
            weights = torch.stack([w for _, w in flight])  # [T, D]
            terms.append(
                SelfTerm(
                    steps[0],
                    view,
                    view,
                    torch.ones(store.width),
                    pair_fn=partial(batch_pairs, weight=weights),
                )
            )
        return terms


@dataclass
class TracInAdam(TracIn):
    """TracIn with the Adam update direction on the train side (methods.md §2.3).

    Train rows are ``P_out^T (G ⊙ a b^T) P_in``, the per-example gradient preconditioned by the
    checkpoint's factored Adam second moments (``a``, ``b`` from row/column means of ``exp_avg_sq``,
    bias-corrected), applied to inputs and output gradients before projection. The query side is the
    plain gradient, so a score is the first-order query-loss drop of one Adam-like step on the example.
    Needs ``GradientLogger(optimizer_state=True)`` with an Adam-family optimizer.
    """

    name: ClassVar[str] = "tracin_adam"
    train_dataset: ClassVar[str] = schema.TRAIN_PRECOND

    def used_checkpoints(self, store: StoreReader) -> list[CheckpointInfo]:
        cks = super().used_checkpoints(store)
        flight = [c.global_step for c in cks if c.in_flight]
        if flight:
            raise in_flight_refusal(flight[0], schema.TRAIN_PRECOND)
        missing = [c.global_step for c in cks if not c.has_precond]
        if missing:
            raise ValueError(
                f"checkpoints {missing} have no preconditioned rows; tracin_adam needs an Adam-family optimizer "
                "and GradientLogger(optimizer_state=True)"
            )
        return cks


def _unit(q: torch.Tensor) -> torch.Tensor:
    return q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)
