"""Module hooks, per-example losses and seeded projections."""

from lightning_tda.capture.layers import LayerSpec, discover_layers
from lightning_tda.capture.losses import causal_lm_loss, classification_loss
from lightning_tda.capture.projection import ProjectionConfig, projection_matrix
from lightning_tda.errors import ProjectionMismatchError

__all__ = [
    "LayerSpec",
    "ProjectionConfig",
    "ProjectionMismatchError",
    "causal_lm_loss",
    "classification_loss",
    "discover_layers",
    "projection_matrix",
]
