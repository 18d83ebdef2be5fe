"""DataInf (methods.md §9) against a dense per-example per-example float64 solves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from lightning_tda.methods import datainf as datainf_module
from lightning_tda.methods.datainf import DataInf
from lightning_tda.store import schema


@pytest.fixture(scope="module")
def run(logged_mlp_store):
    """TinyMLP (blocks 16x9 and 3x17), 256 examples, exact fp32 rows at two checkpoints."""
    store = logged_mlp_store(
        "datainf",
        n=256,
        n_queries=12,
        mlp=dict(lr=0.2),
        log_queries=True,
        epochs=2,
        train_batch_size=32,
        every_n_epochs=1,
        projection="exact",
        dtype="float32",
        verbose=False,
    ).store
    assert [s.size for s in store.layers] == [16 * 9, 3 * 17]
    assert len(store.steps) == 2
    return store


def dense_inverse(store, step, v, damping=None, scale=0.1):
    """``(1/n) Σ_j (g_lj g_lj^T + λ_l I)^{-1} v_l`` per layer by explicit float64 solves."""
    g = store.read(step, schema.TRAIN).double()
    v = v.double()
    n = g.shape[0]
    out = torch.zeros_like(v)
    for s in store.layers:
        cols = slice(s.offset, s.offset + s.size)
        gl = g[:, cols]  # [n, d]
        lam = scale * gl.pow(2).mean() if damping is None else damping  # scale * mean_j mean(g_j^2)
        mats = gl[:, :, None] * gl[:, None, :] + lam * torch.eye(s.size, dtype=torch.float64)
        sol = torch.linalg.solve(mats, v[:, cols].T.expand(n, -1, -1))  # [n, d, Q]
        out[:, cols] = sol.mean(0).T
    return out


def _check(got, ref, rtol=1e-4):
    got, ref = got.double(), ref.double()
    r = pearsonr(got.flatten().numpy(), ref.flatten().numpy())[0]
    assert r > 0.9999, r
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


@pytest.mark.parametrize("budget", [None, 20_000])  # 20 kB: 64-row train blocks and query tiles
def test_scores_equal_dense_reference(run, monkeypatch, budget):
    store = run
    if budget is not None:
        monkeypatch.setattr(datainf_module, "_BUDGET", budget)
    for step in store.steps:
        v = store.read(step, schema.QUERY)  # [12, D]
        got = store.attribute("logged", method=DataInf(checkpoint=step), top_k=None).scores
        ref = dense_inverse(store, step, v) @ store.read(step, schema.TRAIN).double().T
        assert got.shape == (12, 256)
        _check(got, ref)
    # the default checkpoint is the last one; the two checkpoints give different scores
    last = store.attribute("logged", method=DataInf(), top_k=None).scores
    first = store.attribute("logged", method=DataInf(checkpoint=store.steps[0]), top_k=None)
    torch.testing.assert_close(last, got)
    assert not torch.allclose(first.scores, last, rtol=1e-2)


def test_self_influence_equals_dense_reference(run, monkeypatch):
    store = run
    step = store.steps[-1]
    g = store.read(step, schema.TRAIN)
    ref = (dense_inverse(store, step, g) * g.double()).sum(1)
    got = store.self_influence(method=DataInf())
    assert got.shape == (256,)
    _check(got, ref)
    assert (got > 0).all()  # a positive-definite inverse
    monkeypatch.setattr(datainf_module, "_BUDGET", 20_000)  # many blocks and tiles
    ref_half = (dense_inverse(store, step, g, scale=0.5) * g.double()).sum(1)
    _check(store.self_influence(method=DataInf(damping_scale=0.5)), ref_half)


def test_explicit_damping_and_large_damping_limit(run):
    store = run
    step = store.steps[-1]
    v = store.read(step, schema.QUERY)
    gt = store.read(step, schema.TRAIN).double()
    got = store.attribute("logged", method=DataInf(damping=1e-3), top_k=None).scores
    _check(got, dense_inverse(store, step, v, damping=1e-3) @ gt.T)
    # λ >> |g|²: (g g^T + λ I)^{-1} ≈ I / λ, so λ·DataInf -> graddot (same sign and ranking)
    lam = 1e6 * float(gt.pow(2).sum(1).max())
    big = store.attribute("logged", method=DataInf(damping=lam), top_k=None).scores
    dot = store.attribute("logged", method="graddot", top_k=None).scores
    torch.testing.assert_close(big.double() * lam, dot.double(), rtol=1e-4, atol=1e-5)
    rho = np.mean([spearmanr(big[q], dot[q])[0] for q in range(len(dot))])
    assert rho > 0.999, rho
    # at the default damping the inverse matters: the ranking differs from graddot's
    default = store.attribute("logged", method=DataInf(), top_k=None).scores
    rho_default = np.mean([spearmanr(default[q], dot[q])[0] for q in range(len(dot))])
    assert rho_default < 0.99, rho_default


def test_top_k_matches_dense(run):
    store = run
    dense = store.attribute("logged", method=DataInf(), top_k=None).scores
    top = store.attribute("logged", method=DataInf(), top_k=5, block_rows=50)
    order = torch.argsort(dense, dim=1, descending=True)[:, :5]
    assert torch.equal(top.indices, store.example_ids[order])


def test_bad_input(run):
    with pytest.raises(
        ValueError, match=r"damping must be > 0 \(or None for the per-layer default"
    ):
        DataInf(damping=-1)
    with pytest.raises(ValueError, match="damping must be > 0"):
        DataInf(damping=0.0)
    with pytest.raises(ValueError, match="damping_scale must be > 0"):
        DataInf(damping_scale=0)
    with pytest.raises(KeyError, match=r"no complete checkpoint at step 999.*DataInf\(checkpoint="):
        run.attribute("logged", method=DataInf(checkpoint=999), top_k=None)
    with pytest.raises(KeyError, match="no complete checkpoint at step 999"):
        run.self_influence(method=DataInf(checkpoint=999))
