"""The logging callback and its typed configuration."""

from lightning_tda._moved import moved
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


# InfluencePanels moved to a higher layer (the W&B integration): a lazy alias
__getattr__ = moved(__name__, {"InfluencePanels": "lightning_tda.integrations.influence_panels"})
