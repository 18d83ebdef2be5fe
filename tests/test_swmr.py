"""A reader can open the store while a fit writes it, from the training process or another one.

The writer commits each HDF5 flush atomically under an exclusive ``flock`` (lightning_tda.store.journal);
readers read under a shared one, so a reader sees exactly the checkpoints complete at that moment and
never a half-done commit. Reads are triggered from inside the fit (a callback, the sweep's own loss
function, the writer's commit), so every interleaving below is deterministic: nothing depends on timing.

Run as a script, this file is the reader process: one JSON request per stdin line, one JSON answer.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import FastLogger, TinyMLP, loader, make_classification
from lightning.pytorch.callbacks import Callback

from lightning_tda import AttributionStore, GradientLogger
from lightning_tda.store import journal

HERE = Path(__file__).parent
EVERY = 2  # log every 2 optimizer steps: 64 examples / batch 16 = 4 steps per epoch, 2 epochs
STEPS = [2, 4, 6, 8]


def _fit(path: Path, model: pl.LightningModule, callbacks=()) -> GradientLogger:
    pl.seed_everything(0, verbose=False)
    data = make_classification(64)
    logger = FastLogger(
        path,
        attribution_data=data,
        query_data=make_classification(8, seed=1),
        every_n_train_steps=EVERY,
        batch_size=16,
        rank=4,
        verbose=False,
    )
    pl.Trainer(
        max_epochs=2,
        callbacks=[logger, *callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    ).fit(model, loader(data, shuffle=False))
    return logger


def _scores(store: AttributionStore, steps: list[int] | None = None) -> torch.Tensor:
    """Dense ``[Q, N]`` TracIn scores of the logged queries over ``steps`` (default: all)."""
    return store.attribute("logged", method="tracin", top_k=None, checkpoints=steps).scores


def _check_snapshots(path: Path, snapshots: list[dict]) -> None:
    """Each snapshot's scores equal the finished store's over the checkpoints it saw."""
    final = AttributionStore(path)
    assert final.steps == STEPS and final.incomplete == []
    for snap in snapshots:
        if snap["steps"]:
            want = _scores(final, snap["steps"])
            got = torch.as_tensor(np.asarray(snap["scores"]), dtype=want.dtype)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# -- readers in the training process -----------------------------------------------------------------


class SweepReader(TinyMLP):
    """Opens and scores the store from inside the sweep (``per_example_loss`` runs only in sweeps),
    while the writer has the file open with the checkpoint of this step half-written."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.snapshots: list[dict] = []

    def per_example_loss(self, batch):
        if self.path.exists() and self.trainer.global_step > 0:  # not the first-batch check
            s = AttributionStore(self.path)
            self.snapshots.append(
                {
                    "at": self.trainer.global_step,
                    "steps": s.steps,
                    "incomplete": s.incomplete,
                    "scores": _scores(s).numpy() if s.steps else None,
                }
            )
        return super().per_example_loss(batch)


class BatchEndReader(Callback):
    """Opens and scores the store after every training batch (after GradientLogger's own hook)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.snapshots: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        s = AttributionStore(self.path) if self.path.exists() else None
        self.snapshots.append(
            {
                "at": trainer.global_step,
                "steps": s.steps if s else [],
                "incomplete": s.incomplete if s else [],
                "scores": _scores(s).numpy() if s and s.steps else None,
            }
        )


def test_reader_in_the_training_process_sees_exactly_the_complete_checkpoints(tmp_path):
    path = tmp_path / "tda.h5"
    model, cb = SweepReader(path), BatchEndReader(path)
    logger = _fit(path, model, [cb])
    assert logger._logged_steps == STEPS
    # mid-sweep: the checkpoint being written is incomplete, the earlier ones complete
    assert len(model.snapshots) >= 15  # 5 loss calls per sweep (4 train + 1 query batch), 4 sweeps
    for snap in model.snapshots:
        t = snap["at"]
        assert snap["steps"] == [s for s in STEPS if s < t], snap
        assert snap["incomplete"] == [t], snap
    assert {snap["at"] for snap in model.snapshots} == set(STEPS)
    # between batches: exactly the checkpoints logged so far, nothing incomplete
    assert [s["at"] for s in cb.snapshots] == list(range(1, 9))
    for snap in cb.snapshots:
        assert snap["steps"] == [s for s in STEPS if s <= snap["at"]], snap
        assert snap["incomplete"] == []
    _check_snapshots(path, model.snapshots + cb.snapshots)


# -- a reader process --------------------------------------------------------------------------------


class ReaderProcess:
    """This file run as a script: opens stores on request, from another process."""

    def __init__(self) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        assert ready, f"the reader process did not answer {request}"
        line = self.proc.stdout.readline()
        assert line, "the reader process died"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def reader():
    r = ReaderProcess()
    assert r.ask(op="ping") == {"ok": True}
    yield r
    r.close()


class RemoteSweepReader(TinyMLP):
    """Asks the reader process to open and score the store on the 2nd batch of each sweep."""

    def __init__(self, path: Path, reader: ReaderProcess) -> None:
        super().__init__()
        self.path, self.reader = path, reader
        self.calls = 0
        self.snapshots: list[dict] = []

    def per_example_loss(self, batch):
        self.calls += 1
        if self.calls % 5 == 2 and self.path.exists():
            snap = self.reader.ask(op="read", path=str(self.path), score=True)
            assert snap["error"] is None, snap["error"]
            self.snapshots.append({**snap, "at": self.trainer.global_step})
        return super().per_example_loss(batch)


def test_reader_process_mid_sweep_sees_exactly_the_complete_checkpoints(tmp_path, reader):
    path = tmp_path / "tda.h5"
    model = RemoteSweepReader(path, reader)
    _fit(path, model)
    assert [s["at"] for s in model.snapshots] == STEPS
    for snap in model.snapshots:
        t = snap["at"]
        assert snap["steps"] == [s for s in STEPS if s < t] and snap["incomplete"] == [t], snap
    _check_snapshots(path, model.snapshots)


def test_reader_process_waits_out_a_commit_instead_of_reading_it_half_done(
    tmp_path, reader, monkeypatch
):
    """While the writer is inside a commit (journal open, exclusive lock held) the reader cannot
    open the store; right after the commit it sees the new checkpoint."""
    path = tmp_path / "tda.h5"
    seen: list[dict] = []
    begin = journal.JournaledFile._begin

    def begin_and_ask(self) -> None:
        begin(self)  # the exclusive lock is held and the journal exists from here to the commit
        if len(seen) < 3 and self.path == path:
            seen.append(reader.ask(op="read", path=str(path), score=False, timeout=0.2))

    monkeypatch.setattr(journal.JournaledFile, "_begin", begin_and_ask)
    _fit(path, TinyMLP())
    assert len(seen) == 3
    for snap in seen:
        assert snap["error"] is not None and "stayed locked by a writer's commit" in snap["error"]
    after = reader.ask(op="read", path=str(path), score=True)
    assert after["error"] is None and after["steps"] == STEPS and after["incomplete"] == []
    _check_snapshots(path, [after])


def test_a_reader_keeping_the_file_open_does_not_stop_training(tmp_path, reader, monkeypatch):
    """A plain ``h5py.File(path)`` held open elsewhere (HDF5's own shared lock, as in a notebook) made
    the writer's next open fail with 'unable to lock file'; now the writer waits a little, warns and
    commits, and the store ends complete."""
    path = tmp_path / "tda.h5"
    monkeypatch.setattr(journal, "LOCK_TIMEOUT", 0.2)

    class Hold(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == EVERY:  # the first checkpoint is committed
                assert reader.ask(op="hold", path=str(path)) == {"ok": True}

    try:
        with pytest.warns(RuntimeWarning, match="kept .* open for more than"):
            _fit(path, TinyMLP(), [Hold()])
    finally:
        assert reader.ask(op="release") == {"ok": True}
    after = reader.ask(op="read", path=str(path), score=True)
    assert after["error"] is None and after["steps"] == STEPS and after["incomplete"] == []
    _check_snapshots(path, [after])


def test_an_h5py_handle_in_the_training_process_does_not_stop_training(tmp_path, monkeypatch):
    """The same with the handle in the training process; AttributionStore shares it meanwhile."""
    import h5py

    path = tmp_path / "tda.h5"
    monkeypatch.setattr(journal, "LOCK_TIMEOUT", 0.2)
    held: list = []
    seen: list[list[int]] = []

    class Hold(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == EVERY:
                held.append(h5py.File(path, "r"))  # HDF5's own locking, as a user would open it
            if held:
                seen.append(AttributionStore(path).steps)

    try:
        with pytest.warns(RuntimeWarning, match="kept .* open for more than"):
            _fit(path, TinyMLP(), [Hold()])
    finally:
        for f in held:
            f.close()
    assert seen == [[s for s in STEPS if s <= t] for t in range(EVERY, 9)]
    final = AttributionStore(path)
    assert final.steps == STEPS and final.incomplete == []
    _check_snapshots(path, [])


# -- the reader process itself -----------------------------------------------------------------------


def _serve() -> None:
    import h5py

    from lightning_tda import StoreError

    torch.set_num_threads(1)
    default_timeout = journal.LOCK_TIMEOUT
    held = None
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "read":
            if req.get("timeout") is not None:
                journal.LOCK_TIMEOUT = float(req["timeout"])
            try:
                s = AttributionStore(req["path"])
                out = {"steps": s.steps, "incomplete": s.incomplete, "error": None}
                out["scores"] = _scores(s).tolist() if req.get("score") and s.steps else None
            except StoreError as e:
                out = {"error": f"{type(e).__name__}: {e}"}
            finally:
                journal.LOCK_TIMEOUT = default_timeout
        elif op == "hold":
            held = h5py.File(req["path"], "r")
            out = {"ok": True}
        elif op == "release":
            if held is not None:
                held.close()
                held = None
            out = {"ok": True}
        else:
            out = {"ok": True}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    _serve()
