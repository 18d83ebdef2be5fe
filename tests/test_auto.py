"""``store.attribute(queries, model=model)`` with no method: the documented ``"auto"`` rule."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyMLP, loader, make_classification, trainer

from lightning_tda import AttributionStore, GradientLogger
from lightning_tda.methods import Influence, TracIn


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auto")
    torch.manual_seed(0)
    data = make_classification(48)
    model = TinyMLP(optimizer="adamw", lr=0.02)
    sweep = GradientLogger(tmp / "sweep.h5", attribution_data=data, every_n_epochs=1, verbose=False)
    flight = GradientLogger(tmp / "flight.h5", mode="in_flight", verbose=False)
    plain = GradientLogger(
        tmp / "plain.h5", attribution_data=data, every_n_epochs=1, curvature=False, verbose=False
    )
    trainer(tmp, [sweep, flight, plain], max_epochs=3).fit(model, loader(data))
    return (
        model,
        AttributionStore(tmp / "sweep.h5"),
        AttributionStore(tmp / "flight.h5"),
        AttributionStore(tmp / "plain.h5"),
    )


def test_auto_on_sweep_rows_is_ekfac_influence_over_every_checkpoint(runs):
    model, store, _, plain = runs
    queries = make_classification(5, seed=1)
    auto = store.attribute(queries, model=model, top_k=None)
    ref = store.attribute(
        queries, model=model, method=Influence(mode="ekfac", checkpoints=store.steps), top_k=None
    )
    assert len(store.steps) == 3
    assert auto.method == "influence" and auto.checkpoints == store.steps
    assert auto.settings["chosen_by"] == "auto" and auto.settings["checkpoints"] == store.steps
    assert auto.settings["mode"] == "ekfac" and auto.settings["damping_scale"] == 0.1
    assert "EK-FAC" in auto.settings["reason"]
    torch.testing.assert_close(auto.scores, ref.scores, rtol=0, atol=0)
    # without logged K-FAC factors: the raw block influence, damping 1.0 x mean eigenvalue
    raw = plain.attribute(queries, model=model, top_k=None)
    ref = plain.attribute(
        queries, model=model, method=Influence(checkpoints=plain.steps), top_k=None
    )
    assert raw.settings["mode"] == "raw" and raw.settings["damping_scale"] == 1.0
    torch.testing.assert_close(raw.scores, ref.scores, rtol=0, atol=0)
    named = store.attribute(queries, model=model, method="tracin", top_k=3)
    assert named.settings == {"checkpoints": None, "interval": "previous"}
    assert "chosen_by" not in named.settings


def test_auto_on_in_flight_rows_is_per_step_tracin(runs):
    model, _, flight, _ = runs
    queries = make_classification(4, seed=2)
    auto = flight.attribute(queries, model=model, top_k=None)
    ref = flight.attribute(queries, model=model, method=TracIn(), top_k=None)
    assert auto.method == "tracin" and "in-flight" in auto.settings["reason"]
    torch.testing.assert_close(auto.scores, ref.scores, rtol=0, atol=0)


def test_auto_refuses_hyper_parameters(runs):
    model, store, _, _ = runs
    with pytest.raises(ValueError, match="name the method"):
        store.attribute(make_classification(2, seed=3), model=model, checkpoints=[1])


def test_damping_defaults_on_a_known_spectrum():
    """λ_l = scale × mean eigenvalue per block; scale 1.0 for raw/trak and 0.1 for ekfac by default."""
    from lightning_tda.methods.curvature import BlockEigen, default_damping

    sigma_a = torch.tensor([4.0, 2.0, 0.0, -1e-9], dtype=torch.float64)  # mean of clamped = 1.5
    sigma_b = torch.tensor([9.0, 3.0], dtype=torch.float64)  # mean 6
    curv = [BlockEigen("a", slice(0, 4), sigma_a), BlockEigen("b", slice(4, 6), sigma_b)]
    assert default_damping(curv, None, 1.0) == {"a": 1.5, "b": 6.0}
    assert default_damping(curv, None, 0.1) == pytest.approx({"a": 0.15, "b": 0.6})
    assert default_damping(curv, 0.5) == {"a": 0.5, "b": 0.5}
    assert Influence().damping_scale == 1.0
    assert Influence(mode="trak").damping_scale == 1.0
    assert Influence(mode="ekfac").damping_scale == 0.1
    assert Influence(mode="ekfac", damping_scale=2.0).damping_scale == 2.0
    with pytest.raises(ValueError, match="damping_scale"):
        Influence(damping_scale=0)


def test_capture_presets(tmp_path):
    """Sweep default "accurate" (rank 32, PCA, float32); in-flight default and "fast": rank 16, random,
    float16; explicit arguments win; an unknown preset names the choices."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    def capture(logger):
        p = logger.projection
        return p.rank, p.basis, logger.writer.storage_dtype

    assert capture(GradientLogger(tmp_path / "a.h5")) == (32, "pca", "float32")
    assert capture(GradientLogger(tmp_path / "b.h5", preset="fast")) == (16, "random", "float16")
    assert capture(GradientLogger(tmp_path / "c.h5", mode="in_flight")) == (16, "random", "float16")
    assert capture(GradientLogger(tmp_path / "d.h5", rank=8, dtype="bfloat16")) == (
        8,
        "pca",
        "bfloat16",
    )
    assert GradientLogger(tmp_path / "e.h5", projection="exact").projection.basis == "random"
    with pytest.raises(MisconfigurationException, match="preset must be one of"):
        GradientLogger(tmp_path / "f.h5", preset="fastest")
