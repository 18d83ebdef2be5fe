"""lightning_tda: training-data attribution that rides along a PyTorch Lightning run."""

from lightning_tda._version import __version__
from lightning_tda.attribution import AttributionStore
from lightning_tda.callbacks import GradientLogger
from lightning_tda.capture.losses import causal_lm_loss, classification_loss
from lightning_tda.capture.task import CausalLMTask, ClassificationTask, Targets, Task
from lightning_tda.data import Indexed, IndexedDataset
from lightning_tda.data.ids import ExampleIds
from lightning_tda.errors import (
    MissingExampleIdsError,
    NonFiniteError,
    ProjectionMismatchError,
    SchemaVersionError,
    StoreError,
)
from lightning_tda.integrations.influence_panels import InfluencePanels
from lightning_tda.methods.row_index import IndexConfig, RowIndex
from lightning_tda.posthoc import log_checkpoints
from lightning_tda.results import AttributionResult

__all__ = [
    "AttributionResult",
    "AttributionStore",
    "CausalLMTask",
    "ClassificationTask",
    "ExampleIds",
    "GradientLogger",
    "IndexConfig",
    "InfluencePanels",
    "Indexed",
    "IndexedDataset",
    "MissingExampleIdsError",
    "NonFiniteError",
    "ProjectionMismatchError",
    "RowIndex",
    "SchemaVersionError",
    "StoreError",
    "Targets",
    "Task",
    "__version__",
    "causal_lm_loss",
    "classification_loss",
    "log_checkpoints",
]
