"""The store's run-level root attributes, serialised from the logger's configs, and the resume check.

``logger_config`` holds :meth:`LoggerConfig.saved_arguments` (kronfluence-style saved arguments); the
older per-topic attributes (``projection``, ``schedule``, ``storage`` ...) are derived from the same
configs so readers of either keep working (docs/store.md "Root attributes").
"""

from __future__ import annotations

import json
from typing import Any

import lightning
import lightning.pytorch as pl
import torch

from lightning_tda._version import __version__
from lightning_tda.callbacks.context import FitContext
from lightning_tda.callbacks.optimizer_state import optimizer_summary, param_group_index
from lightning_tda.capture.fingerprint import fingerprint_attrs, module_class
from lightning_tda.errors import StoreError
from lightning_tda.store import schema
from lightning_tda.store.writer import ReadFile

SAVED_ARGUMENTS = "logger_config"
"""Root attribute holding the JSON of the logger's resolved configs."""

COMPARED = ("layers", "projection", "storage", "factor_layout", schema.LOGGING_MODE)
"""Root attributes a resumed fit must reproduce exactly (checked by the writer)."""


def run_metadata(
    ctx: FitContext,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    fingerprints: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Root attributes of the store: provenance, layout and every config of the run
    (``fingerprints``: :func:`fingerprint_attrs` computed already, e.g. on every FSDP2 rank)."""
    cls = module_class(pl_module)
    config = ctx.config
    groups = param_group_index(trainer.optimizers)
    named = dict(pl_module.named_parameters())
    layer_groups = {s.name: groups.get(id(named[s.params[0]]), 0) for s in ctx.layers}
    storage = config.storage
    return {
        "library_version": __version__,
        "lightning_version": lightning.__version__,
        "torch_version": torch.__version__,
        "model_class": f"{cls.__module__}.{cls.__qualname__}",
        "projection": schema.to_json(config.projection.to_dict()),
        "layers": schema.to_json([s.to_dict() for s in ctx.layers]),
        "layer_groups": schema.to_json(layer_groups),
        "other_params": schema.to_json(ctx.other),
        "capture_selection": schema.to_json(
            {"modules": config.capture.modules, "exclude": config.capture.exclude}
        ),
        "loss_reduction": "per-example loss; sequence losses summed over supervised tokens",
        "task": schema.to_json(ctx.task.settings()),
        "example_ids": schema.to_json(ctx.ids_record(trainer)),
        schema.LOGGING_MODE: config.mode,
        "optimizers": schema.to_json(optimizer_summary(trainer.optimizers)),
        "schedule": schema.to_json(config.schedule.to_dict()),
        "storage": storage.kind,
        **(
            {"lorif_rank": storage.lorif_rank, "factor_layout": ctx.factors.to_json()}
            if ctx.factors is not None
            else {}
        ),
        SAVED_ARGUMENTS: schema.to_json(config.saved_arguments()),
        # frozen_fingerprint, architecture_fingerprint
        **(fingerprints or fingerprint_attrs(pl_module, ctx.layers)),
    }


def check_saved_arguments(ctx: FitContext) -> None:
    """Refuse to continue a store whose saved configs differ from this run's in a setting that
    shapes the rows (the schedule, ``overwrite``, batch size, loss and ``flush_every`` may change)."""
    path = ctx.path
    if not path.exists():
        return
    with ReadFile(path) as f:
        saved = f.attrs.get(SAVED_ARGUMENTS)
    if saved is None:
        return  # a store from before the configs were saved: the writer's own checks apply
    diff = ctx.config.resume_mismatch(json.loads(saved))
    if diff is not None:
        raise StoreError(
            f"{path} was written with other GradientLogger settings than this run has ({diff}); "
            "resume with the same settings, or start a fresh fit (no ckpt_path) with a new path or overwrite=True."
        )
