"""Counterfactual evaluation: LDS, mislabel AUC, retraining banks."""

from lightning_tda.eval.metrics import (
    LDSReport,
    LinearDatamodelingScore,
    MislabelDetectionAUC,
    bootstrap_ci,
    lds_report,
    linear_datamodeling_score,
    mislabel_detection_auc,
    split_half_reliability,
)

__all__ = [
    "LDSReport",
    "LinearDatamodelingScore",
    "MislabelDetectionAUC",
    "bootstrap_ci",
    "lds_report",
    "linear_datamodeling_score",
    "mislabel_detection_auc",
    "split_half_reliability",
]
