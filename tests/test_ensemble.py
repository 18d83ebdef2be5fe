"""Dropout ensembles: seeded sub-network rows against torch.func, and the member average."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import FastLogger, make_classification
from oracles import reference_rows
from torch.utils.data import DataLoader

from lightning_tda.capture.ensemble import member_mask
from lightning_tda.methods import Influence
from lightning_tda.store.members import member_dataset
from lightning_tda.store.writer import StoreError


@pytest.fixture(scope="module")
def run(logged_mlp_store):
    fit = logged_mlp_store(
        "ens",
        "e.h5",
        n=80,
        n_queries=6,
        mlp=dict(lr=0.2),
        logger_cls=FastLogger,
        epochs=3,
        every_n_epochs=3,
        rank=4,
        dtype="float32",
        verbose=False,
    )
    model, data, queries, store = fit.model, fit.data, fit.queries, fit.store
    store.add_dropout_ensemble(model, data, members=2, p=0.25, seed=3)
    return model, data, queries, store


def test_member_rows_equal_torch_func_gradients_of_the_masked_network(run):
    model, data, _, store = run
    step = store.steps[-1]
    batch = next(iter(DataLoader(data, batch_size=len(data))))
    for r in range(2):
        m0 = member_mask(3, r, "net.0", 8, 0.25)
        m1 = member_mask(3, r, "net.3", 16, 0.25)

        def masked_loss(mdl, b, m0=m0, m1=m1):
            _, (x, y) = b
            h = torch.tanh(mdl.net[0](x * m0))
            return F.cross_entropy(mdl.net[3](h * m1), y, reduction="none")

        ref = reference_rows(model, masked_loss, batch, store.layers, store.projection)
        got = store.read(step, member_dataset(r))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(
        store.read(step, member_dataset(0)), store.read(step, member_dataset(1))
    )


def test_mask_keeps_the_expected_fraction():
    m = member_mask(0, 0, "layer", 20000, 0.1)
    assert abs(float((m > 0).float().mean()) - 0.9) < 0.01
    torch.testing.assert_close(m[m > 0], torch.full_like(m[m > 0], 1 / 0.9))
    assert torch.equal(m, member_mask(0, 0, "layer", 20000, 0.1))


def test_influence_averages_over_members(run):
    model, _, queries, store = run
    step = store.steps[-1]
    ours = store.attribute(
        queries, model=model, method=Influence(dropout_members=2), top_k=None
    ).scores.double()
    keys = [(step, 0), (step, 1)]
    qv, _ = store.query_vectors(queries, model, keys)
    ref = 0
    for r in range(2):
        rows = store.read(step, member_dataset(r)).double()
        for s in store.layers:
            sl = slice(s.offset, s.offset + s.size)
            f = rows[:, sl].T @ rows[:, sl] / len(rows)
            lam = torch.trace(f) / f.shape[0]  # default: 1.0 x mean eigenvalue
            inv = torch.linalg.inv(f + lam * torch.eye(f.shape[0], dtype=f.dtype))
            ref = ref + qv[(step, r)][:, sl].double() @ inv @ rows[:, sl].T / 2
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_ensemble_bad_input(run):
    model, data, queries, store = run
    with pytest.raises(StoreError, match="overwrite=True"):
        store.add_dropout_ensemble(model, data, members=1, p=0.25, seed=3)
    with pytest.raises(ValueError, match="add_dropout_ensemble"):
        store.attribute(queries, model=model, method=Influence(dropout_members=3))
    with pytest.raises(ValueError, match="query"):
        store.attribute("logged", method=Influence(dropout_members=2))
    with pytest.raises(StoreError, match="exactly the store"):
        store.add_dropout_ensemble(model, make_classification(10), members=1, overwrite=True)
    with pytest.raises(ValueError, match="p must be"):
        store.add_dropout_ensemble(model, data, p=1.5)
