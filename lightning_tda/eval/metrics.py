"""Counterfactual metrics: Linear Datamodeling Score and mislabel-detection AUC.

Functional forms take whole arrays; the :class:`torchmetrics.Metric` twins accumulate queries
batch by batch. Scores follow the library sign (``> 0`` = helpful); the retrained models'
measurement is a *goodness* (margin, log-likelihood), or a loss when ``measurement="loss"``, in which
case it is negated before correlating.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.stats import rankdata
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.functional.classification import binary_auroc

Measurement = Literal["goodness", "loss"]


def _subset_masks(subsets: torch.Tensor, num_train: int) -> torch.Tensor:
    """``[M, N]`` float mask from index lists ``[M, S]`` (dattri's format) or boolean masks ``[M, N]``."""
    if subsets.dtype == torch.bool:
        if subsets.shape[1] != num_train:
            raise ValueError(
                f"subset masks have {subsets.shape[1]} columns but scores cover {num_train} examples"
            )
        return subsets.double()
    if subsets.dtype.is_floating_point:
        raise ValueError("subsets must be integer index lists [M, S] or boolean masks [M, N]")
    if subsets.numel() and (int(subsets.max()) >= num_train or int(subsets.min()) < 0):
        raise ValueError(
            f"subset indices must lie in [0, {num_train}) (store row positions, not example ids)"
        )
    masks = torch.zeros(subsets.shape[0], num_train, dtype=torch.float64)
    masks.scatter_(1, subsets.long(), 1.0)
    return masks


def _goodness(outputs: torch.Tensor, measurement: Measurement) -> torch.Tensor:
    if measurement not in ("goodness", "loss"):
        raise ValueError(f"measurement must be 'goodness' or 'loss', got {measurement!r}")
    outputs = outputs.double()
    if outputs.dim() == 3:  # [M, R, Q]: average the retraining seeds
        outputs = outputs.mean(dim=1)
    return -outputs if measurement == "loss" else outputs


def _columnwise_spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman per column of ``[M, Q]`` arrays in float64 (average ranks for ties, as scipy and dattri);
    NaN where a column is constant. (torchmetrics' ``spearman_corrcoef`` computes in float32.)"""
    ra = torch.from_numpy(rankdata(a.double().cpu().numpy(), axis=0))
    rb = torch.from_numpy(rankdata(b.double().cpu().numpy(), axis=0))
    ra = ra - ra.mean(0)
    rb = rb - rb.mean(0)
    denom = (ra.pow(2).sum(0) * rb.pow(2).sum(0)).sqrt()
    rho = (ra * rb).sum(0) / denom
    return torch.where(denom > 0, rho, torch.full_like(rho, float("nan")))


def linear_datamodeling_score(
    scores: torch.Tensor,
    subsets: torch.Tensor,
    outputs: torch.Tensor,
    measurement: Measurement = "goodness",
) -> torch.Tensor:
    """Per-query LDS: Spearman over subsets between ``Σ_{i∈S_m} score[q, i]`` and the retrained output.

    Args:
        scores: ``[Q, N]`` attribution scores (library sign: > 0 helpful).
        subsets: ``[M, S]`` kept-example index lists (row positions) or ``[M, N]`` boolean masks.
        outputs: ``[M, Q]`` (or ``[M, R, Q]``, averaged over the ``R`` seeds) measurement of each query by
            the model retrained on each subset.
        measurement: ``"goodness"`` (margin, log-likelihood: larger = better) or ``"loss"`` (negated).

    Returns:
        ``[Q]`` float64 Spearman correlations (NaN where either side is constant over subsets).

    Example:
        >>> scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.2, 0.1, 0.3, 0.4]])
        >>> subsets = torch.tensor([[0, 1], [0, 2], [1, 2]])
        >>> outputs = torch.tensor([[0.3, 0.3], [0.4, 0.4], [0.5, 0.3]])
        >>> linear_datamodeling_score(scores, subsets, outputs)
        tensor([1.0000, 0.8660], dtype=torch.float64)
    """
    scores = scores.double()
    masks = _subset_masks(subsets, scores.shape[1])
    good = _goodness(outputs, measurement)
    if good.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(
            f"outputs have shape {tuple(good.shape)} after seed averaging but need [M={masks.shape[0]}, "
            f"Q={scores.shape[0]}] (one row per subset, one column per query, in the scores' query order)"
        )
    predicted = masks @ scores.T  # [M, Q]
    return _columnwise_spearman(predicted, good)


def split_half_reliability(
    outputs: torch.Tensor, measurement: Measurement = "goodness"
) -> tuple[float, float]:
    """Ceiling of the ground truth from its seeds: ``(split-half ρ, Spearman–Brown full-R reliability)``.

    Averages the first and second half of the ``R`` seeds separately and correlates them across subsets
    per query (mean over queries). Spearman–Brown ``2ρ/(1+ρ)`` estimates the reliability of the mean of all
    ``R`` seeds: an LDS near it means the method explains all the signal the bank can show.

    Args:
        outputs: ``[M, R, Q]`` per-seed measurements, ``R >= 2``.

    Example:
        >>> seeds = torch.tensor([[0.1, 0.2], [0.4, 0.5], [0.3, 0.1], [0.6, 0.7]])  # [M=4, R=2]
        >>> rho, reliability = split_half_reliability(seeds.unsqueeze(-1))  # one query
        >>> round(rho, 4), round(reliability, 4)
        (0.8, 0.8889)
    """
    if outputs.dim() != 3 or outputs.shape[1] < 2:
        raise ValueError("split-half reliability needs per-seed outputs [M, R, Q] with R >= 2")
    sign = -1.0 if measurement == "loss" else 1.0
    r = outputs.shape[1] // 2
    a = sign * outputs[:, :r].double().mean(1)
    b = sign * outputs[:, r:].double().mean(1)
    rho = float(np.nanmean(_columnwise_spearman(a, b).numpy()))
    return rho, 2 * rho / (1 + rho) if rho > -1 else float("nan")


def bootstrap_ci(
    per_query: torch.Tensor, num_resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the NaN-mean over queries (queries resampled with replacement).

    Example:
        >>> bootstrap_ci(torch.tensor([0.5, 0.7, float("nan"), 0.9], dtype=torch.float64))
        (0.5, 0.9)
    """
    x = per_query.double().numpy()
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(num_resamples, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


@dataclass
class LDSReport:
    """LDS of one method on one bank."""

    mean: float
    ci_low: float
    ci_high: float
    per_query: torch.Tensor
    num_nan: int
    # noise ceiling sqrt(reliability): the best Spearman a noise-free predictor can expect against
    # the bank's seed average (None without per-seed outputs)
    ceiling: float | None = None
    reliability: float | None = None  # Spearman–Brown reliability of the seed average

    def __str__(self) -> str:
        ceil = f", ceiling {self.ceiling:.3f}" if self.ceiling is not None else ""
        return f"LDS {self.mean:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] over {len(self.per_query) - self.num_nan} queries{ceil}"


def lds_report(
    scores: torch.Tensor,
    subsets: torch.Tensor,
    outputs: torch.Tensor,
    measurement: Measurement = "goodness",
    num_resamples: int = 2000,
    seed: int = 0,
) -> LDSReport:
    """:func:`linear_datamodeling_score` with its bootstrap CI and the bank's ceiling.

    Example:
        >>> scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.2, 0.1, 0.3, 0.4]])  # [Q=2, N=4]
        >>> subsets = torch.tensor([[0, 1], [0, 2], [1, 2], [2, 3]])  # [M=4, S=2]
        >>> outputs = torch.tensor(  # [M=4, R=2 seeds, Q=2]
        ...     [[[0.1, 0.2], [0.2, 0.1]], [[0.4, 0.5], [0.5, 0.3]],
        ...      [[0.3, 0.3], [0.2, 0.4]], [[0.6, 0.1], [0.7, 0.2]]]
        ... )
        >>> print(lds_report(scores, subsets, outputs, num_resamples=200))
        LDS 0.453 [0.105, 0.800] over 2 queries, ceiling 0.934
    """
    per_query = linear_datamodeling_score(scores, subsets, outputs, measurement)
    lo, hi = bootstrap_ci(per_query, num_resamples, seed=seed)
    reliability = (
        split_half_reliability(outputs, measurement)[1]
        if outputs.dim() == 3 and outputs.shape[1] >= 2
        else None
    )
    ceiling = None if reliability is None else float(np.sqrt(max(reliability, 0.0)))
    nan = int(torch.isnan(per_query).sum())
    return LDSReport(
        float(np.nanmean(per_query.numpy())), lo, hi, per_query, nan, ceiling, reliability
    )


class LinearDatamodelingScore(Metric):
    """Mean LDS over queries, accumulated batch by batch.

    Args:
        subsets: ``[M, S]`` index lists or ``[M, N]`` boolean masks of the retraining bank.
        measurement: ``"goodness"`` or ``"loss"``.

    Example:
        >>> metric = LinearDatamodelingScore(torch.tensor([[0, 1], [0, 2], [1, 2]]))
        >>> metric.update(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), torch.tensor([[0.3], [0.4], [0.5]]))
        >>> metric.update(torch.tensor([[0.2, 0.1, 0.3, 0.4]]), torch.tensor([[0.3], [0.4], [0.3]]))
        >>> round(float(metric.compute()), 6)
        0.933013
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, subsets: torch.Tensor, measurement: Measurement = "goodness", **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.subsets = subsets
        self.measurement = measurement
        self.add_state("per_query", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, outputs: torch.Tensor) -> None:
        """``scores`` ``[Q, N]`` and the bank's ``outputs`` ``[M, Q]`` / ``[M, R, Q]`` for the same queries."""
        self.per_query.append(
            linear_datamodeling_score(scores, self.subsets, outputs, self.measurement)
        )

    def compute(self) -> torch.Tensor:
        values = torch.cat(self.per_query) if isinstance(self.per_query, list) else self.per_query
        return torch.tensor(float(np.nanmean(values.double().cpu().numpy())), dtype=torch.float64)


def mislabel_detection_auc(
    self_influence: torch.Tensor, is_mislabeled: torch.Tensor
) -> torch.Tensor:
    """AUROC of ranking flipped-label examples first by self-influence (higher = more suspicious).

    Example:
        >>> mislabel_detection_auc(torch.tensor([0.9, 0.1, 0.8, 0.2]), torch.tensor([1, 0, 0, 1]))
        tensor(0.7500)
    """
    return binary_auroc(self_influence.float(), is_mislabeled.long())


class MislabelDetectionAUC(BinaryAUROC):
    """:class:`torchmetrics.classification.BinaryAUROC` over ``(self_influence, is_mislabeled)`` pairs.

    Example (the batches of :func:`mislabel_detection_auc`'s example, one update each):
        >>> metric = MislabelDetectionAUC()
        >>> metric.update(torch.tensor([0.9, 0.1]), torch.tensor([1, 0]))
        >>> metric.update(torch.tensor([0.8, 0.2]), torch.tensor([0, 1]))
        >>> metric.compute()
        tensor(0.7500)
    """
