"""In-flight rows of a multi-process (DDP, FSDP1, FSDP2) fit: every rank's rows of a step, gathered.

Each rank captures the per-example rows of its own slice of the global batch. Before the optimizer
step, :class:`StepRowGather` collects every rank's rows of that step so rank zero writes the whole
step into the one store, with the single-process writer (its crash and kill guarantees unchanged).
The row counts (host integers) travel over a CPU (gloo) group, so no rank reads a device value; the
rows travel through ``trainer.strategy.all_gather``, padded to the largest count. An example that two
ranks both hold in one step (``DistributedSampler`` pads the last batch by repeating examples) keeps
one row, the sum, as it entered the averaged update twice (:func:`~lightning_tda.callbacks.in_flight.merge_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from lightning_tda.callbacks.in_flight import StepRows
from lightning_tda.errors import ConfigError


@dataclass(frozen=True)
class _Shape:
    """What a rank reports of its step before the rows move: count, row width and dtype."""

    rows: int
    width: int
    dtype: str
    scaled: bool


class StepRowGather:
    """Gather one optimizer step's in-flight rows from every rank (collective: every rank, every
    logged step, in the same order).

    Args:
        strategy: the trainer's strategy (its ``all_gather`` moves the rows).
    """

    def __init__(self, strategy: pl.strategies.Strategy) -> None:
        self.strategy = strategy
        self.world_size = dist.get_world_size()
        # the counts go over a CPU group: reading them never waits for the device
        self._counts = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def __call__(self, step: int, taken: StepRows | None, device: torch.device) -> StepRows | None:
        """Every rank's rows of ``step`` (ids ``[ΣM_r]``, rows ``[ΣM_r, D]``, rank order) on every
        rank; ``None`` when no rank has rows."""
        shapes = self._shapes(taken)
        present = [s for s in shapes if s is not None]
        if not present:
            return None
        _check_shapes(step, present)
        width, dtype = present[0].width, getattr(torch, present[0].dtype)
        most = max(s.rows for s in present)
        counts = [0 if s is None else s.rows for s in shapes]
        ids = torch.zeros(most, dtype=torch.int64, device=device)
        rows = torch.zeros(most, width, dtype=dtype, device=device)
        if taken is not None:
            ids[: len(taken.ids)] = taken.ids.to(device, non_blocking=True)
            rows[: len(taken.rows)] = taken.rows
        all_ids = self.strategy.all_gather(ids).reshape(self.world_size, most)
        all_rows = self.strategy.all_gather(rows).reshape(self.world_size, most, width)
        keep = [r for r, n in enumerate(counts) if n]
        return StepRows(
            torch.cat([all_ids[r, : counts[r]] for r in keep]),
            torch.cat([all_rows[r, : counts[r]] for r in keep]),
            any(s.scaled for s in present),
        )

    def _shapes(self, taken: StepRows | None) -> list[_Shape | None]:
        mine = None
        if taken is not None:
            mine = _Shape(
                int(taken.ids.shape[0]),
                int(taken.rows.shape[1]),
                str(taken.rows.dtype).removeprefix("torch."),
                bool(taken.scaled),
            )
        shapes: list[Any] = [None] * self.world_size
        dist.all_gather_object(shapes, mine, group=self._counts)
        return shapes


def _check_shapes(step: int, shapes: list[_Shape]) -> None:
    widths = {(s.width, s.dtype) for s in shapes}
    if len(widths) > 1:
        raise ConfigError(
            f"GradientLogger(mode='in_flight'): at step {step} the ranks captured rows of different "
            f"widths/dtypes {sorted(widths)}; every rank must train the same model with the same "
            "logger settings (one Trainer launched by Lightning on every device)."
        )
