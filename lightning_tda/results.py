"""What attribution returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttributionResult:
    """Scores of training examples for each query.

    Sign convention: a score > 0 means including the training example lowers the query's loss
    (a proponent); < 0 raises it (an opponent).

    Attributes:
        method: method name.
        scores: ``[Q, k]`` scores of the top-k proponents (descending), or ``[Q, N]`` dense scores in
            store row order when ``top_k=None``.
        indices: ``[Q, k]`` example ids of the proponents (``None`` for dense results).
        opponent_scores: ``[Q, k]`` most negative scores (ascending), ``None`` for dense results.
        opponents: ``[Q, k]`` example ids of the opponents.
        example_ids: ``[N]`` example id of each store row (the column order of dense scores).
        query_ids: ``[Q]`` ids of the queries when known.
        checkpoints: the global steps that contributed.
        settings: the method's hyper-parameters as used; with ``method="auto"`` also
            ``"chosen_by": "auto"`` and the ``"reason"`` for the choice.

    Example:
        >>> result = AttributionResult(
        ...     method="tracin",
        ...     scores=torch.tensor([[0.9, 0.4]]),
        ...     indices=torch.tensor([[12, 7]]),
        ...     opponent_scores=torch.tensor([[-0.3, -0.1]]),
        ...     opponents=torch.tensor([[3, 5]]),
        ...     example_ids=torch.arange(20),
        ...     checkpoints=[100, 200],
        ... )
        >>> result
        AttributionResult(method='tracin', queries=1, top-2, train_examples=20, checkpoints=[100, 200])
        >>> result.dense, result.indices[0].tolist()  # the top proponent of query 0 is example 12
        (False, [12, 7])
    """

    method: str
    scores: torch.Tensor
    indices: torch.Tensor | None
    opponent_scores: torch.Tensor | None
    opponents: torch.Tensor | None
    example_ids: torch.Tensor
    query_ids: torch.Tensor | None = None
    checkpoints: list[int] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    @property
    def dense(self) -> bool:
        return self.indices is None

    def __repr__(self) -> str:
        kind = "dense" if self.dense else f"top-{self.scores.shape[1]}"
        return (
            f"AttributionResult(method={self.method!r}, queries={self.scores.shape[0]}, {kind}, "
            f"train_examples={len(self.example_ids)}, checkpoints={self.checkpoints})"
        )
