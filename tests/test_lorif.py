"""LoRIF: factored storage (FastLogger(storage="lorif")) and the low-rank Woodbury influence."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from helpers import (
    FastLogger,
    TinyGPT,
    TinyMLP,
    TokenDataset,
    loader,
    make_classification,
    trainer,
)
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_tda import AttributionStore, IndexedDataset
from lightning_tda.capture.lowrank import FactorLayout
from lightning_tda.methods.influence import Influence
from lightning_tda.methods.lorif import LoRIF
from lightning_tda.store import schema


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _fit(tmp, name, model_fn, data, queries, storage, c, epochs=2, batch_size=8, **kw):
    torch.manual_seed(0)
    model = model_fn()
    logger = FastLogger(
        tmp / name,
        attribution_data=data,
        query_data=queries,
        storage=storage,
        lorif_rank=c,
        verbose=False,
        **kw,
    )
    trainer(tmp, [logger], max_epochs=epochs).fit(model, loader(data, batch_size=batch_size))
    return AttributionStore(tmp / name), model


@pytest.fixture(scope="module")
def gpt_runs(tmp_path_factory):
    """Identically seeded TinyGPT fits: dense rows vs full-rank factors (c = k = 4), float32 rows."""
    tmp = tmp_path_factory.mktemp("lorif_gpt")
    data = IndexedDataset(TokenDataset(24))
    queries = IndexedDataset(TokenDataset(6, seed=1))
    kw = dict(rank=4, dtype="float32", dense_dim=8)
    dense, _ = _fit(tmp, "dense.h5", TinyGPT, data, queries, "dense", 1, **kw)
    lorif, _ = _fit(tmp, "lorif.h5", TinyGPT, data, queries, "lorif", 4, **kw)
    low, _ = _fit(tmp, "lorif1.h5", TinyGPT, data, queries, "lorif", 1, **kw)
    return dense, lorif, low


@pytest.fixture(scope="module")
def mlp_runs(tmp_path_factory):
    """Identically seeded TinyMLP (Adam) fits: dense rows vs rank-1 factors, float32 rows."""
    tmp = tmp_path_factory.mktemp("lorif_mlp")
    data = make_classification(48)
    queries = make_classification(5, seed=1)
    kw = dict(dtype="float32", every_n_epochs=1)

    def model_fn():
        return TinyMLP(optimizer="adam", lr=0.01)

    dense, model = _fit(tmp, "dense.h5", model_fn, data, queries, "dense", 1, epochs=3, **kw)
    lorif, _ = _fit(tmp, "lorif.h5", model_fn, data, queries, "lorif", 1, epochs=3, **kw)
    return dense, lorif, model, queries


# -- storage ---------------------------------------------------------------------------------
def test_store_layout_and_attrs(gpt_runs):
    dense, lorif, _ = gpt_runs
    assert dense.storage == "dense" and dense.factor_layout is None
    assert lorif.storage == "lorif" and int(lorif.attrs["lorif_rank"]) == 4
    ck = lorif.checkpoint(None)
    assert ck.factored and ck.has_precond and ck.has_queries
    assert schema.TRAIN not in ck.datasets and schema.TRAIN_PRECOND not in ck.datasets
    layout = lorif.factor_layout
    assert [b.name for b in layout.blocks] == [s.name for s in lorif.layers]
    assert layout.blocks[-1].kind == "raw" and layout.blocks[-1].name == "<dense>"
    assert all(b.c == 4 for b in layout.blocks[:-1])
    with h5py.File(lorif.path, "r") as f:
        g = f[schema.checkpoint_name(ck.global_step)]
        assert g[schema.TRAIN_FACTORS].shape == (24, layout.width)
        assert g[schema.QUERY].shape == (6, lorif.width)  # queries stay dense
        assert bool(g.attrs["complete"])


def test_full_rank_factors_reconstruct_the_dense_rows(gpt_runs):
    dense, lorif, low = gpt_runs
    for step in dense.steps:
        for name in (schema.TRAIN, schema.TRAIN_PRECOND):
            ref = dense.read(step, name)
            assert _rel(lorif.read(step, name), ref) < 1e-5
    # sequences: per-example projected gradients have rank > 1, so c = 1 loses information
    step = dense.steps[-1]
    g = dense.read(step)[:, :16].reshape(-1, 4, 4)
    s = torch.linalg.svdvals(g)
    assert float((s[:, 1] / s[:, 0]).max()) > 0.1
    assert _rel(low.read(step), dense.read(step)) > 1e-2


def test_full_rank_lorif_equals_dense_store(gpt_runs):
    """c = min(k_out, k_in): LoRIF on the factors == LoRIF on the dense rows of the same run."""
    dense, lorif, low = gpt_runs
    for method in (LoRIF(rank=8, oversample=2), LoRIF(rank=64), LoRIF(checkpoints=dense.steps)):
        a = lorif.attribute("logged", method=method, top_k=None).scores
        b = dense.attribute("logged", method=method, top_k=None).scores
        assert _rel(a, b) < 1e-4
        assert _rel(lorif.self_influence(method=method), dense.self_influence(method=method)) < 1e-4
    # top-k through the factored scorer matches the dense ranking
    top = lorif.attribute("logged", method=LoRIF(rank=8, oversample=2), top_k=3)
    full = dense.attribute("logged", method=LoRIF(rank=8, oversample=2), top_k=None).scores
    torch.testing.assert_close(top.scores, full.topk(3, dim=1).values, rtol=1e-4, atol=0)
    # the rank-1 store is a different (lossy) answer, so the comparison above can fail
    a = low.attribute("logged", method=LoRIF(rank=64), top_k=None).scores
    b = dense.attribute("logged", method=LoRIF(rank=64), top_k=None).scores
    assert _rel(a, b) > 1e-2


def test_woodbury_with_full_rank_equals_exact_inverse(gpt_runs):
    """r >= D_l: the low-rank inverse is (F + λI)^{-1} from torch.linalg.solve on the dense rows."""
    dense, lorif, _ = gpt_runs
    step = dense.steps[-1]
    rows = dense.read(step).double()
    n = rows.shape[0]
    fits = LoRIF(rank=64).curvature(lorif, step)
    for blk in fits:
        g = rows[:, blk.block.dense_cols]
        fisher = g.T @ g / n
        lam = 0.1 * float(torch.trace(fisher)) / g.shape[1]
        assert blk.lam == pytest.approx(lam, rel=1e-5)
        exact = torch.linalg.solve(
            fisher + lam * torch.eye(g.shape[1], dtype=g.dtype),
            torch.eye(g.shape[1], dtype=g.dtype),
        )
        torch.testing.assert_close(
            blk.dense_inverse(), exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max())
        )
    # and LoRIF then equals influence(mode="raw") at LoRIF's damping (0.1 x mean eigenvalue)
    a = lorif.attribute("logged", method=LoRIF(rank=64), top_k=None).scores
    b = dense.attribute("logged", method=Influence(damping_scale=0.1), top_k=None).scores
    assert _rel(a, b) < 1e-4


def test_randomized_subspace_captures_the_top_eigenvalues(gpt_runs):
    dense, _, _ = gpt_runs
    step = dense.steps[-1]
    rows = dense.read(step).double()
    fits = LoRIF(rank=3, oversample=5, power_iters=2).curvature(dense, step)
    for blk in fits[:-1]:  # 16-dim layers, sketch of 8 columns
        assert blk.basis.shape == (16, 3)
        g = rows[:, blk.block.dense_cols]
        top = torch.linalg.eigvalsh(g.T @ g / g.shape[0]).flip(0)[:3]
        torch.testing.assert_close(blk.mu, top, rtol=5e-2, atol=1e-6 * float(top[0]))
        torch.testing.assert_close(blk.basis.T @ blk.basis, torch.eye(3, dtype=torch.float64))


def test_mlp_rank_one_factors_reproduce_dense_scores(mlp_runs):
    """Per-example MLP gradients are rank 1: c = 1 stores them exactly."""
    dense, lorif, model, queries = mlp_runs
    assert all(b.c == 1 for b in lorif.factor_layout.blocks)
    for method in (LoRIF(), LoRIF(checkpoints=dense.steps, weighting="uniform")):
        a = lorif.attribute(queries, model=model, method=method, top_k=None).scores
        b = dense.attribute(queries, model=model, method=method, top_k=None).scores
        assert _rel(a, b) < 1e-4
        assert _rel(lorif.self_influence(method=method), dense.self_influence(method=method)) < 1e-4


def test_other_methods_read_the_reconstruction(mlp_runs):
    """tracin / tracin_adam / influence on a lorif store give the dense-store answer (rows = U V^T)."""
    dense, lorif, model, queries = mlp_runs
    for method in ("tracin", "tracin_adam", "influence"):
        a = lorif.attribute(queries, model=model, method=method, top_k=None).scores
        b = dense.attribute(queries, model=model, method=method, top_k=None).scores
        assert _rel(a, b) < 1e-4, method
    assert _rel(lorif.self_influence(method="tracin"), dense.self_influence(method="tracin")) < 1e-4


def test_lr_weighting_of_checkpoints(mlp_runs):
    dense, _, model, queries = mlp_runs
    steps = dense.steps
    per = [
        dense.attribute(queries, model=model, method=LoRIF(checkpoints=[s]), top_k=None).scores
        for s in steps
    ]
    lr = torch.tensor([dense.checkpoint(s).lr_sum[0] for s in steps])
    want = sum(w * p for w, p in zip((lr / lr.sum()).tolist(), per, strict=True))
    got = dense.attribute(queries, model=model, method=LoRIF(checkpoints=steps), top_k=None).scores
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("c", [1, 2, 4])
def test_stored_bytes_per_example(tmp_path, c):
    data = make_classification(32)
    kw = dict(dtype="float16", optimizer_state=False)
    store, _ = _fit(
        tmp_path, "s.h5", lambda: TinyMLP(hidden=32), data, None, "lorif", c, epochs=1, **kw
    )
    with h5py.File(store.path, "r") as f:
        g = f[schema.checkpoint_name(store.steps[-1])]
        assert schema.TRAIN not in g
        got = g[schema.TRAIN_FACTORS].id.get_storage_size() / store.num_examples
    want = sum(min(c, s.k_out, s.k_in) * (s.k_out + s.k_in) * 2 for s in store.layers)
    dense_bytes = sum(s.k_out * s.k_in * 2 for s in store.layers)
    assert got == want
    assert got < dense_bytes
    # layers are 32x9 -> 16x9 and 3x33 -> 3x16: per-layer c(k_out + k_in) vs k_out k_in
    assert [(s.k_out, s.k_in) for s in store.layers] == [(16, 9), (3, 16)]


def test_dense_bytes_match_arithmetic(tmp_path):
    data = make_classification(32)
    store, _ = _fit(
        tmp_path,
        "d.h5",
        lambda: TinyMLP(hidden=32),
        data,
        None,
        "dense",
        1,
        epochs=1,
        log_at_fit_end=True,
        optimizer_state=False,
    )
    with h5py.File(store.path, "r") as f:
        g = f[schema.checkpoint_name(store.steps[-1])]
        got = g[schema.TRAIN].id.get_storage_size() / store.num_examples
    assert got == sum(s.k_out * s.k_in * 2 for s in store.layers) == (16 * 9 + 3 * 16) * 2


# -- factor layout unit checks -------------------------------------------------------------
def test_factor_layout_exact_and_lossy():
    from lightning_tda.capture.layers import LayerSpec

    layers = [
        LayerSpec("a", "linear", 6, 5, True, 6, 5, 0, ("a.weight", "a.bias")),
        LayerSpec("<dense>", "dense", 1, 40, False, 1, 7, 30, ("e",)),
    ]
    g = torch.Generator().manual_seed(0)
    m = torch.randn(10, 6, 2, generator=g) @ torch.randn(10, 2, 5, generator=g)  # rank 2
    rows = torch.cat([m.reshape(10, -1), torch.randn(10, 7, generator=g)], dim=1)
    for c, exact in ((2, True), (5, True), (1, False)):
        layout = FactorLayout.from_layers(layers, c)
        assert layout.width == min(c, 5) * 11 + 7
        x = layout.factor(rows)
        err = _rel(layout.reconstruct(x), rows)
        assert (err < 1e-5) == exact, (c, err)
        # scores against factors == scores against the reconstruction, for Q = 1 (factored
        # contraction) and Q = 4 (expanded block)
        for q in (1, 4):
            qv = torch.randn(q, 37, generator=g)
            torch.testing.assert_close(
                layout.dot(qv, x), qv @ layout.reconstruct(x).T, rtol=1e-5, atol=1e-5
            )
        sq = sum(b.sqnorm(x) for b in layout.blocks)
        torch.testing.assert_close(sq, layout.reconstruct(x).pow(2).sum(1), rtol=1e-5, atol=1e-5)
    assert FactorLayout.from_json(layout.to_json()) == layout


def test_large_blocks_use_the_randomized_svd():
    from lightning_tda.capture.layers import LayerSpec

    layers = [LayerSpec("big", "linear", 200, 150, False, 200, 150, 0, ("w",))]
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 200, 2, generator=g) @ torch.randn(3, 2, 150, generator=g)
    layout = FactorLayout.from_layers(layers, 2)
    x = layout.factor(m.reshape(3, -1))
    assert x.shape == (3, 2 * 350)
    assert _rel(layout.reconstruct(x), m.reshape(3, -1)) < 1e-4


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(storage="lorif", lorif_rank=0), "lorif_rank must be a positive int"),
        (dict(storage="lorif", lorif_rank=-2), "lorif_rank must be a positive int"),
        (dict(storage="lorif", lorif_rank=1.5), "lorif_rank must be a positive int"),
        (dict(storage="lorif", lorif_rank=True), "lorif_rank must be a positive int"),
        (dict(storage="factored"), "storage must be 'dense' or 'lorif'"),
    ],
)
def test_bad_logger_options(tmp_path, kw, match):
    with pytest.raises(MisconfigurationException, match=match):
        FastLogger(tmp_path / "x.h5", **kw)


@pytest.mark.parametrize(
    "kw",
    [
        dict(rank=0),
        dict(oversample=-1),
        dict(power_iters=1.5),
        dict(damping=0.0),
        dict(damping_scale=-1),
        dict(weighting="sum"),
    ],
)
def test_bad_lorif_hyperparameters(kw):
    with pytest.raises(ValueError, match="lorif"):
        LoRIF(**kw)


def test_resume_with_other_storage_is_refused(mlp_runs, tmp_path):
    """A store written dense cannot be continued with storage='lorif' (layout recorded in root attrs)."""
    dense, _, _, _ = mlp_runs
    from lightning_tda.store.writer import StoreError, StoreWriter

    w = StoreWriter(dense.path, "float32")
    with pytest.raises(StoreError, match="different storage"):
        w.write_run_metadata({"storage": "lorif"}, compare=("storage",))
    assert np.asarray(dense.example_ids).shape == (48,)
