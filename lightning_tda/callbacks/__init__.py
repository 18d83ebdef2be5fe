from typing import Any

from lightning_tda.callbacks.gradient_logger import GradientLogger
from lightning_tda.callbacks.schedule import LogSchedule

__all__ = ["GradientLogger", "InfluencePanels", "LogSchedule"]


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
