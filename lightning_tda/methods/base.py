"""The method protocol: what an attribution method over a store implements, per kind.

Every method is a dataclass of its hyper-parameters deriving from one of two kinds; the
:class:`~lightning_tda.AttributionStore` dispatches on the declared ``kind`` and capabilities,
never on ``getattr`` probes or exceptions.

**Row methods** (:class:`RowMethod`, ``kind = "rows"``: TracIn, influence, SOURCE, LoRIF, ...) score
the stored rows against projected query gradients. The store computes (or reads) the query
gradients at ``query_steps(store)`` and streams the stored rows once through the terms the method
returns. A row method implements:

- ``used_checkpoints(store) -> list[CheckpointInfo]``: the checkpoints it reads (recorded in results);
- ``query_steps(store) -> list[int | tuple]``: where query gradients are needed (default: every
  used checkpoint; a ``(step, member)`` tuple asks for a dropout-ensemble member's gradients);
- ``score_terms(store, queries) -> list[ScoreTerm]``: ``queries[step]`` is ``[Q, D]``; the score is
  the sum of the terms' ``<query, row>`` products over the stored rows;
- ``index_maps(store)`` (optional): a whitening of the rows for an approximate row index;
- ``self_terms(store) -> list[SelfTerm]``: each training example's self-influence as a sum of terms,
  required when ``supports_self_influence`` is ``True`` (the default); a method that defines none
  declares ``supports_self_influence = False`` and a ``self_influence_note`` naming alternatives.

**Model methods** (:class:`ModelMethod`, ``kind = "model"``: STRIDE) measure the queries with the
model itself instead of reading projected query gradients. A model method implements
``used_checkpoints(store)`` and ``scores(store, queries, model, spec) -> ([Q, N] scores in store row
order, query ids or None)``, ``spec`` being the :class:`~lightning_tda.capture.query_spec.QuerySpec`
the queries are batched and differentiated with. Model methods define no self-influence.

Both kinds follow the library sign: score > 0 means including the training example lowers the
query's loss. To make a new method selectable by name, register it with
:func:`lightning_tda.methods.register_method` (``"name"``, ``"package.module:Class"``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from lightning_tda.capture.query_spec import QuerySpec
from lightning_tda.errors import ConfigError
from lightning_tda.methods.scoring import ScoreTerm, SelfTerm
from lightning_tda.store.reader import CheckpointInfo, StoreReader

Interval = Literal["previous", "next"]
MethodKind = Literal["rows", "model"]
RowMap = Callable[[torch.Tensor], torch.Tensor]
"""A map of a block of rows ``[B, D] -> [B, D]``."""


class AttributionMethod(ABC):
    """Common base of both method kinds (see the module docstring for the protocol).

    Subclass :class:`RowMethod` or :class:`ModelMethod`, not this class. Subclasses are dataclasses
    holding the method's hyper-parameters.
    """

    name: ClassVar[str]
    kind: ClassVar[MethodKind] = "rows"
    """``"rows"``: scores stored rows against projected query gradients (``score_terms``);
    ``"model"``: measures queries with the model itself (``scores``, e.g. STRIDE)."""
    supports_self_influence: ClassVar[bool] = True
    """Whether ``store.self_influence`` is defined for this method (``self_terms``)."""
    self_influence_note: ClassVar[str] = ""
    """Why a method without self-influence has none, and what to use instead."""

    @abstractmethod
    def used_checkpoints(self, store: StoreReader) -> list[CheckpointInfo]:
        """The checkpoints this method reads."""


def self_influence_refusal(method: AttributionMethod) -> str:
    """The error message for ``store.self_influence`` with a method that defines none."""
    return method.self_influence_note or (
        f"{method.name} defines no self-influence; use method='tracin' or 'influence'"
    )


class RowMethod(AttributionMethod):
    """A method that scores stored rows against projected query gradients (``kind = "rows"``)."""

    kind: ClassVar[MethodKind] = "rows"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.supports_self_influence and cls.self_terms is RowMethod.self_terms:
            raise TypeError(
                f"{cls.__name__} declares supports_self_influence = True but implements no "
                "self_terms; implement it or declare supports_self_influence = False"
            )

    def query_steps(self, store: StoreReader) -> list[int]:
        """The checkpoints at which query gradients are needed (default: every used checkpoint)."""
        return [c.global_step for c in self.used_checkpoints(store)]

    @abstractmethod
    def score_terms(self, store: StoreReader, queries: dict[int, torch.Tensor]) -> list[ScoreTerm]:
        """``queries[step]``: ``[Q, D]`` projected query gradients at that checkpoint."""

    def index_maps(self, store: StoreReader) -> list[tuple[RowMap, RowMap]] | None:
        """Per score term, ``(row_map, query_map)`` with ``<query_map(u), row_map(x)> = <u, x>``
        that whiten the rows of a row index (:mod:`lightning_tda.methods.row_index`); ``None``
        (the default): the index holds the rows as stored."""
        return None

    def self_terms(self, store: StoreReader) -> list[SelfTerm]:
        """Terms of each training example's self-influence (methods with ``supports_self_influence``).

        The default is for methods that declare ``supports_self_influence = False``: it refuses,
        naming the alternatives (``store.self_influence`` checks the flag before calling this)."""
        raise ConfigError(self_influence_refusal(self))


class ModelMethod(AttributionMethod):
    """A method that measures the queries with the model itself (``kind = "model"``)."""

    kind: ClassVar[MethodKind] = "model"
    supports_self_influence: ClassVar[bool] = False

    @abstractmethod
    def scores(
        self,
        store: StoreReader,
        queries: Any,
        model: nn.Module | None,
        spec: QuerySpec | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([Q, N] scores in store row order, query ids [Q] or None)`` for query data ``queries``.

        ``spec`` batches the queries and names the per-example loss (``None``: ``QuerySpec()``)."""


def select_checkpoints(store: StoreReader, steps: Sequence[int] | None) -> list[CheckpointInfo]:
    """The checkpoints at ``steps`` (``None``: every complete checkpoint); never empty."""
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


__all__ = [
    "AttributionMethod",
    "Interval",
    "MethodKind",
    "ModelMethod",
    "RowMethod",
    "lr_weights",
    "select_checkpoints",
    "self_influence_refusal",
]
