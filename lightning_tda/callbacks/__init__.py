from lightning_tda.callbacks.gradient_logger import GradientLogger
from lightning_tda.callbacks.influence_panels import InfluencePanels
from lightning_tda.callbacks.schedule import LogSchedule

__all__ = ["GradientLogger", "InfluencePanels", "LogSchedule"]
