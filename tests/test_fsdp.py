"""GradientLogger under FSDP2 (Lightning's ModelParallelStrategy) and FSDP1 (Lightning's
FSDPStrategy, ``strategy="fsdp"``), 2 CPU processes, gloo: the store equals the single-process one.
(Lightning refuses ``strategy="fsdp"`` without a GPU; ``fsdp_script.CPUFSDPStrategy`` is the same
strategy with torch's CPU device id, and ``LIGHTNING_TDA_TEST_ACCELERATOR=cuda`` runs the plain one.)"""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import pytest
import torch

from lightning_tda import AttributionStore

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import fsdp_script  # noqa: E402
from helpers import assert_same_datasets, h5_datasets, launch_script  # noqa: E402

pytestmark = pytest.mark.slow
NAMES = ("plain", "frozen")
SHARDED = ("plain", "frozen", "plain_fsdp1", "frozen_fsdp1", "one_fsdp1")  # FSDP2, FSDP1, FSDP1 x 1
REFERENCE = {"one_fsdp1": "plain"}  # the single-process store each is compared with


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    for args in ((), ("one",)):
        proc = launch_script(HERE / "fsdp_script.py", str(out), *args)
        assert proc.returncode == 0, proc.stderr[-4000:]
    ref = tmp_path_factory.mktemp("single")
    for name in NAMES:
        fsdp_script.fit(ref, name, devices=1)
    return out, ref


@pytest.mark.parametrize("name", SHARDED)
def test_fsdp_store_equals_the_single_process_store(stores, name):
    """Every dataset (train rows, Adam-preconditioned rows, losses, K-FAC factors, PCA bases,
    query rows, optimizer moments, saved state) matches to fp32 rounding, and the fingerprints,
    model class and checkpoints are identical: FSDP1's or FSDP2's sharding leaves no trace in the store."""
    fsdp, single = stores
    ref = REFERENCE.get(name, name.removesuffix("_fsdp1"))
    with h5py.File(fsdp / f"{name}.h5") as a, h5py.File(single / f"{ref}.h5") as b:
        da, db = h5_datasets(a), h5_datasets(b)
        assert any("/state/" in k for k in da) and any("optimizer" in k for k in da)
        assert_same_datasets(da, db)
        for key in ("frozen_fingerprint", "architecture_fingerprint", "layers"):
            assert a.attrs[key] == b.attrs[key], key
        # (the script runs as __main__: compare the class, not its module)
        assert a.attrs["model_class"].endswith(".ShardedMLP"), a.attrs["model_class"]
    st = AttributionStore(fsdp / f"{name}.h5")
    assert st.steps == AttributionStore(single / f"{ref}.h5").steps == [0, 2, 4]


def test_fsdp2_store_attributes_like_the_single_process_one(stores):
    """A plain (unsharded) model attributes the FSDP2 store: the fingerprint check passes and the
    scores equal the single-process store's."""
    fsdp, single = stores
    _, _, queries = (
        fsdp_script.make_classification(n, seed=s) for n, s in ((32, 0), (35, 1), (6, 3))
    )
    model = fsdp_script.ShardedMLP()
    want = AttributionStore(single / "plain.h5").attribute(queries, model=model, top_k=None)
    for name in ("plain", "plain_fsdp1"):
        got = AttributionStore(fsdp / f"{name}.h5").attribute(queries, model=model, top_k=None)
        torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-6)


def test_unsupported_fsdp_setups_are_refused_with_the_fix():
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_tda.callbacks.distributed import check_strategy

    class Trainer:
        world_size = 2
        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)

    with pytest.raises(MisconfigurationException, match="tensor_parallel_size=1"):
        check_strategy(Trainer(), "sweep")
