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
from lightning_tda.eval.removal import RemovalReport, topk_removal_test
from lightning_tda.eval.retrain import (
    Bank,
    BankSpec,
    RetrainRecipe,
    build_bank,
    draw_subsets,
    train_on_subset,
)

__all__ = [
    "Bank",
    "BankSpec",
    "RemovalReport",
    "RetrainRecipe",
    "build_bank",
    "draw_subsets",
    "topk_removal_test",
    "train_on_subset",
    "LDSReport",
    "LinearDatamodelingScore",
    "MislabelDetectionAUC",
    "bootstrap_ci",
    "lds_report",
    "linear_datamodeling_score",
    "mislabel_detection_auc",
    "split_half_reliability",
]
