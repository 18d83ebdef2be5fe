"""GradientLogger under DDP (2 CPU processes, gloo): one logical store equal to the single-process one.

One DDP launch of ``ddp_script.py`` (module fixture) writes three stores; the references are
single-process fits in this process with the same data, seed and global batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_tda import AttributionStore
from lightning_tda.callbacks.distributed import check_strategy, shard_bounds, shard_path
from lightning_tda.store import schema
from lightning_tda.store.writer import StoreError

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import ddp_script  # noqa: E402
from helpers import TinyMLP, launch_script  # noqa: E402

STEPS = {"plain": [0, 2, 4], "accum": [0, 1, 2, 3, 4], "pca": [0, 2], "resume": [0, 2, 4]}
EPOCHS = {"plain": 2, "accum": 2, "pca": 1}


def _launch(out: Path, *args: str) -> subprocess.CompletedProcess:
    return launch_script(HERE / "ddp_script.py", str(out), *args)


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    proc = _launch(out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def single_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    for name, epochs in EPOCHS.items():
        trainer, model = ddp_script.fit(out, name, devices=1, max_epochs=epochs)
        ddp_script.save_weights(trainer, model, out / f"{name}.pt")
    return out


def _datasets(path: Path, step: int | None) -> dict[str, np.ndarray]:
    """Every dataset of checkpoint ``step`` (``None``: of the PCA basis group)."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f[schema.BASES if step is None else schema.checkpoint_name(step)].visititems(
            lambda name, obj: (
                out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return out


def _attrs(path: Path, step: int) -> dict:
    with h5py.File(path, "r") as f:
        a = dict(f[schema.checkpoint_name(step)].attrs)
    return {k: v for k, v in a.items() if k != "seconds"}


def _model(weights: Path) -> TinyMLP:
    model = TinyMLP(optimizer="adam", lr=0.05)
    model.load_state_dict(torch.load(weights))
    return model


@pytest.mark.parametrize("name", ["plain", "accum", "pca", "resume"])
def test_each_example_once_per_checkpoint(ddp_out, name):
    path = ddp_out / f"{name}.h5"
    _, attribution, _ = ddp_script.data()
    expected = np.asarray(attribution.ids)  # dataset order, as a single-process sweep writes it
    store = AttributionStore(path)
    assert store.steps == STEPS[name] and store.incomplete == []
    assert np.array_equal(store.example_ids.numpy(), expected)
    for step in store.steps:
        d = _datasets(path, step)
        assert np.array_equal(d[schema.ROW_IDS], expected)  # 35 rows, each id once, 17/18 shards
        assert d[schema.TRAIN].shape == (35, d[schema.QUERY].shape[1])
        assert (np.abs(d[schema.TRAIN]).sum(1) > 0).all()  # no unwritten row
        assert _attrs(path, step)["world_size"] == 2
    assert not any(shard_path(path, r).exists() for r in range(2))  # shards merged and deleted


@pytest.mark.parametrize("name", ["plain", "accum", "pca"])
def test_ddp_store_equals_single_process(ddp_out, single_out, name):
    ddp, single = ddp_out / f"{name}.h5", single_out / f"{name}.h5"
    # the training itself matches (DDP's averaged gradients = the global batch's mean)
    w_ddp, w_single = torch.load(ddp_out / f"{name}.pt"), torch.load(single_out / f"{name}.pt")
    for k in w_single:
        torch.testing.assert_close(w_ddp[k], w_single[k], rtol=1e-5, atol=1e-6)
    assert AttributionStore(single).steps == STEPS[name]
    for step in STEPS[name]:
        a, b = _datasets(ddp, step), _datasets(single, step)
        # rows, preconditioned rows, losses, ids, queries, reduced K-FAC factors, Adam moments, state
        assert sorted(a) == sorted(b)
        assert any(k.startswith(schema.KFAC) for k in a)
        assert (schema.TRAIN_PRECOND in a) == (step > 0)  # Adam has moments after its first step
        for k in b:
            # float32 rows at weights equal to ~1e-7: agree to ~1e-5 of the array's scale
            atol = 1e-6 + 1e-5 * float(np.abs(b[k]).max(initial=0.0))
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=atol, err_msg=f"{k}@{step}")
        attrs_a, attrs_b = _attrs(ddp, step), _attrs(single, step)
        attrs_a.pop("world_size")
        assert attrs_a.keys() == attrs_b.keys()
        for k in ("lr_sum", "lr_cumsum", "lr_at_checkpoint"):
            np.testing.assert_allclose(np.asarray(attrs_a[k]), np.asarray(attrs_b[k]), rtol=1e-6)
        for k in ("steps_since_previous", "epoch", "trigger", "optimizer"):
            assert attrs_a[k] == attrs_b[k], k
    if name == "pca":  # fitted by rank zero on the whole attribution set, used by both ranks
        a, b = _datasets(ddp, None), _datasets(single, None)
        assert sorted(a) == sorted(b) and a
        for k in b:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    _, _, queries = ddp_script.data()
    model = _model(single_out / f"{name}.pt")
    for method in ("tracin", "influence"):
        s_ddp = AttributionStore(ddp).attribute(queries, model=model, method=method, top_k=None)
        s_one = AttributionStore(single).attribute(queries, model=model, method=method, top_k=None)
        assert s_one.scores.abs().max() > 0
        torch.testing.assert_close(s_ddp.scores, s_one.scores, rtol=1e-3, atol=1e-5)


def test_resumed_ddp_store_equals_uninterrupted(ddp_out):
    """1 epoch, a Lightning checkpoint, fit(ckpt_path=...) to 2 epochs == 2 epochs at once."""
    w_res, w_full = torch.load(ddp_out / "resume.pt"), torch.load(ddp_out / "plain.pt")
    for k in w_full:
        torch.testing.assert_close(w_res[k], w_full[k], rtol=1e-6, atol=1e-7)
    for step in STEPS["plain"]:
        a, b = _datasets(ddp_out / "resume.h5", step), _datasets(ddp_out / "plain.h5", step)
        assert sorted(a) == sorted(b)
        for k in b:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=f"{k}@{step}")
        attrs = _attrs(ddp_out / "resume.h5", step)
        ref = _attrs(ddp_out / "plain.h5", step)
        np.testing.assert_allclose(attrs["lr_sum"], ref["lr_sum"])
        np.testing.assert_allclose(attrs["lr_cumsum"], ref["lr_cumsum"])
        assert attrs["steps_since_previous"] == ref["steps_since_previous"]


def test_shard_bounds_cover_every_example_once():
    for n, w in [(35, 2), (7, 3), (4, 4), (100, 8)]:
        bounds = shard_bounds(n, w)
        idx = [i for lo, hi in bounds for i in range(lo, hi)]
        assert idx == list(range(n))
        assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1
    with pytest.raises(StoreError, match="fewer than the 3 DDP processes"):
        shard_bounds(2, 3)


def test_unsupported_multi_process_setups_name_the_fix():
    from lightning.pytorch.strategies import DDPStrategy

    ddp = SimpleNamespace(world_size=2, strategy=DDPStrategy())
    check_strategy(ddp, "sweep")  # supported, in both modes
    check_strategy(ddp, "in_flight")  # (tests/test_in_flight_distributed.py)
    from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

    for mode in ("sweep", "in_flight"):
        check_strategy(SimpleNamespace(world_size=2, strategy=FSDPStrategy()), mode)  # FSDP1
    flat = SimpleNamespace(world_size=2, strategy=FSDPStrategy(use_orig_params=False))
    with pytest.raises(MisconfigurationException, match="use_orig_params=True"):
        check_strategy(flat, "sweep")
    hybrid = SimpleNamespace(
        world_size=2,
        strategy=FSDPStrategy(sharding_strategy="HYBRID_SHARD", auto_wrap_policy={torch.nn.Linear}),
    )
    with pytest.raises(MisconfigurationException, match="sharding_strategy='FULL_SHARD'"):
        check_strategy(hybrid, "sweep")
    other = SimpleNamespace(world_size=2, strategy=SingleDeviceStrategy("cpu"))
    with pytest.raises(
        MisconfigurationException,
        match="strategy='ddp'.*strategy='fsdp'.*uses SingleDeviceStrategy",
    ):
        check_strategy(other, "in_flight")
    check_strategy(SimpleNamespace(world_size=1, strategy=object()), "in_flight")  # one process


@pytest.mark.slow
def test_ddp_rank_killed_mid_sweep_then_resumed(ddp_out, tmp_path):
    """Rank 1 SIGKILLed mid-sweep of the step-4 checkpoint; the fit resumed from the last Lightning
    checkpoint (step 2) finishes the store exactly as the uninterrupted DDP fit wrote it."""
    killed = _launch(tmp_path, "kill")
    assert killed.returncode != 0
    store = AttributionStore(tmp_path / "killed.h5")
    assert store.steps == [0, 2]  # the interrupted checkpoint never reached the store
    resumed = _launch(tmp_path, "resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    store = AttributionStore(tmp_path / "killed.h5")
    assert store.steps == [0, 2, 4] and store.incomplete == []
    assert not any(shard_path(tmp_path / "killed.h5", r).exists() for r in range(2))
    w_res, w_full = torch.load(tmp_path / "killed.pt"), torch.load(ddp_out / "plain.pt")
    for k in w_full:
        torch.testing.assert_close(w_res[k], w_full[k], rtol=1e-6, atol=1e-7)
    for step in STEPS["plain"]:
        a, b = _datasets(tmp_path / "killed.h5", step), _datasets(ddp_out / "plain.h5", step)
        assert sorted(a) == sorted(b)
        for k in b:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=f"{k}@{step}")
        attrs, ref = _attrs(tmp_path / "killed.h5", step), _attrs(ddp_out / "plain.h5", step)
        np.testing.assert_allclose(attrs["lr_cumsum"], ref["lr_cumsum"])
        assert attrs["steps_since_previous"] == ref["steps_since_previous"]
