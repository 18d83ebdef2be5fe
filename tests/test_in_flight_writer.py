"""The in-flight background writer: order, bounded queue, errors raised in the training thread."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from helpers import FastLogger, TinyMLP, loader, make_classification, trainer

from lightning_tda import AttributionStore
from lightning_tda.callbacks import in_flight as recorder_module
from lightning_tda.callbacks import in_flight_steps
from lightning_tda.callbacks.config import InFlightConfig
from lightning_tda.errors import NonFiniteError, StoreError
from lightning_tda.store.background import BackgroundWriter


def test_jobs_run_in_order_and_the_queue_is_bounded():
    gate, done = threading.Event(), []
    w = BackgroundWriter(max_pending=1)
    w.submit(gate.wait)  # the thread blocks in this job
    w.submit(done.append, 1)  # waits in the queue (1 slot)
    blocked = threading.Thread(target=w.submit, args=(done.append, 2))
    blocked.start()
    blocked.join(timeout=0.2)
    assert blocked.is_alive(), "a full queue must make submit wait"
    gate.set()
    blocked.join()
    w.drain()
    assert done == [1, 2]
    w.close()
    assert not w.alive


def test_a_failed_job_is_raised_in_the_caller_and_later_jobs_are_dropped():
    done = []

    def fail():
        raise StoreError("disk full")

    w = BackgroundWriter()
    w.submit(fail)
    w.submit(done.append, 1)
    with pytest.raises(StoreError, match="disk full"):
        w.drain()
    with pytest.raises(StoreError):
        w.submit(done.append, 2)
    with pytest.raises(StoreError):
        w.close()
    assert done == []


class NaNAfter(TinyMLP):
    """Its training loss (and so its gradients) turns NaN from optimizer step ``at`` on."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step >= self.at else loss


def test_non_finite_rows_raise_in_the_training_thread_and_earlier_steps_stay(tmp_path):
    torch.manual_seed(0)
    logger = FastLogger(tmp_path / "a.h5", mode="in_flight", rank=4, flush_every=2, verbose=False)
    with pytest.raises(NonFiniteError, match="in-flight gradient.*example ids"):
        trainer(tmp_path, [logger], max_epochs=3).fit(
            NaNAfter(at=5), loader(make_classification(32), batch_size=4)
        )
    store = AttributionStore(tmp_path / "a.h5")
    assert store.steps == [0, 1, 2, 3]  # the group holding step 5 failed as a whole; none after it
    assert all(torch.isfinite(store.batch_rows(t)[1]).all() for t in store.steps)


def test_a_step_with_non_finite_scaled_rows_is_skipped(tmp_path, monkeypatch):
    """Under a GradScaler (scale != 1) a non-finite step is skipped by the scaler: it is not logged."""
    torch.manual_seed(0)
    monkeypatch.setattr(recorder_module, "loss_scale", lambda trainer: 2.0)
    logger = FastLogger(tmp_path / "a.h5", mode="in_flight", rank=4, flush_every=2, verbose=False)
    trainer(tmp_path, [logger], max_epochs=2).fit(
        NaNAfter(at=3), loader(make_classification(24), batch_size=4)
    )
    assert AttributionStore(tmp_path / "a.h5").steps == [0, 1, 2]


def test_a_write_failing_in_the_background_stops_the_fit_with_its_error(tmp_path, monkeypatch):
    torch.manual_seed(0)
    real, calls = in_flight_steps.write_batch_steps, []

    def failing(path, dtype, steps, query_ids=None):
        calls.append(len(steps))
        if len(calls) == 2:
            time.sleep(0.05)
            raise StoreError("disk full: no space left on the device")
        real(path, dtype, steps, query_ids)

    monkeypatch.setattr(in_flight_steps, "write_batch_steps", failing)
    flight = InFlightConfig(flush_every=2, background=True)
    logger = FastLogger(
        tmp_path / "a.h5", mode="in_flight", rank=4, in_flight=flight, verbose=False
    )
    with pytest.raises(StoreError, match="disk full"):
        trainer(tmp_path, [logger], max_epochs=4).fit(
            TinyMLP(), loader(make_classification(32), batch_size=4)
        )
    assert AttributionStore(tmp_path / "a.h5").steps == [0, 1]
    assert len(calls) < 16, "the fit went on after the writer failed"


def test_seals_made_without_reading_back_match_the_file(tmp_path):
    """The writer seals each step from the attributes it set (nothing read back); the file's own
    attributes and bytes give the same CRCs, and the step's attributes read back unchanged."""
    import h5py

    from lightning_tda.store import schema
    from lightning_tda.store.writer import check_dataset, check_group

    path = tmp_path / "s.h5"
    logger = FastLogger(path, mode="in_flight", rank=4, flush_every=3, verbose=False)
    torch.manual_seed(0)
    trainer(tmp_path, [logger], max_epochs=2).fit(
        TinyMLP(optimizer="adam"), loader(make_classification(40), batch_size=8)
    )
    store = AttributionStore(path)
    with h5py.File(path, "r") as f:
        for c in store.checkpoints:
            g = f[schema.checkpoint_name(c.global_step)]
            check_group(g)
            for name in g:
                check_dataset(g[name])
            meta = json.loads(g.attrs[schema.STEP_META])
            assert meta["trigger"] == "in_flight" and meta["epoch"] == c.epoch
            assert tuple(meta["lr_sum"]) == c.lr_sum and c.lr_sum[0] > 0
            assert store.checkpoint_attrs(c.global_step)["lr_cumsum"] == meta["lr_cumsum"]
        g = f[schema.checkpoint_name(store.steps[-1])]
        ds = g[schema.TRAIN]
        assert schema.dataset_crc(ds) == int(ds.attrs[schema.CRC])
