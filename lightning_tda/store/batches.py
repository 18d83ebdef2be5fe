"""Batch checkpoints of in-flight stores: one optimizer step's rows, written and read (docs/store.md).

``GradientLogger(mode="in_flight")`` logs, for optimizer step ``t``, the projected per-example gradients
of the examples of that step's batch at the weights ``θ_t`` the step started from. Each logged step is
a checkpoint ``checkpoints/<t>`` with attribute ``rows="batch"`` holding ``ids [B_t]`` (unique, sorted)
and ``train [B_t, D]``, the step's learning rates and, optionally, the trainable state ``θ_t`` and the
logged queries' rows. Readers see its rows as a sparse ``[N, D]`` matrix (zero for examples not in the
batch) through the ``"train@batch"`` alias; the plain ``"train"`` of a batch checkpoint is refused,
because methods reading it expect every example's row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from lightning_tda.store import schema
from lightning_tda.store.writer import StoreError, _attr, _open


class InFlightRowsError(StoreError):
    """A method asked a batch (in-flight) checkpoint for rows it does not hold."""


@dataclass
class BatchStep:
    """One logged optimizer step, ready to be written.

    Attributes:
        step: global step of the weights ``θ_t`` the rows were taken at (optimizer steps done before).
        ids: ``[B]`` int64 example ids, unique and ascending.
        rows: ``[B, D]`` fp32 projected gradients of each example's own per-example loss.
        attrs: checkpoint attributes (``lr_sum``, ``lr_cumsum``, ``epoch``, ...).
        state: trainable parameters and buffers at ``θ_t`` (CPU copies), or ``None``.
        queries: ``(rows [Q, D], losses [Q])`` of the logged queries at ``θ_t``, or ``None``.
    """

    step: int
    ids: torch.Tensor
    rows: torch.Tensor
    attrs: dict[str, Any] = field(default_factory=dict)
    state: Mapping[str, torch.Tensor] | None = None
    queries: tuple[torch.Tensor, torch.Tensor] | None = None


def _encode(rows: torch.Tensor, encoding: str, step: int) -> np.ndarray:
    if encoding == "float16" and rows.numel():
        peak = float(rows.abs().max())
        if peak > schema.FP16_MAX:
            raise StoreError(
                f"a projected gradient value ({peak:.3g}) overflows float16 at step {step}; "
                "use GradientLogger(dtype='bfloat16') or dtype='float32'."
            )
    return schema.encode_rows(rows, encoding)


def _write_rows(g: h5py.Group, name: str, rows: torch.Tensor, encoding: str, step: int) -> None:
    ds = g.create_dataset(name, data=_encode(rows, encoding, step), track_times=False)
    ds.attrs["encoding"] = encoding


def write_batch_steps(
    path: str | Path,
    storage_dtype: str,
    steps: Sequence[BatchStep],
    query_ids: torch.Tensor | None = None,
) -> None:
    """Append batch checkpoints to an existing store in one file open.

    Groups are created first, then ``examples/ids`` is extended to the union of every example id seen
    (ascending), then each group is marked ``complete``: a crash at any point leaves complete checkpoints
    whose ids are all in ``examples/ids``, and incomplete ones that the next writer deletes.

    Raises:
        StoreError: a complete checkpoint already exists at one of the steps.
    """
    if not steps:
        return
    with _open(Path(path), "a") as f:
        made = []
        for s in steps:
            ids = s.ids.detach().cpu().numpy().astype(np.int64)
            if ids.ndim != 1 or len(ids) != s.rows.shape[0] or np.any(np.diff(ids) <= 0):
                raise StoreError(
                    f"step {s.step}: batch ids must be unique and ascending, one per row"
                )
            name = schema.checkpoint_name(s.step)
            if name in f:
                if f[name].attrs.get("complete", False):
                    raise StoreError(
                        f"checkpoint at step {s.step} already exists and is complete in {path}"
                    )
                del f[name]
            g = f.create_group(name)
            g.attrs["global_step"] = int(s.step)
            g.attrs[schema.ROWS_KIND] = schema.BATCH_ROWS
            g.create_dataset(schema.ROW_IDS, data=ids, track_times=False)
            _write_rows(g, schema.TRAIN, s.rows, storage_dtype, s.step)
            if s.queries is not None:
                q_rows, q_losses = s.queries
                _write_rows(g, schema.QUERY, q_rows, storage_dtype, s.step)
                g.create_dataset(
                    schema.QUERY_LOSS,
                    data=q_losses.detach().float().cpu().numpy(),
                    track_times=False,
                )
            if s.state is not None:
                sg = g.create_group(schema.STATE)
                for k, v in s.state.items():
                    arr = v.detach().cpu()
                    arr = arr.float().numpy() if arr.dtype == torch.bfloat16 else arr.numpy()
                    sg.create_dataset(k, data=arr, track_times=False)
            made.append((g, s))
        _extend_example_ids(f, np.concatenate([s.ids.cpu().numpy() for s in steps]))
        if query_ids is not None and schema.QUERY_IDS not in f:
            f.create_dataset(schema.QUERY_IDS, data=query_ids.cpu().numpy().astype(np.int64))
        f.flush()
        for g, s in made:
            for k, v in s.attrs.items():
                g.attrs[k] = _attr(v)
            g.attrs["complete"] = True
        f.flush()


def _extend_example_ids(f: h5py.File, new: np.ndarray) -> None:
    old = f[schema.EXAMPLE_IDS][()] if schema.EXAMPLE_IDS in f else np.empty(0, np.int64)
    ids = np.union1d(old, new.astype(np.int64))
    if len(ids) == len(old) and np.array_equal(ids, old):
        return
    if schema.EXAMPLE_IDS in f:
        del f[schema.EXAMPLE_IDS]
    f.create_dataset(schema.EXAMPLE_IDS, data=ids)


def rebuild_example_ids(path: str | Path) -> int:
    """Reset ``examples/ids`` to the ids of the complete batch checkpoints (after a resume's prune).

    Returns:
        The number of examples.
    """
    with _open(Path(path), "a") as f:
        parts = [np.empty(0, np.int64)]
        for g in f.get(schema.CHECKPOINTS, {}).values():
            if g.attrs.get("complete", False) and schema.ROW_IDS in g:
                parts.append(g[schema.ROW_IDS][()])
        ids = np.unique(np.concatenate(parts)).astype(np.int64)
        if schema.EXAMPLE_IDS in f:
            del f[schema.EXAMPLE_IDS]
        f.create_dataset(schema.EXAMPLE_IDS, data=ids)
        f.flush()
        return len(ids)


# -- reading -----------------------------------------------------------------------------------


@dataclass
class RowBlock:
    """Rows ``[start, start + length)`` of a sparse ``[N, D]`` view: only the ``m`` non-empty ones.

    Attributes:
        rows: ``[m, D]`` fp32 rows.
        index: ``[m]`` int64 positions of those rows within the block (``0 <= index < length``).
        length: number of store rows the block covers.
    """

    rows: torch.Tensor
    index: torch.Tensor
    length: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.length, self.rows.shape[1])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RowBlock:
        return RowBlock(
            self.rows.to(device, non_blocking=non_blocking),
            self.index.to(device, non_blocking=non_blocking),
            self.length,
        )

    def dense(self) -> torch.Tensor:
        """``[length, D]`` with zero rows for examples outside the batch."""
        out = self.rows.new_zeros(self.length, self.rows.shape[1])
        out[self.index] = self.rows
        return out


def batch_scores(query: torch.Tensor, block: RowBlock, normalize: bool = False) -> torch.Tensor:
    """``[Q, length]`` inner products of ``query`` ``[Q, D]`` with a block's rows (0 off the batch).

    With ``normalize`` each row is divided by its norm first (cosine).
    """
    out = query.new_zeros(query.shape[0], block.length)
    if block.index.numel():
        rows = block.rows
        if normalize:
            rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
        out[:, block.index] = query @ rows.T
    return out


def batch_pairs(a: RowBlock, b: RowBlock, weight: torch.Tensor) -> torch.Tensor:
    """``[length]``: ``<weight ⊙ a_i, b_i>`` per row of two views of the same batch checkpoint."""
    if not torch.equal(a.index, b.index):
        raise ValueError("self-influence pairs need two datasets of the same batch checkpoint")
    out = torch.zeros(a.length, dtype=torch.float32)
    if a.index.numel():
        out[a.index] = (a.rows * weight * b.rows).sum(dim=1)
    return out


class BatchRows:
    """A batch checkpoint's rows as a read-only sparse ``[N, D]`` matrix in store row order.

    Slicing returns a dense numpy block (zeros off the batch); :meth:`block` returns a
    :class:`RowBlock` holding only the batch's rows, which is what ``StoreReader.iter_blocks`` yields.
    The (small) dataset is read once, on first use.
    """

    def __init__(
        self, rows: h5py.Dataset, ids: np.ndarray, positions: Mapping[int, int], n: int, enc: str
    ) -> None:
        missing = [int(i) for i in ids if int(i) not in positions]
        if missing:
            raise StoreError(
                f"batch checkpoint ids {missing[:5]} are not in the store's examples/ids; the file was "
                "interrupted between writes: resume the fit (or run lightning_tda.store.batches."
                "rebuild_example_ids on it) to repair it"
            )
        pos = np.fromiter((positions[int(i)] for i in ids), dtype=np.int64, count=len(ids))
        self.order = np.argsort(pos, kind="stable")
        self.positions = pos[self.order]
        self.dataset = rows
        self.encoding = enc
        self.shape = (n, rows.shape[1])
        self.ndim = 2
        self.attrs = {**dict(rows.attrs), "encoding": "float32"}
        self._rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def _sorted_rows(self) -> torch.Tensor:
        if self._rows is None:
            self._rows = schema.decode_rows(self.dataset[()], self.encoding)[
                torch.from_numpy(self.order)
            ]
        return self._rows

    def block(self, start: int, stop: int) -> RowBlock:
        lo, hi = np.searchsorted(self.positions, [start, stop])
        return RowBlock(
            self._sorted_rows()[lo:hi],
            torch.from_numpy(self.positions[lo:hi] - start),
            stop - start,
        )

    def __getitem__(self, sel: Any) -> np.ndarray:
        if not isinstance(sel, slice) or sel.step not in (None, 1):
            raise TypeError("a batch checkpoint's sparse view supports contiguous slices only")
        start, stop, _ = sel.indices(self.shape[0])
        return self.block(start, max(start, stop)).dense().numpy()


def in_flight_refusal(step: int, name: str) -> InFlightRowsError:
    """The error for a method reading every example's rows from a batch checkpoint."""
    what = (
        "per-example losses" if name == schema.TRAIN_LOSS else f"the {name!r} rows of every example"
    )
    return InFlightRowsError(
        f"checkpoint {step} was logged in flight (GradientLogger(mode='in_flight')): it holds only the rows "
        f"of that optimizer step's batch, not {what}. In-flight stores answer method='tracin' (per-step "
        "TracIn), 'graddot', 'gradcos' and self_influence(method='tracin'); methods that need every "
        "example's gradient at a checkpoint (influence, source, lorif, datainf, tracin_adam) need a store "
        "logged with GradientLogger(mode='sweep'). StoreReader.batch_rows(step) returns the step's rows."
    )


GUARDED = (
    schema.TRAIN,
    schema.TRAIN_PRECOND,
    schema.TRAIN_FACTORS,
    schema.TRAIN_PRECOND_FACTORS,
    schema.TRAIN_LOSS,
)
