"""The explanation model (``lightning_tda.explain``) against brute-force references."""

from __future__ import annotations

import pytest
import torch

from lightning_tda import AttributionResult, IndexedDataset
from lightning_tda.explain import (
    ExampleLookup,
    checkpoint_shares,
    explain,
    self_influence_choice,
    self_influence_outliers,
)


def _dense(q: int = 3, n: int = 12, seed: int = 0) -> AttributionResult:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(100, generator=g)[:n]  # store row order != id order
    return AttributionResult(
        method="tracin",
        scores=torch.randn(q, n, generator=g),
        indices=None,
        opponent_scores=None,
        opponents=None,
        example_ids=ids,
        checkpoints=[5, 10],
    )


def test_dense_result_rankings_equal_topk_mapped_to_ids():
    res = _dense()
    train = ExampleLookup(
        IndexedDataset([f"ex{i}" for i in res.example_ids.tolist()], ids=res.example_ids.tolist())
    )
    ex = explain(res, top_k=4, train=train)
    for r, qe in enumerate(ex.queries):
        hi = torch.topk(res.scores[r], 4)
        lo = torch.topk(res.scores[r], 4, largest=False)
        assert [p.example_id for p in qe.proponents] == res.example_ids[hi.indices].tolist()
        assert [p.example_id for p in qe.opponents] == res.example_ids[lo.indices].tolist()
        assert [p.score for p in qe.proponents] == pytest.approx(hi.values.tolist())
        assert [p.rank for p in qe.proponents] == [1, 2, 3, 4]
        assert [p.example.data for p in qe.proponents] == [
            f"ex{i}" for i in res.example_ids[hi.indices].tolist()
        ]


def test_top_k_result_is_used_as_given_never_recomputed():
    # rankings that are not the top of anything: the explanation must show exactly these rows
    res = AttributionResult(
        method="influence",
        scores=torch.tensor([[0.1, 0.5, 0.2]]),
        indices=torch.tensor([[7, 3, 9]]),
        opponent_scores=torch.tensor([[-0.4, -0.9, -0.1]]),
        opponents=torch.tensor([[1, 2, 4]]),
        example_ids=torch.arange(10),
        checkpoints=[1],
    )
    ex = explain(res, top_k=2)
    (qe,) = ex.queries
    assert [p.example_id for p in qe.proponents] == [7, 3]
    assert [p.example_id for p in qe.opponents] == [1, 2]
    assert ex.scores[0].tolist() == pytest.approx([0.1, 0.5, -0.4, -0.9])
    assert ex.top_k == 2 and not ex.dense


def test_example_lookup_finds_by_id_and_refuses_unknown_ids_when_strict():
    data = IndexedDataset(["a", "b", "c"], ids=[30, 10, 20])
    look = ExampleLookup(data)
    assert [look.find(i).data for i in (10, 20, 30)] == ["b", "c", "a"]
    assert [look.find(i).example_id for i in (10, 20, 30)] == [10, 20, 30]
    assert look.find(99) is None
    with pytest.raises(KeyError):
        ExampleLookup(data, strict=True).find(99)


def test_checkpoint_shares_equal_abs_sums_and_sum_to_one():
    g = torch.Generator().manual_seed(1)
    per = {10: torch.randn(2, 6, generator=g), 5: torch.randn(2, 6, generator=g)}
    shares = checkpoint_shares(per, num_queries=2)
    assert shares.steps == [5, 10]
    ref = torch.stack([per[5].abs().sum(1), per[10].abs().sum(1)], 1).double()
    torch.testing.assert_close(shares.abs_total, ref)
    torch.testing.assert_close(shares.share, ref / ref.sum(1, keepdim=True))
    torch.testing.assert_close(shares.share.sum(1), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="queries"):
        checkpoint_shares({1: torch.zeros(3, 6)}, num_queries=2)


def test_self_influence_outliers_are_the_largest_scores():
    scores = torch.tensor([0.1, 3.0, -1.0, 2.0])
    ids = torch.tensor([40, 41, 42, 43])
    out = self_influence_outliers(scores, ids, 2, method="tracin")
    assert [(o.rank, o.example_id, o.score) for o in out.outliers] == [(1, 41, 3.0), (2, 43, 2.0)]
    with pytest.raises(ValueError, match="store row order"):
        self_influence_outliers(scores[:3], ids, 2)


def test_self_influence_choice_follows_declared_capability():
    assert self_influence_choice("tracin", True) == ("tracin", "")
    method, note = self_influence_choice("gradcos", True)
    assert method == "tracin" and "gradcos defines no self-influence" in note
    assert self_influence_choice("gradcos", "influence") == ("influence", "")
