"""A fit killed with SIGKILL mid-sweep, resumed from its Lightning checkpoint, completes the store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from lightning_tda import AttributionStore
from lightning_tda.store import schema

HERE = Path(__file__).parent


def run(store: Path, ckpt: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, str(HERE / "kill_resume_script.py"), str(store), str(ckpt), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at", [6, 7, 9]
)  # 4 sweep batches per checkpoint: mid-sweep of the 2nd/3rd
def test_sigkill_mid_sweep_then_resume(tmp_path, kill_at):
    store, ckpt = tmp_path / "tda.h5", tmp_path / "ckpt"
    killed = run(store, ckpt, "kill", str(kill_at))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    # the killed file is readable; the interrupted checkpoint is invisible
    s = AttributionStore(store)
    done = (kill_at - 1) // 4
    assert s.steps == [4 * (i + 1) for i in range(done)]
    assert s.incomplete == [4 * (done + 1)]

    resumed = run(store, ckpt, "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    s = AttributionStore(store)
    assert s.steps == [4, 8, 12] and s.incomplete == []
    expected = np.arange(1000, 1064)
    with h5py.File(store, "r") as f:
        for step in s.steps:
            ids = f[schema.checkpoint_name(step)][schema.ROW_IDS][()]
            assert np.array_equal(np.sort(ids), expected)  # every example exactly once
            assert np.array_equal(ids, s.example_ids.numpy())  # in the store's row order
            rows = f[schema.checkpoint_name(step)][schema.TRAIN][()]
            assert np.isfinite(rows).all() and (np.abs(rows).sum(1) > 0).all()  # no unwritten rows
    # the learning-rate record continued across the kill: 4 steps of lr 0.1 per interval
    np.testing.assert_allclose([c.lr_sum[0] for c in s.checkpoints], [0.4, 0.4, 0.4], rtol=1e-6)
