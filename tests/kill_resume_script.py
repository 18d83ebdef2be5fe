"""Child process of test_resume.py and test_faults.py: a logged fit killed on purpose, then resumed.

usage::

    python kill_resume_script.py STORE CKPT_DIR (kill N | resume)   # test_resume.py: one fit per process
    python kill_resume_script.py serve                              # test_faults.py: a fork server

``serve`` imports torch and Lightning once, then reads one JSON trial per stdin line, runs it in a
forked child (so a trial costs a fit, not an interpreter start) and answers one JSON line
``{"returncode": rc}`` (negative: killed by that signal). A trial is
``{"store": path, "ckpt": dir, "resume": bool, "fault": null | {"kind": ..., "at": int}, "trace": path}``:

- ``"batch"``: SIGKILL on the ``at``-th sweep batch (``per_example_loss`` runs only in sweeps; each
  checkpoint sweeps 4 training batches, then 1 query batch);
- ``"io"``: SIGKILL just before the ``at``-th low-level write of the store writer
  (:func:`lightning_tda.store.journal.pwrite_all`: every byte HDF5 writes to the store, raw rows,
  metadata and superblock, inside flushes and closes too, and every journal record), so kills land
  at exact, reproducible points of the I/O stream;
- ``"io_torn"``: as ``"io"`` but the first half of that write reaches the file before the kill.

``trace`` (also without a fault) gets one JSON line per low-level write:
``{"n": index, "phase": writer method, "step": checkpoint or null, "killed": bool}``. A resumed trial
without a Lightning checkpoint to resume from (killed before the first one was saved) starts the fit
again with ``overwrite=True``, as a user would.

A trial with ``"mode": "in_flight"`` (test_in_flight_kills.py) runs an in-flight fit instead
(:func:`run_in_flight_trial`): ``GradientLogger(mode="in_flight")`` logging every optimizer step
(rows, state, learning rates, logged queries), written every ``FLUSH_EVERY`` steps and whenever a
Lightning checkpoint is saved (one per epoch). Its faults are ``"io"`` / ``"io_torn"`` as above and
``"step"``: SIGKILL inside ``training_step`` at optimizer step ``at``. Its trace names each write's
phase by who made it (the stack of the thread writing, so a background writer thread is classified
the same way): ``{"n", "phase", "steps", "train_step", "file", "thread", "killed"}`` with ``phase`` one of
``metadata``, ``flush`` (:func:`~lightning_tda.store.batches.write_batch_steps`; ``steps`` the steps
it writes when known), ``rebuild``, ``prune``, ``root_attrs``, ``other``; a ``"step"`` kill appends
``{"phase": "training", "train_step": at, "killed": true}``.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import traceback
from typing import Any

import lightning.pytorch as pl
import torch
from helpers import FastLogger, TinyMLP, loader, make_classification
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tda.store import journal
from lightning_tda.store import writer as store_writer

# checkpoints at steps 4, 8, 12; each sweeps 4 training batches and 1 query batch
N_TRAIN, N_QUERY, BATCH, EPOCHS = 64, 8, 16, 3


class KillingMLP(TinyMLP):
    """SIGKILLs the process on the n-th sweep batch (per_example_loss runs only in sweeps)."""

    def __init__(self, kill_at: int | None, optimizer: str = "sgd") -> None:
        super().__init__(optimizer=optimizer, lr=0.1 if optimizer == "sgd" else 0.01)
        self.kill_at = kill_at
        self.calls = 0

    def per_example_loss(self, batch):
        if self.trainer.global_step == 0:  # the logger's first-batch check, before any sweep
            return super().per_example_loss(batch)
        self.calls += 1
        if self.kill_at is not None and self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().per_example_loss(batch)


def main() -> None:
    if sys.argv[1] == "serve":
        serve()
        return
    store, ckpt_dir, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    kill_at = int(sys.argv[4]) if mode == "kill" else None
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    data = make_classification(64)
    model = KillingMLP(kill_at)
    logger = FastLogger(
        store, attribution_data=data, every_n_epochs=1, batch_size=16, verbose=False
    )
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[logger, ckpt],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(
        model,
        loader(data),
        ckpt_path=os.path.join(ckpt_dir, "last.ckpt") if mode == "resume" else None,
    )


# -- fork server (test_faults.py) ------------------------------------------------------------------


def serve() -> None:
    """Answer one JSON line per trial read from stdin; each trial runs in a forked child."""
    torch.set_num_threads(1)
    for line in sys.stdin:
        if not line.strip():
            continue
        trial = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                fd = os.open(trial["store"] + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                if trial.get("mode") == "in_flight":
                    run_in_flight_trial(trial)
                else:
                    run_trial(trial)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


def run_trial(trial: dict[str, Any]) -> None:
    """One deterministic fit (no shuffling, seeded init): fresh, or resumed from ``last.ckpt``."""
    store, ckpt_dir = trial["store"], trial["ckpt"]
    fault = trial.get("fault") or {}
    trace = trial.get("trace")
    if trace or fault.get("kind", "batch") != "batch":
        _install_io_faults(store, fault, trace)
    last = os.path.join(ckpt_dir, "last.ckpt")
    resume = bool(trial.get("resume")) and os.path.exists(last)
    pl.seed_everything(0, verbose=False)
    data = make_classification(N_TRAIN)
    queries = make_classification(N_QUERY, seed=1)
    model = KillingMLP(fault.get("at") if fault.get("kind") == "batch" else None, "adam")
    logger = FastLogger(
        store,
        attribution_data=data,
        query_data=queries,
        every_n_epochs=1,
        batch_size=BATCH,
        rank=4,
        verbose=False,
        overwrite=bool(trial.get("resume")) and not resume,
    )
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        callbacks=[logger, ckpt],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=ckpt_dir,
    )
    trainer.fit(model, loader(data, shuffle=False), ckpt_path=last if resume else None)


# -- in-flight trials (test_in_flight_kills.py) ----------------------------------------------------

# 48 examples in batches of 8 (no shuffling), 6 epochs: optimizer steps 0..35, a Lightning
# checkpoint after steps 5, 11, ..., 35, flushes of 4 steps (and one at each Lightning checkpoint)
IF_TRAIN, IF_QUERY, IF_BATCH, IF_EPOCHS, FLUSH_EVERY = 48, 4, 8, 6, 4
_TRAIN_STEP = [-1]  # the optimizer step being trained (read by the trace from any thread)


class StepKillingMLP(TinyMLP):
    """SIGKILLs the process inside ``training_step`` at optimizer step ``kill_at``."""

    def __init__(self, kill_at: int | None, trace: str | None) -> None:
        super().__init__(optimizer="adam", lr=0.01)
        self.kill_at = kill_at
        self.trace = trace

    def training_step(self, batch, batch_idx):
        step = self.trainer.global_step
        _TRAIN_STEP[0] = step
        if self.kill_at is not None and step == self.kill_at:
            if self.trace:
                rec = {"n": None, "phase": "training", "steps": None, "train_step": step}
                _append(self.trace, {**rec, "thread": _thread_name(), "killed": True})
            os.kill(os.getpid(), signal.SIGKILL)
        return super().training_step(batch, batch_idx)


def run_in_flight_trial(trial: dict[str, Any]) -> None:
    """One deterministic in-flight fit (no shuffling, seeded init): fresh, or resumed from
    ``last.ckpt`` (``overwrite=True`` when there is none yet, as a user would)."""
    from lightning_tda import GradientLogger
    from lightning_tda.callbacks.config import InFlightConfig

    store, ckpt_dir = trial["store"], trial["ckpt"]
    fault = trial.get("fault") or {}
    trace = trial.get("trace")
    if trace or fault.get("kind") in ("io", "io_torn"):
        _install_in_flight_faults(fault, trace)
    last = os.path.join(ckpt_dir, "last.ckpt")
    resume = bool(trial.get("resume")) and os.path.exists(last)
    pl.seed_everything(0, verbose=False)
    data = make_classification(IF_TRAIN)
    model = StepKillingMLP(fault.get("at") if fault.get("kind") == "step" else None, trace)
    logger = GradientLogger(
        store,
        mode="in_flight",
        query_data=make_classification(IF_QUERY, seed=1),
        in_flight=InFlightConfig(flush_every=FLUSH_EVERY, background=True),  # the thread on CPU too
        rank=4,
        verbose=False,
        overwrite=bool(trial.get("resume")) and not resume,
    )
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(
        max_epochs=IF_EPOCHS,
        callbacks=[logger, ckpt],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=ckpt_dir,
    )
    loader_ = loader(data, batch_size=IF_BATCH, shuffle=False)
    trainer.fit(model, loader_, ckpt_path=last if resume else None)


# who wrote: (module file suffix, function) of a frame on the writing thread's stack -> phase
_IN_FLIGHT_PHASES = (
    (os.path.join("store", "batches.py"), "rebuild_example_ids", "rebuild"),
    (os.path.join("store", "batches.py"), None, "flush"),
    (os.path.join("store", "writer.py"), "prune", "prune"),
    (os.path.join("store", "writer.py"), "write_run_metadata", "metadata"),
    (os.path.join("store", "writer.py"), "set_root_attrs", "root_attrs"),
)


def _thread_name() -> str:
    return "main" if threading.current_thread() is threading.main_thread() else "background"


def _file_kind(fd: int) -> str | None:
    """``"journal"``, ``"creating"`` (a new store before its first commit) or ``"store"``; ``None``
    where ``/proc`` cannot tell."""
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    for suffix in (journal.JOURNAL_SUFFIX, journal.CREATING_SUFFIX):
        if name.endswith(suffix):
            return suffix[1:]
    return "store"


def _append(path: str, rec: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.write(fd, (json.dumps(rec) + "\n").encode())
    finally:
        os.close(fd)


def _classify(frame) -> tuple[str, list[int] | None]:
    """The phase of the write made from ``frame`` (the first matching entry of ``_IN_FLIGHT_PHASES``
    over the whole stack) and the steps a flush writes (a ``steps`` list of a store.batches frame)."""
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    phase = "other"
    for suffix, fn, name in _IN_FLIGHT_PHASES:
        if any(
            f.f_code.co_filename.endswith(suffix) and fn in (None, f.f_code.co_name) for f in frames
        ):
            phase = name
            break
    steps = None
    if phase == "flush":
        for f in frames:
            in_batches = f.f_code.co_filename.endswith(_IN_FLIGHT_PHASES[1][0])
            pending = f.f_locals.get("steps") if in_batches else None
            if isinstance(pending, (list, tuple)) and all(hasattr(p, "step") for p in pending):
                steps = [int(p.step) for p in pending] or None
                break
    return phase, steps


def _install_in_flight_faults(fault: dict[str, Any], trace: str | None) -> None:
    """Count (and trace) every low-level store write, from any thread; SIGKILL at the chosen one."""
    real = journal.pwrite_all
    lock = threading.Lock()
    count = [0]

    def pwrite_all(fd: int, data, offset: int) -> None:
        with lock:
            count[0] += 1
            n = count[0]
        kill = fault.get("kind") in ("io", "io_torn") and n == fault.get("at")
        if trace is not None:
            phase, steps = _classify(sys._getframe(1))
            rec = {"n": n, "phase": phase, "steps": steps, "train_step": _TRAIN_STEP[0]}
            rec.update(file=_file_kind(fd), thread=_thread_name(), killed=kill)
            _append(trace, rec)
        if kill:
            if fault["kind"] == "io_torn":
                view = memoryview(data).cast("B")
                real(fd, view[: max(1, len(view) // 2)], offset)
            os.kill(os.getpid(), signal.SIGKILL)
        real(fd, data, offset)

    journal.pwrite_all = pwrite_all


# -- I/O fault injection -----------------------------------------------------------------------------

_PHASE: list[tuple[str, int | None]] = [("other", None)]


def _phase(name: str):
    """Wrap a writer method so writes made inside it are traced as ``name`` (with its checkpoint step)."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(self, *args, **kwargs):
            step = getattr(self, "step", None)
            if step is None and name == "setup":
                step = int(args[1]) if len(args) > 1 else None  # CheckpointWriter(store, step, ...)
            _PHASE.append((name, step))
            try:
                return fn(self, *args, **kwargs)
            finally:
                _PHASE.pop()

        return inner

    return wrap


def _install_io_faults(store: str, fault: dict[str, Any], trace: str | None) -> None:
    """Count (and trace) every low-level write of the store writer; SIGKILL at the chosen one."""
    real = journal.pwrite_all
    trace_fd = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if trace else None
    count = [0]

    def pwrite_all(fd: int, data, offset: int) -> None:
        count[0] += 1
        kill = fault.get("kind") in ("io", "io_torn") and count[0] == fault.get("at")
        if trace_fd is not None:
            phase, step = _PHASE[-1]
            rec = {"n": count[0], "phase": phase, "step": step, "killed": kill}
            os.write(trace_fd, (json.dumps(rec) + "\n").encode())
        if kill:
            if fault["kind"] == "io_torn":
                view = memoryview(data).cast("B")
                real(fd, view[: max(1, len(view) // 2)], offset)
            os.kill(os.getpid(), signal.SIGKILL)
        real(fd, data, offset)

    journal.pwrite_all = pwrite_all
    sw, cw = store_writer.StoreWriter, store_writer.CheckpointWriter
    for cls, method, phase in (
        (sw, "write_run_metadata", "metadata"),
        (sw, "prune", "prune"),
        (sw, "set_root_attrs", "root_attrs"),
        (sw, "write_bases", "bases"),
        (cw, "__init__", "setup"),
        (cw, "write_rows", "rows"),
        (cw, "write_queries", "queries"),
        (cw, "write_arrays", "arrays"),
        (cw, "commit", "commit"),
        (cw, "close", "close"),
    ):
        if hasattr(cls, method):
            setattr(cls, method, _phase(phase)(getattr(cls, method)))


if __name__ == "__main__":
    main()
