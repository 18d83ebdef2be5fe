"""What durable commits cost the in-flight store write path: ``python -m benchmarks.durability``.

One process, a fresh store per (repeat, mode), the two modes interleaved (their order alternating
between repeats): ``flushes`` calls of :func:`~lightning_tda.store.batches.write_batch_steps`, each
one commit of ``steps`` logged steps of ``rows`` x ``width`` projected rows (float16 storage, sorted
distinct example ids, no trainable state or queries), with ``journal.DURABLE`` True (journal, store
and directory fsync'ed at each commit) and False (no fsync: atomic against a killed process only).
Every call is timed; a mode's figure is the median call of a repeat, the ratio the median over repeats
of each repeat's durable / non-durable (load changes between repeats cancel). The fsyncs are counted by
wrapping :func:`journal.sync` and :func:`journal.sync_dir` (what the commit calls).

The store is written under ``workdir`` (default: a temporary directory), so the figures are those of
that filesystem (named in the result): a tmpfs makes fsync free.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lightning_tda.capture.layers import LayerSpec
from lightning_tda.capture.projection import ProjectionConfig
from lightning_tda.store import journal, schema
from lightning_tda.store.batches import BatchStep, write_batch_steps
from lightning_tda.store.writer import StoreWriter


def filesystem(path: Path) -> str:
    """``"<type> (<mount point>)"`` of the filesystem holding ``path`` (from /proc/mounts)."""
    best = ("?", "")
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "?"
    real = str(path.resolve())
    for line in lines:
        parts = line.split()
        if len(parts) < 3 or len(parts[1]) < len(best[1]):
            continue
        if real == parts[1] or real.startswith(parts[1].rstrip("/") + "/"):
            best = (parts[2], parts[1])
    return f"{best[0]} ({best[1]})"


def _new_store(path: Path, width: int) -> None:
    """A store with one exact layer of ``width`` columns and the in-flight schema, no checkpoints."""
    side = int(width**0.5)
    layer = LayerSpec(
        "l", "linear", side, width // side, False, side, width // side, 0, ("l.weight",)
    )
    StoreWriter(path).write_run_metadata(
        {
            "layers": schema.to_json([layer.to_dict()]),
            "projection": schema.to_json(ProjectionConfig(kind="exact").to_dict()),
            "layer_groups": "{}",
        },
        schema_version=schema.IN_FLIGHT_SCHEMA_VERSION,
    )


def _steps(first: int, steps: int, rows: int, width: int, examples: int) -> list[BatchStep]:
    """``steps`` logged steps from global step ``first``: ``rows`` sorted distinct ids, random rows."""
    g = torch.Generator().manual_seed(first)
    out = []
    for t in range(first, first + steps):
        ids = torch.sort(torch.randperm(examples, generator=g)[:rows]).values
        attrs = {"lr_sum": [1e-3], "lr_cumsum": [1e-3 * (t + 1)], "epoch": 0}
        out.append(BatchStep(t, ids, torch.randn(rows, width, generator=g), attrs))
    return out


class _Counted:
    """Counts calls of ``journal.sync`` and ``journal.sync_dir`` while installed."""

    def __init__(self) -> None:
        self.calls = 0
        self._real = (journal.sync, journal.sync_dir)

    def __enter__(self) -> _Counted:
        sync, sync_dir = self._real

        def counted(real):
            def call(*a, **kw):
                self.calls += 1
                return real(*a, **kw)

            return call

        journal.sync, journal.sync_dir = counted(sync), counted(sync_dir)
        return self

    def __exit__(self, *exc) -> None:
        journal.sync, journal.sync_dir = self._real


def _one_store(
    where: Path, durable: bool, flushes: int, steps: int, rows: int, width: int
) -> tuple[list[float], int]:
    """Seconds of each write_batch_steps call on a fresh store, and the fsyncs they made."""
    path = where / f"durable{int(durable)}.h5"
    before = journal.DURABLE
    journal.DURABLE = durable
    try:
        _new_store(path, width)
        batches = [_steps(i * steps, steps, rows, width, 16 * rows) for i in range(flushes)]
        times = []
        with _Counted() as fsyncs:
            for batch in batches:
                t0 = time.perf_counter()
                write_batch_steps(path, "float16", batch)
                times.append(time.perf_counter() - t0)
        return times, fsyncs.calls
    finally:
        journal.DURABLE = before
        for p in (path, journal.journal_path(path)):
            p.unlink(missing_ok=True)


def fsync_cost(
    workdir: str | os.PathLike | None = None,
    flushes: int = 12,
    steps: int = 8,
    rows: int = 32,
    width: int = 4096,
    repeats: int = 5,
) -> dict[str, Any]:
    """Milliseconds per in-flight commit with and without fsync, interleaved in this process.

    Returns:
        ``durable_ms_per_commit``, ``nondurable_ms_per_commit`` (medians over repeats of each repeat's
        median call), ``fsync_ms_per_commit`` (their difference), ``ratio_durable`` (median over
        repeats of durable / non-durable), ``fsyncs_per_commit`` (durable; ``nondurable_fsyncs_per_commit``
        is 0), ``mb_per_commit`` (row bytes, float16), ``steps_per_commit``, ``rows_per_step``,
        ``width``, ``flushes``, ``repeats``, ``filesystem``, and the per-repeat lists
        ``durable_ms``, ``nondurable_ms``.
    """
    ms: dict[bool, list[float]] = {True: [], False: []}
    fsyncs: dict[bool, int] = {True: 0, False: 0}
    with tempfile.TemporaryDirectory(dir=workdir, prefix="durability-") as tmp:
        for r in range(repeats):
            for durable in (True, False) if r % 2 == 0 else (False, True):
                times, calls = _one_store(Path(tmp), durable, flushes, steps, rows, width)
                ms[durable].append(1e3 * statistics.median(times))
                fsyncs[durable] += calls
        fs = filesystem(Path(tmp))
    commits = flushes * repeats
    durable_ms, plain_ms = statistics.median(ms[True]), statistics.median(ms[False])
    return {
        "durable_ms_per_commit": durable_ms,
        "nondurable_ms_per_commit": plain_ms,
        "fsync_ms_per_commit": durable_ms - plain_ms,
        "ratio_durable": statistics.median(a / b for a, b in zip(ms[True], ms[False], strict=True)),
        "fsyncs_per_commit": fsyncs[True] / commits,
        "nondurable_fsyncs_per_commit": fsyncs[False] / commits,
        "mb_per_commit": steps * rows * width * 2 / 1e6,
        "steps_per_commit": steps,
        "rows_per_step": rows,
        "width": width,
        "flushes": flushes,
        "repeats": repeats,
        "filesystem": fs,
        "durable_ms": ms[True],
        "nondurable_ms": ms[False],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None, help="directory on the filesystem to measure")
    p.add_argument("--flushes", type=int, default=12)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    out = fsync_cost(a.workdir, a.flushes, a.steps, a.rows, a.width, a.repeats)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
