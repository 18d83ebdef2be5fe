"""Performance suite: ``python -m benchmarks.perf`` (issue 7, item 5).

Four measurements, all in one process (the memory probe in child processes), every timing the
median of ``repeats`` runs, written to ``benchmarks/results/perf.json`` and the perf section of
``BENCHMARKS.md``:

(i) logging overhead: fit wall time with a :class:`~lightning_tda.GradientLogger` (sweep and
    in-flight) divided by the plain fit, on the digits MLP and the tiny GPT (runs interleaved);
(ii) featurization throughput (training examples per second per checkpoint) of our sweep versus the
    peers' featurization (dattri, kronfluence, captum, traker adapters of ``benchmarks/peers*.py``
    run on the last checkpoint with ONE query, so their time is almost all train featurization);
(iii) query throughput (rows x queries per second) of ``store.attribute`` with precomputed query
    vectors versus ``torch.mm`` on the same rows in memory; HDF5 read bandwidth of the ``train``
    dataset; peak RSS growth of scoring for stores of N and 4N rows;
(iv) stored bytes per example row for each storage mode.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.data import extract_batch_size
from torch import nn
from torch.utils.data import TensorDataset

from benchmarks.common import QUIET_CPU, RESULTS, fit_logged, update_benchmarks_md
from benchmarks.durability import fsync_cost
from benchmarks.tasks import Task, digits_task, gpt10m_task, tinygpt_task
from lightning_tda import AttributionStore, GradientLogger, IndexedDataset
from lightning_tda.store import schema
from lightning_tda.store.writer import StoreWriter

ROW_DATASETS = (
    schema.TRAIN,
    schema.TRAIN_PRECOND,
    schema.TRAIN_FACTORS,
    schema.TRAIN_PRECOND_FACTORS,
)
SWEEP_CONFIG = dict(rank=16, basis="pca", batch_size=None)
"""The quality suite's "kronecker r16 pca" (float16) logger at the library's own sweep batch size."""
IN_FLIGHT_CONFIG = dict(mode="in_flight", rank=16)  # in-flight takes no PCA basis


def median_time(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, list[float]]:
    """Median and all wall times (s) of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


# -- (i) logging overhead ------------------------------------------------------------------------


def _trainer(task: Task, callbacks: Sequence[pl.Callback], seed: int) -> tuple[pl.Trainer, dict]:
    trainer_kwargs, fit_kwargs = task.fit_setup(seed)
    trainer = pl.Trainer(
        callbacks=list(callbacks),
        **QUIET_CPU,
        **trainer_kwargs,
    )
    return trainer, fit_kwargs


class ExamplesSeen(pl.Callback):
    """Counts the training examples of every batch of a fit (for examples/s)."""

    def __init__(self) -> None:
        self.examples = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.examples += extract_batch_size(batch)


def plain_fit(task: Task, seed: int = 0) -> tuple[float, int]:
    """Wall seconds of the task's fit without any logger, and the examples it trained on."""
    pl.seed_everything(seed, verbose=False)
    model = task.factory()
    seen = ExamplesSeen()
    trainer, fit_kwargs = _trainer(task, [seen], seed)
    t0 = time.perf_counter()
    trainer.fit(model, **fit_kwargs)
    return time.perf_counter() - t0, seen.examples


def plain_fit_seconds(task: Task, seed: int = 0) -> float:
    """Wall seconds of the task's fit without any logger."""
    return plain_fit(task, seed)[0]


def in_flight_fit(
    task: Task, path: Path, seed: int = 0, **kwargs
) -> tuple[AttributionStore, float]:
    """Fit with an in-flight GradientLogger (every optimizer step); returns the store and seconds."""
    pl.seed_everything(seed, verbose=False)
    model = task.factory()
    logger = GradientLogger(path, overwrite=True, verbose=False, **(IN_FLIGHT_CONFIG | kwargs))
    trainer, fit_kwargs = _trainer(task, [logger], seed)
    t0 = time.perf_counter()
    trainer.fit(model, **fit_kwargs)
    seconds = time.perf_counter() - t0  # (before the store is opened and checked for reading)
    return AttributionStore(path), seconds


def logging_overhead(task: Task, workdir: Path, repeats: int = 3) -> dict:
    """Median fit seconds plain / sweep / in-flight (interleaved repeats) and the ratios to plain.

    Also returns the sweep store's logging seconds (the sum of its checkpoints' sweep times).
    """
    times: dict[str, list[float]] = {"plain": [], "sweep": [], "in_flight": []}
    sweep_log: list[float] = []
    sweep_path, flight_path = workdir / f"{task.name}-sweep.h5", workdir / f"{task.name}-flight.h5"
    plain_fit_seconds(task)  # warm-up (imports, data, allocator): not timed
    trained = 0
    for _ in range(repeats):
        secs, trained = plain_fit(task)
        times["plain"].append(secs)
        _, store, secs = fit_logged(task, sweep_path, **SWEEP_CONFIG)
        times["sweep"].append(secs)
        sweep_log.append(sum(float(store.checkpoint_attrs(s)["seconds"]) for s in store.steps))
        times["in_flight"].append(in_flight_fit(task, flight_path)[1])
    med = {k: statistics.median(v) for k, v in times.items()}
    sweep = AttributionStore(sweep_path)
    swept = sweep.num_examples * len(sweep.steps)
    return {
        "task": task.name,
        "describe": task.describe,
        "seconds": med,
        "all_seconds": times,
        **overhead_ratios(times),
        "sweep_logging_seconds": statistics.median(sweep_log),
        "all_sweep_logging_seconds": sweep_log,
        "sweep_checkpoints": len(sweep.steps),
        "num_examples": sweep.num_examples,
        "trained_examples": trained,
        "swept_examples": swept,
        **throughput_ratio(times["plain"], sweep_log, trained, swept),
        "sweep_store": str(sweep_path),
        "in_flight_store": str(flight_path),
    }


def throughput_ratio(
    plain: Sequence[float], sweep_log: Sequence[float], trained: int, swept: int
) -> dict:
    """Sweep featurization examples/s ÷ plain training examples/s, median of per-repeat ratios."""
    ratios = [(swept / s) / (trained / p) for s, p in zip(sweep_log, plain, strict=True)]
    return {
        "train_examples_per_s": trained / statistics.median(plain),
        "sweep_examples_per_s": swept / statistics.median(sweep_log),
        "ratio_sweep_throughput": statistics.median(ratios),
        "all_ratio_sweep_throughput": ratios,
    }


def overhead_ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """Median over the interleaved repeats of each repeat's logged ÷ plain fit time.

    A per-repeat ratio cancels load changes between repeats on a shared machine (a median of the
    times would mix a quiet repeat's numerator with a busy repeat's denominator).
    """
    return {
        f"ratio_{mode}": statistics.median(
            m / p for m, p in zip(times[mode], times["plain"], strict=True)
        )
        for mode in ("sweep", "in_flight")
    }


# -- (ii) featurization throughput ---------------------------------------------------------------


def our_featurization(overhead: dict) -> dict:
    """Our sweep's training examples per second per checkpoint (logging seconds of the sweep fit)."""
    rows = overhead["num_examples"] * overhead["sweep_checkpoints"]
    return {
        "library": "lightning_tda",
        "method": "sweep, kronecker r16 pca, float16",
        "examples": rows,
        "seconds": overhead["sweep_logging_seconds"],
        "examples_per_s": rows / overhead["sweep_logging_seconds"],
    }


DIGITS_PEERS = (
    "dattri_graddot",
    "dattri_trak",
    "kronfluence_ekfac",
    "captum_tracincp",
    "traker_trak",
)
LM_PEERS = ("dattri_graddot_lm", "dattri_trak_lm", "kronfluence_ekfac_lm", "captum_tracincp_lm")


def peer_featurization(
    task: Task,
    store: AttributionStore,
    names: Sequence[str],
    repeats: int = 3,
    num_train: int | None = None,
) -> list[dict]:
    """Examples/s of each peer: its adapter run on the store's LAST checkpoint with one query.

    With one query the peers' scoring is negligible, so ``N / seconds`` is their train
    featurization throughput per checkpoint (kronfluence: factor fitting + per-example gradients).
    ``num_train`` featurizes only the first rows (keeps slow LM peers within the time budget).
    """
    n = len(task.train) if num_train is None else min(num_train, len(task.train))
    step = store.steps[-1]
    if task.name == "tinygpt":
        from benchmarks.common import GPTLogits
        from benchmarks.peers_lm import LMTask, run_peers_lm

        model = GPTLogits(task)
        model.load_state_dict(store.state(step), strict=False)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        tokens = torch.stack([task.train[i].data[0] for i in range(n)])
        peer_task = LMTask(
            model_factory=lambda: GPTLogits(task),
            checkpoints=[state],
            lr_weights=[1.0],
            train_tokens=tokens,
            test_tokens=task.queries[0].data[0][None],
        )
        run = run_peers_lm
    else:
        from benchmarks.peers import ClassificationTask, run_peers

        x, y = task.train.dataset.tensors
        q = task.queries[0].data
        peer_task = ClassificationTask(
            model_factory=lambda: task.factory().net,
            checkpoints=[{k.removeprefix("net."): v for k, v in store.state(step).items()}],
            lr_weights=[1.0],
            x_train=x[:n],
            y_train=y[:n],
            x_test=q[0][None],
            y_test=q[1].reshape(1),
        )
        run = run_peers
    out = []
    for name in names:
        secs, err, res = [], None, None
        for _ in range(repeats):
            res = run(peer_task, [name])[0]
            if res.error:
                err = res.error.splitlines()[0][:200]
                break
            secs.append(res.seconds)
        row = {"name": name, "library": res.library, "method": res.method, "examples": n}
        if err:
            out.append(row | {"error": err})
            continue
        med = statistics.median(secs)
        out.append(row | {"seconds": med, "all_seconds": secs, "examples_per_s": n / med})
    return out


def quality_lds(task_name: str) -> dict[tuple[str, str], float]:
    """``{(library, method): LDS}`` of the quality suite (for "equal LDS" context), if present."""
    path = RESULTS / "quality.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    out: dict[tuple[str, str], float] = {}
    for r in rows:
        if r["task"] != task_name or r.get("lds") is None:
            continue
        if r["library"] == "lightning_tda":
            if r["config"] != "kronecker r16 pca":
                continue
            key = ("lightning_tda", "best method on the kronecker r16 pca store")
            out[key] = max(out.get(key, -1.0), r["lds"])
        else:
            out[(r["library"], r["method"])] = r["lds"]
    return out


# -- (iii) query throughput, read bandwidth, scoring memory --------------------------------------


class _Probe(pl.LightningModule):
    """One linear layer ``d_in -> d_out``: exact rows of width ``d_out * (d_in + 1)``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def per_example_loss(self, batch) -> torch.Tensor:
        _, (x, y) = batch
        return ((self.lin(x) - y) ** 2).sum(1)

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _template_attrs(workdir: Path, d_in: int, d_out: int) -> dict:
    """Root attributes of a real store of the one-layer probe (exact projection, one checkpoint)."""
    path = workdir / f"template-{d_in}x{d_out}.h5"
    if not path.exists():
        g = torch.Generator().manual_seed(0)
        data = IndexedDataset(
            TensorDataset(torch.randn(16, d_in, generator=g), torch.randn(16, d_out, generator=g))
        )
        logger = GradientLogger(
            path, attribution_data=data, projection="exact", save_state=False, verbose=False
        )
        trainer = pl.Trainer(
            max_epochs=1,
            callbacks=[logger],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        trainer.fit(_Probe(d_in, d_out), torch.utils.data.DataLoader(data, batch_size=8))
    with h5py.File(path, "r") as f:
        return {k: f.attrs[k] for k in f.attrs}


def synthetic_store(
    path: Path,
    num_rows: int,
    workdir: Path,
    width: int = 1024,
    dtype: str = "float16",
    seed: int = 0,
    block: int = 8192,
    rows_fn: Callable[[int, int], torch.Tensor] | None = None,
) -> AttributionStore:
    """A one-checkpoint store of ``num_rows`` rows of width ``width`` written with StoreWriter:
    ``rows_fn(start, stop)`` (``[stop - start, width]``), default standard-normal rows.

    ``width`` must be ``d_out * (d_in + 1)`` with ``d_out = 16`` (a one-layer exact layout).
    """
    if width % 16:
        raise ValueError(f"width must be a multiple of 16, got {width}")
    attrs = _template_attrs(workdir, width // 16 - 1, 16)
    drop = ("format", "schema_version", "storage_dtype", schema.INTEGRITY, "final_global_step")
    keep = {k: v for k, v in attrs.items() if k not in drop and not k.endswith("_final")}
    if path.exists():
        path.unlink()
    writer = StoreWriter(path, dtype)
    writer.write_run_metadata(keep)
    g = torch.Generator().manual_seed(seed)
    with writer.begin_checkpoint(1, num_rows, width) as cw:
        for start in range(0, num_rows, block):
            stop = min(num_rows, start + block)
            if rows_fn is None:
                rows = torch.randn(stop - start, width, generator=g)
            else:
                rows = rows_fn(start, stop)
            cw.write_rows(torch.arange(start, stop), rows, torch.zeros(stop - start))
        cw.commit(
            {
                "epoch": 0,
                "trigger": "synthetic",
                "lr_sum": [1.0],
                "lr_cumsum": [1.0],
                "steps_since_previous": 1,
                "seconds": 0.0,
            }
        )
    return AttributionStore(path)


def query_throughput(
    store: AttributionStore, num_queries: int = 100, repeats: int = 3, method: str = "graddot"
) -> dict:
    """Rows x queries / s of ``store.attribute`` (precomputed queries, top 10) vs ``torch.mm`` in memory."""
    step = store.steps[-1]
    g = torch.Generator().manual_seed(1)
    qv = torch.randn(num_queries, store.width, generator=g)
    rows = store.read(step, schema.TRAIN).float()  # the same rows, decoded, in memory
    n = rows.shape[0]

    def ours():
        return store.attribute({step: qv}, method=method, top_k=10)

    res = ours()  # warm-up, and a correctness check against the in-memory product
    ref = torch.mm(qv, rows.T).topk(10, dim=1)
    if not torch.allclose(res.scores, ref.values, rtol=1e-3, atol=1e-3):
        raise AssertionError("streamed top-10 scores disagree with the in-memory matmul")
    t_ours, all_ours = median_time(ours, repeats)
    t_mm, all_mm = median_time(lambda: torch.mm(qv, rows.T), repeats)
    return {
        "method": method,
        "rows": n,
        "queries": num_queries,
        "width": store.width,
        "dtype": store.storage_dtype,
        "seconds_store": t_ours,
        "seconds_matmul": t_mm,
        "all_seconds_store": all_ours,
        "all_seconds_matmul": all_mm,
        "store_rows_queries_per_s": n * num_queries / t_ours,
        "matmul_rows_queries_per_s": n * num_queries / t_mm,
        "ratio": t_mm / t_ours,
    }


def hdf5_read_bandwidth(store: AttributionStore, block_rows: int = 8192, repeats: int = 3) -> dict:
    """GB/s reading the last checkpoint's ``train`` dataset in blocks of ``block_rows`` (h5py)."""
    name = f"{schema.checkpoint_name(store.steps[-1])}/{schema.TRAIN}"
    with h5py.File(store.path, "r") as f:
        ds = f[name]
        nbytes = ds.size * ds.dtype.itemsize
        buf = np.empty((block_rows, ds.shape[1]), dtype=ds.dtype)

        def read_all():
            for s in range(0, ds.shape[0], block_rows):
                e = min(ds.shape[0], s + block_rows)
                ds.read_direct(buf, np.s_[s:e], np.s_[: e - s])

        read_all()  # warm the page cache: this is the bandwidth from cached pages through HDF5
        t, all_t = median_time(read_all, repeats)
    return {
        "bytes": int(nbytes),
        "block_rows": block_rows,
        "seconds": t,
        "all_seconds": all_t,
        "gb_per_s": nbytes / t / 1e9,
    }


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _rss_child(path: str, warm: str, num_queries: int, block_rows: int, conn) -> None:
    """In a fresh process: peak RSS growth (bytes) of one top-10 scoring pass over ``path``."""
    try:
        conn.send(_rss_measure(path, warm, num_queries, block_rows))
    except Exception as e:  # report the failure to the parent instead of leaving it waiting
        conn.send({"error": f"{type(e).__name__}: {e}"[:300]})
    conn.close()


def _rss_measure(path: str, warm: str, num_queries: int, block_rows: int) -> dict:
    torch.set_num_threads(1)
    for p in (warm, path):
        store = AttributionStore(p)
        step = store.steps[-1]
        qv = torch.randn(num_queries, store.width)
        if p == warm:  # initialise torch/h5py/the library on a tiny store first
            store.attribute({step: qv}, method="graddot", top_k=10, block_rows=block_rows)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        before, reset = _vm_kib("VmRSS"), True
    except OSError:
        before, reset = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False
    store.attribute({step: qv}, method="graddot", top_k=10, block_rows=block_rows)
    peak = _vm_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"growth_bytes": max(0, peak - before) * 1024, "peak_reset": reset}


def scoring_peak_rss(
    path: Path,
    warm: Path,
    num_queries: int = 100,
    block_rows: int = 4096,
    env: dict[str, str] | None = None,
) -> dict:
    """Peak RSS growth of ``store.attribute(..., top_k=10)`` measured in a spawned child process.

    ``env``: extra environment variables of the child (e.g. glibc's ``MALLOC_MMAP_THRESHOLD_``).
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=_rss_child, args=(str(path), str(warm), num_queries, block_rows, child)
    )
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    child.close()  # only the child holds its end now: recv() fails instead of hanging if it dies
    try:
        out = parent.recv()
    except EOFError:
        out = {"error": f"the measuring process died (exit code {proc.exitcode})"}
    proc.join()
    return out


def scoring_memory(
    workdir: Path, num_rows: int, factor: int = 4, width: int = 1024, block_rows: int = 4096
) -> dict:
    """Peak RSS growth of scoring stores of ``num_rows`` and ``factor * num_rows`` rows (float16)."""
    warm = workdir / "warm.h5"
    synthetic_store(warm, 1000, workdir, width)
    out = {"width": width, "dtype": "float16", "block_rows": block_rows, "queries": 100, "runs": []}
    for n in (num_rows, factor * num_rows):
        p = workdir / f"mem-{n}.h5"
        synthetic_store(p, n, workdir, width)
        r = scoring_peak_rss(p, warm, 100, block_rows)
        # the same with large allocations always mmapped (returned to the OS when freed): separates
        # the scorer's live memory from glibc keeping freed heap blocks
        r2 = scoring_peak_rss(p, warm, 100, block_rows, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
        row = {"rows": n, "store_bytes": p.stat().st_size, **r}
        row["growth_bytes_mmap_threshold_64k"] = r2.get("growth_bytes")
        out["runs"].append(row)
        p.unlink()
    errors = [r["error"] for r in out["runs"] if "error" in r]
    if errors:
        out["error"] = errors[0]
        return out
    small, large = (r["growth_bytes"] for r in out["runs"])
    out["ratio_large_small"] = large / max(1, small)
    s2, l2 = (r["growth_bytes_mmap_threshold_64k"] for r in out["runs"])
    if s2 is not None and l2 is not None:
        out["ratio_large_small_mmap_threshold_64k"] = l2 / max(1, s2)
    out["block_bytes_fp32"] = block_rows * width * 4
    return out


# -- (iv) bytes per example ----------------------------------------------------------------------


def row_bytes_per_example(store: AttributionStore) -> float:
    """Stored bytes of the gradient row datasets over all checkpoints, per stored row.

    For a sweep store this is the bytes per example per checkpoint; for an in-flight store, per
    (example, step) row. Losses, ids and model state are not counted.
    """
    total, rows = 0, 0
    with h5py.File(store.path, "r") as f:
        for step in store.steps:
            g = f[schema.checkpoint_name(step)]
            names = [k for k in ROW_DATASETS if k in g]
            total += sum(g[k].id.get_storage_size() for k in names)
            rows += g[names[0]].shape[0]
    return total / max(1, rows)


def expected_row_bytes(store: AttributionStore) -> float:
    """Width x itemsize of the stored rows (factor width under ``storage="lorif"``), plus precond."""
    item = {"float16": 2, "bfloat16": 2, "float32": 4}[store.storage_dtype]
    with h5py.File(store.path, "r") as f:
        g = f[schema.checkpoint_name(store.steps[-1])]
        return float(sum(g[k].shape[1] * item for k in ROW_DATASETS if k in g))


STORAGE_MODES: list[tuple[str, dict]] = [
    ("dense exact float32", dict(projection="exact", dtype="float32")),
    ("dense kronecker r16 float16", dict(rank=16, basis="pca")),
    ("dense kronecker r16 bfloat16", dict(rank=16, basis="pca", dtype="bfloat16")),
    ("dense kronecker r16 float32", dict(rank=16, basis="pca", dtype="float32")),
    ("lorif c=1 kronecker r16 float16", dict(rank=16, basis="pca", storage="lorif", lorif_rank=1)),
    ("lorif c=4 kronecker r16 float16", dict(rank=16, basis="pca", storage="lorif", lorif_rank=4)),
]


def storage_bytes(task: Task, workdir: Path) -> list[dict]:
    """Bytes per stored row of every storage mode of :data:`STORAGE_MODES` on ``task`` (one fit each)."""
    out = []
    for label, kwargs in STORAGE_MODES:
        path = workdir / f"bytes-{task.name}-{label.replace(' ', '_')}.h5"
        _, store, _ = fit_logged(task, path, **kwargs)
        out.append(_bytes_row(task.name, label, store))
        path.unlink()
    return out


def _bytes_row(task: str, label: str, store: AttributionStore) -> dict:
    return {
        "task": task,
        "mode": label,
        "width": store.width,
        "dtype": store.storage_dtype,
        "bytes_per_row": row_bytes_per_example(store),
        "expected_bytes_per_row": expected_row_bytes(store),
    }


# -- the suite -----------------------------------------------------------------------------------


def short_gpt(epochs: int) -> Task:
    """The tiny GPT task trained ``epochs`` epochs (sweeps every 2 epochs as in the quality suite)."""
    task = tinygpt_task()
    if epochs != task.recipe.max_epochs:
        task.recipe = replace(task.recipe, max_epochs=epochs)
        task.describe += f" (perf suite: {epochs} epochs)"
    return task


DEFAULT_TASKS = ("digits", "tinygpt", "gpt10m")
PEER_TASKS = ("digits", "tinygpt")  # the peers' adapters exist for these models
EXTRA_TASKS = {"gpt10m": gpt10m_task}  # >= 10 M parameters (GPT-2 6x384)


def perf_task(name: str, gpt_epochs: int) -> Task:
    """A task of (i) and (ii): ``digits``, ``tinygpt`` (``gpt_epochs`` epochs) or ``gpt10m``."""
    if name == "digits":
        return digits_task()
    if name == "tinygpt":
        return short_gpt(gpt_epochs)
    if name in EXTRA_TASKS:
        return EXTRA_TASKS[name]()
    raise ValueError(
        f"unknown perf task {name!r}; choose from digits, tinygpt, {', '.join(EXTRA_TASKS)}"
    )


def run_suite(
    workdir: Path,
    repeats: int = 3,
    gpt_epochs: int = 2,
    lm_peer_examples: int = 250,
    scoring_rows: int = 50_000,
    memory_rows: int = 20_000,
    save: Callable[[dict], None] | None = None,
    tasks: Sequence[str] = DEFAULT_TASKS,
) -> dict:
    """All four measurements, the quick ones first; ``save(results)`` runs after every stage.

    With ``tasks`` other than the default only (i) and (ii) run, on those tasks.
    """
    save = save or (lambda results: None)
    results: dict[str, Any] = {}
    if tuple(tasks) == DEFAULT_TASKS:
        _scoring_stages(results, workdir, repeats, scoring_rows, memory_rows, save)
    results["logging_overhead"], results["featurization"] = [], []
    for task in (perf_task(name, gpt_epochs) for name in tasks):
        print(f"(i) logging overhead on {task.name} ...", flush=True)
        ov = logging_overhead(task, workdir, repeats)
        results["logging_overhead"].append(ov)
        print(
            f"    plain {ov['seconds']['plain']:.1f}s sweep x{ov['ratio_sweep']:.3f} "
            f"in-flight x{ov['ratio_in_flight']:.3f}",
            flush=True,
        )
        results.setdefault("bytes_per_example", [])
        results["bytes_per_example"] += [
            _bytes_row(
                task.name, "sweep kronecker r16 pca float16", AttributionStore(ov["sweep_store"])
            ),
            _bytes_row(
                task.name,
                "in-flight kronecker r16 float16 (per step row)",
                AttributionStore(ov["in_flight_store"]),
            ),
        ]
        save(results)
        print(f"(ii) featurization on {task.name} ...", flush=True)
        results["featurization"].append(
            featurization(task, ov, repeats, lm_peer_examples if task.name == "tinygpt" else None)
        )
        save(results)
    return results


def _scoring_stages(
    results: dict,
    workdir: Path,
    repeats: int,
    scoring_rows: int,
    memory_rows: int,
    save: Callable[[dict], None],
) -> None:
    """(iii) query throughput, read bandwidth and scoring memory; (iv) bytes per example."""
    print("(iii) query throughput, read bandwidth, memory ...", flush=True)
    store = synthetic_store(workdir / "scoring.h5", scoring_rows, workdir, dtype="float32")
    results["query_throughput"] = query_throughput(store, 100, repeats)
    results["hdf5_read"] = hdf5_read_bandwidth(store, repeats=repeats)
    (workdir / "scoring.h5").unlink()
    print(f"    {results['query_throughput']['ratio']:.3f} of matmul", flush=True)
    results["scoring_memory"] = scoring_memory(workdir, memory_rows)
    print(f"    memory {results['scoring_memory']}", flush=True)
    save(results)

    print("(iv) bytes per example ...", flush=True)
    results["bytes_per_example"] = storage_bytes(digits_task(), workdir)
    save(results)

    print("(v) fsync cost of durable in-flight commits ...", flush=True)
    results["fsync_cost"] = fsync_cost(workdir, steps=16, repeats=max(repeats, 5))  # flush_every=16
    save(results)


def featurization(task: Task, ov: dict, repeats: int, num_train: int | None) -> dict:
    """Our sweep's examples/s next to every peer's on the same model (checkpoint of ``ov``'s store)."""
    sweep = AttributionStore(ov["sweep_store"])
    names = LM_PEERS if task.name == "tinygpt" else DIGITS_PEERS
    # the peers' adapters are built for the digits MLP and the tiny GPT: none on the other tasks
    peers = (
        peer_featurization(task, sweep, names, repeats, num_train=num_train)
        if task.name in PEER_TASKS
        else []
    )
    lds = quality_lds(task.name)
    ours = our_featurization(ov)
    ours["lds"] = lds.get(("lightning_tda", "best method on the kronecker r16 pca store"))
    for p in peers:
        p["lds"] = lds.get((p["library"], p["method"]))
        print(f"    {p['library']} {p['method']}: {p.get('examples_per_s', p.get('error'))}")
    print(f"    ours {ours['examples_per_s']:.0f} ex/s", flush=True)
    ok = [p for p in peers if "examples_per_s" in p]
    fastest = max(ok, key=lambda p: p["examples_per_s"]) if ok else None
    return {
        "task": task.name,
        "ours": ours,
        "peers": peers,
        "fastest_peer": fastest and f"{fastest['library']} {fastest['method']}",
        "ratio_vs_fastest": fastest and ours["examples_per_s"] / fastest["examples_per_s"],
    }


IN_FLIGHT_MAX, SWEEP_MIN, SCORING_MIN = 1.10, 0.5, 0.8
OVERHEAD_TASKS = ("tinygpt", "gpt10m")  # the targets are on these two
TARGETS = {
    **{
        f"in_flight_overhead_{t}": f"in-flight fit ≤ {IN_FLIGHT_MAX:.2f}× the plain fit ({t})"
        for t in OVERHEAD_TASKS
    },
    **{
        f"sweep_throughput_{t}": f"sweep featurization ≥ {SWEEP_MIN}× the plain training examples/s ({t})"
        for t in OVERHEAD_TASKS
    },
    "scoring": f"scoring ≥ {SCORING_MIN}× the raw in-memory matmul throughput",
    "featurization": "sweep featurization ≥ 3× the fastest peer's examples/s",
    "memory": "scoring memory bounded independent of N (4N rows ≤ 1.25× the growth of N rows)",
}


def targets(results: dict) -> dict[str, dict]:
    """Each measured target's value and whether it is met (targets not measured yet are left out)."""
    out = {}
    for o in results.get("logging_overhead", []):
        if o["task"] in OVERHEAD_TASKS:
            r = o["ratio_in_flight"]
            out[f"in_flight_overhead_{o['task']}"] = {"value": r, "met": r <= IN_FLIGHT_MAX}
            if "ratio_sweep_throughput" in o:
                r = o["ratio_sweep_throughput"]
                out[f"sweep_throughput_{o['task']}"] = {"value": r, "met": r >= SWEEP_MIN}
    feats = [
        f["ratio_vs_fastest"] for f in results.get("featurization", []) if f["ratio_vs_fastest"]
    ]
    if feats:
        out["featurization"] = {"value": min(feats), "met": min(feats) >= 3.0}
    if "query_throughput" in results:
        r = results["query_throughput"]["ratio"]
        out["scoring"] = {"value": r, "met": r >= SCORING_MIN}
    mem = results.get("scoring_memory", {})
    if "ratio_large_small" in mem:
        out["memory"] = {"value": mem["ratio_large_small"], "met": mem["ratio_large_small"] <= 1.25}
    return out


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def write_markdown(results: dict, command: str) -> str:
    """The perf section of BENCHMARKS.md."""
    m = results["machine"]
    lines = [
        "## Performance",
        "",
        f"Produced by `{command}` on {m['date']} ({m['machine']}, {m['cpus']} CPUs, "
        f"{m['torch_threads']} torch threads, torch {m['torch']}; absolute times vary between runs "
        "and with other load on the machine — every figure is a ratio of timings taken in the same "
        f"run, each the median of {results['repeats']} repeats).",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for key, t in results["targets"].items():
        lines.append(f"| {TARGETS[key]} | {t['value']:.3f} | {'met' if t['met'] else 'not met'} |")
    missing = [k for k in TARGETS if k not in results["targets"]]
    if missing:
        lines += [f"| {TARGETS[k]} | not measured (the run stopped early) | |" for k in missing]
    lines += ["", "### Logging overhead (fit wall time with the logger ÷ without)", ""]
    lines += [
        "| task | plain fit s | sweep s (ratio) | in-flight s (ratio) | per-repeat ratios sweep; in-flight |"
        " train ex/s | sweep ex/s (ratio) |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in results.get("logging_overhead", []):
        s, t = o["seconds"], o["all_seconds"]
        thr = (
            f"{o['train_examples_per_s']:,.0f} | {o['sweep_examples_per_s']:,.0f} "
            f"({o['ratio_sweep_throughput']:.2f}×)"
            if "ratio_sweep_throughput" in o
            else "n/a | n/a"
        )
        lines.append(
            f"| {o['task']} | {s['plain']:.1f} | {s['sweep']:.1f} ({o['ratio_sweep']:.2f}×) | "
            f"{s['in_flight']:.1f} ({o['ratio_in_flight']:.2f}×) | "
            + ", ".join(f"{a / p:.2f}" for a, p in zip(t["sweep"], t["plain"], strict=True))
            + "; "
            + ", ".join(f"{a / p:.2f}" for a, p in zip(t["in_flight"], t["plain"], strict=True))
            + f" | {thr} |"
        )
    lines += [
        "",
        "Seconds are medians; a ratio is the median over the interleaved repeats of that "
        "repeat's logged ÷ plain time (cancels load changes between repeats). "
        "Sweep: the quality suite's `kronecker r16 pca` float16 logger at its schedule (digits every 4 "
        "of 20 epochs, tiny GPT and gpt10m every 2 epochs) and the library's sweep batch size (64); "
        'in-flight: `mode="in_flight", rank=16`, every optimizer step, at its defaults '
        '(`background="auto"`: written between steps on CPU, `flush_every=16`, '
        '`save_state="auto"`). Train ex/s: examples the plain fit trained on ÷ its seconds; sweep '
        "ex/s: N × checkpoints ÷ the seconds the sweep's checkpoints took (basis, rows, curvature, "
        "optimizer state, state, HDF5), the ratio again a median of per-repeat ratios. Tasks: "
        + "; ".join(f"{o['task']}: {o['describe']}" for o in results.get("logging_overhead", []))
        + ".",
        "",
        "### Featurization throughput (training examples per second per checkpoint)",
        "",
        "Ours: N × checkpoints ÷ the sweep's logging seconds. Peers: their adapters "
        "(`benchmarks/peers*.py`) run on the last checkpoint with a single query, so the time is "
        "almost entirely train featurization (kronfluence: factor fitting plus per-example "
        "gradients). LDS is from the quality suite (`benchmarks/results/quality.json`, full settings, "
        "all queries); the target is checked against the fastest peer whatever its LDS.",
        "",
        "| task | library | method | examples | examples/s | LDS (quality) |",
        "|---|---|---|---|---|---|",
    ]
    for f in results.get("featurization", []):
        for p in [f["ours"], *f["peers"]]:
            eps = (
                f"{p['examples_per_s']:,.0f}" if "examples_per_s" in p else f"failed: {p['error']}"
            )
            lds = f"{p['lds']:.3f}" if p.get("lds") is not None else "n/a"
            lines.append(
                f"| {f['task']} | {p['library']} | {p['method']} | {p['examples']} | {eps} | {lds} |"
            )
        if f["ratio_vs_fastest"]:
            lines.append(
                f"| {f['task']} | | **ours ÷ fastest peer ({f['fastest_peer']})** | | "
                f"**{f['ratio_vs_fastest']:.2f}×** | |"
            )
    q, h, mem = results["query_throughput"], results["hdf5_read"], results["scoring_memory"]
    if "error" in mem:
        mem_text = f"Scoring memory: the measurement failed ({mem['error']})."
    else:
        mem_text = (
            f"Re-measured by `{mem['command']}` on {mem['date']}. " if "command" in mem else ""
        ) + (
            f"Peak RSS growth of one top-10 scoring pass (fresh process, D = {mem['width']} float16, "
            f"block_rows = {mem['block_rows']}, {mem['queries']} queries): "
            + ", ".join(
                f"N = {r['rows']:,} ({_mib(r['store_bytes'])} on disk): {_mib(r['growth_bytes'])}"
                for r in mem["runs"]
            )
            + f"; 4N ÷ N = {mem['ratio_large_small']:.2f}. The bound is set by `block_rows` "
            "(default: about 256 MB of decoded float32 per block), not by N."
        )
        if "ratio_large_small_mmap_threshold_64k" in mem:
            mem_text += (
                " With glibc's `MALLOC_MMAP_THRESHOLD_=65536` (freed large blocks go back to the "
                "OS instead of staying in the heap): "
                + ", ".join(
                    f"N = {r['rows']:,}: {_mib(r['growth_bytes_mmap_threshold_64k'])}"
                    for r in mem["runs"]
                )
                + f"; 4N ÷ N = {mem['ratio_large_small_mmap_threshold_64k']:.2f} — any growth left "
                "with the default allocator is freed heap that glibc keeps, not live scorer memory."
            )
    lines += _fsync_lines(results.get("fsync_cost"))
    lines += [
        "",
        "### Query throughput, HDF5 bandwidth, scoring memory",
        "",
        f"Synthetic store (StoreWriter) of {q['rows']:,} rows × D = {q['width']} {q['dtype']}, "
        f"{q['queries']} precomputed query vectors: `store.attribute({{step: Tensor[Q, D]}}, "
        f'method="{q["method"]}", top_k=10)` {q["store_rows_queries_per_s"] / 1e6:,.1f} M rows·queries/s '
        f"vs `torch.mm` on the same rows in memory {q['matmul_rows_queries_per_s'] / 1e6:,.1f} M/s: "
        f"**{q['ratio']:.2f}×**. HDF5 read of the `train` dataset in blocks of {h['block_rows']} rows "
        f"(page cache warm): **{h['gb_per_s']:.2f} GB/s** ({_mib(h['bytes'])}).",
        "",
        mem_text,
        "",
        "### Stored bytes per example row",
        "",
        "| task | storage mode | D | dtype | bytes / row | width × itemsize |",
        "|---|---|---|---|---|---|",
    ]
    for b in results.get("bytes_per_example", []):
        lines.append(
            f"| {b['task']} | {b['mode']} | {b['width']:,} | {b['dtype']} | "
            f"{b['bytes_per_row']:,.1f} | {b['expected_bytes_per_row']:,.0f} |"
        )
    lines += [
        "",
        "A sweep row is one example at one checkpoint; an in-flight row is one example at one "
        "optimizer step (so an in-flight run stores epochs × N rows per logged epoch span). "
        "LoRIF stores c·(k_out + k_in) factor values per layer instead of k_out·k_in.",
        "",
    ]
    return "\n".join(lines)


def _fsync_lines(f: dict | None) -> list[str]:
    """The durability row of the perf section (``benchmarks.durability.fsync_cost``)."""
    if not f:
        return []
    return [
        "",
        "### Durable commits (fsync cost)",
        "",
        "| commit of | fsyncs | durable ms | without fsync ms | fsync ms | ratio | filesystem |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| {f['steps_per_commit']} in-flight steps × {f['rows_per_step']} rows × D = {f['width']} "
        f"({f['mb_per_commit']:.1f} MB) | {f['fsyncs_per_commit']:.0f} | {f['durable_ms_per_commit']:.1f} "
        f"| {f['nondurable_ms_per_commit']:.1f} | {f['fsync_ms_per_commit']:.1f} | "
        f"{f['ratio_durable']:.2f}× | {f['filesystem']} |",
        "",
        "Made by `python -m benchmarks.durability` inside the suite: `write_batch_steps` with "
        "`journal.DURABLE` True (journal, store and directory fsync'ed per commit) vs False, "
        f"interleaved, median of {f['repeats']} repeats. Per logged step that is "
        f"{f['fsync_ms_per_commit'] / f['steps_per_commit']:.2f} ms of fsync at this flush size.",
    ]


def render(path: Path) -> dict:
    """Recompute the overhead ratios and targets of a saved run and rewrite its BENCHMARKS.md block."""
    results = json.loads(path.read_text())
    for o in results.get("logging_overhead", []):
        o.update(overhead_ratios(o["all_seconds"]))
    results["targets"] = targets(results)
    path.write_text(json.dumps(results, indent=1, default=float))
    command = results.get("command", "python -m benchmarks.perf")
    update_benchmarks_md(write_markdown(results, command), marker="perf")
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m benchmarks.perf``: run the suite, write perf.json and the BENCHMARKS.md section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpt-epochs", type=int, default=2, help="tiny GPT epochs for (i) and (ii)")
    ap.add_argument("--lm-peer-examples", type=int, default=250)
    ap.add_argument("--scoring-rows", type=int, default=50_000)
    ap.add_argument("--memory-rows", type=int, default=20_000)
    ap.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help="comma-separated tasks of (i) and (ii): digits, tinygpt, gpt10m; other than the default, "
        "only (i) and (ii) run and the results go to benchmarks/results/perf_<tasks>.json "
        "(perf.json and BENCHMARKS.md are left as they are)",
    )
    ap.add_argument(
        "--render",
        action="store_true",
        help="only recompute ratios/targets from benchmarks/results/perf.json and rewrite the section",
    )
    ap.add_argument(
        "--memory-only",
        action="store_true",
        help="re-measure only the scoring memory into benchmarks/results/perf.json and re-render",
    )
    args = ap.parse_args(argv)
    if args.memory_only:
        warnings.filterwarnings("ignore")
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        results = json.loads((RESULTS / "perf.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            results["scoring_memory"] = scoring_memory(Path(tmp), args.memory_rows)
        results["scoring_memory"]["command"] = "python -m benchmarks.perf --memory-only"
        results["scoring_memory"]["date"] = datetime.now(timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        )
        (RESULTS / "perf.json").write_text(json.dumps(results, indent=1, default=float))
    if args.render or args.memory_only:
        return render(RESULTS / "perf.json")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    command = "python -m benchmarks.perf"
    defaults = ap.parse_args([])
    changed = [
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if getattr(defaults, k) != v and k not in ("render", "memory_only")
    ]
    command += "".join(" " + c for c in changed)
    tasks = tuple(args.tasks.split(","))
    out = RESULTS / ("perf.json" if tasks == DEFAULT_TASKS else f"perf_{'_'.join(tasks)}.json")

    def save(results: dict) -> None:
        results["repeats"] = args.repeats
        results["command"] = command
        results["targets"] = targets(results)
        results["machine"] = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        }
        results["suite_seconds"] = time.perf_counter() - t0
        RESULTS.mkdir(exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=float))
        if tasks == DEFAULT_TASKS:
            update_benchmarks_md(write_markdown(results, command), marker="perf")

    with tempfile.TemporaryDirectory() as tmp:
        results = run_suite(
            Path(tmp),
            args.repeats,
            args.gpt_epochs,
            args.lm_peer_examples,
            args.scoring_rows,
            args.memory_rows,
            save=save,
            tasks=tasks,
        )
    save(results)
    print(f"wrote {out} ({results['suite_seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
