"""Helpers shared by the benchmark suites (``benchmarks.run``, ``benchmarks.perf`` and the sweeps):
train a task with the logger attached, measure a store, wrap the task GPT for LM peers, and
rewrite one marked section of BENCHMARKS.md."""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from benchmarks.tasks import Task
from lightning_tda import AttributionStore, GradientLogger

QUIET_CPU = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "accelerator": "cpu",
    "devices": 1,
}
"""Trainer keywords of every benchmark fit: one CPU process, no logging, checkpoints or bars."""

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def fit_logged(
    task: Task, path: Path, seed: int = 0, callbacks: list | None = None, **logger_kwargs
) -> tuple[pl.LightningModule, AttributionStore, float]:
    """Train the task's model on its full training set with a GradientLogger; returns model, store, fit seconds.

    The sweep batch size is 250 unless ``logger_kwargs`` says otherwise (``None``: the library's rule);
    ``callbacks`` run beside the logger."""
    pl.seed_everything(seed, verbose=False)
    model = task.factory()
    logger = GradientLogger(
        path,
        attribution_data=task.train,
        overwrite=True,
        verbose=False,
        **{"batch_size": 250, **task.logger_schedule(), **logger_kwargs},
    )
    trainer_kwargs, fit_kwargs = task.fit_setup(seed)
    trainer = pl.Trainer(
        callbacks=[logger, *(callbacks or [])],
        **QUIET_CPU,
        **trainer_kwargs,
    )
    t0 = time.perf_counter()
    trainer.fit(model, **fit_kwargs)
    seconds = time.perf_counter() - t0
    store = AttributionStore(path)
    assert torch.equal(store.example_ids, torch.as_tensor(task.train.ids)), (
        "store rows must follow the dataset order"
    )
    return model, store, seconds


def stored_bytes_per_example(store: AttributionStore) -> float:
    """On-disk bytes of the per-example row datasets of one checkpoint, divided by N."""
    import h5py

    from lightning_tda.store import schema

    with h5py.File(store.path, "r") as f:
        g = f[schema.checkpoint_name(store.steps[-1])]
        total = sum(
            g[k].id.get_storage_size()
            for k in g
            if isinstance(g[k], h5py.Dataset) and k.startswith("train") and "dropout" not in k
        )
    return total / max(1, store.num_examples)


def logging_seconds(store: AttributionStore) -> float:
    return float(sum(store.checkpoint_attrs(s)["seconds"] for s in store.steps))


class GPTLogits(torch.nn.Module):
    """The task model's GPT-2 as ``input_ids -> logits`` (what the LM peer adapters take)."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.lm = task.factory().lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits


def update_benchmarks_md(section: str, marker: str = "quality") -> None:
    path = ROOT / "BENCHMARKS.md"
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    block = f"{start}\n{section}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
