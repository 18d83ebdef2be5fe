"""Common interface of attribution methods over a store."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch

from lightning_tda.methods.scoring import ScoreTerm, SelfTerm
from lightning_tda.store.reader import CheckpointInfo, StoreReader

Interval = Literal["previous", "next"]
MethodKind = Literal["rows", "model"]


class AttributionMethod(ABC):
    """A method turns per-checkpoint query vectors into score terms over stored rows.

    Subclasses are dataclasses holding the method's hyper-parameters; they never touch the model.
    """

    name: ClassVar[str]
    kind: ClassVar[MethodKind] = "rows"
    """``"rows"``: scores stored rows against projected query gradients (``score_terms``);
    ``"model"``: measures queries with the model itself (e.g. STRIDE)."""
    supports_self_influence: ClassVar[bool] = True
    """Whether ``self_terms`` (``store.self_influence``) is defined for this method."""

    @abstractmethod
    def used_checkpoints(self, store: StoreReader) -> list[CheckpointInfo]:
        """The checkpoints whose query gradients this method needs."""

    def query_steps(self, store: StoreReader) -> list[int]:
        """The checkpoints at which query gradients are needed (default: every used checkpoint)."""
        return [c.global_step for c in self.used_checkpoints(store)]

    @abstractmethod
    def score_terms(self, store: StoreReader, queries: dict[int, torch.Tensor]) -> list[ScoreTerm]:
        """``queries[step]``: ``[Q, D]`` projected query gradients at that checkpoint."""

    @abstractmethod
    def self_terms(self, store: StoreReader) -> list[SelfTerm]:
        """Terms of each training example's self-influence."""


def select_checkpoints(store: StoreReader, steps: Sequence[int] | None) -> list[CheckpointInfo]:
    out = list(store.checkpoints) if steps is None else [store.checkpoint(s) for s in steps]
    if not out:
        store.checkpoint(None)  # raises the informative "no complete checkpoint" error
    return out


def lr_weights(store: StoreReader, ck: CheckpointInfo, interval: Interval) -> torch.Tensor:
    """``[D]`` per-column learning-rate sum of the interval checkpoint ``ck`` stands for.

    ``"previous"``: the steps since the previous checkpoint (TracIn-CP's usual convention);
    ``"next"``: the steps until the next checkpoint (or the end of training). A batch (in-flight)
    checkpoint stands for exactly the optimizer step that used its batch: its weight is that step's
    learning rate whatever the interval (ideal per-step TracIn).
    """
    if interval == "previous" or (interval == "next" and ck.in_flight):
        sums = ck.lr_sum
    elif interval == "next":
        later = [c for c in store.checkpoints if c.global_step > ck.global_step]
        end = (
            later[0].lr_cumsum if later else tuple(store.attrs.get("lr_cumsum_final", ck.lr_cumsum))
        )
        sums = tuple(float(e) - float(s) for e, s in zip(end, ck.lr_cumsum, strict=True))
    else:
        raise ValueError(f"interval must be 'previous' or 'next', got {interval!r}")
    if not sums:
        raise ValueError(
            f"checkpoint {ck.global_step} has no learning-rate record; it was not logged during fit "
            "(use method='graddot' or re-log with GradientLogger during training)"
        )
    return store.column_weights(ck.global_step, sums)
