"""Lazy reader of an attribution store, and the entry point for attribution."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from lightning_tda.capture.layers import LayerSpec
from lightning_tda.capture.lowrank import FactorLayout
from lightning_tda.capture.projection import ProjectionConfig
from lightning_tda.data.ids import ExampleIds, recorded_ids
from lightning_tda.errors import (
    SchemaVersionError,  # noqa: F401 (re-exported)
    StoreError,
)
from lightning_tda.store import schema
from lightning_tda.store.batches import GUARDED, BatchRows, RowBlock, in_flight_refusal
from lightning_tda.store.scan import CrcLane, RowScan
from lightning_tda.store.writer import ReadFile, check_dataset, check_group, check_root, read_bases


@dataclass(frozen=True)
class CheckpointInfo:
    """One complete checkpoint of the store."""

    global_step: int
    epoch: int
    lr_sum: tuple[float, ...]  # per param group, over the steps since the previous checkpoint
    lr_cumsum: tuple[float, ...]  # per param group, since the start of training
    steps_since_previous: int
    trigger: str
    datasets: tuple[str, ...]
    in_flight: bool = False  # a batch checkpoint: only the rows of one optimizer step's batch
    has_kfac: bool = False  # projected K-FAC factors were logged (GradientLogger(curvature=True))

    @property
    def has_precond(self) -> bool:
        return (
            schema.TRAIN_PRECOND in self.datasets or schema.TRAIN_PRECOND_FACTORS in self.datasets
        )

    @property
    def factored(self) -> bool:
        """Whether the train rows are stored as rank-c factors (``GradientLogger(storage="lorif")``)."""
        return schema.TRAIN_FACTORS in self.datasets

    @property
    def has_queries(self) -> bool:
        return schema.QUERY in self.datasets


class FactoredRows:
    """Read-only stand-in for a dense row dataset stored as factors: slicing returns ``U V^T`` per layer.

    Lets every method that reads ``train`` / ``train_precond`` run on a ``storage="lorif"`` store; it
    sees the rank-``c`` reconstruction (exact when ``c`` is at least each per-example gradient's rank).
    """

    def __init__(self, factors: h5py.Dataset, layout: FactorLayout, storage_dtype: str) -> None:
        self.factors = factors
        self.layout = layout
        self.encoding = schema.dataset_encoding(factors, storage_dtype)
        self.shape = (factors.shape[0], layout.dense_width)
        self.ndim = 2
        self.attrs = {**dict(factors.attrs), "encoding": "float32"}

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sel: Any) -> np.ndarray:
        x = schema.decode_rows(self.factors[sel], self.encoding)
        return self.layout.reconstruct(x).numpy()


class StoreReader:
    """Read-only view of a store file; opens the file on demand.

    Args:
        path: the ``.h5`` file written by :class:`~lightning_tda.GradientLogger`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(
                f"no attribution store at {self.path}; check the path given to GradientLogger"
            )
        try:
            with self._h5() as f:
                self._read_meta(f)
        except StoreError:
            raise
        except OSError as e:
            raise StoreError(
                f"{self.path} is not a readable HDF5 file ({e}); was it written by GradientLogger?"
            ) from e
        except (
            ArithmeticError,
            AttributeError,
            LookupError,
            MemoryError,
            RuntimeError,
            TypeError,
            ValueError,
        ) as e:
            raise StoreError(
                f"{self.path} is not a valid lightning_tda store ({type(e).__name__}: {e}); the file is "
                "corrupted or was written by another tool. Re-log the run, or restore the file from a copy."
            ) from e

    def _h5(self) -> ReadFile:
        """The store opened read-only as of its last commit (safe while a fit writes it)."""
        return ReadFile(self.path)

    def _read_meta(self, f: h5py.File) -> None:
        fmt = f.attrs.get("format")
        if fmt != schema.FORMAT:
            raise StoreError(f"{self.path} is not a lightning_tda store (format attribute {fmt!r})")
        version = int(f.attrs.get("schema_version", -1))
        if version not in schema.READABLE_SCHEMA_VERSIONS:
            raise SchemaVersionError(
                f"{self.path} has store schema version {version}; this lightning_tda ({_lib_version()}) reads "
                f"versions {', '.join(map(str, schema.READABLE_SCHEMA_VERSIONS))}. Install the lightning_tda version that wrote it "
                f"(library_version={f.attrs.get('library_version', '?')!r}) or re-log the run."
            )
        self.storage_dtype = str(f.attrs["storage_dtype"])
        self.attrs = {k: f.attrs[k] for k in f.attrs}
        self.layers = [LayerSpec.from_dict(d) for d in json.loads(f.attrs["layers"])]
        self.projection = ProjectionConfig.from_dict(json.loads(f.attrs["projection"]))
        self.layer_groups = json.loads(f.attrs["layer_groups"])
        self.bases = read_bases(f) if self.projection.basis == "pca" else None
        self.width = sum(s.size for s in self.layers)
        self.storage = str(f.attrs.get("storage", "dense"))
        self.factor_layout = (
            FactorLayout.from_json(str(f.attrs["factor_layout"]))
            if "factor_layout" in f.attrs
            else None
        )
        ck = []
        for g in f.get(schema.CHECKPOINTS, {}).values():
            a = schema.group_attrs(g.attrs)
            if not a.get("complete", False):
                continue
            ck.append(
                CheckpointInfo(
                    global_step=int(a["global_step"]),
                    epoch=int(a.get("epoch", -1)),
                    lr_sum=tuple(float(x) for x in np.atleast_1d(a.get("lr_sum", []))),
                    lr_cumsum=tuple(float(x) for x in np.atleast_1d(a.get("lr_cumsum", []))),
                    steps_since_previous=int(a.get("steps_since_previous", 0)),
                    trigger=str(a.get("trigger", "")),
                    datasets=tuple(k for k in g if isinstance(g[k], h5py.Dataset)),
                    in_flight=a.get(schema.ROWS_KIND) == schema.BATCH_ROWS,
                    has_kfac=schema.KFAC in g,
                )
            )
        self.checkpoints = sorted(ck, key=lambda c: c.global_step)
        self.example_ids = (
            torch.from_numpy(f[schema.EXAMPLE_IDS][()])
            if schema.EXAMPLE_IDS in f
            else torch.empty(0)
        )
        self.query_ids = (
            torch.from_numpy(f[schema.QUERY_IDS][()]) if schema.QUERY_IDS in f else None
        )
        self.incomplete = [
            int(g.attrs.get("global_step", -1))
            for g in f.get(schema.CHECKPOINTS, {}).values()
            if not g.attrs.get("complete", False)
        ]
        check_layout(self, f)

    # -- basic access ----------------------------------------------------------------------
    def record(self, name: str) -> dict[str, Any] | None:
        """A JSON root attribute (``task``, ``example_ids``, ...) parsed; ``None`` when absent."""
        raw = self.attrs.get(name)
        return json.loads(raw) if raw else None

    def recorded_ids(self) -> tuple[ExampleIds, bool]:
        """``(spec, positional)``: how the logged training data carries its example ids (the
        ``example_ids`` record; data the logger numbered by position is numbered the same way)."""
        return recorded_ids(self.record("example_ids"))

    @property
    def num_examples(self) -> int:
        return len(self.example_ids)

    @property
    def steps(self) -> list[int]:
        return [c.global_step for c in self.checkpoints]

    def checkpoint(self, step: int | None = None) -> CheckpointInfo:
        """The checkpoint at ``step`` (the last one when ``None``)."""
        if not self.checkpoints:
            raise StoreError(
                f"{self.path} has no complete checkpoint yet"
                + (
                    f" (incomplete: steps {self.incomplete}; resume the fit to finish them)"
                    if self.incomplete
                    else ""
                )
            )
        if step is None:
            return self.checkpoints[-1]
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise ValueError(
                f"a checkpoint is named by its global step, an int (this store has {self.steps}); "
                f"got {step!r}"
            )
        for c in self.checkpoints:
            if c.global_step == int(step):
                return c
        raise KeyError(f"no complete checkpoint at step {step}; the store has steps {self.steps}")

    def _dataset(
        self, f: h5py.File, step: int, name: str
    ) -> h5py.Dataset | FactoredRows | BatchRows:
        base = schema.batch_base(name)
        if base is not None or name in GUARDED:
            group = f.get(schema.checkpoint_name(step))
            in_flight = group is not None and group.attrs.get(schema.ROWS_KIND) == schema.BATCH_ROWS
            if base is not None:
                return (
                    self._batch_view(f, step, name) if in_flight else self._dataset(f, step, base)
                )
            if in_flight:
                raise in_flight_refusal(step, name)
        path = f"{schema.checkpoint_name(step)}/{name}"
        factored = f"{schema.checkpoint_name(step)}/{schema.FACTORED.get(name, '')}"
        if path not in f and name in schema.FACTORED and factored in f:
            if self.factor_layout is None:
                raise StoreError(
                    f"{self.path} stores factored rows at step {step} but no factor_layout attribute; "
                    "the file is incomplete or was written by another tool"
                )
            return FactoredRows(f[factored], self.factor_layout, self.storage_dtype)
        if path not in f:
            hint = (
                " (log with optimizer_state=True and an Adam-family optimizer)"
                if name == schema.TRAIN_PRECOND
                else ""
            )
            raise KeyError(f"checkpoint {step} has no {name!r} dataset{hint}")
        return f[path]

    def _batch_view(self, f: h5py.File, step: int, name: str) -> BatchRows:
        """Batch checkpoints' rows as a sparse ``[N, D]`` view (``name``: a ``schema.batch_view`` alias)."""
        steps = schema.batch_steps(name) or [step]
        base = schema.batch_base(name)
        return BatchRows(f, steps, base, self.example_ids.numpy(), self.storage_dtype)

    def batch_rows(self, step: int, name: str = schema.TRAIN) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [B], rows [B, D] fp32)`` of a batch (in-flight) checkpoint, ids ascending."""
        if not self.checkpoint(step).in_flight:
            raise ValueError(
                f"checkpoint {step} is a sweep checkpoint holding every example; use read(step, {name!r})"
            )
        with self._h5() as f:
            g = f[schema.checkpoint_name(step)]
            ds = g[name]
            rows = schema.decode_rows(ds[()], schema.dataset_encoding(ds, self.storage_dtype))
            return torch.from_numpy(g[schema.ROW_IDS][()]), rows

    def stored_rows(self, step: int, name: str = schema.TRAIN) -> tuple[str, FactorLayout]:
        """The dataset actually holding rows ``name`` at ``step``, and how to decode it.

        Returns ``("train_factors", layout)`` on a factored checkpoint, ``("train", identity layout)``
        on a dense one (every block raw), so a method can work on factors without caring which.
        """
        ck = self.checkpoint(step)
        factored = schema.FACTORED.get(name)
        if factored is not None and factored in ck.datasets:
            if self.factor_layout is None:
                raise StoreError(
                    f"{self.path} stores factored rows but no factor_layout attribute; the file is incomplete"
                )
            return factored, self.factor_layout
        return name, FactorLayout.identity(self.layers)

    def read(
        self, step: int, name: str = schema.TRAIN, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Rows ``[start:stop]`` of a checkpoint dataset as fp32 ``[n, D]`` (or ``[n]``).

        On a ``storage="lorif"`` checkpoint ``train`` / ``train_precond`` are reconstructed from their
        factors (``train_factors`` / ``train_precond_factors`` read the factors themselves)."""
        with self._h5() as f:
            ds = self._dataset(f, step, name)
            arr = ds[start:stop]
            enc = schema.dataset_encoding(ds, self.storage_dtype)
            whole = start == 0 and (stop is None or stop >= len(ds))
            self._verify(ds, arr if whole and isinstance(ds, h5py.Dataset) else None)
        if arr.ndim == 2:
            return schema.decode_rows(arr, enc)
        return torch.from_numpy(np.ascontiguousarray(arr))

    def iter_blocks(
        self,
        steps_and_names: Sequence[tuple[int, str]],
        block_rows: int,
        rows: tuple[int, int] | None = None,
    ) -> Iterator[tuple[int, int, list[torch.Tensor | RowBlock]]]:
        """Yield ``(start, stop, [block per (step, name)])`` over the train rows, with one open file.

        ``rows=(lo, hi)`` limits the scan to rows ``lo:hi`` (blocks start at ``lo``), e.g. one
        process's shard of a distributed scoring pass (:mod:`lightning_tda.methods.sharding`).

        ``train`` / ``train_precond`` of a factored checkpoint are reconstructed block by block. A batch
        checkpoint's ``"train@batch"`` (or ``"train@batch:<steps>"``, :func:`schema.batch_view`) yields a
        lazy :class:`RowBlock` of the rows of those steps' batches that fall in the block.

        Rows are read as :mod:`lightning_tda.store.scan` describes (memory-mapped where possible). A
        dataset this reader has not verified yet is checksummed as it is read, on a background thread
        while the caller uses each block; a full scan ends with its checksum verified (a damaged
        dataset raises :class:`StoreError` there)."""
        with self._h5() as f, CrcLane() as lane:
            dsets = [self._scanned(self._dataset(f, s, n), lane) for s, n in steps_and_names]
            encs = [schema.dataset_encoding(d, self.storage_dtype) for d in dsets]
            if not any(isinstance(d, BatchRows) for d in dsets):  # (those look up groups lazily)
                f.unlock()  # the datasets are open: a long scan does not hold up the writer's commits
            lo, n = (0, self.num_examples) if rows is None else _row_range(rows, self.num_examples)
            for start in range(lo, n, block_rows):
                stop = min(n, start + block_rows)
                yield (
                    start,
                    stop,
                    [
                        d.block(start, stop)
                        if isinstance(d, BatchRows)
                        else schema.decode_rows(d[start:stop], e)
                        for d, e in zip(dsets, encs, strict=True)
                    ],
                )
            for d in dsets:  # a full scan ends with each dataset's checksum verified
                scan = d.factors if isinstance(d, FactoredRows) else d
                if isinstance(scan, RowScan) and scan.checksummed and scan.done():
                    self._verify(scan.ds, crc=scan.crc())

    def state_step(self, step: int) -> int:
        """The checkpoint whose saved state stands for the weights at ``step``: ``step`` itself, or for
        an in-flight step logged without its own state (``save_state="auto"``) the latest step before
        it whose state was saved (its ``state_step`` attribute)."""
        with self._h5() as f:
            g = f.get(schema.checkpoint_name(step))
            if g is None or schema.has_state(g):
                return int(step)
            return int(schema.group_attrs(g.attrs).get(schema.STATE_STEP, step))

    def state(self, step: int) -> dict[str, torch.Tensor]:
        """Trainable parameters and buffers saved at a checkpoint (see :meth:`state_step`)."""
        step = self.state_step(step)
        with self._h5() as f:
            c = f.get(schema.checkpoint_name(step))
            if c is not None and schema.STATE_PACKED in c:
                packed = self._checked(c[schema.STATE_PACKED])
                out = schema.unpack_tensors(packed, str(c.attrs[schema.STATE_INDEX]))
                return {k.replace("|", "."): v for k, v in out.items()}
            g = None if c is None else c.get(schema.STATE)
            if g is None:
                raise KeyError(
                    f"checkpoint {step} saved no model state (GradientLogger(save_state=False)); query gradients "
                    "cannot be recomputed: use queries='logged' or re-log with save_state=True"
                )
            out = {}
            g.visititems(
                lambda k, d: (
                    out.__setitem__(k, torch.from_numpy(self._checked(d)))
                    if isinstance(d, h5py.Dataset)
                    else None
                )
            )
            return {k.replace("|", "."): v for k, v in out.items()}

    def arrays(self, step: int, group: str) -> dict[str, np.ndarray]:
        with self._h5() as f:
            g = f.get(f"{schema.checkpoint_name(step)}/{group}")
            if g is None:
                return {}
            out: dict[str, np.ndarray] = {}
            g.visititems(
                lambda k, d: (
                    out.__setitem__(k, self._checked(d)) if isinstance(d, h5py.Dataset) else None
                )
            )
            return out

    # -- integrity ------------------------------------------------------------------------------
    def _verify(self, ds: Any, arr: np.ndarray | None = None, crc: int | None = None) -> None:
        """Check a dataset's CRC once per reader (``arr``: its whole content, already read;
        ``crc``: the CRC of its bytes, already computed)."""
        raw = ds.factors if isinstance(ds, FactoredRows) else ds
        if not isinstance(raw, h5py.Dataset) or schema.CRC not in raw.attrs:
            return
        verified = self.__dict__.setdefault("_verified", set())
        if raw.name in verified:
            return
        if crc is None and arr is not None:
            crc = schema.crc_update(0, arr)
        try:
            check_dataset(raw, crc)
        except ValueError as e:
            raise _bad(self, str(e)) from e
        verified.add(raw.name)

    def _checked(self, ds: h5py.Dataset) -> np.ndarray:
        """A whole (small) dataset, its checksum verified."""
        arr = ds[()]
        self._verify(ds, np.asarray(arr))
        return arr

    def _scanned(self, ds: Any, lane: CrcLane) -> Any:
        """``ds`` read block by block through a :class:`RowScan`, which checksums its rows on ``lane``
        as :meth:`iter_blocks` reads them in order unless this reader verified them already."""
        raw = ds.factors if isinstance(ds, FactoredRows) else ds
        if not isinstance(raw, h5py.Dataset):
            return ds
        verified = self.__dict__.get("_verified", set())
        checksum = schema.CRC in raw.attrs and raw.name not in verified
        scan = RowScan(raw, lane if checksum else None)
        if isinstance(ds, FactoredRows):
            ds.factors = scan
            return ds
        return scan

    def kfac_factors(self, step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer: (A' [k_in, k_in], S' [k_out, k_out])}`` projected K-FAC factors of a checkpoint."""
        arrays = self.arrays(step, schema.KFAC)
        if not arrays:
            raise KeyError(
                f"checkpoint {step} has no curvature factors; log with GradientLogger(curvature=True) "
                "or use mode='raw'"
            )
        out = {}
        for key in arrays:
            name, side = key.rsplit("/", 1)
            if side == "A":
                out[name] = (
                    torch.from_numpy(arrays[key]).float(),
                    torch.from_numpy(arrays[f"{name}/S"]).float(),
                )
        return out

    def checkpoint_attrs(self, step: int) -> dict[str, Any]:
        with self._h5() as f:
            return schema.group_attrs(f[schema.checkpoint_name(step)].attrs)

    def column_weights(self, step: int, per_group: Sequence[float]) -> torch.Tensor:
        """``[D]`` vector holding each layer's parameter-group value on that layer's columns."""
        w = torch.ones(self.width, dtype=torch.float32)
        for s in self.layers:
            g = int(self.layer_groups.get(s.name, 0))
            if g >= len(per_group):
                raise StoreError(
                    f"layer {s.name} maps to param group {g} but checkpoint {step} has {len(per_group)}"
                )
            w[s.offset : s.offset + s.size] = float(per_group[g])
        return w


def _lib_version() -> str:
    from lightning_tda._version import __version__

    return __version__


# -- layout checks ----------------------------------------------------------------------------------


def _bad(reader: StoreReader, what: str) -> StoreError:
    return StoreError(
        f"{reader.path} is not a valid lightning_tda store: {what}. The file is corrupted or was written "
        "by another tool; re-log the run, or restore the file from a copy."
    )


def check_layout(reader: StoreReader, f: h5py.File) -> None:
    """Check the shapes and dtypes every method relies on, so a damaged or foreign file fails at open
    with a :class:`StoreError` instead of a wrong score later."""
    try:
        sealed = check_root(f).get("checkpoints", [])
        for name in (schema.EXAMPLE_IDS, schema.QUERY_IDS):
            if isinstance(f.get(name), h5py.Dataset):
                check_dataset(f[name])
        for g in f.get(schema.CHECKPOINTS, {}).values():
            if schema.INTEGRITY in g.attrs:
                check_group(g)
                if not g.attrs.get("complete", False):
                    raise ValueError(f"{g.name} is sealed but not marked complete")
    except ValueError as e:
        raise _bad(reader, str(e)) from e
    lost = sorted(set(sealed) - set(reader.steps))
    if lost:
        raise _bad(reader, f"complete checkpoints {lost} are missing")
    if reader.storage_dtype not in schema.STORAGE_DTYPES:
        raise _bad(
            reader, f"storage_dtype {reader.storage_dtype!r} is not one of {schema.STORAGE_DTYPES}"
        )
    offset = 0
    for s in reader.layers:
        if s.offset != offset or s.k_out < 1 or s.k_in < 1:
            raise _bad(
                reader,
                f"layer {s.name!r} has offset {s.offset} and size {s.k_out}x{s.k_in}; "
                f"expected offset {offset} and positive sizes",
            )
        offset += s.size
    if not reader.layers:
        raise _bad(reader, "it lists no captured layer")
    for name, ids in (("examples/ids", reader.example_ids), ("queries/ids", reader.query_ids)):
        if ids is not None and ids.numel() and (ids.dim() != 1 or ids.dtype != torch.int64):
            raise _bad(reader, f"{name} is not a 1-D int64 array ({ids.dtype}, {tuple(ids.shape)})")
    if len(torch.unique(reader.example_ids)) != reader.num_examples:
        raise _bad(reader, "examples/ids repeats an example id")
    seen: set[int] = set()
    for c in reader.checkpoints:
        if c.global_step in seen:
            raise _bad(reader, f"two checkpoints claim global step {c.global_step}")
        seen.add(c.global_step)
        g = f.get(schema.checkpoint_name(c.global_step))
        if not isinstance(g, h5py.Group):
            raise _bad(
                reader, f"a checkpoint claims global step {c.global_step} under another name"
            )
        _check_checkpoint(reader, g, c)


def _check_checkpoint(reader: StoreReader, g: h5py.Group, c: CheckpointInfo) -> None:
    step = c.global_step
    ids = g.get(schema.ROW_IDS)
    if not isinstance(ids, h5py.Dataset) or ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise _bad(reader, f"checkpoint {step} has no 1-D integer {schema.ROW_IDS!r} dataset")
    n = ids.shape[0] if c.in_flight else reader.num_examples
    if ids.shape[0] != n:
        raise _bad(reader, f"checkpoint {step} has {ids.shape[0]} row ids for {n} examples")
    if not (schema.TRAIN in g or schema.TRAIN_FACTORS in g):
        raise _bad(reader, f"checkpoint {step} has no {schema.TRAIN!r} rows")
    for name in (
        schema.TRAIN,
        schema.TRAIN_PRECOND,
        schema.TRAIN_FACTORS,
        schema.TRAIN_PRECOND_FACTORS,
    ):
        if name in g:
            width = reader.width
            if name in (schema.TRAIN_FACTORS, schema.TRAIN_PRECOND_FACTORS):
                if reader.factor_layout is None:
                    raise _bad(
                        reader, f"checkpoint {step} stores factored rows but no factor_layout"
                    )
                width = reader.factor_layout.width
            _check_rows(reader, g[name], step, name, (n, width))
    if schema.TRAIN_LOSS in g:
        _check_vector(reader, g[schema.TRAIN_LOSS], step, schema.TRAIN_LOSS, n, "f")
    if schema.QUERY in g:
        q = g[schema.QUERY].shape[0] if g[schema.QUERY].ndim == 2 else -1
        if reader.query_ids is not None and q != len(reader.query_ids):
            raise _bad(
                reader,
                f"checkpoint {step} has {q} query rows for {len(reader.query_ids)} query ids",
            )
        _check_rows(reader, g[schema.QUERY], step, schema.QUERY, (q, reader.width))
        if schema.QUERY_LOSS in g:
            _check_vector(reader, g[schema.QUERY_LOSS], step, schema.QUERY_LOSS, q, "f")


def _check_rows(reader: StoreReader, ds: h5py.Dataset, step: int, name: str, shape: tuple) -> None:
    if not isinstance(ds, h5py.Dataset) or ds.shape != shape:
        got = ds.shape if isinstance(ds, h5py.Dataset) else type(ds).__name__
        raise _bad(reader, f"checkpoint {step} {name!r} has shape {got}, expected {shape}")
    enc = schema.dataset_encoding(ds, reader.storage_dtype)
    if enc not in schema.STORAGE_DTYPES or ds.dtype != schema.h5_dtype(enc):
        raise _bad(reader, f"checkpoint {step} {name!r} is {ds.dtype} with encoding {enc!r}")


def _check_vector(
    reader: StoreReader, ds: h5py.Dataset, step: int, name: str, n: int, kind: str
) -> None:
    if not isinstance(ds, h5py.Dataset) or ds.shape != (n,) or ds.dtype.kind != kind:
        got = (ds.shape, str(ds.dtype)) if isinstance(ds, h5py.Dataset) else type(ds).__name__
        raise _bad(reader, f"checkpoint {step} {name!r} is {got}, expected [{n}] of kind {kind!r}")


def _row_range(rows: tuple[int, int], n: int) -> tuple[int, int]:
    lo, hi = (int(r) for r in rows)
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"rows=({lo}, {hi}) is not a range of the store's {n} rows")
    return lo, hi
