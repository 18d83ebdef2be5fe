"""LDS and mislabel AUC against dattri's implementation, closed forms and sign rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lightning_tda.eval.metrics import (
    LinearDatamodelingScore,
    MislabelDetectionAUC,
    bootstrap_ci,
    lds_report,
    linear_datamodeling_score,
    mislabel_detection_auc,
    split_half_reliability,
)


def _bank(n=40, m=100, q=30, alpha=0.5, seed=0):
    rng = np.random.default_rng(seed)
    subsets = np.stack(
        [
            np.sort(np.random.default_rng(seed + j).choice(n, int(alpha * n), replace=False))
            for j in range(m)
        ]
    )
    true = rng.normal(size=(q, n))
    masks = np.zeros((m, n))
    np.put_along_axis(masks, subsets, 1.0, axis=1)
    outputs = masks @ true.T + rng.normal(scale=2.0, size=(m, q))
    return torch.from_numpy(subsets), torch.from_numpy(outputs), torch.from_numpy(true)


def test_dattri_golden_fixture():
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.2, 0.1, 0.3, 0.4]])
    outputs = torch.tensor([[0.3, 0.3], [0.4, 0.4], [0.5, 0.3]])
    subsets = torch.tensor([[0, 1], [0, 2], [1, 2]])
    got = linear_datamodeling_score(scores, subsets, outputs)
    np.testing.assert_allclose(got.numpy(), [1.0, 0.8660254], atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_dattri_lds(seed):
    dattri_metric = pytest.importorskip("dattri.metric")
    subsets, outputs, true = _bank(seed=seed)
    scores = true + torch.from_numpy(np.random.default_rng(seed + 10).normal(size=true.shape))
    ours = linear_datamodeling_score(scores, subsets, outputs)
    theirs, _ = dattri_metric.lds(scores.T.float(), (outputs.float(), subsets))
    np.testing.assert_allclose(ours.numpy(), theirs.double().numpy(), atol=1e-6)
    assert float(ours.mean()) > 0.3  # the planted signal is found


def test_random_scores_and_sign_rules():
    subsets, outputs, true = _bank(n=60, m=100, q=200)
    rand = torch.from_numpy(np.random.default_rng(5).normal(size=true.shape))
    assert abs(float(linear_datamodeling_score(rand, subsets, outputs).nanmean())) < 0.05
    good = linear_datamodeling_score(true, subsets, outputs)
    torch.testing.assert_close(linear_datamodeling_score(-true, subsets, outputs), -good)
    # a loss measurement is the negated goodness
    torch.testing.assert_close(
        linear_datamodeling_score(true, subsets, -outputs, measurement="loss"), good
    )
    # boolean masks == index lists; the removed-set convention flips the sign
    masks = torch.zeros(100, 60, dtype=torch.bool)
    masks.scatter_(1, subsets, True)
    torch.testing.assert_close(linear_datamodeling_score(true, masks, outputs), good)
    torch.testing.assert_close(linear_datamodeling_score(true, ~masks, outputs), -good)
    # per-seed outputs are averaged
    torch.testing.assert_close(
        linear_datamodeling_score(true, subsets, torch.stack([outputs, outputs], 1)), good
    )


def test_constant_query_is_nan_and_counted():
    subsets, outputs, true = _bank(q=4)
    outputs[:, 2] = 1.0
    rep = lds_report(true, subsets, outputs)
    assert rep.num_nan == 1 and np.isnan(rep.per_query[2])
    assert rep.ci_low <= rep.mean <= rep.ci_high


def test_split_half_reliability_matches_spearman_brown():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(100, 1, 50))
    outputs = torch.from_numpy(
        signal + rng.normal(size=(100, 4, 50))
    )  # 4 seeds, noise variance = signal variance
    rho, full = split_half_reliability(outputs)
    # each half averages 2 seeds: reliability 2/3 in Pearson terms; Spearman is close for Gaussians
    assert 0.55 < rho < 0.75
    assert full == pytest.approx(2 * rho / (1 + rho))


def test_bootstrap_ci_covers_the_mean():
    x = torch.from_numpy(np.random.default_rng(0).normal(0.4, 0.1, size=500))
    lo, hi = bootstrap_ci(x)
    assert lo < 0.4 < hi and hi - lo < 0.03


def test_metric_accumulates_like_the_functional():
    subsets, outputs, true = _bank(q=10)
    metric = LinearDatamodelingScore(subsets)
    metric.update(true[:4], outputs[:, :4])
    metric.update(true[4:], outputs[:, 4:])
    assert float(metric.compute()) == pytest.approx(
        float(linear_datamodeling_score(true, subsets, outputs).mean())
    )


def test_mislabel_auc_matches_sklearn():
    rng = np.random.default_rng(0)
    flipped = rng.random(300) < 0.1
    self_inf = rng.normal(size=300) + 1.5 * flipped
    got = mislabel_detection_auc(torch.from_numpy(self_inf), torch.from_numpy(flipped))
    assert float(got) == pytest.approx(roc_auc_score(flipped, self_inf), abs=1e-6)
    m = MislabelDetectionAUC()
    m.update(torch.from_numpy(self_inf).float(), torch.from_numpy(flipped).long())
    assert float(m.compute()) == pytest.approx(float(got), abs=1e-6)
