"""The logging callback and its typed configuration."""

from typing import Any

from lightning_tda.callbacks.config import (
    CaptureConfig,
    InFlightConfig,
    LoggerConfig,
    StorageConfig,
)
from lightning_tda.callbacks.gradient_logger import GradientLogger
from lightning_tda.callbacks.post_fit import PostFitStage
from lightning_tda.callbacks.schedule import LogSchedule, ScheduleConfig

__all__ = [
    "CaptureConfig",
    "GradientLogger",
    "InFlightConfig",
    "LogSchedule",
    "LoggerConfig",
    "PostFitStage",
    "ScheduleConfig",
    "StorageConfig",
]


def __getattr__(name: str) -> Any:  # InfluencePanels moved to a higher layer: a lazy alias
    if name == "InfluencePanels":
        import importlib
        import warnings

        warnings.warn(
            "lightning_tda.callbacks.InfluencePanels moved to "
            "lightning_tda.integrations.influence_panels.InfluencePanels (also "
            "`from lightning_tda import InfluencePanels`)",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(
            "lightning_tda.integrations.influence_panels"
        ).InfluencePanels
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
