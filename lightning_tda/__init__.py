"""lightning_tda: training-data attribution that rides along a PyTorch Lightning run."""

__version__ = "0.1.0"

from lightning_tda.attribution import AttributionStore  # noqa: E402
from lightning_tda.callbacks import GradientLogger, InfluencePanels  # noqa: E402
from lightning_tda.capture.checks import NonFiniteError  # noqa: E402
from lightning_tda.capture.layers import ProjectionMismatchError  # noqa: E402
from lightning_tda.capture.losses import causal_lm_loss, classification_loss  # noqa: E402
from lightning_tda.data import Indexed, IndexedDataset, MissingExampleIdsError  # noqa: E402
from lightning_tda.results import AttributionResult  # noqa: E402
from lightning_tda.store import SchemaVersionError, StoreError  # noqa: E402

__all__ = [
    "AttributionResult",
    "AttributionStore",
    "GradientLogger",
    "InfluencePanels",
    "Indexed",
    "IndexedDataset",
    "MissingExampleIdsError",
    "NonFiniteError",
    "ProjectionMismatchError",
    "SchemaVersionError",
    "StoreError",
    "__version__",
    "causal_lm_loss",
    "classification_loss",
]
