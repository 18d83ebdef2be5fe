"""Multi-stage (curriculum / continual) training inside one ``Trainer.fit``.

A *stage* is ``(num_epochs, member_ids)``: for ``num_epochs`` epochs the model trains only on the
examples whose ids are in ``member_ids`` (``None`` = every example). :class:`StagedDataModule` serves
the right stage's subset from ``train_dataloader()`` by reading ``trainer.current_epoch``, so the
trainer must reload its training dataloader at every stage change
(``Trainer(reload_dataloaders_every_n_epochs=1, max_epochs=dm.max_epochs)``). Model, optimizer and
schedulers carry over between stages; a :class:`~lightning_tda.GradientLogger` with
``attribution_data=<the full set>`` keeps sweeping every example at every checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_tda.data.indexed import EXAMPLE_ID_KEY, Indexed

Stage = tuple[int, Sequence[int] | None]
"""``(num_epochs, member_example_ids)``; ``None`` members = every example."""


def normalize_stages(stages: Sequence[Stage]) -> tuple[tuple[int, tuple[int, ...] | None], ...]:
    """Validate stages and return them as ``((epochs, sorted unique-checked ids | None), ...)``.

    Raises:
        ValueError: no stage, a non-positive or non-integer epoch count, an empty or duplicated
            member list.
    """
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or not stages:
        raise ValueError(
            f"stages must be a non-empty sequence of (num_epochs, member_ids) pairs, got {stages!r}"
        )
    out = []
    for k, stage in enumerate(stages):
        if not isinstance(stage, Sequence) or isinstance(stage, (str, bytes)) or len(stage) != 2:
            raise ValueError(f"stage {k} must be a (num_epochs, member_ids) pair, got {stage!r}")
        epochs, members = stage
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
            raise ValueError(f"stage {k}: num_epochs must be a positive int, got {epochs!r}")
        if members is not None:
            ids = np.asarray(members)
            if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
                raise ValueError(
                    f"stage {k}: member ids must be a 1-D sequence of integer example ids"
                )
            if ids.size == 0:
                raise ValueError(f"stage {k} is empty: it lists no member example ids")
            members = tuple(int(i) for i in ids)
            if len(set(members)) != len(members):
                raise ValueError(f"stage {k}: member ids contain duplicates")
        out.append((int(epochs), members))
    return tuple(out)


def dataset_example_ids(dataset: Dataset) -> list[int]:
    """Example ids of every row: ``dataset.ids`` if present (``IndexedDataset``), else read per item."""
    ids = getattr(dataset, "ids", None)
    if ids is not None:
        return [int(i) for i in ids]
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        if isinstance(item, Indexed):
            out.append(int(item.example_id))
        elif isinstance(item, Mapping) and EXAMPLE_ID_KEY in item:
            out.append(int(item[EXAMPLE_ID_KEY]))
        else:
            raise ValueError(
                f"row {i} of the dataset carries no example id; wrap it in lightning_tda.IndexedDataset"
            )
    return out


class StagedDataModule(pl.LightningDataModule):
    """Train stage by stage on subsets of one dataset within a single ``Trainer.fit``.

    Args:
        dataset: the full training set; every row carries an example id (e.g. ``IndexedDataset``).
        stages: ``[(num_epochs, member_example_ids | None), ...]`` in training order.
        batch_size: training batch size.
        shuffle: shuffle each epoch.
        seed: seeds one generator shared by every epoch's shuffle (``None``: torch's global RNG).
        indices: optional row positions to restrict training to (e.g. a retraining subset); a
            stage then trains on ``indices ∩ members``, which must not be empty.
        loader_kwargs: extra ``DataLoader`` arguments (``collate_fn``, ``drop_last``, ...).

    Raises:
        ValueError: invalid stages, member ids not in ``dataset``, a stage left empty by ``indices``.

    Example::

        dm = StagedDataModule(train, [(10, ids_a), (10, ids_b)], batch_size=64, seed=0)
        trainer = pl.Trainer(max_epochs=dm.max_epochs, reload_dataloaders_every_n_epochs=1)
        trainer.fit(model, datamodule=dm)
    """

    def __init__(
        self,
        dataset: Dataset,
        stages: Sequence[Stage],
        batch_size: int = 64,
        shuffle: bool = True,
        seed: int | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        **loader_kwargs: Any,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.stages = normalize_stages(stages)
        self.batch_size, self.shuffle, self.seed = int(batch_size), shuffle, seed
        self.loader_kwargs = loader_kwargs
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        ids = np.asarray(dataset_example_ids(dataset), dtype=np.int64)
        if indices is None:
            allowed = np.ones(len(ids), dtype=bool)
        else:
            pos = np.asarray(indices, dtype=np.int64).reshape(-1)
            if pos.size and (pos.min() < 0 or pos.max() >= len(ids)):
                raise ValueError(f"indices must be row positions in [0, {len(ids)})")
            allowed = np.zeros(len(ids), dtype=bool)
            allowed[pos] = True
        known = set(ids.tolist())
        self.stage_rows: list[np.ndarray] = []
        for k, (_, members) in enumerate(self.stages):
            if members is None:
                rows = np.flatnonzero(allowed)
            else:
                unknown = sorted(set(members) - known)
                if unknown:
                    raise ValueError(
                        f"stage {k} lists {len(unknown)} example ids that are not in the dataset, "
                        f"e.g. {unknown[:5]}"
                    )
                rows = np.flatnonzero(allowed & np.isin(ids, np.asarray(members, dtype=np.int64)))
            if rows.size == 0:
                raise ValueError(
                    f"stage {k} has no training rows"
                    + (" within the given indices" if indices is not None else "")
                )
            self.stage_rows.append(rows)
        self._stage_ends = np.cumsum([e for e, _ in self.stages])

    # -- the curriculum ------------------------------------------------------------------------
    @property
    def max_epochs(self) -> int:
        """Total epochs of the curriculum (pass as ``Trainer(max_epochs=...)``)."""
        return int(self._stage_ends[-1])

    @property
    def stage_starts(self) -> list[int]:
        """First epoch of each stage."""
        return [0, *(int(e) for e in self._stage_ends[:-1])]

    def stage_of_epoch(self, epoch: int) -> int:
        """Index of the stage that trains in (0-based) ``epoch``."""
        if epoch < 0 or epoch >= self.max_epochs:
            raise ValueError(
                f"epoch {epoch} is outside the staged curriculum of {self.max_epochs} epochs; "
                f"use Trainer(max_epochs={self.max_epochs})"
            )
        return int(np.searchsorted(self._stage_ends, epoch, side="right"))

    def stage_ids(self, stage: int) -> list[int]:
        """Example ids trained on in ``stage`` (after any ``indices`` restriction)."""
        ids = dataset_example_ids(self.dataset)
        return [ids[int(r)] for r in self.stage_rows[stage]]

    def steps_per_epoch(self, stage: int) -> int:
        """Optimizer steps of one epoch of ``stage`` (no gradient accumulation)."""
        n = len(self.stage_rows[stage])
        return (
            n // self.batch_size
            if self.loader_kwargs.get("drop_last")
            else math.ceil(n / self.batch_size)
        )

    def stage_end_steps(self) -> list[int]:
        """Global step at the end of each stage (one optimizer step per batch)."""
        total, out = 0, []
        for k, (epochs, _) in enumerate(self.stages):
            total += epochs * self.steps_per_epoch(k)
            out.append(total)
        return out

    # -- LightningDataModule -------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        epoch = 0 if trainer is None else int(trainer.current_epoch)
        if trainer is not None and len(self.stages) > 1:
            n = trainer.reload_dataloaders_every_n_epochs
            if not n or any(s % n for s in self.stage_starts):
                raise ValueError(
                    "StagedDataModule needs the training dataloader reloaded at every stage change; "
                    f"use Trainer(reload_dataloaders_every_n_epochs=1) (got {n})"
                )
        rows = self.stage_rows[self.stage_of_epoch(epoch)]
        return DataLoader(
            Subset(self.dataset, rows.tolist()),
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            generator=self.generator,
            **self.loader_kwargs,
        )
