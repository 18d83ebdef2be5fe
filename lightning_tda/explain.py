"""One explanation model of an attribution, rendered by the HTML report and the W&B panels.

:func:`explain` turns an :class:`~lightning_tda.results.AttributionResult` (plus, optionally, the
self-influence of every training example and each checkpoint's own scores) into an
:class:`Explanation`: per query its top proponents and opponents with the examples themselves, the
self-influence outliers, and each checkpoint's share of the scores. Top-k is taken here once (dense
results) or read from the result as it is (top-k results); the surfaces only render::

    from lightning_tda.explain import ExampleLookup, explain

    res = store.attribute(queries, model=model, method="tracin", top_k=5)
    ex = explain(res, train=ExampleLookup(train), queries=ExampleLookup(queries))
    ex.queries[0].proponents[0]  # RankedExample(rank=1, example_id=..., score=..., example=...)

:class:`ExampleLookup` finds examples by id in an ``IndexedDataset``, any map-style dataset whose
items carry ids, a DataLoader over one, or a collated batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from lightning_tda.attribution import AttributionStore
from lightning_tda.capture.task import Task
from lightning_tda.data.ids import ExampleIds, IdsSpec, recorded_ids
from lightning_tda.data.indexed import Indexed, strip_example_ids
from lightning_tda.methods import METHODS, AttributionMethod
from lightning_tda.results import AttributionResult

Find = Callable[[int], Any]
"""``find(example_id) -> item | None``: a training example by id (``ExampleLookup.find``)."""

# -- example lookup ----------------------------------------------------------------------------


class ExampleLookup:
    """Items of a dataset (or a collated batch) by example id, or by position when ids are unknown.

    Ids come from ``data.ids`` (an :class:`~lightning_tda.IndexedDataset`), the batch's id field, or
    one scan of the items (``Indexed`` items or dicts with ``"example_id"``), on first use.

    Args:
        data: an ``IndexedDataset``, any map-style dataset whose items carry ids, a DataLoader over
            one (its ``dataset``), or a collated batch (``Indexed`` with ``[B]`` ids, or a dict).
        what: the argument's name in the ``TypeError`` raised for data that cannot be indexed.
        strict: :meth:`find` raises ``KeyError`` (as :meth:`by_id`) for an id the data lacks,
            instead of returning ``None``.
        example_ids: where the items keep their ids (as ``GradientLogger(example_ids=)``), or a
            store's ``example_ids`` record (:func:`~lightning_tda.data.ids.recorded_ids`; data the
            logger numbered by position is looked up by position).
    """

    def __init__(
        self,
        data: Any,
        what: str = "data",
        *,
        strict: bool = False,
        example_ids: ExampleIds | IdsSpec | Mapping[str, Any] = None,
    ) -> None:
        if isinstance(data, DataLoader):
            data = data.dataset
        self.batch = _is_batch(data)
        if not self.batch and (
            isinstance(data, str) or not (hasattr(data, "__getitem__") and hasattr(data, "__len__"))
        ):
            raise TypeError(
                f"{what} must be a map-style Dataset (or a DataLoader over one) so its examples can "
                f"be shown; got {type(data).__name__}"
            )
        self.data = data
        self.strict = strict
        if isinstance(example_ids, Mapping):  # a store's record
            self.example_ids, self.positional = recorded_ids(example_ids)
        else:
            self.example_ids, self.positional = ExampleIds.resolve(example_ids), False
        self._ids: list[int] | None = None
        self._pos: dict[int, int] | None = None
        self._scanned = False

    @property
    def ids(self) -> list[int] | None:
        """``[N]`` example id of each position, or ``None`` when the items carry no ids."""
        if not self._scanned:
            self._ids = (
                list(range(len(self.data)))
                if self.positional and not self.batch
                else _data_ids(self.data, self.batch, self.example_ids)
            )
            self._pos = None if self._ids is None else {i: p for p, i in enumerate(self._ids)}
            self._scanned = True
        return self._ids

    @property
    def pos(self) -> dict[int, int] | None:
        """``{example_id: position}`` (``None`` when the items carry no ids)."""
        _ = self.ids
        return self._pos

    def __len__(self) -> int:
        if self.batch:
            return len(self.ids) if self.ids is not None else _batch_len(self.data)
        return len(self.data)

    def item(self, position: int) -> Any:
        """The item at ``position`` as the data returns it (id included)."""
        return _index_batch(self.data, position) if self.batch else self.data[position]

    def at(self, position: int) -> Any:
        """The item (without its id) at ``position``."""
        return strip_example_ids(self.item(position))

    def find(self, example_id: int) -> Any:
        """The item (id included) of ``example_id``; ``None`` when the data does not hold it
        (``KeyError`` when ``strict``)."""
        p = self._position(example_id) if self.strict else (self.pos or {}).get(int(example_id))
        return None if p is None else self.item(p)

    def by_id(self, example_id: int) -> Any:
        """The item (without its id) of ``example_id``; ``KeyError`` when the data lacks it."""
        return self.at(self._position(example_id))

    def _position(self, example_id: int) -> int:
        if self.pos is None:
            raise KeyError(
                "the data carries no example ids; wrap it in lightning_tda.IndexedDataset"
            )
        p = self.pos.get(int(example_id))
        if p is None:
            raise KeyError(
                f"example id {int(example_id)} is not in the data given for rendering; pass the "
                "IndexedDataset that was logged (same ids)"
            )
        return p


def ids_record(store: Any) -> dict[str, Any] | None:
    """The store's ``example_ids`` record (how its examples carry their ids), for
    ``ExampleLookup(example_ids=...)``; ``None`` without a store, without the record, or for ids
    read by a function (not rebuildable: the lookup then recognises ids by default)."""
    record = None if store is None else store.record("example_ids")
    if record and str(record.get("where", "")).startswith("callable:"):
        return None
    return record


def query_ids_spec(store: Any) -> ExampleIds:
    """How query items carry ids: the store's spec (queries are never numbered by position)."""
    record = ids_record(store)
    return recorded_ids(record)[0] if record else ExampleIds()


def _data_ids(data: Any, batch: bool, spec: ExampleIds) -> list[int] | None:
    if batch:
        found = spec.find(data)
        return None if found is None else found.tolist()
    ids = getattr(data, "ids", None)
    if spec.is_default and ids is not None and len(ids) == len(data):
        return [int(i) for i in ids]
    try:
        found = [spec.item_id(data[p]) for p in range(len(data))]
    except (TypeError, ValueError, KeyError, IndexError):
        return None
    return None if any(i is None for i in found) else found  # type: ignore[misc]


def _is_batch(data: Any) -> bool:
    if isinstance(data, Indexed):
        return torch.is_tensor(data.example_id) and data.example_id.dim() == 1
    return isinstance(data, Mapping)


def _batch_len(batch: Any) -> int:
    for v in batch.values() if isinstance(batch, Mapping) else [batch]:
        if torch.is_tensor(v):
            return len(v)
    raise TypeError("cannot tell the size of this batch; pass a Dataset instead")


def _index_batch(batch: Any, i: int) -> Any:
    if torch.is_tensor(batch) or isinstance(batch, np.ndarray):
        return batch[i]
    if isinstance(batch, Indexed):
        return Indexed(int(batch.example_id[i]), _index_batch(batch.data, i))
    if isinstance(batch, Mapping):
        return {k: _index_batch(v, i) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_index_batch(v, i) for v in batch)
    return batch


# -- the explanation model ---------------------------------------------------------------------


@dataclass(frozen=True)
class RankedExample:
    """One row of a ranking: ``rank`` (1-based), the training example's id, its score, the item.

    ``example`` is the item as the training data returns it (id included), ``None`` when no data
    was given or the data does not hold the id.
    """

    rank: int
    example_id: int
    score: float
    example: Any = None


@dataclass
class QueryExplanation:
    """One query: its strongest proponents (descending score) and opponents (ascending score).

    Attributes:
        position: the query's row in the result (0-based).
        query_id: its example id (``result.query_ids``, else the query data's ids), or ``None``.
        query: the query item as the query data returns it, or ``None``.
        proponents: ``k`` rows, largest scores first.
        opponents: ``k`` rows, smallest scores first.
    """

    position: int
    query_id: int | None
    query: Any
    proponents: list[RankedExample]
    opponents: list[RankedExample]


@dataclass
class SelfInfluenceOutliers:
    """The training examples of highest self-influence (mislabel / hard-example candidates).

    Attributes:
        method: the method that defined the self-influence (``""`` when unknown).
        scores: ``[N]`` fp32 self-influence of every training example, in store row order.
        outliers: the largest ``n`` of ``scores``, descending, with their ids and items.
        note: why another method than the attribution's is shown (``""`` when it is not).
    """

    method: str
    scores: torch.Tensor
    outliers: list[RankedExample]
    note: str = ""


@dataclass
class CheckpointShares:
    """Each checkpoint's contribution to each query's scores.

    Attributes:
        steps: ``[S]`` global steps, ascending.
        abs_total: ``[Q, S]`` fp64 sum of ``|score|`` of the query at the checkpoint.
        total: ``[Q, S]`` fp64 signed sum of the scores.
        share: ``[Q, S]`` ``abs_total`` divided by its sum over checkpoints (0 where that is 0).
    """

    steps: list[int]
    abs_total: torch.Tensor
    total: torch.Tensor
    share: torch.Tensor


@dataclass
class Explanation:
    """Everything the report and the panels show of one attribution, computed once.

    Attributes:
        method: the attribution method's name; ``settings``: its hyper-parameters as used.
        checkpoints: the global steps that contributed.
        num_examples: ``N``, training examples scored per query.
        top_k: ``k``, proponents and opponents per query.
        dense: whether ``scores`` holds every training example's score.
        scores: ``[Q, N]`` fp32 dense scores in store row order (dense results), else ``[Q, 2k]``
            (each query's proponent then opponent scores).
        queries: one :class:`QueryExplanation` per query, in result order.
        self_influence: the outliers, when self-influence scores were given.
        checkpoint_shares: the per-checkpoint breakdown, when per-checkpoint scores were given.
        task: the :class:`~lightning_tda.capture.task.Task` the surfaces render examples through
            (:func:`task_rendering`), or ``None`` for their default rendering.
    """

    method: str
    checkpoints: list[int]
    num_examples: int
    top_k: int
    dense: bool
    scores: torch.Tensor
    queries: list[QueryExplanation]
    settings: dict = field(default_factory=dict)
    self_influence: SelfInfluenceOutliers | None = None
    checkpoint_shares: CheckpointShares | None = None
    task: Task | None = None


def task_rendering(task: Task | None, item: Any) -> Any | None:
    """``task.render(item)`` of a dataset item with its id stripped (``Indexed`` / ``"example_id"``):
    an image tensor (e.g. an un-standardised ``[8, 8]`` digit), a string, or ``None`` when there is
    no task, no item, or the task leaves the item to the surface's default rendering."""
    if task is None or item is None:
        return None
    return task.render(strip_example_ids(item))


# -- building it -------------------------------------------------------------------------------


def explain(
    result: AttributionResult,
    *,
    top_k: int | None = 10,
    train: ExampleLookup | None = None,
    queries: ExampleLookup | None = None,
    self_influence: torch.Tensor | None = None,
    self_influence_ids: torch.Tensor | None = None,
    self_influence_method: str = "",
    self_influence_note: str = "",
    num_outliers: int = 20,
    checkpoint_scores: Mapping[int, AttributionResult | torch.Tensor] | None = None,
    task: Task | None = None,
) -> Explanation:
    """Build the :class:`Explanation` of ``result``.

    Args:
        result: top-k (``indices [Q, k]``: its rankings are used as they are, the first ``top_k``
            of them) or dense (``scores [Q, N]``: the ``top_k`` largest and smallest are taken here).
        top_k: rows per ranking (``None``: all of a top-k result's, 10 of a dense one's).
        train: the training examples, looked up by id (an id it lacks gives ``example=None``, or
            a ``KeyError`` from a ``strict`` lookup).
        queries: the query examples, looked up by ``result.query_ids`` when it holds them all,
            else by position (then it must hold exactly ``Q`` items).
        self_influence: ``[N]`` self-influence in the row order of ``self_influence_ids``.
        self_influence_ids: ``[N]`` example id of each row (default ``result.example_ids``).
        self_influence_method, self_influence_note: recorded on the outliers.
        num_outliers: self-influence outliers kept.
        checkpoint_scores: ``{global_step: AttributionResult or Tensor [Q, N] / [Q, k]}``, each
            checkpoint's scores alone; see :func:`checkpoint_shares`.
        task: recorded on the explanation; the report and the panels render each example with
            ``task.render(item)`` when it returns something (:func:`task_rendering`).
    """
    pro, opp = _rankings(result, top_k)
    q = result.scores.shape[0]
    query_ids, query_items = _query_items(result, queries)
    find: Find = train.find if train is not None else _nothing
    rows = [
        QueryExplanation(
            r, query_ids[r], query_items[r], _ranked(*pro, r, find), _ranked(*opp, r, find)
        )
        for r in range(q)
    ]
    scores = result.scores.float() if result.dense else torch.cat([pro[1], opp[1]], dim=1)
    si = None
    if self_influence is not None:
        ids = result.example_ids if self_influence_ids is None else self_influence_ids
        si = self_influence_outliers(
            self_influence, ids, num_outliers, find, self_influence_method, self_influence_note
        )
    shares = checkpoint_shares(checkpoint_scores, q) if checkpoint_scores else None
    return Explanation(
        method=result.method,
        checkpoints=list(result.checkpoints),
        num_examples=len(result.example_ids),
        top_k=pro[0].shape[1],
        dense=result.dense,
        scores=scores,
        queries=rows,
        settings=dict(result.settings),
        self_influence=si,
        checkpoint_shares=shares,
        task=task,
    )


def _nothing(example_id: int) -> None:
    return None


def _rankings(
    result: AttributionResult, top_k: int | None
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((ids, scores), (ids, scores))`` of proponents (descending) and opponents (ascending),
    ``[Q, k]`` each, scores fp32."""
    if result.dense:
        dense = result.scores.float()
        k = min(top_k or 10, dense.shape[1])
        hi, lo = dense.topk(k, dim=1), dense.topk(k, dim=1, largest=False)
        ids = result.example_ids
        return (ids[hi.indices], hi.values), (ids[lo.indices], lo.values)
    if result.opponents is None or result.opponent_scores is None:
        raise ValueError("a top-k AttributionResult needs opponents and opponent_scores")
    k = result.scores.shape[1] if top_k is None else min(top_k, result.scores.shape[1])
    return (
        (result.indices[:, :k], result.scores[:, :k].float()),
        (result.opponents[:, :k], result.opponent_scores[:, :k].float()),
    )


def _ranked(ids: torch.Tensor, scores: torch.Tensor, r: int, find: Find) -> list[RankedExample]:
    pairs = zip(ids[r].tolist(), scores[r].tolist(), strict=True)
    return [RankedExample(n, int(i), s, find(i)) for n, (i, s) in enumerate(pairs, 1)]


def _query_items(
    result: AttributionResult, queries: ExampleLookup | None
) -> tuple[list[int | None], list[Any]]:
    """Each query's id and item (by id when the lookup holds every result query id, else by
    position)."""
    q = result.scores.shape[0]
    if result.query_ids is not None:
        ids: list[int | None] = [int(i) for i in result.query_ids.tolist()]
    elif queries is not None and queries.ids is not None and len(queries.ids) == q:
        ids = [int(i) for i in queries.ids]
    else:
        ids = [None] * q
    if queries is None:
        return ids, [None] * q
    pos = queries.pos
    if result.query_ids is not None and pos is not None and all(i in pos for i in ids):
        return ids, [queries.item(pos[i]) for i in ids]  # type: ignore[index]
    if len(queries) != q:
        raise ValueError(
            f"query_data has {len(queries)} items but the result has {q} queries; pass the queries "
            "that were attributed, in the same order"
        )
    return ids, [queries.item(r) for r in range(q)]


def self_influence_outliers(
    scores: torch.Tensor,
    example_ids: torch.Tensor,
    n: int,
    find: Find | None = None,
    method: str = "",
    note: str = "",
) -> SelfInfluenceOutliers:
    """The ``n`` largest of ``scores`` (``[N]``, row order of ``example_ids [N]``) as outliers;
    ``find(example_id) -> item | None`` supplies the items."""
    si = torch.as_tensor(scores).detach().cpu()
    if si.dim() != 1 or len(si) != len(example_ids):
        raise ValueError(
            f"self_influence has shape {tuple(si.shape)} but the store has {len(example_ids)} "
            "examples; pass the [N] tensor of store.self_influence(...) (store row order)"
        )
    si = si.float()
    top = torch.topk(si, min(n, len(si)))
    find = find or _nothing
    rows = [
        RankedExample(rank, int(example_ids[row]), v, find(int(example_ids[row])))
        for rank, (row, v) in enumerate(
            zip(top.indices.tolist(), top.values.tolist(), strict=True), 1
        )
    ]
    return SelfInfluenceOutliers(method, si, rows, note)


def checkpoint_shares(
    checkpoint_scores: Mapping[int, AttributionResult | torch.Tensor], num_queries: int
) -> CheckpointShares:
    """Per query and checkpoint the total ``|score|``, its share over checkpoints and the signed total.

    Each value is an :class:`AttributionResult` or a ``[Q, N]`` (or ``[Q, k]``) tensor of that
    checkpoint's scores; totals run over the last dim (and the opponents of top-k results).
    """
    steps = sorted(int(s) for s in checkpoint_scores)
    abs_tot, tot = [], []
    for s in steps:
        v = checkpoint_scores[s]
        if isinstance(v, AttributionResult):
            parts = [v.scores] if v.dense else [v.scores, v.opponent_scores]
        else:
            parts = [torch.as_tensor(v)]
        parts = [p.detach().float().cpu().reshape(p.shape[0], -1) for p in parts]
        if any(p.shape[0] != num_queries for p in parts):
            raise ValueError(
                f"checkpoint_scores[{s}] has {parts[0].shape[0]} queries but the result has "
                f"{num_queries}; attribute the same queries at every checkpoint"
            )
        abs_tot.append(sum(p.abs().sum(1) for p in parts))
        tot.append(sum(p.sum(1) for p in parts))
    a, t = torch.stack(abs_tot, 1).double(), torch.stack(tot, 1).double()  # [Q, S]
    denom = a.sum(1, keepdim=True)
    share = torch.where(denom > 0, a / denom.clamp_min(1e-300), torch.zeros_like(a))
    return CheckpointShares(steps, a, t, share)


# -- self-influence by capability --------------------------------------------------------------


def self_influence_choice(
    method: str | AttributionMethod, which: bool | str
) -> tuple[str | AttributionMethod, str]:
    """The method whose self-influence to show, and a note when it is not ``method``.

    ``which=True``: ``method`` itself when it declares ``supports_self_influence``, else TracIn
    (with a note saying so); a method name: that method (its own errors stand).
    """
    if which is not True:
        return str(which), ""
    cls = METHODS.get(method) if isinstance(method, str) else type(method)
    if cls is None or cls.supports_self_influence:
        return method, ""
    name = method if isinstance(method, str) else method.name
    return "tracin", f"{name} defines no self-influence; showing TracIn's."


def store_self_influence(
    store: AttributionStore,
    method: str | AttributionMethod,
    which: bool | str,
    model: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, str, str]:
    """``([N] self-influence, method name, note)`` of :func:`self_influence_choice`'s method."""
    chosen, note = self_influence_choice(method, which)
    scores = store.self_influence(model=model, method=chosen)
    return scores, chosen if isinstance(chosen, str) else chosen.name, note


__all__ = [
    "CheckpointShares",
    "ExampleLookup",
    "Explanation",
    "QueryExplanation",
    "RankedExample",
    "SelfInfluenceOutliers",
    "checkpoint_shares",
    "explain",
    "self_influence_choice",
    "self_influence_outliers",
    "store_self_influence",
    "task_rendering",
]
