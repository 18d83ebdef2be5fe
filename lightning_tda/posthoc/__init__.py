"""After the fact: attribute a finished run from its saved Lightning ``.ckpt`` files.

Example::

    from lightning_tda import AttributionStore
    from lightning_tda.posthoc import log_checkpoints

    path = log_checkpoints("runs/tda.h5", model, "checkpoints/", train, train_dataloaders=loader)
    AttributionStore(path).attribute(queries, model=model, method="tracin")
"""

from lightning_tda.posthoc.ckpt_files import CheckpointFile, checkpoint_files
from lightning_tda.posthoc.log import LOGGED_FROM_CHECKPOINTS, log_checkpoints
from lightning_tda.posthoc.lr_replay import APPROXIMATE, REPLAYED, LrSums, lr_sums

__all__ = [
    "APPROXIMATE",
    "LOGGED_FROM_CHECKPOINTS",
    "REPLAYED",
    "CheckpointFile",
    "LrSums",
    "checkpoint_files",
    "log_checkpoints",
    "lr_sums",
]
