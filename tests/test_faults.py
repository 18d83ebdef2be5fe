"""SIGKILL at seeded random points of a logged fit, and a full disk, never corrupt the store.

A fork server (``kill_resume_script.py serve``) imports torch and Lightning once and runs each fit in a
forked child, so a trial costs a fit (~0.5 s), not an interpreter start. Every trial kills a fit at a
seeded random point: a random sweep batch of a random checkpoint, or just before a random low-level
write of the store writer (inside HDF5 flushes, metadata updates, journal records, closes), or half-way
through one (a torn write). The killed file must open, show only complete checkpoints that equal an
uninterrupted reference run bit for bit, list the interrupted one as incomplete, and be left unchanged
by reading it; resuming must complete it to the reference. Nothing depends on timing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import select
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import FastLogger, TinyMLP, loader, make_classification
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_tda import AttributionStore, StoreError
from lightning_tda.capture.layers import LayerSpec
from lightning_tda.capture.projection import ProjectionConfig
from lightning_tda.store import journal, schema
from lightning_tda.store.writer import CheckpointWriter, StoreWriter

HERE = Path(__file__).parent
STEPS = (4, 8, 12)  # 3 epochs x 4 optimizer steps; one checkpoint per epoch
CALLS_PER_CHECKPOINT = (
    5  # per_example_loss calls per checkpoint: 4 training batches + 1 query batch
)
EXPECTED_IDS = np.arange(1000, 1064)
ROWS = ("train", "train_precond", "loss", "ids", "query", "query_loss")


class ForkServer:
    """``kill_resume_script.py serve``: one JSON trial in, one JSON return code out."""

    def __init__(self) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "kill_resume_script.py"), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )

    def run(self, **trial) -> int:
        self.proc.stdin.write(json.dumps(trial) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 300)
        assert ready, f"the fork server did not answer trial {trial}"
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)["returncode"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server():
    srv = ForkServer()
    yield srv
    srv.close()


def _log_tail(store: Path) -> str:
    log = Path(str(store) + ".log")
    return log.read_text()[-3000:] if log.exists() else "(no log)"


def _trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def snapshot(path: Path) -> dict:
    """Everything a complete checkpoint holds, per step, plus the store's example ids."""
    s = AttributionStore(path)
    out: dict = {"example_ids": s.example_ids.numpy(), "steps": {}}
    for c in s.checkpoints:
        step = c.global_step
        out["steps"][step] = {
            **{name: s.read(step, name).numpy() for name in ROWS},
            "lr_sum": np.array(c.lr_sum),
            "epoch": c.epoch,
            "state": {k: v.numpy() for k, v in s.state(step).items()},
            "kfac": {k: (a.numpy(), b.numpy()) for k, (a, b) in s.kfac_factors(step).items()},
        }
    return out


def assert_same_checkpoint(got: dict, ref: dict, where: str) -> None:
    for name in ROWS:  # rows decode from float16 of the same values: equal up to fp16 rounding
        np.testing.assert_allclose(
            got[name], ref[name], rtol=1e-3, atol=1e-5, err_msg=f"{where} {name}"
        )
    assert np.array_equal(got["ids"], ref["ids"]), where
    np.testing.assert_allclose(got["lr_sum"], ref["lr_sum"], rtol=1e-6, err_msg=where)
    assert got["epoch"] == ref["epoch"], where
    assert got["state"].keys() == ref["state"].keys(), where
    for k in ref["state"]:
        np.testing.assert_allclose(got["state"][k], ref["state"][k], rtol=1e-5, atol=1e-7)
    for k in ref["kfac"]:
        for a, b in zip(got["kfac"][k], ref["kfac"][k], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _files_digest(store: Path) -> str:
    h = hashlib.sha256()
    for p in (store, journal.journal_path(store)):
        h.update(p.read_bytes() if p.exists() else b"-")
    return h.hexdigest()


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    """An uninterrupted fit: its store snapshot, tracin scores and the trace of its writes."""
    d = tmp_path_factory.mktemp("reference")
    store = d / "tda.h5"
    rc = server.run(store=str(store), ckpt=str(d / "ckpt"), trace=str(d / "trace"))
    assert rc == 0, _log_tail(store)
    snap = snapshot(store)
    assert sorted(snap["steps"]) == list(STEPS)
    for step in STEPS:
        assert np.array_equal(np.sort(snap["steps"][step]["ids"]), EXPECTED_IDS)
    scores = AttributionStore(store).attribute("logged", method="tracin", top_k=None).scores
    return {"snap": snap, "scores": scores, "trace": _trace(d / "trace")}


def _trials(trace: list[dict]) -> list[dict]:
    """Seeded random kill points: batches, writes stratified by writer phase, torn writes, double kills."""
    rng = random.Random(20261122)
    by_phase: dict[str, list[int]] = {}
    for rec in trace:
        by_phase.setdefault(rec["phase"], []).append(rec["n"])
    trials = [
        {"fault": {"kind": "batch", "at": rng.randint(1, CALLS_PER_CHECKPOINT * len(STEPS))}}
        for _ in range(7)
    ]
    for phase in sorted(by_phase):  # every phase at least once, the commit (most writes) more often
        for _ in range(5 if phase == "commit" else 2):
            trials.append({"fault": {"kind": "io", "at": rng.choice(by_phase[phase])}})
    for phase in ("setup", "commit", "commit", "close"):
        trials.append({"fault": {"kind": "io_torn", "at": rng.choice(by_phase[phase])}})
    for _ in range(2):  # the resume is killed too (in its prune, rollback or first sweep)
        trials.append(
            {
                "fault": {"kind": "io", "at": rng.choice(by_phase["commit"])},
                "resume_fault": {"kind": "io", "at": rng.randint(1, 60)},
            }
        )
    return trials


def _check_killed(store: Path, phase: str, step: int | None, ref: dict) -> AttributionStore | None:
    """The killed store opens, holds only reference-equal complete checkpoints, and reading it is
    read-only. Returns the store (``None`` when the kill came before the file was first committed)."""
    if not store.exists():
        assert phase == "metadata", f"the store vanished after a kill in {phase} {step}"
        assert not journal.journal_path(store).exists()
        return None
    digest = _files_digest(store)
    s = AttributionStore(store)  # must not raise
    steps, incomplete = s.steps, s.incomplete
    assert list(STEPS[: len(steps)]) == steps, f"complete checkpoints {steps} are not a prefix"
    assert not set(steps) & set(incomplete)
    before = [t for t in STEPS if step is None or t < step]
    if phase in ("rows", "queries", "arrays"):
        assert steps == before and incomplete == [step], (phase, step, steps, incomplete)
    elif phase == "setup":
        assert steps == before and incomplete in ([], [step]), (phase, step, steps, incomplete)
    elif phase in ("commit", "close"):  # the kill may come after the flush that completed it
        assert steps in (before, [*before, step]), (phase, step, steps)
        assert incomplete == ([] if step in steps else [step]), (phase, step, incomplete)
    elif phase == "root_attrs":
        assert steps == list(STEPS) and incomplete == []
    snap = snapshot(store)
    for t in steps:  # a visible checkpoint is never half-written
        assert_same_checkpoint(
            snap["steps"][t], ref["snap"]["steps"][t], f"killed in {phase} {step}: {t}"
        )
    if steps:
        assert np.array_equal(snap["example_ids"], ref["snap"]["example_ids"])
    assert _files_digest(store) == digest, "reading the killed store changed it"
    return s


@pytest.mark.slow
def test_sigkill_at_random_points_never_corrupts_and_resume_completes(server, reference, tmp_path):
    trials = _trials(reference["trace"])
    assert len(trials) >= 20
    seen: Counter = Counter()  # (fault kind, writer phase) of each kill
    events: Counter = Counter()
    for i, trial in enumerate(trials):
        d = tmp_path / f"t{i}"
        store, ckpt = d / "tda.h5", d / "ckpt"
        d.mkdir()
        fault = trial["fault"]
        rc = server.run(store=str(store), ckpt=str(ckpt), fault=fault, trace=str(d / "kill.trace"))
        assert rc == -signal.SIGKILL, f"trial {trial}: {rc}\n{_log_tail(store)}"
        if fault["kind"] == "batch":
            phase, step = "rows", STEPS[(fault["at"] - 1) // CALLS_PER_CHECKPOINT]
        else:
            last = _trace(d / "kill.trace")[-1]
            assert last["killed"] and last["n"] == fault["at"], last
            phase, step = last["phase"], last["step"]
        seen[fault["kind"], phase] += 1
        if journal.journal_path(store).exists():
            events["journal left"] += 1
        _check_killed(store, phase, step, reference)

        if "resume_fault" in trial:
            rc = server.run(
                store=str(store),
                ckpt=str(ckpt),
                resume=True,
                fault=trial["resume_fault"],
                trace=str(d / "resume.trace"),
            )
            assert rc in (0, -signal.SIGKILL), _log_tail(store)
            if rc:
                events["resume killed"] += 1
                last = _trace(d / "resume.trace")[-1]
                _check_killed(store, last["phase"], last["step"], reference)
        rc = server.run(store=str(store), ckpt=str(ckpt), resume=True)
        assert rc == 0, f"resume after {trial}\n{_log_tail(store)}"

        s = AttributionStore(store)
        assert s.steps == list(STEPS) and s.incomplete == [], (trial, s.steps, s.incomplete)
        assert not journal.journal_path(store).exists()
        assert not journal.creating_path(store).exists()
        snap = snapshot(store)
        for t in STEPS:
            got = snap["steps"][t]
            ids = got["ids"]
            assert len(ids) == len(set(ids.tolist())) and np.array_equal(np.sort(ids), EXPECTED_IDS)
            assert_same_checkpoint(
                got, reference["snap"]["steps"][t], f"resumed after {trial}: {t}"
            )
        scores = s.attribute("logged", method="tracin", top_k=None).scores
        torch.testing.assert_close(scores, reference["scores"], rtol=1e-4, atol=1e-6)
    # the seeded points cover every way to die
    phases = {p for (kind, p) in seen if kind == "io"}
    assert {"setup", "rows", "arrays", "commit", "close"} <= phases, seen
    assert events["journal left"] >= 3 and events["resume killed"] >= 1, events
    assert sum(n for k, n in seen.items() if k[0] == "io_torn") == 4, seen


# -- a full disk -----------------------------------------------------------------------------------


def _allocates(fd: int, offset: int, n: int) -> bool:
    """Whether writing ``n`` bytes at ``offset`` needs new disk blocks: past the end of the file, or
    into a hole of a sparse file (HDF5 extends the file over a new checkpoint's rows without writing)."""
    if offset + n > os.fstat(fd).st_size:
        return True
    try:
        return os.lseek(fd, offset, os.SEEK_HOLE) < offset + n
    except OSError:  # no SEEK_HOLE on this filesystem: only growth allocates
        return False


class _FullDisk:
    """``journal.pwrite_all`` on a disk that fills up: once armed, the ``after``-th write that needs new
    blocks (store or journal) and every later one fail with ENOSPC; overwrites in place still work."""

    def __init__(self, after: int) -> None:
        self.real = journal.pwrite_all
        self.after = after
        self.armed = False
        self.in_rows = False  # set while CheckpointWriter.write_rows runs (with after=0)
        self.growing = 0
        self.failed = 0

    def __call__(self, fd: int, data, offset: int) -> None:
        if self.armed and self.after == 0 and self.in_rows:  # rows into a sparse region
            self.failed += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.armed and self.after and _allocates(fd, offset, len(memoryview(data).cast("B"))):
            self.growing += 1
            if self.growing >= self.after:
                self.failed += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.real(fd, data, offset)


class _Arm(Callback):
    """Fill the disk once the first checkpoint is logged (runs after GradientLogger's epoch end)."""

    def __init__(self, disk: _FullDisk) -> None:
        self.disk = disk

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.disk.armed = True


def _fit_in_process(store: Path, ckpt: Path, extra=(), resume: bool = False) -> None:
    """The fork server's fit (same seeds, data, model and logger), in this process."""
    pl.seed_everything(0, verbose=False)
    data = make_classification(64)
    model = TinyMLP(optimizer="adam", lr=0.01)
    logger = FastLogger(
        store,
        attribution_data=data,
        query_data=make_classification(8, seed=1),
        every_n_epochs=1,
        batch_size=16,
        rank=4,
        verbose=False,
    )
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[logger, *extra, ModelCheckpoint(dirpath=ckpt, save_last=True, save_top_k=-1)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=ckpt,
    )
    last = ckpt / "last.ckpt"
    trainer.fit(model, loader(data, shuffle=False), ckpt_path=str(last) if resume else None)


# where the disk fills during checkpoint 8: 0 = its first row write; otherwise the after-th write that
# needs new blocks: 1 the journal's header, 8 the setup's metadata, 20 the optimizer state, 40 the commit
@pytest.mark.parametrize("after", [0, 1, 8, 20, 40])
def test_disk_full_mid_fit_is_a_clear_error_and_the_store_stays_readable(
    reference, tmp_path, monkeypatch, after
):
    store, ckpt = tmp_path / "tda.h5", tmp_path / "ckpt"
    disk = _FullDisk(after)
    monkeypatch.setattr(journal, "pwrite_all", disk)
    write_rows = CheckpointWriter.write_rows

    def rows_on_full_disk(self, *args, **kwargs):
        disk.in_rows = True
        try:
            return write_rows(self, *args, **kwargs)
        finally:
            disk.in_rows = False

    monkeypatch.setattr(CheckpointWriter, "write_rows", rows_on_full_disk)
    with pytest.raises(StoreError) as info:
        _fit_in_process(store, ckpt, extra=[_Arm(disk)])
    msg = str(info.value)
    assert disk.failed >= 1
    assert "disk full" in msg and "no space left" in msg and str(store) in msg
    assert "Free disk space" in msg and "ckpt_path" in msg
    # rolled back to the last commit: checkpoint 4 intact, 8 at most incomplete, no journal left
    assert not journal.journal_path(store).exists()
    s = AttributionStore(store)
    assert s.steps == [4] and s.incomplete in ([], [8])
    assert_same_checkpoint(snapshot(store)["steps"][4], reference["snap"]["steps"][4], "disk full")
    # space freed: resuming completes the store to the reference
    disk.armed = False
    _fit_in_process(store, ckpt, resume=True)
    s = AttributionStore(store)
    assert s.steps == list(STEPS) and s.incomplete == []
    snap = snapshot(store)
    for t in STEPS:
        assert_same_checkpoint(
            snap["steps"][t], reference["snap"]["steps"][t], f"after disk full: {t}"
        )


def test_disk_full_before_the_first_commit_leaves_no_file(tmp_path, monkeypatch):
    store = tmp_path / "tda.h5"
    disk = _FullDisk(1)
    disk.armed = True
    monkeypatch.setattr(journal, "pwrite_all", disk)
    with pytest.raises(StoreError, match=r"disk full: no space left .*Free disk space"):
        _fit_in_process(store, tmp_path / "ckpt")
    assert not store.exists() and not journal.creating_path(store).exists()


# -- an interrupt inside a commit -------------------------------------------------------------------


def _writer_store(path: Path) -> tuple[StoreWriter, int]:
    """A store written directly (one exact 4x8 layer, 16 examples) and its row width."""
    layer = LayerSpec("l", "linear", 4, 8, False, 4, 8, 0, ("l.weight",))
    w = StoreWriter(path)
    w.write_run_metadata(
        {
            "layers": schema.to_json([layer.to_dict()]),
            "projection": schema.to_json(ProjectionConfig(kind="exact").to_dict()),
            "layer_groups": "{}",
        }
    )
    return w, layer.size


def _checkpoint(w: StoreWriter, step: int, width: int, commit: bool = True) -> None:
    g = torch.Generator().manual_seed(step)
    with w.begin_checkpoint(step, 16, width) as cw:
        for start in (0, 8):
            ids = torch.arange(start, start + 8) + 100
            cw.write_rows(ids, torch.randn(8, width, generator=g), torch.rand(8, generator=g))
        cw.write_arrays(schema.STATE, {"l|weight": torch.randn(4, 8, generator=g)})
        if commit:
            cw.commit({"lr_sum": [0.1], "lr_cumsum": [0.1 * step]})


@pytest.mark.parametrize("at", [1, 4, 12, 30])
def test_an_interrupt_inside_a_commit_propagates_and_rolls_back(tmp_path, monkeypatch, at):
    """Ctrl-C lands inside HDF5's I/O (here: at the at-th low-level write of a checkpoint's commit).
    The KeyboardInterrupt reaches the caller and the store is as of its last commit."""
    path = tmp_path / "tda.h5"
    w, width = _writer_store(path)
    _checkpoint(w, 1, width)
    before = snapshot_rows(path)
    real, calls = journal.pwrite_all, [0]

    def interrupted(fd, data, offset):
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt
        real(fd, data, offset)

    with pytest.raises(KeyboardInterrupt):
        g = torch.Generator().manual_seed(2)
        with w.begin_checkpoint(2, 16, width) as cw:
            for start in (0, 8):
                ids = torch.arange(start, start + 8) + 100
                cw.write_rows(ids, torch.randn(8, width, generator=g), torch.rand(8, generator=g))
            monkeypatch.setattr(journal, "pwrite_all", interrupted)
            cw.write_arrays(schema.STATE, {"l|weight": torch.randn(4, 8, generator=g)})
            cw.commit({"lr_sum": [0.1], "lr_cumsum": [0.2]})
    monkeypatch.setattr(journal, "pwrite_all", real)
    assert calls[0] >= at and not journal.journal_path(path).exists()
    s = AttributionStore(path)
    assert s.steps == [1] and s.incomplete == [2]
    assert all(torch.equal(a, b) for a, b in zip(snapshot_rows(path), before, strict=True))
    _checkpoint(w, 2, width)  # the checkpoint is simply written again
    assert AttributionStore(path).steps == [1, 2]


def snapshot_rows(path: Path) -> list[torch.Tensor]:
    s = AttributionStore(path)
    return [s.read(1), s.read(1, "loss"), s.state(1)["l.weight"]]
