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

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from lightning_tda.errors import (
    InFlightRowsError,  # noqa: F401 (re-exported)
    StoreError,
)
from lightning_tda.store import schema
from lightning_tda.store.writer import (
    Written,
    _attr,
    open_for_update,
    root_integrity,
    seal_group,
    seal_root,
)


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


def _step_arrays(s: BatchStep, storage_dtype: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every dataset of one step's group, by name within the group, as written, and the group
    attributes that describe them (the packed state's index)."""
    ids = s.ids.detach().cpu().numpy().astype(np.int64)
    if ids.ndim != 1 or len(ids) != s.rows.shape[0] or np.any(np.diff(ids) <= 0):
        raise StoreError(f"step {s.step}: batch ids must be unique and ascending, one per row")
    arrays = {schema.ROW_IDS: ids, schema.TRAIN: _encode(s.rows, storage_dtype, s.step)}
    if s.queries is not None:
        arrays[schema.QUERY] = _encode(s.queries[0], storage_dtype, s.step)
        arrays[schema.QUERY_LOSS] = s.queries[1].detach().float().cpu().numpy()
    attrs = {}
    if s.state:  # one packed dataset instead of one per tensor: creating datasets dominates a write
        arrays[schema.STATE_PACKED], attrs[schema.STATE_INDEX] = schema.pack_tensors(s.state)
    return arrays, attrs


def _write_step(
    f: h5py.File, s: BatchStep, storage_dtype: str, path: Any
) -> tuple[h5py.Group, dict[str, h5py.Dataset], dict[str, int], Written]:
    """Create the group of one step with its datasets and attributes (``complete`` included: the
    caller's commit makes the whole flush visible at once); returns it, its datasets by name, the CRCs
    of their bytes and the attributes as written (for :func:`seal_group`)."""
    name = schema.checkpoint_name(s.step)
    if name in f:
        if f[name].attrs.get("complete", False):
            raise StoreError(
                f"checkpoint at step {s.step} already exists and is complete in {path}"
            )
        del f[name]
    g = f.create_group(name)
    arrays, attrs = _step_arrays(s, storage_dtype)
    written = Written()
    written.set(
        g,
        {
            "global_step": int(s.step),
            schema.ROWS_KIND: schema.BATCH_ROWS,
            # the step's other attributes as one JSON attribute: an HDF5 attribute costs ~40 us each
            schema.STEP_META: schema.meta_json({k: _attr(v) for k, v in s.attrs.items()}),
            **attrs,
            "complete": True,
        },
    )
    datasets, crcs = {}, {}
    for key, arr in arrays.items():
        ds = datasets[key] = g.create_dataset(key, data=arr, track_times=False)
        if key in (schema.TRAIN, schema.QUERY):
            written.set(ds, {"encoding": storage_dtype}, key)
        crcs[key] = schema.crc_update(0, arr)
    return g, datasets, crcs, written


def write_batch_steps(
    path: str | Path,
    storage_dtype: str,
    steps: Sequence[BatchStep],
    query_ids: torch.Tensor | None = None,
) -> None:
    """Append batch checkpoints to an existing store in one file open and one commit.

    Each step's group gets its datasets and attributes (``complete``) and is sealed (CRCs of its
    datasets and attributes, computed from what was written, nothing read back); ``examples/ids`` is
    extended to the union of every example id seen (ascending) and the steps are listed in the root
    seal. The journal makes all of it one atomic commit, so a crash at any point leaves the store as
    of the previous commit.

    Raises:
        StoreError: a complete checkpoint already exists at one of the steps.
    """
    if not steps:
        return
    with open_for_update(path) as f:
        for s in steps:
            g, datasets, crcs, written = _write_step(f, s, storage_dtype, path)
            seal_group(g, crcs, datasets, written)
        _extend_example_ids(f, np.concatenate([s.ids.cpu().numpy() for s in steps]))
        if query_ids is not None and schema.QUERY_IDS not in f:
            f.create_dataset(schema.QUERY_IDS, data=query_ids.cpu().numpy().astype(np.int64))
        seal_root(f, [*root_integrity(f).get("checkpoints", []), *(s.step for s in steps)])


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
    with open_for_update(path) as f:
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


class _Part:
    """One batch checkpoint's rows, positioned in store row order."""

    def __init__(self, step: int, rows: h5py.Dataset, positions: np.ndarray, enc: str) -> None:
        self.step = step
        self.dataset = rows
        self.encoding = enc
        self.order = np.argsort(positions, kind="stable")
        self.positions = positions[self.order]
        # rows written by the logger are sorted by id, so their positions ascend: slice them from disk
        self.contiguous = bool(np.all(self.order == np.arange(len(positions))))
        self._cache: torch.Tensor | None = None

    def span(self, start: int, stop: int) -> tuple[int, int]:
        lo, hi = np.searchsorted(self.positions, [start, stop])
        return int(lo), int(hi)

    def read(self, lo: int, hi: int) -> torch.Tensor:
        """Rows ``lo:hi`` in position order, fp32 ``[hi - lo, D]``."""
        if self.contiguous:
            return schema.decode_rows(self.dataset[lo:hi], self.encoding)
        if self._cache is None:
            rows = schema.decode_rows(self.dataset[()], self.encoding)
            self._cache = rows[torch.from_numpy(self.order)]
        return self._cache[lo:hi]


@dataclass
class RowBlock:
    """Store rows ``[start, start + length)`` of batch checkpoints: only the rows their batches hold.

    Lazy: the rows are read when iterated (:meth:`parts`), one checkpoint at a time.

    Attributes:
        spans: ``(j, part, lo, hi, index)`` per checkpoint ``j`` of the view with rows in the block;
            ``index`` ``[m]`` are their positions within the block.
        length: number of store rows the block covers.
        width: ``D``.
        device: where :meth:`parts` puts the rows.
    """

    spans: list[tuple[int, _Part, int, int, torch.Tensor]]
    length: int
    width: int
    device: torch.device | str = "cpu"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.length, self.width)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RowBlock:
        return RowBlock(self.spans, self.length, self.width, device)

    def parts(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(j, index [m], rows [m, D])`` per checkpoint ``j`` (its order in the view's step list)."""
        for j, part, lo, hi, index in self.spans:
            yield j, index.to(self.device), part.read(lo, hi).to(self.device)

    def dense(self) -> torch.Tensor:
        """``[length, D]``: each row summed over the view's checkpoints, zero where none holds it."""
        out = torch.zeros(self.length, self.width, device=self.device)
        for _, index, rows in self.parts():
            out.index_add_(0, index, rows)
        return out


def batch_scores(query: torch.Tensor, block: RowBlock, normalize: bool = False) -> torch.Tensor:
    """``[Q, length]``: ``Σ_j <query_j, row_{j,i}>`` over the view's checkpoints ``j``.

    Args:
        query: ``[Q, D]`` (the same vector for every checkpoint) or ``[Q, T, D]`` (one per checkpoint of
            the view, in its step order, e.g. ``η_t g_q(θ_t)``).
        block: a block of a :class:`BatchRows` view.
        normalize: divide each row by its norm first (cosine).
    """
    q3 = query.unsqueeze(1) if query.dim() == 2 else query
    out = torch.zeros(q3.shape[0], block.length, dtype=q3.dtype, device=q3.device)
    for j, index, rows in block.parts():
        if normalize:
            rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
        out.index_add_(1, index, q3[:, j if q3.shape[1] > 1 else 0] @ rows.T)
    return out


def batch_pairs(a: RowBlock, b: RowBlock, weight: torch.Tensor) -> torch.Tensor:
    """``[length]``: ``Σ_j <weight_j ⊙ a_{j,i}, b_{j,i}>`` for two views of the same checkpoints.

    ``weight``: ``[D]`` or ``[T, D]`` (one per checkpoint of the view)."""
    out = torch.zeros(a.length, dtype=torch.float32)
    parts_b = a.parts() if b is a else b.parts()
    for (j, index, ra), (jb, index_b, rb) in zip(a.parts(), parts_b, strict=True):
        if j != jb or not torch.equal(index, index_b):
            raise ValueError("self-influence pairs need two datasets of the same batch checkpoints")
        w = weight[j] if weight.dim() == 2 else weight
        rb = ra if b is a else rb
        out.index_add_(0, index.cpu(), (ra * w.to(ra.device) * rb).sum(dim=1).cpu())
    return out


def positions_of(example_ids: np.ndarray, ids: np.ndarray, step: int) -> np.ndarray:
    """Store rows of ``ids`` (``example_ids[pos] == ids``), or a clear error for unknown ids."""
    sorter = np.argsort(example_ids, kind="stable")
    idx = np.searchsorted(example_ids, ids, sorter=sorter)
    idx = np.clip(idx, 0, max(len(example_ids) - 1, 0))
    pos = sorter[idx] if len(example_ids) else np.zeros(len(ids), dtype=np.int64)
    bad = ids[example_ids[pos] != ids] if len(example_ids) else ids
    if len(bad):
        raise StoreError(
            f"batch checkpoint {step} has example ids {bad[:5].tolist()} that are not in the store's "
            "examples/ids; the file was interrupted between writes: resume the fit (or call "
            "lightning_tda.store.batches.rebuild_example_ids on it) to repair it"
        )
    return pos.astype(np.int64)


class BatchRows:
    """Batch checkpoints' rows as one read-only sparse ``[N, D]`` matrix in store row order.

    :meth:`block` returns a lazy :class:`RowBlock` (what ``StoreReader.iter_blocks`` yields), which keeps
    the checkpoints apart so that a score can weight each with its own query vector; slicing returns
    a dense numpy block (rows summed over the checkpoints, zeros off their batches).

    Args:
        f: the open store.
        steps: the batch checkpoints of the view.
        name: the row dataset (``"train"``).
        example_ids: ``[N]`` the store's example ids (row order).
        storage_dtype: the store's default row encoding.
    """

    def __init__(
        self,
        f: h5py.File,
        steps: Sequence[int],
        name: str,
        example_ids: np.ndarray,
        storage_dtype: str,
    ) -> None:
        self.parts: list[_Part] = []
        width = None
        for step in steps:
            g = f[schema.checkpoint_name(step)]
            if g.attrs.get(schema.ROWS_KIND) != schema.BATCH_ROWS:
                raise StoreError(f"checkpoint {step} is not a batch (in-flight) checkpoint")
            if name not in g:
                raise KeyError(f"checkpoint {step} has no {name!r} dataset")
            ds = g[name]
            width = ds.shape[1] if width is None else width
            pos = positions_of(example_ids, g[schema.ROW_IDS][()], step)
            enc = schema.dataset_encoding(ds, storage_dtype)
            self.parts.append(_Part(int(step), ds, pos, enc))
        self.shape = (len(example_ids), int(width or 0))
        self.ndim = 2
        self.attrs = {"encoding": "float32"}

    def __len__(self) -> int:
        return self.shape[0]

    def block(self, start: int, stop: int) -> RowBlock:
        spans = []
        for j, part in enumerate(self.parts):
            lo, hi = part.span(start, stop)
            if hi > lo:
                spans.append((j, part, lo, hi, torch.from_numpy(part.positions[lo:hi] - start)))
        return RowBlock(spans, stop - start, self.shape[1])

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
