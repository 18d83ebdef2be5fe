"""GradientLogger(mode="in_flight") in 2 CPU processes (gloo): DDP, FSDP2 (Lightning's
ModelParallelStrategy) and FSDP1 (Lightning's FSDPStrategy) write one store equal to the single-process one, and a rank killed mid-fit
leaves a valid store that a resumed fit completes exactly.

One launch of ``in_flight_dist_script.py`` (module fixture) writes the multi-process stores; the
references are single-process fits in this process with the same data, seed and global batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from lightning_tda import AttributionStore
from lightning_tda.store import schema

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import in_flight_dist_script as script  # noqa: E402
from helpers import assert_same_datasets, h5_datasets, launch_script  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = dict.fromkeys(script.NAMES, list(range(6)))
PADDED = (
    1000  # example 0's id: DistributedSampler's padding deals it again in each epoch's last step
)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("in_flight_dist")
    proc = launch_script(HERE / "in_flight_dist_script.py", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref = tmp_path_factory.mktemp("in_flight_single")
    for name in script.NAMES:
        trainer, model = script.fit(ref, name, devices=1)
        script.save_weights(trainer, model, ref / f"{name}.pt")
    return out, ref


def _assert_same_stores(a: Path, b: Path) -> None:
    """Every dataset of ``a`` equals ``b``'s (floats to fp32 rounding), and so do the steps' lr and
    step attributes."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        da, db = h5_datasets(fa), h5_datasets(fb)
    assert any("state_packed" in k for k in da) and any("/query" in k for k in da)
    assert_same_datasets(da, db)
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        for name in fb[schema.CHECKPOINTS]:
            ma, mb = (json.loads(f[schema.CHECKPOINTS][name].attrs["step_meta"]) for f in (fa, fb))
            for key in ("lr_sum", "lr_cumsum", "steps_since_previous", "micro_batches", "epoch"):
                np.testing.assert_allclose(ma[key], mb[key], err_msg=f"{key}@{name}")


@pytest.mark.parametrize("name", script.NAMES)
def test_in_flight_store_equals_the_single_process_store(stores, name):
    """Rows (every example of each global batch, including the padding's repeat of example 0),
    losses, query rows, saved states and learning rates equal the single-process store;
    the final weights too, so the multi-process fit trained the same model."""
    dist, single = stores
    _assert_same_stores(dist / f"{name}.h5", single / f"{name}.h5")
    store = AttributionStore(dist / f"{name}.h5")
    assert store.steps == STEPS[name]
    last = store.steps[-1]
    with h5py.File(dist / f"{name}.h5", "r") as f:
        g = f[schema.checkpoint_name(last)]
        ids = g[schema.ROW_IDS][()]
        assert json.loads(g.attrs["step_meta"])["world_size"] == 2
    assert len(ids) == 8 and PADDED in ids  # 32..38 and the padding's example 0
    wa, wb = torch.load(dist / f"{name}.pt"), torch.load(single / f"{name}.pt")
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_in_flight_scores_equal_the_single_process_scores(stores):
    """TracIn (dense) and the default method (top-k) over the DDP and FSDP2 in-flight stores, with
    the logged query rows, equal the single-process store's."""
    dist, single = stores
    for name in ("ddp", "fsdp2", "fsdp1"):
        for method, k in (("tracin", None), ("auto", 5)):
            a = AttributionStore(dist / f"{name}.h5").attribute("logged", method=method, top_k=k)
            b = AttributionStore(single / f"{name}.h5").attribute("logged", method=method, top_k=k)
            torch.testing.assert_close(
                torch.as_tensor(a.scores), torch.as_tensor(b.scores), rtol=1e-4, atol=1e-6
            )
            if k is not None:
                assert np.array_equal(np.asarray(a.indices), np.asarray(b.indices))


def test_rank_killed_mid_fit_then_resumed(stores, tmp_path):
    """Rank 1 SIGKILLed in step 4: rank zero writes the steps finished before (a valid store, no
    torn step); the fit resumed from the last Lightning checkpoint (step 3) completes the store and
    the weights exactly as the uninterrupted DDP fit."""
    killed = launch_script(HERE / "in_flight_dist_script.py", str(tmp_path), "kill")
    assert killed.returncode != 0
    store = AttributionStore(tmp_path / "killed.h5")
    assert store.incomplete == [] and store.steps == list(range(len(store.steps)))
    assert 3 <= len(store.steps) <= script.KILL_STEP  # steps 0..2 (or 0..3): none after the kill
    resumed = launch_script(HERE / "in_flight_dist_script.py", str(tmp_path), "resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    dist, _ = stores
    _assert_same_stores(tmp_path / "killed.h5", dist / "ddp.h5")
    wa, wb = torch.load(tmp_path / "killed.pt"), torch.load(dist / "ddp.pt")
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)


CASES = ([3, 5], [None, 2], [4, None], [None, None])  # rows per rank (None: no rows this step)


def _gather_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from lightning_tda.callbacks.in_flight import StepRows, merge_rows
    from lightning_tda.callbacks.step_gather import StepRowGather

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    class _Strategy:  # what StepRowGather uses of a Lightning strategy
        def all_gather(self, t):
            parts = [torch.empty_like(t) for _ in range(2)]
            dist.all_gather(parts, t)
            return torch.stack(parts)

    gather, results = StepRowGather(_Strategy()), []
    for counts in CASES:
        n, taken = counts[rank], None
        if n is not None:  # rank r holds ids 10r + 1, ...; rank 1's first is rank 0's first
            ids = torch.arange(n) + 1 + 10 * rank
            if rank == 1:
                ids[0] = 1
            taken = StepRows(ids, torch.full((n, 3), float(rank + 1)) * ids[:, None], False)
        got = gather(7, taken, torch.device("cpu"))
        results.append(None if got is None else merge_rows(got.ids, got.rows))
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_step_row_gather_takes_every_ranks_rows_once(tmp_path):
    """Uneven counts, a rank without rows and no rows at all: the gathered step holds each rank's
    rows exactly once (padding dropped), and an id held by both ranks becomes one summed row."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "gathered.pt")
    mp.spawn(_gather_worker, args=(port, out), nprocs=2)
    for counts, got in zip(CASES, torch.load(out), strict=True):
        expected: dict[int, torch.Tensor] = {}
        for rank, n in enumerate(counts):
            for j in range(n or 0):
                i = 1 if rank == 1 and j == 0 else 10 * rank + j + 1
                expected[i] = expected.get(i, torch.zeros(3)) + float(rank + 1) * i
        if not expected:
            assert got is None
            continue
        ids, rows = got
        assert ids.tolist() == sorted(expected), counts
        torch.testing.assert_close(rows, torch.stack([expected[i] for i in sorted(expected)]))
