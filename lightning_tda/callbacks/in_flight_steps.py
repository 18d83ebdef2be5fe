"""Logged in-flight steps on their way to the store: kept without a host sync, written by the writer.

The training thread keeps, per logged optimizer step, a :class:`LoggedStep`: host copies (in flight
on CUDA) of the step's ids and rows, its attributes and, when :class:`StatePolicy` says so, a snapshot
of ``θ_t``. The background writer turns a group of them into :class:`~lightning_tda.store.batches.BatchStep`
rows (waiting for the copies, merging repeated ids, checking finiteness) and writes them in one commit
(:func:`write_logged_steps`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_tda.callbacks.in_flight import StepRows, finished_rows
from lightning_tda.capture.host_copy import HostCopy
from lightning_tda.store.batches import BatchStep, write_batch_steps


@dataclass
class LoggedStep:
    """One logged optimizer step waiting for the writer.

    Attributes:
        step: the global step of ``θ_t``.
        rows: host copies of ``{"ids": [M], "rows": [M, D]}`` (unmerged, see :class:`StepRows`).
        scaled: the rows carry a loss scaler's scale (non-finite ones: the scaler skips the step).
        attrs: the checkpoint's attributes.
        state: host snapshot of the trainable state ``θ_t``, or ``None``.
        queries: host copies of the logged queries' ``{"rows": [Q, D], "losses": [Q]}``, or ``None``.
    """

    step: int
    rows: HostCopy
    scaled: bool
    attrs: dict[str, Any]
    state: HostCopy | None = None
    queries: HostCopy | None = None

    @classmethod
    def keep(
        cls,
        step: int,
        taken: StepRows,
        attrs: dict[str, Any],
        state: Mapping[str, torch.Tensor] | None,
        queries: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> LoggedStep:
        """Queue the host copies (a snapshot of ``state``: the optimizer step changes it next)."""
        return cls(
            step,
            HostCopy({"ids": taken.ids, "rows": taken.rows}),
            taken.scaled,
            attrs,
            None if state is None else HostCopy(state, snapshot=True),
            None if queries is None else HostCopy({"rows": queries[0], "losses": queries[1]}),
        )

    def batch_step(self) -> BatchStep | None:
        """The step as written (merged, finite), or ``None`` when a GradScaler skips it."""
        t = self.rows.wait()
        merged = finished_rows(self.step, t["ids"], t["rows"], self.scaled)
        if merged is None:
            return None
        queries = None
        if self.queries is not None:
            q = self.queries.wait()
            queries = (q["rows"], q["losses"])
        state = None if self.state is None else self.state.wait()
        return BatchStep(self.step, merged[0], merged[1], self.attrs, state, queries)


def write_logged_steps(
    path: Path,
    storage_dtype: str,
    steps: Sequence[LoggedStep],
    query_ids: torch.Tensor | None,
    verbose: bool,
) -> None:
    """The writer's job: one commit holding every step of ``steps`` that is not skipped."""
    t0 = time.perf_counter()
    batch = [b for s in steps if (b := s.batch_step()) is not None]
    write_batch_steps(path, storage_dtype, batch, query_ids)
    if verbose and batch:
        rows = sum(len(b.ids) for b in batch)
        rank_zero_info(
            f"GradientLogger: in flight, steps {batch[0].step}..{batch[-1].step} ({len(batch)} steps, "
            f"{rows} rows), {time.perf_counter() - t0:.2f}s -> {path}"
        )


class StatePolicy:
    """At which logged in-flight steps ``θ_t`` is saved (``CaptureConfig.save_state``).

    ``True``: every logged step; ``False``: none; ``"auto"``: the first logged step of the fit, then
    whenever the row bytes logged since the last saved state reach the state's own bytes, so saving
    the state at most doubles what a run writes. A step without its own state records ``state_step``,
    the latest step whose state was saved (query gradients recomputed for it use that state).

    Args:
        save_state: the setting.
        state_bytes: bytes of one trainable-state snapshot.
        row_bytes: stored bytes of one row (``D`` times the storage dtype's size).
    """

    def __init__(
        self, save_state: bool | Literal["auto"], state_bytes: int, row_bytes: int
    ) -> None:
        self.save_state = save_state
        self.state_bytes = state_bytes
        self.row_bytes = row_bytes
        self.last: int | None = None  # the latest logged step whose state is saved
        self._since = 0

    def due(self, step: int, num_rows: int) -> bool:
        """Whether to save ``θ_t`` at logged step ``step`` of ``num_rows`` rows (updates the policy)."""
        if self.save_state is False:
            return False
        self._since += num_rows * self.row_bytes
        if self.save_state is True or self.last is None or self._since >= self.state_bytes:
            self.last, self._since = step, 0
            return True
        return False
