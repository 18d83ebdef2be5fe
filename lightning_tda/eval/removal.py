"""Top-k removal counterfactual: retrain without each query's top-k proponents vs k random examples."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_tda.eval.retrain import Measure, ModelFactory, RetrainRecipe, run_jobs


@dataclass
class RemovalReport:
    """Query-loss change after retraining without examples (mean over queries and seeds).

    Attributes:
        k: examples removed per query.
        delta_topk: ``[Q]`` mean change of each query's loss when its top-k proponents are removed.
        delta_random: ``[Q]`` the same for k random examples.
    """

    k: int
    delta_topk: np.ndarray
    delta_random: np.ndarray

    @property
    def mean_topk(self) -> float:
        return float(self.delta_topk.mean())

    @property
    def mean_random(self) -> float:
        return float(self.delta_random.mean())

    @property
    def fraction_topk_larger(self) -> float:
        """Share of queries whose loss rose more without the proponents than without random examples."""
        return float((self.delta_topk > self.delta_random).mean())

    def __str__(self) -> str:
        return (
            f"removing top-{self.k} proponents: query loss {self.mean_topk:+.4f}; {self.k} random: "
            f"{self.mean_random:+.4f}; proponents hurt more for {self.fraction_topk_larger:.0%} of queries"
        )


def topk_removal_test(
    workdir: str | os.PathLike,
    factory: ModelFactory,
    train: Dataset,
    queries: Dataset,
    loss_measure: Measure,
    scores: torch.Tensor,
    k: int = 10,
    seeds: tuple[int, ...] = (0, 1),
    recipe: RetrainRecipe | None = None,
    processes: int = 2,
    random_seed: int = 0,
) -> RemovalReport:
    """Retrain without each query's ``k`` highest-scoring training rows, and without ``k`` random rows.

    Args:
        workdir: directory for the (resumable) job files.
        factory: picklable ``() -> LightningModule``.
        train: the full training set; ``scores`` columns are its row positions.
        queries: the ``Q`` queries (the measure is computed for all; query ``q`` reads column ``q``).
        loss_measure: picklable ``(model, queries) -> {"loss": [Q]}``.
        scores: ``[Q, N]`` attribution scores (library sign).
        k: examples removed per query.
        seeds: training seeds (each retrain is repeated for each).
        recipe: the training recipe.
        processes: worker processes.
        random_seed: seeds the random removal sets.
    """
    recipe = recipe or RetrainRecipe()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    n = len(train)
    q = scores.shape[0]
    rng = np.random.default_rng(random_seed)
    top = torch.topk(scores, k, dim=1).indices.numpy()
    rand = np.stack([rng.choice(n, size=k, replace=False) for _ in range(q)])
    everything = np.arange(n)
    jobs = [(everything, s, work / f"full_{s}.npz") for s in seeds]
    for i in range(q):
        for s in seeds:
            jobs.append((np.setdiff1d(everything, top[i]), s, work / f"top_{i:04d}_{s}.npz"))
            jobs.append((np.setdiff1d(everything, rand[i]), s, work / f"rand_{i:04d}_{s}.npz"))
    run_jobs(jobs, factory, train, queries, loss_measure, recipe, processes)

    def loss(name: str) -> np.ndarray:
        with np.load(work / name) as f:
            return f["loss"]

    full = {s: loss(f"full_{s}.npz") for s in seeds}
    d_top = np.array(
        [np.mean([loss(f"top_{i:04d}_{s}.npz")[i] - full[s][i] for s in seeds]) for i in range(q)]
    )
    d_rand = np.array(
        [np.mean([loss(f"rand_{i:04d}_{s}.npz")[i] - full[s][i] for s in seeds]) for i in range(q)]
    )
    return RemovalReport(k, d_top, d_rand)
