"""Modules written as a user would: batches that carry their own ids, or none, logged unchanged.

Each module below unpacks its batches the way its data yields them (``x, y, idx = batch``,
``batch["x"]``, ``x, y = batch``); none knows about the library. Every store and every row method's
scores equal those of the equivalent ``IndexedDataset`` path (same data, same ids, same seeds; that
module unpacks ``_, (x, y) = batch``). A module whose ids are missing or whose loss is wrong fails
before its first optimizer step.
"""

from __future__ import annotations

import json

import h5py
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_tda import (
    AttributionStore,
    GradientLogger,
    IndexedDataset,
    MissingExampleIdsError,
    NonFiniteError,
)
from lightning_tda.data.ids import ExampleIds

N, NQ, BATCH = 48, 6, 12
IDS = [1000 + 3 * i for i in range(N)]  # user ids: not positions
ROW_METHODS = ("graddot", "gradcos", "tracin", "tracin_adam", "influence", "source", "datainf")


def _tensors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)
    return x, y


X, Y = _tensors(N, 0)
QX, QY = _tensors(NQ, 1)


# -- data as users have it ---------------------------------------------------------------------------
class TupleData(Dataset):
    """``(x, y, idx)`` items."""

    def __init__(self, x, y, ids) -> None:
        self.x, self.y, self.ids = x, y, torch.as_tensor(ids)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], self.ids[i]


class DictData(TupleData):
    """``{"x", "y", "idx"}`` items."""

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "idx": self.ids[i]}


# -- modules as users write them ---------------------------------------------------------------------
class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def unpack(self, batch):  # each subclass: its data's batch layout
        raise NotImplementedError

    def per_example_loss(self, batch):
        x, y = self.unpack(batch)
        return F.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch, batch_idx):
        x, y = self.unpack(batch)
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


class TupleMLP(MLP):
    def unpack(self, batch):
        x, y, idx = batch
        return x, y


class DictMLP(MLP):
    def unpack(self, batch):
        return batch["x"], batch["y"]


class PlainMLP(MLP):
    def unpack(self, batch):
        x, y = batch
        return x, y


class IndexedMLP(MLP):
    def unpack(self, batch):
        _, (x, y) = batch
        return x, y


def _fit(tmp_path, name, module_cls, data, epochs=2, mode="sweep", **kw):
    """Seeded init and shuffling; the logger first; returns (store, model, trainer)."""
    torch.manual_seed(0)
    model = module_cls()
    if mode == "sweep":
        kw.setdefault("attribution_data", data)
        kw.setdefault("every_n_epochs", 1)
    logger = GradientLogger(tmp_path / name, mode=mode, verbose=False, **kw)
    tr = trainer(tmp_path, [logger], max_epochs=epochs)
    g = torch.Generator().manual_seed(0)
    tr.fit(model, DataLoader(data, batch_size=BATCH, shuffle=True, generator=g))
    return AttributionStore(tmp_path / name), model, tr


def _rows(store: AttributionStore) -> dict:
    return {s: store.read(s, "train") for s in store.steps}


def _assert_same_store(got: AttributionStore, ref: AttributionStore) -> None:
    assert got.steps == ref.steps and len(got.steps) >= 2
    assert torch.equal(got.example_ids, ref.example_ids)
    for s in ref.steps:
        for name in ("train", "train_precond", "loss", "ids"):
            assert torch.equal(
                torch.as_tensor(got.read(s, name)), torch.as_tensor(ref.read(s, name))
            ), (s, name)


def _assert_same_scores(got, ref, queries_got, queries_ref, model_got, model_ref, methods) -> None:
    for method in methods:
        a = got.attribute(queries_got, model=model_got, method=method, top_k=None)
        b = ref.attribute(queries_ref, model=model_ref, method=method, top_k=None)
        assert a.scores.shape == (NQ, N), method
        assert torch.equal(a.scores, b.scores), method
        assert torch.equal(a.example_ids, b.example_ids), method


@pytest.fixture(scope="module")
def indexed_user_ids(tmp_path_factory):
    """The reference: IndexedDataset with the user's ids, module unpacking ``_, (x, y)``."""
    d = tmp_path_factory.mktemp("indexed")
    data = IndexedDataset(TensorDataset(X, Y), ids=IDS)
    store, model, _ = _fit(d, "ref.h5", IndexedMLP, data)
    return store, model


@pytest.mark.parametrize(
    ("module_cls", "data_cls", "example_ids"),
    [(TupleMLP, TupleData, 2), (DictMLP, DictData, None), (DictMLP, DictData, "idx")],
    ids=["tuple-position", "dict-default", "dict-key"],
)
def test_batches_with_their_own_ids_equal_the_indexed_path(
    tmp_path, indexed_user_ids, module_cls, data_cls, example_ids
):
    ref, ref_model = indexed_user_ids
    store, model, _ = _fit(
        tmp_path, "u.h5", module_cls, data_cls(X, Y, IDS), example_ids=example_ids
    )
    assert sorted(store.example_ids.tolist()) == sorted(IDS)
    _assert_same_store(store, ref)
    queries = data_cls(QX, QY, list(range(NQ)))
    ref_queries = IndexedDataset(TensorDataset(QX, QY))
    _assert_same_scores(store, ref, queries, ref_queries, model, ref_model, (*ROW_METHODS, "auto"))
    with h5py.File(store.path, "r") as f:
        recorded = json.loads(f.attrs["example_ids"])
        task = json.loads(f.attrs["task"])
    assert recorded == {**ExampleIds(example_ids).describe(), "source": "batch"}
    assert task == {"task": "module"}


def test_factored_rows_of_tuple_batches_equal_the_indexed_path(tmp_path):
    """``storage="lorif"`` (and ``method="lorif"``) on ``(x, y, idx)`` batches."""
    kw = dict(storage="lorif", lorif_rank=2)
    ref, ref_model, _ = _fit(
        tmp_path, "ref.h5", IndexedMLP, IndexedDataset(TensorDataset(X, Y), ids=IDS), **kw
    )
    store, model, _ = _fit(tmp_path, "u.h5", TupleMLP, TupleData(X, Y, IDS), example_ids=2, **kw)
    queries, ref_queries = TupleData(QX, QY, range(NQ)), IndexedDataset(TensorDataset(QX, QY))
    _assert_same_scores(store, ref, queries, ref_queries, model, ref_model, ("lorif", "tracin"))


def test_data_without_ids_is_numbered_by_position(tmp_path):
    """A plain ``(x, y)`` dataset: the library adds positions 0..N-1 and strips them; the module's
    loss sees ``(x, y)``. Equal to IndexedDataset with ids 0..N-1."""
    ref, ref_model, _ = _fit(tmp_path, "ref.h5", IndexedMLP, IndexedDataset(TensorDataset(X, Y)))
    seen = []

    class Watching(PlainMLP):
        def per_example_loss(self, batch):
            seen.append(type(batch))
            assert len(batch) == 2  # the user's (x, y): nothing added
            return super().per_example_loss(batch)

    store, model, _ = _fit(tmp_path, "p.h5", Watching, TensorDataset(X, Y))
    assert seen and all(t is list for t in seen)
    assert store.example_ids.tolist() == list(range(N))  # dataset order, never reordered
    _assert_same_store(store, ref)
    queries = TensorDataset(QX, QY)
    ref_queries = IndexedDataset(TensorDataset(QX, QY))
    _assert_same_scores(store, ref, queries, ref_queries, PlainMLP(), ref_model, ROW_METHODS)
    with h5py.File(store.path, "r") as f:
        assert json.loads(f.attrs["example_ids"])["source"] == "position"


def test_training_set_without_ids_is_numbered_by_position(tmp_path):
    """``attribution_data=None`` sweeps the trainer's own (shuffled) training set in dataset order."""
    ref, _, _ = _fit(
        tmp_path, "ref.h5", IndexedMLP, IndexedDataset(TensorDataset(X, Y)), attribution_data=None
    )
    store, _, _ = _fit(tmp_path, "p.h5", PlainMLP, TensorDataset(X, Y), attribution_data=None)
    assert store.example_ids.tolist() == list(range(N))
    _assert_same_store(store, ref)


def test_in_flight_on_the_unchanged_loader_of_tuples(tmp_path):
    """In flight on the user's own DataLoader of ``(x, y, idx)``: every step's rows equal the
    IndexedDataset in-flight path."""
    kw = dict(mode="in_flight", epochs=1)
    ref, ref_model, _ = _fit(
        tmp_path, "ref.h5", IndexedMLP, IndexedDataset(TensorDataset(X, Y), ids=IDS), **kw
    )
    store, model, _ = _fit(tmp_path, "u.h5", TupleMLP, TupleData(X, Y, IDS), example_ids=2, **kw)
    assert store.steps == ref.steps == list(range(N // BATCH))
    assert torch.equal(store.example_ids, ref.example_ids)
    for step in ref.steps:
        ids, rows = store.batch_rows(step)
        ref_ids, ref_rows = ref.batch_rows(step)
        assert torch.equal(ids, ref_ids) and torch.equal(rows, ref_rows), step
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)  # the same training


# -- failing before the first optimizer step ------------------------------------------------------
class CountingSteps(pl.Callback):
    """Counts optimizer steps (``on_before_optimizer_step``) and keeps the initial weights."""

    def __init__(self) -> None:
        self.steps = 0
        self.initial: list[torch.Tensor] | None = None

    def on_fit_start(self, trainer, pl_module):
        self.initial = [p.detach().clone() for p in pl_module.parameters()]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps += 1


def _fails_before_the_first_step(tmp_path, module, data, error, match, **kw) -> None:
    counter = CountingSteps()
    kw.setdefault("verbose", False)
    logger = GradientLogger(tmp_path / "f.h5", **kw)
    tr = trainer(tmp_path, [logger, counter], max_epochs=3)
    with pytest.raises(error, match=match):
        tr.fit(module, DataLoader(data, batch_size=BATCH, shuffle=True))
    assert counter.steps == 0 and tr.global_step == 0
    for p, p0 in zip(module.parameters(), counter.initial, strict=True):
        assert torch.equal(p, p0)


def test_in_flight_without_ids_fails_before_the_first_step(tmp_path):
    _fails_before_the_first_step(
        tmp_path,
        PlainMLP(),
        TensorDataset(X, Y),
        MissingExampleIdsError,
        r"example_ids=<position \| key \| fn>.*IndexedDataset",
        mode="in_flight",
    )


def test_wrong_position_fails_before_the_first_step(tmp_path):
    data = TupleData(X, Y, IDS)
    _fails_before_the_first_step(
        tmp_path,
        TupleMLP(),
        data,
        MissingExampleIdsError,
        "1-D integer",
        mode="in_flight",
        example_ids=0,  # x [B, 8], not ids
    )


class MeanLoss(PlainMLP):
    def per_example_loss(self, batch):
        return super().per_example_loss(batch).mean()


class NaNLoss(PlainMLP):
    def per_example_loss(self, batch):
        return super().per_example_loss(batch) * float("nan")


@pytest.mark.parametrize("mode", ["sweep", "in_flight"])
def test_wrong_loss_fails_before_the_first_step(tmp_path, mode):
    data = TensorDataset(X, Y)
    kw = dict(attribution_data=data)  # a sweep: plain data, numbered by position
    if mode == "in_flight":  # in flight the batches need ids: tuples with a position
        data, kw = TupleData(X, Y, IDS), dict(example_ids=2)

        class Mean(TupleMLP):
            def per_example_loss(self, batch):
                return super().per_example_loss(batch).mean()

        class NaN(TupleMLP):
            def per_example_loss(self, batch):
                return super().per_example_loss(batch) * float("nan")

        mean_cls, nan_cls = Mean, NaN
    else:
        mean_cls, nan_cls = MeanLoss, NaNLoss
    _fails_before_the_first_step(
        tmp_path, mean_cls(), data, ValueError, r"1-D tensor \[B\]", mode=mode, **kw
    )
    _fails_before_the_first_step(
        tmp_path,
        nan_cls(),
        data,
        NonFiniteError,
        "non-finite per-example loss",
        mode=mode,
        overwrite=True,
        **kw,
    )


def test_module_expecting_indexed_batches_on_plain_data_is_told(tmp_path):
    """The library numbers plain data by position and gives the loss ``(x, y)``; a module written for
    ``IndexedDataset`` batches fails on it at once, with the fix named."""
    data = TensorDataset(X, Y)
    _fails_before_the_first_step(
        tmp_path,
        IndexedMLP(),
        data,
        MissingExampleIdsError,
        "numbered its items by position.*IndexedDataset",
        attribution_data=data,
    )


def test_a_layer_the_loss_never_reaches_fails_before_the_first_step(tmp_path):
    class Unused(PlainMLP):
        def __init__(self) -> None:
            super().__init__()
            self.aux = nn.Linear(8, 2)  # trained by nothing the per-example loss uses

    data = TensorDataset(X, Y)
    _fails_before_the_first_step(
        tmp_path,
        Unused(),
        data,
        ValueError,
        r"does not reach 1 captured layer\(s\) \(aux\)",
        attribution_data=data,
        preset="fast",
    )


def test_example_ids_spec():
    x, ids = torch.zeros(3, 8), torch.tensor([5, 6, 7])
    assert ExampleIds(2)([x, x, ids]).tolist() == [5, 6, 7]
    assert ExampleIds(-1)((x, ids)).tolist() == [5, 6, 7]
    assert ExampleIds("uid")({"x": x, "uid": ids}).tolist() == [5, 6, 7]
    assert ExampleIds(lambda b: b["meta"]["n"])({"meta": {"n": [1, 2, 3]}}).tolist() == [1, 2, 3]
    for key in ("example_id", "idx", "index", "id"):
        assert ExampleIds()({"x": x, key: ids}).dtype == torch.int64
    assert ExampleIds().find((x, ids)) is None  # tuples need a position
    assert ExampleIds(0).find(x) is None  # a tensor batch is not indexed by position
    with pytest.raises(ValueError, match=r"several example-id keys \['idx', 'id'\].*example_ids="):
        ExampleIds()({"idx": ids, "id": ids})
    with pytest.raises(MissingExampleIdsError, match="1-D integer"):
        ExampleIds("idx")({"idx": torch.zeros(3)})
    with pytest.raises(MissingExampleIdsError, match="1-D integer"):
        ExampleIds("idx")({"idx": ["a", "b", "c"]})
    with pytest.raises(MissingExampleIdsError, match="example_ids='uid'.*IndexedDataset"):
        ExampleIds("uid")({"x": x})
    with pytest.raises(ValueError, match="example_ids must be"):
        ExampleIds(1.5)
    with pytest.raises(ValueError, match="example_ids must be"):
        GradientLogger("x.h5", example_ids=True)
