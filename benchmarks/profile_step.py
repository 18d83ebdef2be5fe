"""Profile of one in-flight logged optimizer step and one sweep batch (where each millisecond goes).

``python -m benchmarks.profile_step [--task tinygpt|gpt10m] [--steps N] [--repeats R]``

Per repeat (interleaved): a plain fit of ``N`` optimizer steps, the same fit with
``GradientLogger(mode="in_flight", rank=16)`` (every step logged, the in-flight defaults otherwise:
``save_state=True``, ``flush_every=16``, so the ``N`` steps are written by one flush at train end),
and the same fit with a sweep logger (``rank=16``, random basis, float16) whose one checkpoint at step
``N`` featurizes a few training batches of the training batch size. The library's phases are timed
by wrapping its functions at run time (nothing in ``lightning_tda`` is edited); each timer is
inclusive of the timers it calls. Host conversions (``Tensor.item/tolist/cpu/numpy`` and
``bool/float/int(tensor)``), trainable-state copies (``Tensor.to(..., copy=True)``) and HDF5 calls
(dataset/group creations, attribute sets, file flushes, ``os.fsync``) are counted in the same
regions. One more logged fit runs under ``torch.profiler`` (CPU, ``record_shapes=False``) with a
``record_function`` label per phase; its top operators are saved too.

Writes ``benchmarks/results/profile_<task>.json`` and the "Profile" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import lightning.pytorch as pl
import torch
from torch.utils.data import Subset

from benchmarks.common import QUIET_CPU, RESULTS, ROOT
from benchmarks.tasks import TASKS, Task

MARKER = "profile"
HOST = ("host: Tensor.",)
OPT = "optimizer.step (Lightning: incl. the closure's forward + backward)"
FWD = "training_step (forward, incl. forward hooks)"
BWD = "backward (incl. in-flight backward hooks)"
UPDATE = "= rest of optimizer.step (AdamW update, zero_grad, Lightning's loop, the logger's hooks)"
LIBRARY_IN_STEP = (
    "keep_step (host copies queued, state, lrs)",
    "recorder.after_backward",
    "recorder.batch_start (ids, zero rows)",
)
REST = "= rest of optimizer.step without the logger's hooks (AdamW update, zero_grad, Lightning)"


def _derive(ms: dict[str, float]) -> None:
    """Add the exclusive remainders of ``optimizer.step`` (Lightning runs the closure inside it)."""
    for k in [k for k in ms if k.startswith("= ")]:
        del ms[k]
    if OPT in ms:
        ms[UPDATE] = ms[OPT] - ms.get(FWD, 0.0) - ms.get(BWD, 0.0)
        ms[REST] = ms[UPDATE] - sum(ms.get(k, 0.0) for k in LIBRARY_IN_STEP)


class Meter:
    """Per-region wall time and call counts of the wrapped functions (active only inside a region)."""

    def __init__(self) -> None:
        self.active = False
        self.ms: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.records: dict[str, list[dict]] = defaultdict(list)
        self._t0 = 0.0
        self._depth: dict[str, int] = defaultdict(int)
        self._undo: list[tuple[Any, str, Any]] = []

    def begin(self) -> None:
        self.ms.clear()
        self.calls.clear()
        self.active = True
        self._t0 = time.perf_counter()

    def end(self, kind: str, **extra: Any) -> None:
        if not self.active:
            return
        total = (time.perf_counter() - self._t0) * 1e3
        self.active = False
        self.records[kind].append(
            {"total_ms": total, "ms": dict(self.ms), "calls": dict(self.calls), **extra}
        )

    def sub_begin(self) -> None:
        """Open a nested record (a sweep batch inside the checkpoint's training step)."""
        self._sub = (time.perf_counter(), dict(self.ms), dict(self.calls))

    def sub_end(self, kind: str) -> None:
        sub = getattr(self, "_sub", None)
        if not self.active or sub is None:
            return
        t0, ms0, calls0 = sub
        self._sub = None
        self.records[kind].append(
            {
                "total_ms": (time.perf_counter() - t0) * 1e3,
                "ms": {k: v - ms0.get(k, 0.0) for k, v in self.ms.items() if v - ms0.get(k, 0.0)},
                "calls": {
                    k: v - calls0.get(k, 0) for k, v in self.calls.items() if v - calls0.get(k, 0)
                },
            }
        )

    def timed(self, name: str, fn):
        """``fn`` timed as phase ``name`` (re-entrant calls are counted once)."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not self.active or self._depth[name]:
                return fn(*args, **kwargs)
            self._depth[name] += 1
            t0 = time.perf_counter()
            try:
                with torch.profiler.record_function(f"tda::{name}"):
                    return fn(*args, **kwargs)
            finally:
                self.ms[name] += (time.perf_counter() - t0) * 1e3
                self.calls[name] += 1
                self._depth[name] -= 1

        return wrapper

    def patch(self, owner: Any, attr: str, name: str) -> None:
        orig = getattr(owner, attr)
        self._undo.append((owner, attr, orig))
        setattr(owner, attr, self.timed(name, orig))

    def patch_factory(self, owner: Any, attr: str, name: str) -> None:
        """``owner.attr`` returns a callable (a hook, a loss function): time what it returns."""
        orig = getattr(owner, attr)
        self._undo.append((owner, attr, orig))

        @functools.wraps(orig)
        def factory(*args, **kwargs):
            return self.timed(name, orig(*args, **kwargs))

        setattr(owner, attr, factory)

    def restore(self) -> None:
        for owner, attr, orig in reversed(self._undo):
            setattr(owner, attr, orig)
        self._undo.clear()


def instrument(m: Meter) -> None:
    """Wrap the library's phases, torch's host conversions and h5py's writes (undone by ``m.restore``)."""
    import lightning_tda.callbacks.context as context
    import lightning_tda.callbacks.in_flight as cb_in_flight
    import lightning_tda.callbacks.in_flight_logging as ifl
    import lightning_tda.callbacks.in_flight_steps as steps
    import lightning_tda.capture.checks as checks
    import lightning_tda.capture.featurize as featurize
    import lightning_tda.capture.hooks as hooks
    import lightning_tda.capture.host_copy as host_copy
    import lightning_tda.capture.in_flight as cap_in_flight
    import lightning_tda.store.batches as batches
    import lightning_tda.store.writer as writer

    # the user's step (training_step is patched on the task's module class in _fit)
    m.patch(torch.Tensor, "backward", BWD)
    m.patch(torch.autograd, "grad", "autograd.grad (sweep backward)")
    # in-flight capture
    m.patch(cb_in_flight.InFlightRecorder, "batch_start", "recorder.batch_start (ids, zero rows)")
    m.patch(cb_in_flight.InFlightRecorder, "after_backward", "recorder.after_backward")
    m.patch_factory(cap_in_flight.InFlightCapture, "_make_hook", "in-flight forward hooks (x P_in)")
    m.patch(
        cap_in_flight.InFlightCapture, "_backward", "in-flight backward hooks (δ P_out, einsum)"
    )
    m.patch(cb_in_flight.InFlightRecorder, "take_step", "take_step (rows of the window)")
    m.patch(ifl.InFlightLogging, "_keep_step", "keep_step (host copies queued, state, lrs)")
    m.patch(cb_in_flight, "merge_rows", "writer: merge rows")
    m.patch(host_copy.HostCopy, "__init__", "host copies queued (rows, state snapshot)")
    m.patch(ifl, "trainable_state", "trainable_state dict")
    m.patch(ifl, "current_lrs", "current_lrs")
    # finiteness (every module that imported the function by name)
    for mod in (cb_in_flight, featurize, checks):  # (in flight: in the writer's job)
        m.patch(mod, "_check_finite", "finiteness checks")
    m.patch(featurize, "_check_losses", "loss shape + finiteness check")
    # sweep featurization
    m.patch(context.FitContext, "featurize", "sweep featurize (one batch)")
    m.patch(featurize.Featurizer, "__call__", "Featurizer.__call__")
    m.patch_factory(featurize, "as_loss_fn", "per_example_loss forward (sweep)")
    m.patch_factory(hooks.LayerGradientHooks, "_make_hook", "sweep forward hooks (x P_in)")
    m.patch(hooks.LayerGradientHooks, "projected_gradients", "projected_gradients (grad + einsum)")
    m.patch(writer.CheckpointWriter, "write_rows", "CheckpointWriter.write_rows (HDF5)")
    # the in-flight write
    m.patch(ifl, "write_logged_steps", "flush: write_logged_steps (the writer's job)")
    m.patch(steps, "write_batch_steps", "flush: write_batch_steps")
    m.patch(batches, "open_for_update", "flush: open store (lock, journal)")
    m.patch(batches, "_encode", "flush: encode rows (float16)")
    m.patch(batches, "_extend_example_ids", "flush: extend examples/ids")
    m.patch(writer.StoreFile, "close", "store close (journal commit)")
    m.patch(writer.StoreFile, "flush", "store flush (journal commit)")
    # counted (and timed) low-level calls
    for attr in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        m.patch(torch.Tensor, attr, f"host: Tensor.{attr}")
    _patch_copies(m)
    m.patch(h5py.Group, "create_dataset", "h5: create_dataset")
    m.patch(h5py.Group, "create_group", "h5: create_group")
    m.patch(h5py.AttributeManager, "__setitem__", "h5: attrs set")
    m.patch(h5py.Dataset, "__setitem__", "h5: dataset write")
    m.patch(os, "fsync", "os.fsync")


def _patch_copies(m: Meter) -> None:
    """``Tensor.to(..., copy=True)``: the trainable-state copies of an in-flight step."""
    orig = torch.Tensor.to
    timed = m.timed("state copy: Tensor.to(copy=True)", orig)
    m._undo.append((torch.Tensor, "to", orig))

    def to(self, *args, **kwargs):
        return timed(self, *args, **kwargs) if kwargs.get("copy") else orig(self, *args, **kwargs)

    torch.Tensor.to = to


class StepStart(pl.Callback):
    """First callback: opens a region per training batch, and one for the train-end flush."""

    def __init__(self, m: Meter) -> None:
        self.m = m

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.m.begin()

    def on_train_end(self, trainer, pl_module) -> None:
        self.m.begin()


class StepEnd(pl.Callback):
    """Last callback: closes the region as a ``<mode>`` step record (or a ``<mode>_flush`` record)."""

    def __init__(self, m: Meter, mode: str) -> None:
        self.m, self.mode = m, mode

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.m.end(self.mode, step=trainer.global_step - 1)

    def on_train_end(self, trainer, pl_module) -> None:
        self.m.end(f"{self.mode}_flush")


def _patch_sweep_batches(m: Meter) -> None:
    """A ``sweep`` batch record runs from ``FitContext.featurize`` to the end of its ``write_rows``."""
    import lightning_tda.callbacks.context as context
    import lightning_tda.store.writer as writer

    featurize, write_rows = context.FitContext.featurize, writer.CheckpointWriter.write_rows
    m._undo += [
        (context.FitContext, "featurize", featurize),
        (writer.CheckpointWriter, "write_rows", write_rows),
    ]

    def feat(*args, **kwargs):
        m.sub_begin()
        return featurize(*args, **kwargs)

    def write(*args, **kwargs):
        out = write_rows(*args, **kwargs)
        m.sub_end("sweep_batch")
        return out

    context.FitContext.featurize, writer.CheckpointWriter.write_rows = feat, write


def _patch_optimizer(m: Meter) -> list:
    """Time ``optimizer.step`` itself (the update, not the closure's forward/backward)."""
    name = OPT
    state = {}

    def pre(opt, args, kwargs):
        state["t0"] = time.perf_counter()

    def post(opt, args, kwargs):
        if m.active and "t0" in state:
            m.ms[name] += (time.perf_counter() - state.pop("t0")) * 1e3
            m.calls[name] += 1

    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    return [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]


SWEEP = {"basis": "random", "batch_size": None}  # set by main: --sweep-basis, --sweep-batch-size


def _fit(task: Task, m: Meter, mode: str, steps: int, path: Path, sweep_batches: int) -> None:
    from lightning_tda import GradientLogger
    from lightning_tda.callbacks.config import InFlightConfig

    pl.seed_everything(0, verbose=False)
    model = task.factory()
    m.patch(type(model), "training_step", FWD)
    trainer_kwargs, fit_kwargs = task.fit_setup(0)
    trainer_kwargs.pop("max_epochs", None)
    cbs: list[pl.Callback] = []
    if mode == "in_flight":
        # the writer runs inline here so its milliseconds land in the step that flushes (in a real
        # run it is a background thread: InFlightConfig(background=True), the default)
        flight = InFlightConfig(background=False)
        cbs = [
            GradientLogger(
                path, mode="in_flight", rank=16, in_flight=flight, overwrite=True, verbose=False
            )
        ]
    elif mode == "sweep":
        bs = SWEEP["batch_size"] or task.recipe.batch_size
        cbs = [
            GradientLogger(
                path,
                attribution_data=Subset(task.train, range(bs * sweep_batches)),
                batch_size=bs,
                rank=16,
                basis=SWEEP["basis"],
                dtype="float16",
                at_steps=[steps],
                overwrite=True,
                verbose=False,
            )
        ]
    trainer = pl.Trainer(
        callbacks=[StepStart(m), *cbs, StepEnd(m, mode)],
        **QUIET_CPU,
        max_steps=steps,
        max_epochs=-1,
        **trainer_kwargs,
    )
    try:
        trainer.fit(model, **fit_kwargs)
    finally:
        owner, attr, orig = m._undo.pop()
        setattr(owner, attr, orig)


def _tag(m: Meter, before: dict[str, int], repeat: int) -> None:
    for kind, recs in m.records.items():
        for rec in recs[before.get(kind, 0) :]:
            rec["repeat"] = repeat


def _torch_profile(task: Task, m: Meter, mode: str, steps: int, path: Path, nb: int) -> list:
    """Top operators (CPU self time) of one more ``mode`` fit under ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    before = {k: len(v) for k, v in m.records.items()}
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        _fit(task, m, mode, steps, path, nb)
    for kind, n in before.items():
        del m.records[kind][n:]
    for kind in [k for k in m.records if k not in before]:
        del m.records[kind]
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {
            "name": e.key,
            "calls": e.count,
            "cpu_total_ms": e.cpu_time_total / 1e3,
            "self_cpu_ms": e.self_cpu_time_total / 1e3,
        }
        for e in rows[:25]
    ]


def run(task: Task, steps: int, repeats: int, sweep_batches: int, workdir: Path) -> dict:
    """Interleaved plain / in-flight / sweep fits of ``steps`` steps, then the two profiled fits."""
    m = Meter()
    instrument(m)
    _patch_sweep_batches(m)
    handles = _patch_optimizer(m)
    try:
        _fit(task, m, "plain", 2, workdir / "warm.h5", sweep_batches)  # warm-up, not kept
        m.records.clear()
        for r in range(repeats):
            for mode in ("plain", "in_flight", "sweep"):
                before = {k: len(v) for k, v in m.records.items()}
                _fit(task, m, mode, steps, workdir / f"{mode}.h5", sweep_batches)
                _tag(m, before, r)
                print(f"  repeat {r} {mode} done", flush=True)
        prof = {
            mode: _torch_profile(task, m, mode, steps, workdir / f"prof-{mode}.h5", sweep_batches)
            for mode in ("in_flight", "sweep")
        }
    finally:
        m.restore()
        for h in handles:
            h.remove()
    return {"records": dict(m.records), "torch_profiler_top_ops": prof}


def _median_phases(recs: list[dict]) -> tuple[float, dict[str, float], dict[str, float]]:
    for r in recs:
        _derive(r["ms"])
    names = sorted({k for r in recs for k in r["ms"]})
    ms = {k: statistics.median(r["ms"].get(k, 0.0) for r in recs) for k in names}
    calls = {k: statistics.median(r["calls"].get(k, 0) for r in recs) for k in names}
    return statistics.median(r["total_ms"] for r in recs), ms, calls


def _checkpoint_summary(rec: dict, steps: int, med) -> dict:
    """The sweep fit's last step holds the whole checkpoint: its fixed cost beyond the batches."""
    rows = []
    for x in rec["sweep"]:
        if x["step"] != steps - 1:
            continue
        batches = [b["total_ms"] for b in rec["sweep_batch"] if b["repeat"] == x["repeat"]]
        rows.append(
            {
                "step_ms": x["total_ms"],
                "batches_ms": sum(batches),
                "batches": len(batches),
                "fixed_ms": x["total_ms"] - sum(batches) - med("plain", x["repeat"]),
                "calls": x["calls"],
            }
        )
    return {
        "step_ms": statistics.median(r["step_ms"] for r in rows),
        "batches_ms": statistics.median(r["batches_ms"] for r in rows),
        "batches": rows[0]["batches"],
        "fixed_ms": statistics.median(r["fixed_ms"] for r in rows),
        "calls": rows[0]["calls"],
    }


def summarize(raw: dict, steps: int, batch_size: int, sweep_batch_size: int | None = None) -> dict:
    """Medians per phase (steps after the first of each fit) and per-repeat logged/plain ratios."""
    rec = raw["records"]
    steady = {
        k: [r for r in rec.get(k, []) if r.get("step", 1) >= 1] for k in ("plain", "in_flight")
    }
    out: dict[str, Any] = {}
    for kind in ("plain", "in_flight", "in_flight_flush", "sweep_batch"):
        recs = steady.get(kind, rec.get(kind, []))
        if recs:
            total, ms, calls = _median_phases(recs)
            out[kind] = {"total_ms": total, "ms": ms, "calls": calls, "n": len(recs)}
    repeats = sorted({r["repeat"] for r in steady["plain"]})

    def med(kind: str, r: int) -> float:
        return statistics.median(
            x["total_ms"] for x in steady.get(kind, rec[kind]) if x["repeat"] == r
        )

    flush = {r: med("in_flight_flush", r) / steps for r in repeats}
    out["ratio_in_flight_step"] = statistics.median(
        med("in_flight", r) / med("plain", r) for r in repeats
    )
    out["ratio_in_flight_with_flush"] = statistics.median(
        (med("in_flight", r) + flush[r]) / med("plain", r) for r in repeats
    )
    sweep = [x for x in rec["sweep_batch"]]
    out["ratio_sweep_batch_to_plain_step"] = statistics.median(
        statistics.median(x["total_ms"] for x in sweep if x["repeat"] == r) / med("plain", r)
        for r in repeats
    )
    out["flush_ms_per_logged_step"] = statistics.median(flush.values())
    out["sweep_checkpoint"] = _checkpoint_summary(rec, steps, med)
    sweep_bs = sweep_batch_size or batch_size
    out["sweep_examples_per_s"] = sweep_bs / out["sweep_batch"]["total_ms"] * 1e3
    out["plain_examples_per_s"] = batch_size / out["plain"]["total_ms"] * 1e3
    return out


COUNTED = {
    "HDF5 datasets created": ("h5: create_dataset",),
    "HDF5 groups created": ("h5: create_group",),
    "HDF5 attributes set": ("h5: attrs set",),
    "HDF5 dataset writes (slice assignment)": ("h5: dataset write",),
    "store flushes / closes (journal commits)": (
        "store flush (journal commit)",
        "store close (journal commit)",
    ),
    "os.fsync": ("os.fsync",),
    "host copies of rows and state snapshots": ("host copies queued (rows, state snapshot)",),
    "tensor -> host conversions (item/tolist/cpu/numpy/bool/float/int)": HOST,
    "finiteness checks": ("finiteness checks",),
}


def _count(calls: dict[str, float], prefixes: tuple[str, ...]) -> float:
    return sum(v for k, v in calls.items() if k.startswith(prefixes))


def _phase_table(rows: list[tuple[str, float, float, float]], total: float, head: str) -> list[str]:
    lines = [
        f"| phase (inclusive) | {head} ms | logged ms | % of logged | calls |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, base, ms, calls in rows:
        lines.append(f"| {name} | {base:.2f} | {ms:.2f} | {100 * ms / total:.1f}% | {calls:g} |")
    return lines


def task_markdown(res: dict) -> str:
    s = res["summary"]
    plain, fl, flush, sw = s["plain"], s["in_flight"], s["in_flight_flush"], s["sweep_batch"]
    n = res["steps"]
    logged_total = fl["total_ms"] + s["flush_ms_per_logged_step"]
    rows = [("**optimizer step, total**", plain["total_ms"], fl["total_ms"], 1)]
    names = sorted(set(fl["ms"]) | set(plain["ms"]), key=lambda k: -fl["ms"].get(k, 0.0))
    rows += [
        (k, plain["ms"].get(k, 0.0), fl["ms"].get(k, 0.0), fl["calls"].get(k, 0))
        for k in names
        if max(fl["ms"].get(k, 0.0), plain["ms"].get(k, 0.0)) >= 0.01
    ]
    rows.append((f"**train-end flush ÷ {n} steps**", 0.0, s["flush_ms_per_logged_step"], 1 / n))
    rows += [
        (f"↳ {k}", 0.0, v / n, flush["calls"].get(k, 0) / n)
        for k, v in sorted(flush["ms"].items(), key=lambda kv: -kv[1])
        if v / n >= 0.01
    ]
    out = [
        f"#### {res['task']}: {res['describe']}",
        "",
        f"{res['parameters']:,} parameters; batch {res['batch_size']}; {n} steps per fit x "
        f"{res['repeats']} interleaved repeats (medians over steps 1..{n - 1} of every fit).",
        "",
        f"**In-flight logged step {fl['total_ms']:.1f} ms + {s['flush_ms_per_logged_step']:.1f} ms of "
        f"amortized flush = {logged_total:.1f} ms vs plain {plain['total_ms']:.1f} ms: "
        f"x{s['ratio_in_flight_step']:.2f} without the flush, x{s['ratio_in_flight_with_flush']:.2f} "
        "with it.**",
        "",
        *_phase_table(rows, logged_total, "plain"),
        "",
        "Counts per logged step (the flush's share included) and per plain step:",
        "",
        "| what | per logged step | per plain step |",
        "|---|---:|---:|",
    ]
    for label, prefixes in COUNTED.items():
        per = _count(fl["calls"], prefixes) + _count(flush["calls"], prefixes) / n
        out.append(f"| {label} | {per:g} | {_count(plain['calls'], prefixes):g} |")
    ck = s["sweep_checkpoint"]
    sbs = res.get("sweep_batch_size", res["batch_size"])
    srows = [("**one sweep batch, total**", plain["total_ms"], sw["total_ms"], 1)]
    srows += [
        (k, plain["ms"].get(k, 0.0), v, sw["calls"].get(k, 0))
        for k, v in sorted(sw["ms"].items(), key=lambda kv: -kv[1])
        if v >= 0.01
    ]
    out += [
        "",
        f"**One sweep batch ({sbs} examples) {sw['total_ms']:.1f} ms vs one plain training "
        f"step ({res['batch_size']} examples) {plain['total_ms']:.1f} ms: "
        f"{s['sweep_examples_per_s']:.0f} vs {s['plain_examples_per_s']:.0f} examples/s, "
        f"x{s['plain_examples_per_s'] / s['sweep_examples_per_s']:.2f} the training time per example.**",
        "",
        *_phase_table(srows, sw["total_ms"], "plain step"),
        "",
        f"The whole sweep checkpoint ({ck['batches']} batches, basis `{res.get('sweep_basis', 'random')}`, "
        f"batch {res.get('sweep_batch_size', res['batch_size'])}): its training step took {ck['step_ms']:.0f} ms, "
        f"of which {ck['batches_ms']:.0f} ms were the batches above and **{ck['fixed_ms']:.0f} ms "
        f"per-checkpoint fixed cost** beyond a plain step (open, metadata, basis, state, commit; "
        f"{ck['calls'].get('h5: create_dataset', 0)} datasets created, "
        f"{ck['calls'].get('h5: attrs set', 0)} attributes set).",
        "",
        "Top operators (self CPU) of one in-flight fit under torch.profiler: "
        + ", ".join(
            f"`{o['name']}` {o['self_cpu_ms']:.0f} ms"
            for o in res["torch_profiler_top_ops"]["in_flight"][:6]
        )
        + ".",
    ]
    return "\n".join(out)


def render() -> str:
    """The BENCHMARKS.md section from every ``benchmarks/results/profile_*.json``."""
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("profile_*.json"))]
    for res in results:  # re-derived from the raw records: the section follows this file's code
        res["summary"] = summarize(
            res, res["steps"], res["batch_size"], res.get("sweep_batch_size")
        )
    head = [
        "## Profile of one logged step and one sweep batch",
        "",
        "Made by `python -m benchmarks.profile_step --task <task>` (benchmarks/profile_step.py). Timers "
        "wrap the library's functions at run time and are inclusive (a row contains the rows it calls: "
        "e.g. `backward` contains the in-flight backward hooks, `keep_step` the state copy, "
        "`write_batch_steps` every `flush:` and `h5:` row). The plain column is the same phase in the "
        "plain fit's step. CPU only: a `tensor -> host` conversion costs nothing here but is a device "
        "sync on a GPU.",
        "",
    ]
    for res in results:
        mach = res["machine"]
        head += [
            f"`{res['command']}` - {mach['date']}, {mach['machine']}, {mach['cpus']} CPUs, torch "
            f"{mach['torch']} with {mach['torch_threads']} threads, load average "
            f"{', '.join(f'{x:.1f}' for x in mach['load_average'])}.",
            "",
            task_markdown(res),
            "",
        ]
    return "\n".join(head).rstrip()


def update_section(section: str) -> None:
    """Replace (or append) the ``<!-- profile:start -->`` ... ``<!-- profile:end -->`` block."""
    path = ROOT / "BENCHMARKS.md"
    start, end = f"<!-- {MARKER}:start -->", f"<!-- {MARKER}:end -->"
    text = path.read_text()
    block = f"{start}\n{section}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=["tinygpt", "gpt10m"], default="tinygpt")
    ap.add_argument(
        "--steps", type=int, default=8, help="optimizer steps per fit (< 16: one flush)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--sweep-batches", type=int, default=4, help="batches the sweep checkpoint featurizes"
    )
    ap.add_argument("--sweep-basis", choices=["random", "pca"], default="random")
    ap.add_argument(
        "--sweep-batch-size", type=int, default=None, help="default: the training batch size"
    )
    ap.add_argument("--render", action="store_true", help="only rewrite the BENCHMARKS.md section")
    args = ap.parse_args(argv)
    if not args.render:
        warnings.filterwarnings("ignore")
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        torch.set_num_threads(2)
        task = TASKS[args.task]()
        SWEEP.update(basis=args.sweep_basis, batch_size=args.sweep_batch_size)
        command = (
            f"python -m benchmarks.profile_step --task {args.task} --steps {args.steps} "
            f"--repeats {args.repeats} --sweep-batches {args.sweep_batches}"
        )
        variant = ""
        if args.sweep_basis != "random":
            command += f" --sweep-basis {args.sweep_basis}"
            variant += f"_{args.sweep_basis}"
        if args.sweep_batch_size:
            command += f" --sweep-batch-size {args.sweep_batch_size}"
            variant += f"_b{args.sweep_batch_size}"
        with tempfile.TemporaryDirectory() as tmp:
            raw = run(task, args.steps, args.repeats, args.sweep_batches, Path(tmp))
        res = {
            "task": task.name,
            "describe": task.describe,
            "parameters": sum(p.numel() for p in task.factory().parameters()),
            "batch_size": task.recipe.batch_size,
            "steps": args.steps,
            "repeats": args.repeats,
            "sweep_basis": args.sweep_basis,
            "sweep_batch_size": args.sweep_batch_size or task.recipe.batch_size,
            "command": command,
            "machine": {
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "load_average": os.getloadavg(),
            },
            "summary": summarize(raw, args.steps, task.recipe.batch_size, args.sweep_batch_size),
            **raw,
        }
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"profile_{task.name}{variant}.json").write_text(
            json.dumps(res, indent=1, default=float)
        )
        print(task_markdown(res))
    update_section(render())
    print("wrote BENCHMARKS.md (section 'Profile of one logged step and one sweep batch')")
    return {}


if __name__ == "__main__":
    main()
