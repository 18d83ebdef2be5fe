"""Retraining harness: reproducible subsets, resumable banks, the exchange format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TinyMLP, make_classification

from lightning_tda.eval.retrain import (
    Bank,
    BankSpec,
    RetrainRecipe,
    build_bank,
    draw_subsets,
    train_on_subset,
)


def tiny_factory():
    return TinyMLP(lr=0.2)


def tiny_measure(model, queries):
    x = torch.stack([queries[i].data[0] for i in range(len(queries))])
    y = torch.stack([queries[i].data[1] for i in range(len(queries))])
    return {"loss": F.cross_entropy(model(x), y, reduction="none").numpy()}


def test_subsets_follow_the_dattri_convention():
    spec = BankSpec(num_subsets=5, alpha=0.5, num_seeds=1, base_seed=7)
    subsets = draw_subsets(40, spec)
    assert subsets.shape == (5, 20)
    for j in range(5):
        expect = np.sort(np.random.default_rng(7 + j).choice(40, size=20, replace=False))
        assert np.array_equal(subsets[j], expect)
    assert np.array_equal(subsets, draw_subsets(40, spec))


def test_training_is_reproducible_per_seed():
    train = make_classification(32)
    idx = np.arange(0, 32, 2)
    recipe = RetrainRecipe(max_epochs=2, batch_size=8)
    a = train_on_subset(tiny_factory, train, idx, 3, recipe)
    b = train_on_subset(tiny_factory, train, idx, 3, recipe)
    c = train_on_subset(tiny_factory, train, idx, 4, recipe)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def test_bank_build_resume_and_reload(tmp_path):
    train, queries = make_classification(32), make_classification(6, seed=1)
    spec = BankSpec(num_subsets=4, alpha=0.5, num_seeds=2, base_seed=0)
    recipe = RetrainRecipe(max_epochs=2, batch_size=8)
    calls = []
    bank = build_bank(
        tmp_path / "bank",
        tiny_factory,
        train,
        queries,
        tiny_measure,
        {"loss": "loss"},
        spec,
        recipe,
        processes=1,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert bank.outputs["loss"].shape == (4, 2, 6) and bank.subsets.shape == (4, 16)
    assert calls[-1] == (8, 8)
    # run (j, r) used seed base + j*R + r: retrain one by hand and compare
    model = train_on_subset(tiny_factory, train, bank.subsets[2], 0 + 2 * 2 + 1, recipe)
    with torch.no_grad():
        np.testing.assert_allclose(
            bank.outputs["loss"][2, 1], tiny_measure(model, queries)["loss"], rtol=1e-6
        )
    # resume: a deleted job is the only one retrained
    (tmp_path / "bank" / "jobs" / "0001_00.npz").unlink()
    calls.clear()
    again = build_bank(
        tmp_path / "bank",
        tiny_factory,
        train,
        queries,
        tiny_measure,
        {"loss": "loss"},
        spec,
        recipe,
        processes=1,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls == [(8, 8)]
    np.testing.assert_array_equal(again.outputs["loss"], bank.outputs["loss"])
    meta = json.loads((tmp_path / "bank" / "meta.json").read_text())
    assert meta["spec"]["num_subsets"] == 4 and len(meta["fingerprint"]["train"]) == 64
    assert Bank.load(tmp_path / "bank").measurement("loss") == "loss"
    # other data in the same directory is refused
    with pytest.raises(ValueError, match="other data or settings"):
        build_bank(
            tmp_path / "bank",
            tiny_factory,
            make_classification(32, seed=9),
            queries,
            tiny_measure,
            {"loss": "loss"},
            spec,
            recipe,
            processes=1,
        )


@pytest.mark.slow
def test_parallel_workers_give_the_same_bank(tmp_path):
    train, queries = make_classification(24), make_classification(4, seed=1)
    spec = BankSpec(num_subsets=2, alpha=0.5, num_seeds=2)
    recipe = RetrainRecipe(max_epochs=1, batch_size=8)
    serial = build_bank(
        tmp_path / "a",
        tiny_factory,
        train,
        queries,
        tiny_measure,
        {"loss": "loss"},
        spec,
        recipe,
        processes=1,
    )
    parallel = build_bank(
        tmp_path / "b",
        tiny_factory,
        train,
        queries,
        tiny_measure,
        {"loss": "loss"},
        spec,
        recipe,
        processes=2,
    )
    np.testing.assert_allclose(parallel.outputs["loss"], serial.outputs["loss"], rtol=1e-6)


def test_topk_removal_test_removes_the_right_rows(tmp_path):
    from lightning_tda.eval.removal import topk_removal_test

    train, queries = make_classification(24), make_classification(3, seed=1)
    recipe = RetrainRecipe(max_epochs=2, batch_size=8)
    scores = torch.zeros(3, 24)
    scores[:, :4] = 1.0  # the first 4 rows are every query's top proponents
    rep = topk_removal_test(
        tmp_path,
        tiny_factory,
        train,
        queries,
        tiny_measure,
        scores,
        k=4,
        seeds=(0,),
        recipe=recipe,
        processes=1,
    )
    full = train_on_subset(tiny_factory, train, np.arange(24), 0, recipe)
    without = train_on_subset(tiny_factory, train, np.arange(4, 24), 0, recipe)
    with torch.no_grad():
        expect = tiny_measure(without, queries)["loss"] - tiny_measure(full, queries)["loss"]
    np.testing.assert_allclose(rep.delta_topk, expect, rtol=1e-5, atol=1e-6)
    assert rep.delta_random.shape == (3,) and "proponents" in str(rep)


class _OrderRecorder(TinyMLP):
    """Records the example ids it trains on (in order) and the loss weight each got."""

    def __init__(self) -> None:
        super().__init__(lr=0.1)
        self.kept = None
        self.seen: list[int] = []
        self.weights: list[float] = []
        self.init = self.net[0].weight.detach().clone()

    def set_kept(self, mask):
        self.kept = mask

    def training_step(self, batch, batch_idx):
        ids, (x, y) = batch
        self.seen += ids.tolist()
        w = torch.ones(len(ids)) if self.kept is None else self.kept[ids - 1000]
        self.weights += w.tolist()
        return (F.cross_entropy(self(x), y, reduction="none") * w).mean()


def _order_measure(model, queries):
    """Per query q: the q-th id trained on, its weight, and a fingerprint of the initial weights."""
    q = len(queries)
    pad = [-1] * max(0, q - len(model.seen))  # a subset run sees fewer examples than queries
    return {
        "id": np.asarray((model.seen + pad)[:q], dtype=np.float64),
        "w": np.asarray((model.weights + pad)[:q], dtype=np.float64),
        "init": np.full(q, float(model.init.sum())),
    }


@pytest.mark.parametrize("in_place", [False, True])
def test_shared_seed_banks_share_initialisation_and_order(tmp_path, in_place):
    """shared_seeds: run r of every subset starts from the same weights and visits the examples in
    one permutation of the full set (restricted to the subset, or in place with weight 0)."""
    n = 16
    train, queries = make_classification(n), make_classification(n, seed=1)
    spec = BankSpec(
        num_subsets=3, alpha=0.5, num_seeds=2, base_seed=5, shared_seeds=True, in_place=in_place
    )
    recipe = RetrainRecipe(max_epochs=1, batch_size=4)
    bank = build_bank(
        tmp_path / "bank",
        _OrderRecorder,
        train,
        queries,
        _order_measure,
        {"id": "goodness", "w": "goodness", "init": "goodness"},
        spec,
        recipe,
        processes=1,
    )
    subsets = bank.subsets
    for r in range(2):
        perm = np.random.default_rng(5 + r).permutation(n)
        assert len({float(bank.outputs["init"][j, r, 0]) for j in range(3)}) == 1  # same init
        for j in range(3):
            seen = bank.outputs["id"][j, r].astype(int) - 1000
            members = set(subsets[j].tolist())
            if in_place:  # every example in the permutation order, removed ones weighted 0
                assert seen.tolist() == perm.tolist()
                w = bank.outputs["w"][j, r]
                assert w.tolist() == [float(i in members) for i in perm]
            else:  # the subset's examples in the permutation's order
                expect = [i for i in perm if i in members]
                assert seen[: len(expect)].tolist() == expect
    assert bank.meta["spec"]["shared_seeds"] is True
    assert bank.meta["spec"].get("in_place", False) is in_place
    with pytest.raises(ValueError, match="shared_seeds"):
        BankSpec(in_place=True)
