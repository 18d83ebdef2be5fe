"""``lightning-tda report``: the command line of :func:`lightning_tda.report.write_report`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from lightning_tda.capture.task import ClassificationTask, Task
from lightning_tda.methods.auto import AUTO
from lightning_tda.report import write_report


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``report`` on a subparsers object (``lightning-tda report --config X.yaml``)."""
    from lightning_tda.methods import METHODS

    p = subparsers.add_parser(
        "report",
        help="write a self-contained HTML attribution report of a recipe run",
        description="Attribute query examples of a `lightning-tda fit --config X.yaml` run and "
        "write one HTML page: store summary, top proponents/opponents per query, score "
        "histograms and self-influence outliers.",
    )
    p.add_argument("--config", required=True, help="the LightningCLI config that trained the run")
    p.add_argument(
        "--store", default=None, help="store path (default: the config's GradientLogger path)"
    )
    p.add_argument("--method", default=AUTO, choices=[AUTO, *sorted(METHODS)])
    p.add_argument("--top-k", type=int, default=5, help="proponents and opponents per query")
    p.add_argument(
        "--queries",
        type=int,
        default=8,
        help="query examples: the first N of the datamodule's val (else test, else train) set",
    )
    p.add_argument("--outliers", type=int, default=10, help="self-influence outliers listed")
    p.add_argument(
        "--self-influence",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the self-influence section",
    )
    p.add_argument("--out", default="report.html", help="output HTML file")
    p.set_defaults(func=main_report)
    return p


def _query_set(dm: Any, train: Dataset) -> tuple[Dataset, str]:
    """The datamodule's val set, else its test set, else the training set, with its name."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    if dm is not None:
        for stage, hook, name in (
            ("validate", "val_dataloader", "validation"),
            ("test", "test_dataloader", "test"),
        ):
            try:
                dm.setup(stage)
                loader = getattr(dm, hook)()
            except (MisconfigurationException, AttributeError):
                continue
            if isinstance(loader, list | tuple):
                loader = loader[0] if loader else None
            ds = getattr(loader, "dataset", None)
            if ds is not None and hasattr(ds, "__len__") and len(ds) > 0:
                return ds, name
    return train, "training"


def render_task(dm: Any) -> Task | None:
    """How the report draws the datamodule's examples: its ``task`` (a :class:`Task`), else, when
    it exposes standardisation statistics (``mean``, ``std`` and optionally ``image_shape``, as
    :class:`~lightning_tda.data.digits.DigitsDataModule` does after ``setup``), a
    :class:`ClassificationTask` that draws ``x * std + mean``; ``None``: the default rendering."""
    task = getattr(dm, "task", None)
    if isinstance(task, Task):
        return task
    mean, std = getattr(dm, "mean", None), getattr(dm, "std", None)
    if mean is None or std is None:
        return None
    shape = getattr(dm, "image_shape", None)
    return ClassificationTask(
        image_shape=None if shape is None else tuple(int(s) for s in shape),
        mean=tuple(float(v) for v in np.ravel(mean)),
        std=tuple(float(v) for v in np.ravel(std)),
    )


def main_report(args: argparse.Namespace) -> int:
    """Run ``lightning-tda report`` from parsed arguments."""
    from lightning_tda.cli.recipe_config import load_logged_run

    if args.queries < 1:
        raise ValueError(f"--queries must be >= 1, got {args.queries}")
    run = load_logged_run(args.config, args.store)
    model, dm, path, train = run.model, run.datamodule, run.store_path, run.train_data
    queries, source = _query_set(dm, train)
    n = min(args.queries, len(queries))
    out = write_report(
        path,
        queries,
        model,
        train,
        args.out,
        method=args.method,
        top_k=args.top_k,
        task=render_task(dm),
        tokenizer=getattr(model, "tokenizer", None),
        self_influence=args.self_influence,
        max_queries=n,
        num_outliers=args.outliers,
        title=f"lightning-tda report: {Path(args.config).name}",
        queries_note=f"Queries: the first {n} examples of the {source} set of {args.config}.",
    )
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB): {n} queries, method {args.method}")
    return 0
