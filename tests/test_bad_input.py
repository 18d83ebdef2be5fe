"""Bad input fails early with an error that names the fix, and leaves nothing corrupt behind."""

from __future__ import annotations

import shutil

import h5py
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import TinyMLP, loader, make_classification, trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from lightning_tda import (
    AttributionStore,
    GradientLogger,
    Indexed,
    IndexedDataset,
    MissingExampleIdsError,
    NonFiniteError,
    ProjectionMismatchError,
    SchemaVersionError,
    StoreError,
)
from lightning_tda.data.indexed import get_example_ids

# 64 examples, batch 16 -> 4 optimizer steps per epoch; every_n_epochs=1 logs at steps 4, 8, ...
N = 64


def _fit(tmp_path, model, data, logger, max_epochs: int = 1) -> None:
    trainer(tmp_path, [logger], max_epochs=max_epochs).fit(model, loader(data))


def _logger(path, data, **kw) -> GradientLogger:
    kw.setdefault("every_n_epochs", 1)
    kw.setdefault("verbose", False)
    return GradientLogger(path, attribution_data=data, **kw)


@pytest.fixture(scope="module")
def good_store(logged_mlp_store):
    """A healthy store: TinyMLP(hidden=16), SGD, 64 examples, one epoch (one checkpoint at step 4)."""
    run = logged_mlp_store(
        "bad_input", "good.h5", n=N, mlp=dict(hidden=16), epochs=1, every_n_epochs=1, verbose=False
    )
    model, store = run.model, run.store
    assert store.steps == [4]
    return model, store


# -- 1. batches without example ids -------------------------------------------------------------


def test_unwrapped_attribution_data_names_indexed_dataset(tmp_path):
    data = make_classification(N)
    plain = data.dataset  # the TensorDataset inside: its batches carry no ids
    assert isinstance(plain, TensorDataset)
    path = tmp_path / "tda.h5"
    with pytest.raises(MissingExampleIdsError, match="IndexedDataset"):
        _fit(tmp_path, TinyMLP(), data, _logger(path, plain, preset="fast"))
    # still readable: the first-batch check refused before any checkpoint
    store = AttributionStore(path)
    assert store.checkpoints == []
    assert store.incomplete == []
    # the default PCA basis pass meets the batch first: the same error, before the checkpoint opens
    with pytest.raises(MissingExampleIdsError, match="IndexedDataset"):
        _fit(tmp_path, TinyMLP(), data, _logger(tmp_path / "pca.h5", plain, overwrite=True))


def test_get_example_ids_on_batches_without_ids():
    with pytest.raises(MissingExampleIdsError, match="IndexedDataset"):
        get_example_ids({"x": torch.zeros(4, 8), "y": torch.zeros(4)})
    with pytest.raises(MissingExampleIdsError, match="IndexedDataset"):
        get_example_ids([torch.zeros(4, 8), torch.zeros(4)])
    with pytest.raises(MissingExampleIdsError, match="1-D integer"):
        get_example_ids({"example_id": torch.zeros(4), "x": torch.zeros(4, 8)})
    ids = get_example_ids({"example_id": torch.tensor([3, 1]), "x": torch.zeros(2, 8)})
    assert ids.dtype == torch.int64 and ids.tolist() == [3, 1]


# -- 2. query side does not reproduce the store's projection ------------------------------------


def test_query_model_of_another_architecture(good_store):
    _, store = good_store
    queries = make_classification(6, seed=1)
    with pytest.raises(ProjectionMismatchError, match="same architecture"):
        store.attribute(queries, model=TinyMLP(hidden=32))


def test_precomputed_query_vectors_of_wrong_width(good_store):
    _, store = good_store
    wrong = {4: torch.randn(5, store.width + 3)}
    with pytest.raises(ProjectionMismatchError, match=rf"D={store.width}"):
        store.attribute(wrong, method="graddot")
    with pytest.raises(ProjectionMismatchError, match="query_vectors"):
        store.attribute({4: torch.randn(store.width)}, method="graddot")  # 1-D, not [Q, D]
    with pytest.raises(KeyError, match="lack checkpoint 4"):
        store.attribute({8: torch.randn(5, store.width)}, method="graddot")
    ok = store.attribute({4: torch.randn(5, store.width)}, method="graddot", top_k=None)
    assert ok.scores.shape == (5, N)


# -- 3. NaN / Inf in the sweep ---------------------------------------------------------------------


class NaNAtSweep(TinyMLP):
    """Training is clean (training_step uses its own loss); the sweep's loss of id 1003 is NaN from epoch 1."""

    def per_example_loss(self, batch):
        ids, _ = batch
        loss = super().per_example_loss(batch)
        if self.current_epoch >= 1:
            loss = torch.where(ids == 1003, torch.full_like(loss, float("nan")), loss)
        return loss


def test_nan_loss_names_the_example_and_leaves_no_complete_checkpoint(tmp_path):
    data = make_classification(N)
    model = NaNAtSweep()
    path = tmp_path / "tda.h5"
    with pytest.raises(
        NonFiniteError, match=r"\[1003\].*exclude the examples from attribution_data"
    ):
        _fit(tmp_path, model, data, _logger(path, data), max_epochs=2)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # training itself is finite
    assert not any(m._forward_hooks for m in model.modules())  # capture hooks were removed
    store = AttributionStore(path)
    assert store.steps == [4]  # epoch 0 checkpoint is intact
    assert store.incomplete == [8]  # the failed sweep is marked incomplete, not half-valid
    with pytest.raises(KeyError, match="no complete checkpoint at step 8"):
        store.checkpoint(8)
    # the complete checkpoint is still usable
    res = store.attribute(make_classification(4, seed=1), model=TinyMLP(), method="graddot")
    assert torch.isfinite(res.scores).all()


# -- 4. files that are not (this version's) stores -----------------------------------------------


def test_unknown_schema_version(good_store, tmp_path):
    _, store = good_store
    path = tmp_path / "future.h5"
    shutil.copy(store.path, path)
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(SchemaVersionError, match=r"schema version 99.*re-log the run"):
        AttributionStore(path)


def test_files_that_are_not_stores(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=[1, 2, 3])
    with pytest.raises(StoreError, match="not a lightning_tda store"):
        AttributionStore(other)
    text = tmp_path / "notes.h5"
    text.write_text("this is not HDF5\n")
    with pytest.raises(StoreError, match="not a readable HDF5 file.*GradientLogger"):
        AttributionStore(text)
    with pytest.raises(FileNotFoundError, match="no attribution store"):
        AttributionStore(tmp_path / "missing.h5")


# -- 5. unwritable paths ---------------------------------------------------------------------------


def test_store_path_under_a_regular_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(StoreError, match="writable path"):
        GradientLogger(afile / "sub" / "tda.h5")
    assert afile.read_text() == "x"


def test_store_path_directly_under_a_regular_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(StoreError, match="writable"):
        GradientLogger(afile / "tda.h5")


def test_store_path_is_a_directory(tmp_path):
    d = tmp_path / "adir"
    d.mkdir()
    with pytest.raises(StoreError, match=r"is a directory; pass a file path"):
        GradientLogger(d)
    assert d.is_dir()


# -- 6. invalid constructor arguments -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_epochs": 1, "every_n_train_steps": 5}, "one trigger"),
        ({"every_n_epochs": 0}, "every_n_epochs must be a positive int"),
        ({"every_n_train_steps": -2}, "every_n_train_steps must be a positive int"),
        ({"at_steps": []}, "at_steps must be a non-empty list"),
        ({"at_steps": [-1]}, "non-negative ints"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
    ],
)
def test_invalid_triggers(tmp_path, kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        GradientLogger(tmp_path / "tda.h5", **kwargs)
    assert not (tmp_path / "tda.h5").exists()


def test_invalid_dtype_and_projection(tmp_path):
    with pytest.raises(ValueError, match=r"dtype must be one of .*float16.*bfloat16.*float32"):
        GradientLogger(tmp_path / "tda.h5", dtype="int8")
    with pytest.raises(ValueError, match="projection must be 'kronecker' or 'exact'"):
        GradientLogger(tmp_path / "tda.h5", projection="foo")
    with pytest.raises(MisconfigurationException, match="Dataset or DataLoader"):
        GradientLogger(tmp_path / "tda.h5", attribution_data=[1, 2, 3])
    assert not (tmp_path / "tda.h5").exists()


@pytest.mark.parametrize("top_k", [0, -3, 2.5])
def test_invalid_top_k(good_store, top_k):
    model, store = good_store
    with pytest.raises(ValueError, match="top_k must be a positive int or None"):
        store.attribute(make_classification(4, seed=1), model=model, top_k=top_k)


# -- 7. no per-example loss -------------------------------------------------------------------------


class NoPerExampleLoss(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 3)

    def training_step(self, batch, batch_idx):
        _, (x, y) = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_model_without_per_example_loss(tmp_path):
    data = make_classification(N)
    path = tmp_path / "tda.h5"
    with pytest.raises(ValueError, match=r"per_example_loss.*loss_fn="):
        _fit(tmp_path, NoPerExampleLoss(), data, _logger(path, data))
    assert not path.exists()  # rejected at setup, before any file is created


def test_loss_fn_rescues_a_model_without_per_example_loss(tmp_path):
    data = make_classification(N)
    path = tmp_path / "tda.h5"

    def loss_fn(model, batch):
        _, (x, y) = batch
        return F.cross_entropy(model.net(x), y, reduction="none")

    _fit(tmp_path, NoPerExampleLoss(), data, _logger(path, data, loss_fn=loss_fn))
    assert AttributionStore(path).steps == [4]


def test_batch_mean_loss_is_rejected(tmp_path):
    class MeanLoss(TinyMLP):
        def per_example_loss(self, batch):
            return super().per_example_loss(batch).mean()

    data = make_classification(N)
    with pytest.raises(ValueError, match=r"1-D tensor \[B\].*reduction='none'"):
        _fit(tmp_path, MeanLoss(), data, _logger(tmp_path / "tda.h5", data))


# -- 8. duplicate example ids ------------------------------------------------------------------------


class RepeatingIds(Dataset):
    """Items tagged ``Indexed(i % 8, ...)``: every id appears several times."""

    def __init__(self, base: IndexedDataset) -> None:
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return Indexed(i % 8, self.base[i].data)


def test_indexed_dataset_rejects_duplicate_ids():
    x, y = torch.randn(4, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="ids must be unique"):
        IndexedDataset(TensorDataset(x, y), ids=[1, 1, 2, 3])
    with pytest.raises(ValueError, match="one id per item"):
        IndexedDataset(TensorDataset(x, y), ids=[1, 2, 3])


def test_duplicate_ids_in_attribution_data(tmp_path):
    data = make_classification(N)
    path = tmp_path / "tda.h5"
    with pytest.raises(
        StoreError, match=r"example ids \[0, 1, 2, 3, 4\] appear twice.*unique.*IndexedDataset"
    ):
        _fit(tmp_path, TinyMLP(), data, _logger(path, RepeatingIds(data)))
    store = AttributionStore(path)
    assert store.checkpoints == [] and store.incomplete == [4]
    assert store.num_examples == 0  # no example-id table was committed


# -- 9. float16 overflow --------------------------------------------------------------------------------


class HugeGradients(TinyMLP):
    def per_example_loss(self, batch):
        return super().per_example_loss(batch) * 1e8


def test_fp16_overflow_names_wider_dtypes(tmp_path):
    data = make_classification(N)
    path = tmp_path / "fp16.h5"
    with pytest.raises(StoreError, match=r"overflows float16.*dtype='bfloat16'.*float32"):
        _fit(tmp_path, HugeGradients(), data, _logger(path, data, dtype="float16"))
    store = AttributionStore(path)
    assert store.checkpoints == [] and store.incomplete == [4]

    path32 = tmp_path / "fp32.h5"
    _fit(tmp_path, HugeGradients(), data, _logger(path32, data, dtype="float32"))
    store32 = AttributionStore(path32)
    assert store32.steps == [4] and store32.storage_dtype == "float32"
    rows = store32.read(4)
    assert torch.isfinite(rows).all() and float(rows.abs().max()) > 65504


# -- 10. an existing store from another fit ------------------------------------------------------------


def test_existing_store_is_not_silently_replaced(tmp_path):
    data = make_classification(N)
    path = tmp_path / "tda.h5"
    _fit(tmp_path, TinyMLP(), data, _logger(path, data), max_epochs=2)
    before = AttributionStore(path)
    assert before.steps == [4, 8]
    rows = before.read(8)

    with pytest.raises(StoreError, match=r"overwrite=True"):
        _fit(tmp_path, TinyMLP(), data, _logger(path, data))
    kept = AttributionStore(path)  # the refused fit did not touch the old store
    assert kept.steps == [4, 8]
    assert torch.equal(kept.read(8), rows)

    _fit(tmp_path, TinyMLP(), data, _logger(path, data, overwrite=True))
    assert AttributionStore(path).steps == [4]


def test_foreign_file_at_the_store_path_is_kept(tmp_path):
    data = make_classification(N)
    path = tmp_path / "notes.h5"
    path.write_text("important notes")
    with pytest.raises(StoreError, match="not an HDF5 store.*pass a new path"):
        _fit(tmp_path, TinyMLP(), data, _logger(path, data))
    assert path.read_text() == "important notes"


def test_foreign_hdf5_file_at_the_store_path_is_kept(tmp_path):
    data = make_classification(N)
    path = tmp_path / "mydata.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("precious", data=[1, 2, 3])
    try:
        with pytest.raises(StoreError, match="overwrite=True"):
            _fit(tmp_path, TinyMLP(), data, _logger(path, data))
    finally:
        with h5py.File(path, "r") as f:
            assert "precious" in f


# -- 11. attribute() misuse ------------------------------------------------------------------------------


def test_data_queries_need_a_model(good_store):
    _, store = good_store
    with pytest.raises(ValueError, match="pass model="):
        store.attribute(make_classification(4, seed=1), model=None)


def test_unknown_method_lists_the_available_ones(good_store):
    model, store = good_store
    with pytest.raises(ValueError, match=r"unknown method 'nope'.*graddot.*tracin_adam"):
        store.attribute(make_classification(4, seed=1), model=model, method="nope")


def test_tracin_adam_on_an_sgd_store(good_store):
    model, store = good_store
    with pytest.raises(ValueError, match=r"Adam-family optimizer.*optimizer_state=True"):
        store.attribute(make_classification(4, seed=1), model=model, method="tracin_adam")


def test_logged_queries_when_none_were_logged(good_store):
    _, store = good_store
    with pytest.raises(ValueError, match="pass query_data= to GradientLogger"):
        store.attribute("logged")
    with pytest.raises(ValueError, match="'logged'"):
        store.attribute("loged")


# -- argument validation of ProjectionConfig, the schedule and attribute() --------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rank", True),
        ("basis_examples", False),
        ("dense_dim", 2.5),
        ("dense_dim", "8"),
        ("seed", "abc"),
        ("seed", 1.0),
        ("dims", {"net.0": 3}),
        ("dims", {"net.0": (1.5, 2)}),
        ("dims", {"net.0": (4, -1)}),
    ],
)
def test_projection_config_refuses_bad_fields(field, value):
    from lightning_tda.capture.projection import ProjectionConfig

    with pytest.raises(ValueError, match=field):
        ProjectionConfig(**{field: value})


def test_projection_config_takes_numpy_ints_and_round_trips():
    import numpy as np

    from lightning_tda.capture.projection import ProjectionConfig

    cfg = ProjectionConfig(rank=np.int64(4), dims={"net.0": [2, 0]}, seed=np.int32(3))
    back = ProjectionConfig.from_dict(cfg.to_dict())
    assert back.dims == {"net.0": (2, 0)} and back.seed == 3
    assert back.side_dim("net.0", "out", 9) == 2 and back.side_dim("net.0", "in", 9) == 9


def test_at_steps_as_a_bare_int_names_the_list_form(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"at_steps=\[3\]"):
        GradientLogger(tmp_path / "s.h5", at_steps=3, verbose=False)


def test_attribute_refuses_repeated_checkpoints_and_bad_block_rows(good_store):
    _, store = good_store
    q = {4: torch.randn(2, store.width)}
    with pytest.raises(ValueError, match="checkpoints lists 4 more than once"):
        store.attribute(q, method="tracin", checkpoints=[4, 4])
    with pytest.raises(ValueError, match=r"checkpoints=\[4\]"):
        store.attribute(q, method="tracin", checkpoints=4)
    with pytest.raises(ValueError, match="block_rows"):
        store.self_influence(method="tracin", block_rows=0)
    with pytest.raises(ValueError, match="method must be a method name"):
        store.attribute(q, method=["tracin"])
    # the valid call still gives TracIn: lr_sum * <q, row>
    got = store.attribute(q, method="tracin", checkpoints=[4], top_k=None, block_rows=5).scores
    want = store.checkpoint(4).lr_sum[0] * q[4] @ store.read(4).float().T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
