"""Sweep featurization throughput versus plain training throughput (issue 15, "sweeps at training speed").

``python -m benchmarks.sweep_throughput --task tinygpt|gpt10m --config default|quality [--repeats 3]``

Per repeat, interleaved in one process: the task's plain fit and the same fit with a sweep
``GradientLogger`` at the task's schedule. Two throughputs, both in examples per second:

* plain training: ``N x epochs / plain fit seconds`` (the whole fit, Lightning's loop included);
* sweep featurization: ``N x checkpoints / seconds the sweep's logging adds``, those seconds being
  the store's per-checkpoint ``seconds`` attributes (basis fitting, scales, every batch, curvature,
  optimizer state, trainable state, HDF5 writes and commit) plus the logger's setup-time first-batch
  check; the fit-time difference (logged fit - plain fit) is reported beside it, and the same ratio in
  process CPU seconds (``ratio_cpu``), which other load on a shared machine barely moves.

The sweep's seconds are broken down by wrapping the library's functions at run time (nothing in
``lightning_tda`` is edited): ``basis`` (PCA fit), ``featurize`` (forward + backward + projections of
every batch, incl. the loss and finiteness checks), ``curvature`` (K-FAC means), ``optimizer_state``
(Adam scales and factored moments), ``state`` (trainable-state dict), ``hdf5`` (rows, arrays, commit,
checkpoint open) and ``check`` (first-batch check); timers are inclusive and nest-free by design.

Configs: ``default`` is what ``GradientLogger(path, attribution_data=train)`` gives in sweep mode
(preset "accurate": rank 32, PCA basis, float32; the sweep's own batch size rule); ``quality`` is
the quality/perf suites' ``kronecker r16 pca`` float16 logger at batch 250 (``benchmarks.common.fit_logged``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from benchmarks.common import QUIET_CPU, RESULTS, fit_logged
from benchmarks.tasks import Task

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {"batch_size": None},  # the library's own sweep batch size
    "quality": {"rank": 16, "basis": "pca", "batch_size": 250},
    "perf": {
        "rank": 16,
        "basis": "pca",
        "batch_size": None,
    },  # the perf suite's (perf.SWEEP_CONFIG)
}
"""GradientLogger keywords of each measured config (beyond path, attribution_data and schedule)."""

TARGET = 0.5  # sweep featurization examples/s >= 0.5 x plain training examples/s


class _Timers:
    """Seconds per phase of the wrapped library functions (outermost call of a phase only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu_seconds: dict[str, float] = defaultdict(float)  # process CPU time (all threads)
        self._depth: dict[str, int] = defaultdict(int)
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attr: str, phase: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth[phase]:
                return fn(*args, **kwargs)
            self._depth[phase] += 1
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - t0
                self.cpu_seconds[phase] += time.process_time() - c0
                self._depth[phase] -= 1

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, fn))

    def restore(self) -> None:
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo.clear()


@contextlib.contextmanager
def instrumented() -> Iterator[_Timers]:
    """Wrap the sweep's phases (see the module docstring); unwrapped on exit."""
    from lightning_tda.callbacks import context, sweep
    from lightning_tda.capture import featurize
    from lightning_tda.store import writer

    t = _Timers()
    t.wrap(sweep, "fit_pca_bases", "basis")
    t.wrap(context.FitContext, "featurize", "featurize")
    t.wrap(featurize.Featurizer, "take_covariances", "curvature")
    t.wrap(sweep, "adam_scales", "optimizer_state")
    t.wrap(sweep, "factored_second_moments", "optimizer_state")
    t.wrap(sweep, "trainable_state", "state")
    for name in ("write_rows", "write_arrays", "write_queries", "commit", "_setup"):
        t.wrap(writer.CheckpointWriter, name, "hdf5")
    t.wrap(writer.StoreWriter, "write_bases", "hdf5")
    t.wrap(sweep.SweepLogging, "check", "check")
    t.wrap(sweep.SweepLogging, "_log_single", "checkpoint_total")
    try:
        yield t
    finally:
        t.restore()


def _plain_fit(task: Task, seed: int = 0) -> tuple[float, float]:
    """Wall and process-CPU seconds of the task's fit without a logger."""
    pl.seed_everything(seed, verbose=False)
    model = task.factory()
    trainer_kwargs, fit_kwargs = task.fit_setup(seed)
    trainer = pl.Trainer(**QUIET_CPU, **trainer_kwargs)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(model, **fit_kwargs)
    return time.perf_counter() - t0, time.process_time() - c0


def sweep_throughput(task: Task, config: dict, repeats: int = 3) -> dict:
    """Interleaved plain and sweep-logged fits of ``task``; medians of per-repeat throughputs.

    Returns ``plain_examples_per_s``, ``sweep_examples_per_s`` (store seconds + first-batch check),
    ``ratio`` (their per-repeat ratio's median), ``ratio_fit_difference`` (the same with the fit-time
    difference as the sweep's seconds), ``ratio_cpu`` (the same with process CPU seconds of the plain
    fit and of the sweep's checkpoints + check: robust to other processes on a shared machine), ``breakdown_s`` (median seconds per phase, summed over the
    checkpoints of one fit) and the raw per-repeat numbers.
    """
    n = len(task.train)
    epochs = task.recipe.max_epochs
    rec: dict[str, list] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{task.name}-sweep.h5"
        _plain_fit(task)  # warm-up: imports, data, allocator
        for _ in range(repeats):
            plain, plain_cpu = _plain_fit(task)
            with instrumented() as timers:
                _, store, fit = fit_logged(task, path, **config)
            ckpts = len(store.steps)
            stored = sum(float(store.checkpoint_attrs(s)["seconds"]) for s in store.steps)
            logged = stored + timers.seconds.get("check", 0.0)
            rec["plain_s"].append(plain)
            rec["sweep_fit_s"].append(fit)
            rec["sweep_logging_s"].append(logged)
            rec["checkpoints"].append(ckpts)
            rec["plain_eps"].append(n * epochs / plain)
            rec["sweep_eps"].append(n * ckpts / logged)
            rec["sweep_eps_fitdiff"].append(n * ckpts / max(fit - plain, 1e-9))
            rec["breakdown"].append(dict(timers.seconds))
            cpu = timers.cpu_seconds
            logged_cpu = cpu.get("checkpoint_total", 0.0) + cpu.get("check", 0.0)
            rec["ratio_cpu"].append((n * ckpts / logged_cpu) / (n * epochs / plain_cpu))
        store_info = {"dtype": store.storage_dtype if hasattr(store, "storage_dtype") else None}
    ratios = [s / p for s, p in zip(rec["sweep_eps"], rec["plain_eps"], strict=True)]
    ratios_fd = [s / p for s, p in zip(rec["sweep_eps_fitdiff"], rec["plain_eps"], strict=True)]
    phases = sorted({k for b in rec["breakdown"] for k in b})
    breakdown = {k: statistics.median(b.get(k, 0.0) for b in rec["breakdown"]) for k in phases}
    return {
        "task": task.name,
        "config": config,
        "num_examples": n,
        "epochs": epochs,
        "checkpoints": rec["checkpoints"][-1],
        "plain_examples_per_s": statistics.median(rec["plain_eps"]),
        "sweep_examples_per_s": statistics.median(rec["sweep_eps"]),
        "ratio": statistics.median(ratios),
        "ratio_fit_difference": statistics.median(ratios_fd),
        "ratio_cpu": statistics.median(rec["ratio_cpu"]),
        "target": TARGET,
        "met": statistics.median(ratios) >= TARGET,
        "breakdown_s": breakdown,
        "per_repeat": {k: v for k, v in rec.items() if k != "breakdown"} | {"ratios": ratios},
        **store_info,
    }


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.perf import perf_task

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--task", default="tinygpt", help="tinygpt or gpt10m (benchmarks.perf.perf_task)"
    )
    p.add_argument("--config", default="default", choices=sorted(CONFIGS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpt-epochs", type=int, default=2, help="tinygpt epochs (the perf suite's)")
    p.add_argument("--out", default=None, help="JSON output (default: print only)")
    a = p.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    res = sweep_throughput(perf_task(a.task, a.gpt_epochs), CONFIGS[a.config], a.repeats)
    res["config_name"] = a.config
    text = json.dumps(res, indent=1, default=str)
    print(text)
    if a.out:
        Path(a.out if "/" in a.out else RESULTS / a.out).write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
