"""Logged projected gradients == P_out^T G P_in of exact torch.func per-example gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    FastLogger,
    TinyGPT,
    TinyMLP,
    TokenDataset,
    make_classification,
)
from oracles import augmented_gradient, per_example_grads, reference_rows, rel_err
from torch.utils.data import DataLoader

from lightning_tda.capture.featurize import Featurizer
from lightning_tda.capture.layers import CONV1D, discover_layers
from lightning_tda.capture.losses import resolve_loss_fn
from lightning_tda.capture.projection import ProjectionConfig


def _featurize(model, batch, config):
    layers, _ = discover_layers(model, config)
    feat = Featurizer(
        model, layers, config, resolve_loss_fn(model, None), torch.device("cpu"), require_ids=False
    )
    model.eval()
    return layers, feat(batch).rows


@pytest.mark.parametrize(
    "config",
    [
        ProjectionConfig("kronecker", rank=4),
        ProjectionConfig("exact"),
        ProjectionConfig("kronecker", rank=5, distribution="rademacher", seed=3),
    ],
)
def test_mlp_hooks_match_torch_func(config):
    torch.manual_seed(0)
    model = TinyMLP()
    batch = next(iter(DataLoader(make_classification(20), batch_size=20)))
    layers, rows = _featurize(model, batch, config)
    ref = reference_rows(model, resolve_loss_fn(model, None), batch, layers, config)
    assert rows.shape == ref.shape
    assert rel_err(rows, ref) < 1e-4
    if config.kind == "exact":
        assert rows.shape[1] == 16 * 9 + 3 * 17


@pytest.mark.parametrize(
    "config", [ProjectionConfig("kronecker", rank=6), ProjectionConfig("exact")]
)
def test_gpt2_conv1d_padded_sequences_match_torch_func(config):
    torch.manual_seed(0)
    model = TinyGPT()
    with torch.no_grad():  # break the symmetry of the zero-initialised biases
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = next(iter(DataLoader(TokenDataset(6), batch_size=6)))
    assert (batch["attention_mask"] == 0).any()  # really padded
    layers, rows = _featurize(model, batch, config)
    assert {s.kind for s in layers} == {
        CONV1D
    }  # c_attn, c_proj, c_fc, mlp.c_proj; tied lm_head skipped
    assert len(layers) == 8
    ref = reference_rows(model, resolve_loss_fn(model, None), batch, layers, config, use_vmap=False)
    for s in layers:
        sl = slice(s.offset, s.offset + s.size)
        assert rel_err(rows[:, sl], ref[:, sl]) < 1e-4, s.name


def test_padding_does_not_change_an_example_gradient():
    """The same sequence padded to different lengths in a batch gives the same row."""
    torch.manual_seed(0)
    model = TinyGPT()
    config = ProjectionConfig("kronecker", rank=6)
    ds = TokenDataset(4)
    item = ds[0]
    n = int(item["attention_mask"].sum())
    short = {k: v[None, : n + 1] for k, v in item.items()}
    long = {k: v[None] for k, v in item.items()}
    _, a = _featurize(model, short, config)
    _, b = _featurize(model, long, config)
    assert rel_err(a, b) < 1e-5


def test_logged_rows_match_oracle_end_to_end(tmp_path, logged_mlp_store):
    run = logged_mlp_store(
        tmp_path,
        n=48,
        logger_cls=FastLogger,
        epochs=2,
        every_n_epochs=1,
        rank=4,
        seed=7,
        dtype="float32",
        batch_size=13,
    )
    model, data, store = run.model, run.data, run.store
    config = ProjectionConfig("kronecker", rank=4, seed=7)
    last = store.steps[-1]
    stored = store.read(last)
    batch = next(iter(DataLoader(data, batch_size=len(data))))
    ref = reference_rows(model, resolve_loss_fn(model, None), batch, store.layers, config)
    assert torch.equal(store.example_ids, torch.tensor(data.ids))
    assert rel_err(stored, ref) < 1e-4


def test_pca_basis_rows_match_oracle_end_to_end(tmp_path, logged_gpt_store):
    """PCA bases are stored, orthonormal, and the logged rows are U^T G V of the exact gradients."""
    run = logged_gpt_store(
        tmp_path,
        "p.h5",
        n=10,
        logger_cls=FastLogger,
        epochs=2,
        train_loader=DataLoader,  # unshuffled
        train_batch_size=5,
        every_n_epochs=1,
        rank=6,
        basis="pca",
        dtype="float32",
        batch_size=4,
    )
    model, data, store = run.model, run.data, run.store
    assert store.bases is not None and set(store.bases) == {s.name for s in store.layers}
    for p_out, p_in in store.bases.values():
        for p in (p_out, p_in):
            if p is not None:
                torch.testing.assert_close(p.T @ p, torch.eye(p.shape[1]), atol=1e-5, rtol=0)
    batch = next(iter(DataLoader(data, batch_size=10)))
    names = {n for s in store.layers for n in s.params}
    grads = per_example_grads(model, resolve_loss_fn(model, None), batch, names, use_vmap=False)
    ref = []
    for s in store.layers:
        g = augmented_gradient(s, grads)
        p_out, p_in = store.bases[s.name]
        g = g if p_out is None else p_out.T @ g
        g = g if p_in is None else g @ p_in
        ref.append(g.reshape(10, -1))
    rows = store.read(store.steps[-1])
    assert rel_err(rows, torch.cat(ref, 1)) < 1e-4
    # query gradients recomputed with the stored bases match the logged train rows of the same examples
    res = store.attribute(data, model=model, method="graddot", top_k=None)
    torch.testing.assert_close(
        res.scores, rows @ rows.T, rtol=1e-3, atol=1e-4 * float((rows @ rows.T).abs().max())
    )


def test_gpt2_logged_rows_match_oracle_end_to_end(tmp_path, logged_gpt_store):
    run = logged_gpt_store(
        tmp_path,
        "g.h5",
        n=10,
        logger_cls=FastLogger,
        epochs=1,
        train_loader=DataLoader,  # unshuffled
        train_batch_size=5,
        every_n_epochs=1,
        rank=6,
        dtype="float32",
        batch_size=4,
    )
    model, data, store = run.model, run.data, run.store
    batch = next(iter(DataLoader(data, batch_size=10)))
    ref = reference_rows(
        model, resolve_loss_fn(model, None), batch, store.layers, store.projection, use_vmap=False
    )
    assert rel_err(store.read(store.steps[-1]), ref) < 1e-4
