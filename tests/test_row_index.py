"""Approximate top-k through a FAISS row index: exact with a flat index (whitened or not, every
row method whose rows are plain vectors), high recall with IVF on clustered rows, and the errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from lightning_tda.errors import ConfigError  # noqa: E402
from lightning_tda.methods.row_index import IndexConfig, RowIndex  # noqa: E402


@pytest.fixture(scope="module")
def run(logged_mlp_store):
    return logged_mlp_store("row_index", n=300, n_queries=8, epochs=2)


@pytest.mark.parametrize("method", ["tracin", "influence", "gradcos", "auto"])
@pytest.mark.parametrize("whiten", [True, False])
def test_flat_index_gives_the_exact_top_k(run, method, whiten):
    """``factory="Flat"`` searches every row: the same proponents and opponents as the exact
    scan, scores within fp32 rounding (influence: through its whitening maps when ``whiten``)."""
    st = run.store
    exact = st.attribute(run.queries, model=run.model, method=method, top_k=5)
    index = st.build_index(method=method, config=IndexConfig(factory="Flat", whiten=whiten))
    got = st.attribute(run.queries, model=run.model, method=method, top_k=5, index=index)
    assert torch.equal(got.indices, exact.indices) and torch.equal(got.opponents, exact.opponents)
    scale = exact.scores.abs().max()
    torch.testing.assert_close(got.scores, exact.scores, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(
        got.opponent_scores, exact.opponent_scores, atol=1e-5 * scale, rtol=0
    )
    assert got.settings["index"] == {
        "factory": "Flat",
        "nprobe": 1,
        "refine": None,
        "whiten": whiten,
    }


def test_whitening_maps_are_adjoint_and_whiten_the_rows(run):
    """Influence's maps keep every inner product: ``<Q(u), R(x)> = <u, x>`` for ``u, x`` at random,
    and ``R = (F + λ)^{-1/2}``: ``R(R(x)) = (F + λ)^{-1} x``, the method's own preconditioner."""
    from lightning_tda.methods import get_method
    from lightning_tda.methods.curvature import damped_inverse

    st = run.store
    m = get_method("influence")
    g = torch.Generator().manual_seed(0)
    u, x = torch.randn(4, st.width, generator=g), torch.randn(6, st.width, generator=g)
    for (row, query), (*_, curv, lam, _) in zip(m.index_maps(st), m._curvatures(st), strict=True):
        torch.testing.assert_close(query(u) @ row(x).T, u @ x.T, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(row(row(x)), damped_inverse(curv, lam)(x), atol=1e-4, rtol=1e-3)


def test_ivf_index_recall_on_clustered_rows(tmp_path):
    """The default index (IVF over 4-bit fast-scan codes, candidates re-ranked with the exact rows)
    over 20,000 clustered rows (the geometry gradients have): recall@10 against the exact scan is
    high at the default nprobe (6 % of the lists) and 1.0 when every list is probed."""
    sys.path.insert(0, str(tmp_path.parent))
    from benchmarks.scale import clustered_rows, recall_at_k, synthetic_rows_store

    store = synthetic_rows_store(tmp_path / "s.h5", clustered_rows(20_000, 64, seed=0), tmp_path)
    q = torch.from_numpy(clustered_rows(50, 64, seed=1))
    exact = store.attribute({store.steps[-1]: q}, method="graddot", top_k=10)
    index = store.build_index(method="graddot")
    # 64 + 1 augmented dims, padded to 72: 18 sub-quantisers of 4 dims
    assert (index.config.factory, index.config.nprobe) == ("IVF512,PQ18x4fs,RFlat", 32)
    approx = store.attribute({store.steps[-1]: q}, method="graddot", top_k=10, index=index)
    assert recall_at_k(approx.indices, exact.indices) > 0.85  # 0.92 when written
    dense = store.attribute({store.steps[-1]: q}, method="graddot", top_k=None)
    pos = {int(i): j for j, i in enumerate(np.asarray(dense.example_ids))}
    cols = torch.tensor([[pos[int(i)] for i in row] for row in np.asarray(approx.indices)])
    torch.testing.assert_close(  # re-ranked with the exact rows: every score is the exact one
        approx.scores, torch.as_tensor(dense.scores).gather(1, cols), rtol=1e-4, atol=1e-3
    )
    index.config.nprobe = 512
    full = store.attribute({store.steps[-1]: q}, method="graddot", top_k=10, index=index)
    assert recall_at_k(full.indices, exact.indices) == 1.0


def test_index_round_trips_and_refuses_a_mismatch(run, tmp_path, monkeypatch):
    st = run.store
    path = tmp_path / "tracin.faiss"
    st.build_index(method="tracin", config=IndexConfig(factory="Flat"), path=path)
    loaded = RowIndex.load(path)
    assert loaded.num_rows == st.num_examples and loaded.method["name"] == "tracin"
    exact = st.attribute(run.queries, model=run.model, method="tracin", top_k=3)
    got = st.attribute(run.queries, model=run.model, method="tracin", top_k=3, index=str(path))
    assert torch.equal(got.indices, exact.indices)
    with pytest.raises(ConfigError, match="rebuild"):
        st.attribute(run.queries, model=run.model, method="graddot", top_k=3, index=loaded)
    with pytest.raises(ConfigError, match="rebuild"):
        st.attribute(run.queries, model=run.model, method="tracin", top_k=3, index=loaded,
                     interval="next")  # fmt: skip
    with pytest.raises(ConfigError, match="top_k"):
        st.attribute(run.queries, model=run.model, method="tracin", top_k=None, index=loaded)
    with pytest.raises(ConfigError, match="plain vectors|does not score"):
        st.build_index(method="stride")
    with pytest.raises(ValueError, match="nprobe"):
        IndexConfig(nprobe=0)
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        st.build_index(method="tracin")
    assert np.isfinite(exact.scores.numpy()).all()
