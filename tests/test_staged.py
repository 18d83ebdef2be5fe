"""Multi-stage training: StagedDataModule and staged retraining recipes."""

from __future__ import annotations

import json
from collections import defaultdict

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import TinyMLP, make_classification, trainer

from lightning_tda.data import StagedDataModule, get_example_ids
from lightning_tda.eval.retrain import Bank, BankSpec, RetrainRecipe, build_bank, train_on_subset


class IdRecorder(pl.Callback):
    """Example ids of every training batch by epoch, and the global step at each epoch end."""

    def __init__(self) -> None:
        self.ids: dict[int, list[int]] = defaultdict(list)
        self.epoch_end_steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids[trainer.current_epoch] += get_example_ids(batch).tolist()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_end_steps.append(trainer.global_step)


def tiny_factory():
    return TinyMLP(lr=0.2)


def tiny_measure(model, queries):
    x = torch.stack([queries[i].data[0] for i in range(len(queries))])
    y = torch.stack([queries[i].data[1] for i in range(len(queries))])
    return {"loss": torch.nn.functional.cross_entropy(model(x), y, reduction="none").numpy()}


def test_each_epoch_sees_exactly_its_stage_members(tmp_path):
    train = make_classification(30)  # ids 1000..1029
    a, b = train.ids[:12], train.ids[12:]
    dm = StagedDataModule(train, [(2, a), (3, b)], batch_size=5, seed=0)
    assert dm.max_epochs == 5 and dm.stage_starts == [0, 2]
    assert [dm.stage_of_epoch(e) for e in range(5)] == [0, 0, 1, 1, 1]
    assert dm.stage_end_steps() == [2 * 3, 2 * 3 + 3 * 4]
    rec = IdRecorder()
    trainer(tmp_path, [rec], max_epochs=dm.max_epochs, reload_dataloaders_every_n_epochs=1).fit(
        tiny_factory(), datamodule=dm
    )
    assert sorted(rec.ids) == [0, 1, 2, 3, 4]
    for epoch in (0, 1):
        assert sorted(rec.ids[epoch]) == sorted(a)  # every member once, nothing else
    for epoch in (2, 3, 4):
        assert sorted(rec.ids[epoch]) == sorted(b)
    assert rec.ids[0] != rec.ids[1]  # one shuffling stream across the stage's epochs
    assert rec.epoch_end_steps[1] == dm.stage_end_steps()[0]
    assert rec.epoch_end_steps[-1] == dm.stage_end_steps()[1]


def test_stage_inputs_are_validated(tmp_path):
    train = make_classification(10)  # ids 1000..1009
    with pytest.raises(ValueError, match="not in the dataset"):
        StagedDataModule(train, [(1, [1000, 5])])
    with pytest.raises(ValueError, match="is empty"):
        StagedDataModule(train, [(1, [1000]), (1, [])])
    with pytest.raises(ValueError, match="positive int"):
        StagedDataModule(train, [(0, [1000])])
    with pytest.raises(ValueError, match="positive int"):
        RetrainRecipe.staged([(2, None), (-1, [1001])])
    with pytest.raises(ValueError, match="duplicates"):
        StagedDataModule(train, [(1, [1000, 1000])])
    with pytest.raises(ValueError, match="non-empty sequence"):
        StagedDataModule(train, [])
    with pytest.raises(ValueError, match="no training rows within the given indices"):
        StagedDataModule(train, [(1, [1000, 1001]), (1, [1002])], indices=[0, 1])
    with pytest.raises(ValueError, match="max_epochs"):
        RetrainRecipe(max_epochs=3, stages=((1, None), (1, None)))
    with pytest.raises(ValueError, match="outside the staged curriculum"):
        StagedDataModule(train, [(1, None)]).stage_of_epoch(1)
    dm = StagedDataModule(train, [(1, [1000, 1001]), (1, [1002, 1003])])
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        trainer(tmp_path, max_epochs=2).fit(tiny_factory(), datamodule=dm)


def test_train_on_subset_trains_only_on_subset_and_stage(tmp_path):
    train = make_classification(40)
    ids = np.asarray(train.ids)
    perm = np.random.default_rng(0).permutation(40)
    a, b = ids[perm[:20]], ids[perm[20:]]
    rec = IdRecorder()
    recipe = RetrainRecipe.staged(
        [(2, a), (2, b)], batch_size=8, trainer_kwargs={"callbacks": [rec]}
    )
    subset = np.sort(np.random.default_rng(1).choice(40, size=20, replace=False))
    train_on_subset(tiny_factory, train, subset, 0, recipe)
    kept = set(ids[subset].tolist())
    for epoch in (0, 1):
        assert sorted(rec.ids[epoch]) == sorted(kept & set(a.tolist()))
    for epoch in (2, 3):
        assert sorted(rec.ids[epoch]) == sorted(kept & set(b.tolist()))
    assert 0 < len(rec.ids[0]) < 20 and 0 < len(rec.ids[2]) < 20  # the restriction mattered
    # a staged run is reproducible per seed
    plain = RetrainRecipe.staged([(2, a), (2, b)], batch_size=8)
    m1 = train_on_subset(tiny_factory, train, subset, 3, plain)
    m2 = train_on_subset(tiny_factory, train, subset, 3, plain)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters(), strict=True))


def test_staged_bank_meta_is_json_and_resumes(tmp_path):
    train, queries = make_classification(32), make_classification(5, seed=1)
    ids = np.asarray(train.ids)
    recipe = RetrainRecipe.staged([(1, ids[:16]), (1, ids[16:])], batch_size=8)
    spec = BankSpec(num_subsets=2, alpha=0.5, num_seeds=1)
    args = (tiny_factory, train, queries, tiny_measure, {"loss": "loss"}, spec, recipe)
    bank = build_bank(tmp_path / "bank", *args, processes=1)
    meta = json.loads((tmp_path / "bank" / "meta.json").read_text())
    assert meta["recipe"]["stages"] == [[1, ids[:16].tolist()], [1, ids[16:].tolist()]]
    assert meta["recipe"]["max_epochs"] == 2
    again = build_bank(tmp_path / "bank", *args, processes=1)  # same settings: accepted
    np.testing.assert_array_equal(again.outputs["loss"], bank.outputs["loss"])
    assert Bank.load(tmp_path / "bank").outputs["loss"].shape == (2, 1, 5)
    # an unstaged recipe's meta has no stages key (older banks stay resumable)
    assert "stages" not in RetrainRecipe(max_epochs=2).to_meta()
