from lightning_tda.callbacks.config import (
    CaptureConfig,
    InFlightConfig,
    LoggerConfig,
    StorageConfig,
)
from lightning_tda.callbacks.gradient_logger import GradientLogger
from lightning_tda.callbacks.influence_panels import InfluencePanels
from lightning_tda.callbacks.post_fit import PostFitStage
from lightning_tda.callbacks.schedule import LogSchedule, ScheduleConfig

__all__ = [
    "CaptureConfig",
    "GradientLogger",
    "InFlightConfig",
    "InfluencePanels",
    "LogSchedule",
    "LoggerConfig",
    "PostFitStage",
    "ScheduleConfig",
    "StorageConfig",
]
