"""``InfluencePanels``: after a fit, attribute queries from the logged store and log W&B panels.

(Moved here from ``lightning_tda.callbacks.influence_panels``, which still resolves the names with a
``DeprecationWarning``.)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_tda.attribution import AttributionStore
from lightning_tda.callbacks.gradient_logger import GradientLogger
from lightning_tda.capture.losses import LossFn
from lightning_tda.capture.task import Task
from lightning_tda.errors import StoreError
from lightning_tda.integrations.wandb_panels import Render, log_influence_panels, require_wandb
from lightning_tda.methods import AttributionMethod, TracIn, get_method
from lightning_tda.methods.base import lr_weights
from lightning_tda.results import AttributionResult


def attribute_by_checkpoint(
    store: AttributionStore,
    queries: Any,
    model: nn.Module,
    method: str | AttributionMethod = "tracin",
    top_k: int | None = 10,
    *,
    loss_fn: LossFn | None = None,
    batch_size: int = 64,
    collate_fn: Any = None,
    task: Task | None = None,
    **method_kwargs: Any,
) -> tuple[AttributionResult, dict[int, torch.Tensor]]:
    """A TracIn-family attribution and each checkpoint's own dense scores, from one query sweep.

    TracIn sums one term per checkpoint, so the per-checkpoint scores add up to the dense total.

    Args:
        store: the store to read.
        queries: query data (Dataset, DataLoader or batch), as for :meth:`AttributionStore.attribute`.
        model: the trained model class.
        method: ``"tracin"``, ``"tracin_adam"`` or a :class:`~lightning_tda.methods.TracIn` instance.
        top_k: proponents/opponents kept in the returned result (``None``: dense).
        loss_fn, batch_size, collate_fn, task: as for :meth:`AttributionStore.attribute`.
        **method_kwargs: hyper-parameters of the method (e.g. ``checkpoints=[...]``).

    Returns:
        The :class:`AttributionResult` (with ``query_ids``) and ``{global_step: Tensor [Q, N]}``.
    """
    m = get_method(method, **method_kwargs)
    if not isinstance(m, TracIn):
        raise ValueError(
            f"a per-checkpoint breakdown needs a TracIn-family method ('tracin', 'tracin_adam'), got "
            f"{m.name!r}; pass checkpoint_breakdown=False"
        )
    qvecs, qids = store.query_vectors(
        queries,
        model,
        m.query_steps(store),
        loss_fn=loss_fn,
        batch_size=batch_size,
        collate_fn=collate_fn,
        task=task,
    )
    vectors = dict(qvecs)
    result = store.attribute(vectors, method=m, top_k=top_k)
    result.query_ids = qids
    parts: dict[int, torch.Tensor] = {}
    q = next(iter(vectors.values())).shape[0]
    for ck in m.used_checkpoints(store):
        s = ck.global_step
        if float(lr_weights(store, ck, m.interval).abs().max()) == 0.0:
            parts[s] = torch.zeros(q, store.num_examples)  # e.g. a fit-start checkpoint
            continue
        one = dataclasses.replace(m, checkpoints=[s])
        parts[s] = store.attribute({s: vectors[s]}, method=one, top_k=None).scores
    return result, parts


class InfluencePanels(pl.Callback):
    """At the end of a fit, attribute ``queries`` from the GradientLogger's store and log W&B panels.

    Put it **after** the :class:`~lightning_tda.GradientLogger` in ``callbacks=[...]`` (callbacks run
    in list order, so the store is complete, and any STRIDE fit of the logger is done, before this runs).
    Runs on global rank zero only and logs through the trainer's ``WandbLogger`` (or ``run``) with
    :func:`~lightning_tda.integrations.wandb_panels.log_influence_panels`.

    Args:
        store: the store path, or the :class:`~lightning_tda.GradientLogger` writing it.
        queries: the query examples (Dataset/DataLoader of items with ids, or a collated batch).
        train_data: the logged training data (``IndexedDataset``), shown next to ids in the tables.
        method: attribution method name or instance.
        top_k: proponents and opponents per query.
        self_influence: log the self-influence ranking: ``True`` (with ``method``), a method name, or
            ``False``.
        run: a wandb run to log to instead of the trainer's ``WandbLogger``.
        checkpoint_breakdown: log each checkpoint's share of the scores (TracIn family only; default:
            on for ``"tracin"``/``"tracin_adam"``).
        render: how examples show in tables (``"auto"``, ``"image"``, ``"text"`` or a callable).
        tokenizer: decodes token-id examples.
        task: a :class:`~lightning_tda.capture.task.Task` whose ``render(item)`` draws the examples
            (e.g. ``ClassificationTask(image_shape=(8, 8), mean=..., std=...)``: un-standardised)
            and measures the queries (unless ``loss_fn`` is given; ``None``: the store's task).
        self_influence_top: rows of the self-influence table.
        prefix: W&B key prefix.
        loss_fn, batch_size, collate_fn: query sweep settings, as for ``AttributionStore.attribute``.
        method_kwargs: hyper-parameters of the method.

    Example::

        grads = GradientLogger("runs/tda.h5", attribution_data=train, every_n_epochs=1)
        panels = InfluencePanels(grads, queries=test_subset, train_data=train, top_k=10)
        trainer = L.Trainer(logger=WandbLogger(project="tda"), callbacks=[grads, panels])
    """

    def __init__(
        self,
        store: str | os.PathLike | GradientLogger,
        queries: Any,
        train_data: Any,
        method: str | AttributionMethod = "tracin",
        top_k: int = 10,
        self_influence: bool | str = True,
        *,
        run: Any = None,
        checkpoint_breakdown: bool | None = None,
        render: str | Render | None = None,
        tokenizer: Any = None,
        task: Task | None = None,
        self_influence_top: int = 20,
        prefix: str = "tda",
        loss_fn: LossFn | None = None,
        batch_size: int = 64,
        collate_fn: Any = None,
        method_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        require_wandb()
        self.gradient_logger = store if isinstance(store, GradientLogger) else None
        self.path = Path(store.path if isinstance(store, GradientLogger) else store)
        self.queries, self.train_data = queries, train_data
        self.method, self.top_k, self.self_influence = method, top_k, self_influence
        self.run, self.render, self.tokenizer, self.task = run, render, tokenizer, task
        name = method if isinstance(method, str) else getattr(method, "name", "")
        self.checkpoint_breakdown = (
            name in ("tracin", "tracin_adam")
            if checkpoint_breakdown is None
            else checkpoint_breakdown
        )
        self.self_influence_top, self.prefix = self_influence_top, prefix
        self.loss_fn, self.batch_size, self.collate_fn = loss_fn, batch_size, collate_fn
        self.method_kwargs = dict(method_kwargs or {})
        self.logged: dict[str, int] = {}
        self.result: AttributionResult | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.run is None and _wandb_logger(trainer) is None:
            raise MisconfigurationException(
                "InfluencePanels logs through a WandbLogger, but this Trainer has none. Pass "
                "logger=lightning.pytorch.loggers.WandbLogger(...) to the Trainer, or run=wandb.init(...) "
                "to InfluencePanels."
            )
        callbacks = list(trainer.callbacks)
        me = next(i for i, c in enumerate(callbacks) if c is self)
        loggers = [
            i
            for i, c in enumerate(callbacks)
            if c is self.gradient_logger
            or (isinstance(c, GradientLogger) and _same_file(Path(c.path), self.path))
        ]
        if self.gradient_logger is not None and not loggers:
            raise MisconfigurationException(
                "the GradientLogger given to InfluencePanels is not among the Trainer's callbacks; "
                "pass callbacks=[gradient_logger, influence_panels]"
            )
        if loggers and min(loggers) > me:
            raise MisconfigurationException(
                "InfluencePanels must come after the GradientLogger that writes its store: pass "
                "callbacks=[gradient_logger, ..., influence_panels]"
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        run = self.run if self.run is not None else _wandb_logger(trainer)
        if not self.path.exists():
            raise StoreError(
                f"InfluencePanels found no store at {self.path}; put it after a GradientLogger writing "
                "that path in callbacks=[...]"
            )
        store = AttributionStore(self.path)
        if not store.checkpoints:
            raise StoreError(
                f"InfluencePanels found no complete checkpoint in {self.path}: place it after the "
                "GradientLogger in callbacks=[...] and make the logger fire at least once (e.g. "
                "log_at_fit_end=True or every_n_epochs=1)"
            )
        sweep = dict(loss_fn=self.loss_fn, batch_size=self.batch_size, collate_fn=self.collate_fn)
        if self.loss_fn is None:  # the task that renders the examples measures the queries too
            sweep["task"] = self.task
        parts = None
        if self.checkpoint_breakdown:
            self.result, parts = attribute_by_checkpoint(
                store,
                self.queries,
                pl_module,
                self.method,
                self.top_k,
                **sweep,
                **self.method_kwargs,
            )
        else:
            self.result = store.attribute(
                self.queries,
                model=pl_module,
                method=self.method,
                top_k=self.top_k,
                **sweep,
                **self.method_kwargs,
            )
        si = None
        if self.self_influence:
            name = self.method if self.self_influence is True else self.self_influence
            kwargs = self.method_kwargs if self.self_influence is True else {}
            si = store.self_influence(method=name, **kwargs)
        self.logged = log_influence_panels(
            run,
            self.result,
            self.train_data,
            self.queries,
            store=store,
            self_influence=si,
            checkpoint_scores=parts,
            render=self.render,
            tokenizer=self.tokenizer,
            task=self.task,
            top_k=self.top_k,
            self_influence_top=self.self_influence_top,
            prefix=self.prefix,
        )


def _wandb_logger(trainer: pl.Trainer) -> Any:
    """The trainer's WandbLogger (from either Lightning package), or ``None``."""
    for lg in getattr(trainer, "loggers", []) or []:
        if any(c.__name__ == "WandbLogger" for c in type(lg).__mro__):
            return lg
    return None


def _same_file(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


__all__ = ["InfluencePanels", "attribute_by_checkpoint"]
