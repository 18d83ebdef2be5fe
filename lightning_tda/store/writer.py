"""Crash-safe writer of the attribution store.

Crash safety rests on these rules:

1. Every open for writing goes through :class:`StoreFile`: a rollback journal
   (:mod:`lightning_tda.store.journal`) makes each completed HDF5 flush an atomic commit. A process
   killed anywhere, inside a flush too, leaves the file as of its last commit (the next opener undoes
   the rest; readers see that state meanwhile), and a failed write (a full disk) rolls back to it.
   A new file appears at its path only at its first commit. Commits are fsync'ed (write-ahead
   journal, then store, then directory), so a power cut leaves the file as of its last returned
   commit or a later one (``journal.DURABLE = False`` turns that off).
2. A checkpoint's datasets are created contiguous with early allocation and committed before any
   row is written, so rows go to raw bytes that nothing complete references (no journal needed).
3. ``complete=True``, the checkpoint's seal (CRCs of its datasets and attributes, see
   ``schema.INTEGRITY``) and its entry in the root seal are one commit, after every row is written.
   Readers ignore checkpoints without it; the next writer reuses or deletes them.
4. The file is open only while a checkpoint is written. Readers (:class:`ReadFile`) take a shared
   lock while they read metadata, the writer an exclusive one while it commits.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from lightning_tda.capture.lowrank import FactorLayout
from lightning_tda.errors import StoreError  # noqa: F401 (re-exported)
from lightning_tda.store import journal, schema


def _create_early(
    group: h5py.Group, name: str, shape: tuple[int, ...], dtype: np.dtype
) -> h5py.Dataset:
    """Contiguous dataset whose storage is allocated now, so later writes touch no metadata."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    space = h5py.h5s.create_simple(shape)
    tid = h5py.h5t.py_create(dtype, logical=True)
    dsid = h5py.h5d.create(group.id, name.encode(), tid, space, dcpl=dcpl)
    return h5py.Dataset(dsid)


def read_bases(f: h5py.File) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] | None:
    g = f.get(schema.BASES)
    if g is None or not g.attrs.get("complete", False):
        return None
    if schema.INTEGRITY in g.attrs:
        check_group(g)
        g.visititems(lambda _, d: check_dataset(d) if isinstance(d, h5py.Dataset) else None)
    out = {}
    for name, lg in g.items():
        out[name] = tuple(
            torch.from_numpy(lg[side][()]) if side in lg else None for side in ("out", "in")
        )
    return out


def _attr(v: Any) -> Any:
    """HDF5-storable attribute value (str subclasses such as torch's version become plain str)."""
    return str(v) if isinstance(v, str) else v


@dataclass
class Written:
    """Attributes a writer just set, as it set them: ``group`` on the group, ``datasets`` by dataset
    name (see :func:`seal_group`)."""

    group: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def set(self, obj: h5py.Group | h5py.Dataset, values: Mapping[str, Any], key: str = "") -> None:
        """Set ``values`` as attributes of ``obj`` (the group, or its dataset ``key``) and record them."""
        into = self.group if not key else self.datasets.setdefault(key, {})
        for k, v in values.items():
            obj.attrs[k] = v
            into[k] = v


def seal_group(
    g: h5py.Group,
    data_crcs: Mapping[str, int] | None = None,
    datasets: Mapping[str, h5py.Dataset] | None = None,
    written: Written | None = None,
) -> None:
    """Seal a finished group: a CRC on every dataset in it, and its ``integrity`` attribute (CRC of
    its attributes, names of its datasets). Readers then refuse it if any of that changes.

    ``data_crcs``: the CRC of the raw bytes of datasets (by name within ``g``) already computed from
    the arrays written, so they are not read back. ``datasets``: every dataset of the group, by name,
    when the caller made them all (saves walking the group). ``written``: the attributes of the group
    and of those datasets exactly as the caller set them (plain ints, floats, bools and strings), so
    none is read back either (:func:`check_group` recomputes the same CRC from the file)."""
    known = data_crcs or {}
    if datasets is None:
        found: dict[str, h5py.Dataset] = {}
        g.visititems(lambda n, o: found.__setitem__(n, o) if isinstance(o, h5py.Dataset) else None)
        datasets = found
    for name, ds in datasets.items():
        ds_attrs = None if written is None else written.datasets.get(name, {})
        ds.attrs[schema.CRC] = schema.dataset_crc(ds, known.get(name), ds_attrs)
    attrs = g.attrs if written is None else written.group
    keys = sorted(k for k in attrs if k != schema.INTEGRITY)
    g.attrs[schema.INTEGRITY] = json.dumps(
        {
            "attrs": {"keys": keys, "crc32": schema.attrs_crc(attrs, keys)},
            "datasets": sorted(datasets),
        }
    )


def check_group(g: h5py.Group) -> None:
    """Verify a sealed group's attributes and that its datasets are all there (their bytes are checked
    when read); raises ``ValueError`` naming what does not match."""
    info = json.loads(g.attrs[schema.INTEGRITY])
    keys = info["attrs"]["keys"]
    missing = [k for k in keys if k not in g.attrs]
    if missing:
        raise ValueError(f"{g.name} lost its attributes {missing}")
    if schema.attrs_crc(g.attrs, keys) != info["attrs"]["crc32"]:
        raise ValueError(f"the attributes of {g.name} do not match their checksum")
    gone = [n for n in info["datasets"] if not isinstance(g.get(n), h5py.Dataset)]
    if gone:
        raise ValueError(f"{g.name} lost its datasets {gone}")


def check_dataset(ds: h5py.Dataset, data_crc: int | None = None) -> None:
    """Verify a dataset's bytes and attributes against its CRC (when it has one)."""
    want = ds.attrs.get(schema.CRC)
    if want is not None and schema.dataset_crc(ds, data_crc) != int(want):
        raise ValueError(f"{ds.name} does not match its checksum")


def root_integrity(f: h5py.File) -> dict[str, Any]:
    """The root ``integrity`` record (empty for a store written before sealing existed)."""
    raw = f.attrs.get(schema.INTEGRITY)
    return json.loads(raw) if raw is not None else {}


def seal_root(f: h5py.File, checkpoints: list[int] | None = None) -> None:
    """Seal the root attributes (and ``examples/ids``, ``queries/ids``); ``checkpoints`` replaces the
    list of sealed checkpoints a reader must find complete."""
    old = root_integrity(f)
    keys = sorted(k for k in f.attrs if k != schema.INTEGRITY)
    present = [
        n for n in (schema.EXAMPLE_IDS, schema.QUERY_IDS) if isinstance(f.get(n), h5py.Dataset)
    ]
    new = {
        "attrs": {"keys": keys, "crc32": schema.attrs_crc(f.attrs, keys)},
        "checkpoints": sorted(old.get("checkpoints", []) if checkpoints is None else checkpoints),
        "datasets": sorted(set(old.get("datasets", [])) | set(present)),
    }
    if new != old:
        f.attrs[schema.INTEGRITY] = json.dumps(new, sort_keys=True)
    for name in (schema.EXAMPLE_IDS, schema.QUERY_IDS):
        ds = f.get(name)
        if isinstance(ds, h5py.Dataset) and schema.CRC not in ds.attrs:
            ds.attrs[schema.CRC] = schema.dataset_crc(ds)


def check_root(f: h5py.File) -> dict[str, Any]:
    """Verify the root seal (when there is one); raises ``ValueError`` naming what does not match."""
    info = root_integrity(f)
    if info:
        keys = info["attrs"]["keys"]
        missing = [k for k in keys if k not in f.attrs]
        if missing:
            raise ValueError(f"root attributes {missing} are missing")
        if schema.attrs_crc(f.attrs, keys) != info["attrs"]["crc32"]:
            raise ValueError("the root attributes do not match their checksum")
        gone = [n for n in info.get("datasets", []) if not isinstance(f.get(n), h5py.Dataset)]
        if gone:
            raise ValueError(f"the datasets {gone} are missing")
    return info


_DISK_FULL = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "the file size limit was hit",
}
if hasattr(errno, "EDQUOT"):
    _DISK_FULL[errno.EDQUOT] = "the disk quota is exhausted"


def io_error(path: Path, err: BaseException) -> StoreError:
    """A :class:`StoreError` naming what failed while writing ``path`` and what to do."""
    code = getattr(err, "errno", None)
    if code in _DISK_FULL or "No space left" in str(err):
        what = _DISK_FULL.get(code, _DISK_FULL[errno.ENOSPC])
        return StoreError(
            f"disk full: {what} while writing the attribution store {path} ({err}). The store was rolled "
            "back to its last commit: complete checkpoints stay readable and the interrupted one is marked "
            "incomplete. Free disk space (or pass GradientLogger another path), then resume the fit from "
            "its last Lightning checkpoint with trainer.fit(..., ckpt_path=...)."
        )
    return StoreError(
        f"I/O error while writing the attribution store {path} ({err}); the store was rolled back to its "
        "last commit. Check the disk, then resume the fit from its last Lightning checkpoint."
    )


class StoreFile(h5py.File):
    """The store opened for writing through a :class:`~lightning_tda.store.journal.JournaledFile`.

    Every completed ``flush()`` is an atomic commit, on disk when it returns (``durable``, default
    :data:`lightning_tda.store.journal.DURABLE`: fsync'ed, so it survives a power cut); ``close()``
    after an error rolls back to the last one. A write that failed (disk full) raises
    :class:`StoreError` at the next ``flush``/``close`` (and :meth:`check`)."""

    def __init__(
        self, path: Path, lock_timeout: float | None = None, durable: bool | None = None
    ) -> None:
        self.journal = journal.JournaledFile(
            path, journal.LOCK_TIMEOUT if lock_timeout is None else lock_timeout, durable
        )
        self.store_path = Path(path)
        try:
            super().__init__(self.journal, "w" if self.journal.fresh else "r+")
        except BaseException:
            self.journal.close(commit=False)
            raise
        try:
            check_root(self)
        except (ValueError, KeyError, TypeError) as e:
            super().close()
            self.journal.close(commit=False)
            raise StoreError(
                f"{path} is damaged ({e}); refusing to write to it. Restore it from a copy or start a new store."
            ) from e
        _WRITING.add(str(self.store_path.resolve()))

    def check(self, cause: BaseException | None = None) -> None:
        """Raise what stopped the writes, if anything: a :class:`StoreError` for an I/O error (e.g. a
        full disk), else the interrupt itself."""
        err = self.journal.error
        if err is None:
            return
        if isinstance(err, OSError):
            raise io_error(self.store_path, err) from (cause or err)
        raise err

    def flush(self) -> None:
        try:
            seal_root(self)
            super().flush()
        except Exception as e:
            self.check(e)
            raise
        self.check()

    def close(self) -> None:
        if self.journal.fd < 0:
            return
        ok = False
        try:
            if self.id.valid:
                if self.journal.error is None:
                    seal_root(self)
                self.journal.closing = True  # HDF5's flush inside close is not a commit: one commit
                super().close()
            ok = True
        finally:
            _WRITING.discard(str(self.store_path.resolve()))
            self.journal.close(commit=ok)
        self.check()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except Exception:
            if exc_type is None:
                raise  # otherwise the error in flight says more
        if exc_type is not None and not isinstance(exc, StoreError):
            self.check(exc)  # an h5py error caused by a failed write: say what failed


_WRITING: set[str] = set()  # stores this process has open for writing


class ReadFile(h5py.File):
    """A store opened read-only as of its last commit, under a shared lock until :meth:`unlock`.

    While the lock is held no writer commits, so metadata read through it is consistent even while a
    fit writes the store. A commit left unfinished by a killed writer is undone in memory
    (:class:`~lightning_tda.store.journal.RolledBackView`); the file is not changed."""

    def __init__(self, path: str | os.PathLike, lock_timeout: float | None = None) -> None:
        path = Path(path)
        timeout = journal.LOCK_TIMEOUT if lock_timeout is None else lock_timeout
        self._path = path
        self._lock_fd = os.open(path, os.O_RDONLY | journal.O_BINARY)
        self._view = False
        try:
            if not journal.lock(self._lock_fd, False, timeout):
                raise StoreError(
                    f"{path} stayed locked by a writer's commit for more than {timeout:.0f}s; retry, or "
                    "check that the process writing it is not stuck"
                )
            undo = None
            if str(path.resolve()) not in _WRITING:  # our own writer's journal is not a dead one
                undo = journal.read_journal(
                    journal.journal_path(path), os.fstat(self._lock_fd).st_ino
                )
            if undo is None:
                try:
                    super().__init__(path, "r", locking=False)
                except OSError as e:
                    if "locking flag" not in str(e):
                        raise
                    # this process holds it open with HDF5's own locking: opening the path would share
                    # that handle's (possibly stale) view, so read the bytes through a file object
                    size = os.fstat(self._lock_fd).st_size
                    view = journal.RolledBackView(self._lock_fd, journal.Undo(size, ()))
                    super().__init__(view, "r")
            else:
                self._view = True
                super().__init__(journal.RolledBackView(self._lock_fd, undo), "r")
        except BaseException:
            os.close(self._lock_fd)
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        damaged = exc_type is not None and issubclass(exc_type, (OSError, RuntimeError))
        if damaged and not isinstance(exc, StoreError):  # HDF5 could not read part of the file
            raise StoreError(
                f"{self._path} could not be read ({exc}); the file is damaged. Restore it from a copy "
                "or re-log the run."
            ) from exc

    def unlock(self) -> None:
        """Let writers commit again (open datasets of complete checkpoints stay readable)."""
        if not self._view and self._lock_fd >= 0:
            journal.unlock(self._lock_fd)

    def close(self) -> None:
        try:
            if self.id.valid:
                super().close()
        finally:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1


def open_for_reading(path: str | os.PathLike) -> ReadFile:
    """Open a store read-only, consistent even while a fit writes it (see :class:`ReadFile`)."""
    return ReadFile(path)


def open_for_update(path: str | os.PathLike) -> StoreFile:
    """Open a store for writing (created if missing), the public entry point for code that adds to a
    store after training (see :class:`~lightning_tda.store.extension.ExtensionGroup`).

    The returned :class:`StoreFile` holds the exclusive lock and the rollback journal: every
    ``flush()`` is one atomic commit, fsync'ed before it returns unless
    :data:`lightning_tda.store.journal.DURABLE` is ``False``, and a crash, a power cut or an exception
    inside ``with`` rolls the file back to the last one. One writer per store per process.

    Raises:
        StoreError: another process (or this one) is writing the store, or it cannot be opened.
    """
    return _open(Path(path), "a")


def _open(path: Path, mode: str) -> h5py.File:
    """Open the store: ``"r"`` through :class:`ReadFile`, ``"a"`` (created if missing) through
    :class:`StoreFile`."""
    path = Path(path)
    try:
        if mode == "r":
            return ReadFile(path)
        if str(path.resolve()) in _WRITING:
            raise StoreError(
                f"{path} is already open for writing in this process; write one checkpoint at a time"
            )
        return StoreFile(path)
    except journal.LockTimeout as e:
        raise StoreError(
            f"cannot open the attribution store {path} for writing: {e}. Another process is writing it; "
            "use another path or wait for it to finish."
        ) from e
    except StoreError:
        raise
    except OSError as e:
        if getattr(e, "errno", None) in _DISK_FULL or "No space" in str(e):
            raise io_error(path, e) from e
        raise StoreError(
            f"cannot open the attribution store {path} for writing ({e}). Check that the directory exists "
            "and is writable, that no other process holds the file open, or pass another path."
        ) from e


def check_writable(path: str | os.PathLike) -> Path:
    """Fail fast (at construction) when ``path`` cannot be created or written."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.exists() and p.is_dir():
        raise StoreError(f"store path {p} is a directory; pass a file path such as {p / 'tda.h5'}")
    if parent.exists() and not parent.is_dir():
        raise StoreError(
            f"the store's parent {parent} is not a directory; pass a path inside a writable directory"
        )
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"cannot create the directory {parent} for the store ({e}); pass a writable path"
            ) from e
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise StoreError(f"store path {p} is not writable; pass a path in a writable directory")
    return p


class StoreWriter:
    """Writes run metadata and checkpoints into one HDF5 file.

    Args:
        path: the ``.h5`` file.
        storage_dtype: ``float16`` (default), ``bfloat16`` or ``float32`` for gradient rows.
    """

    def __init__(self, path: str | os.PathLike, storage_dtype: str = "float16") -> None:
        if storage_dtype not in schema.STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {schema.STORAGE_DTYPES}, got {storage_dtype!r}")
        self.path = check_writable(path)
        self.storage_dtype = storage_dtype
        # a commit a killed writer left unfinished is undone now, even if this fit writes nothing
        journal.recover(self.path, timeout=0.0)

    # -- run level ---------------------------------------------------------------------------
    def has_complete_checkpoints(self) -> bool:
        """Whether the file holds complete checkpoints; raises if it is not a lightning_tda store."""
        if not self.path.exists():
            return False
        try:
            f = ReadFile(self.path)
        except OSError as e:
            raise StoreError(
                f"{self.path} exists and is not an HDF5 store ({e}); pass a new path, or overwrite=True to replace it"
            ) from e
        with f:
            if f.attrs.get("format") != schema.FORMAT:
                raise StoreError(
                    f"{self.path} exists and is not a lightning_tda store; pass a new path, or overwrite=True to "
                    "replace it"
                )
            ck = f.get(schema.CHECKPOINTS)
            return ck is not None and any(bool(g.attrs.get("complete", False)) for g in ck.values())

    def remove(self) -> None:
        """Delete the store (and a journal or half-created file left next to it)."""
        for p in (self.path, journal.journal_path(self.path), journal.creating_path(self.path)):
            if p.exists():
                p.unlink()

    def prune(self, keep_up_to_step: int | None) -> list[int]:
        """Delete incomplete checkpoints and those after ``keep_up_to_step`` (stale after a resume)."""
        if not self.path.exists():
            return []
        removed = []
        with _open(self.path, "a") as f:
            ck = f.get(schema.CHECKPOINTS)
            if ck is None:
                return []
            for name in list(ck.keys()):
                g = ck[name]
                step = int(g.attrs.get("global_step", int(name)))
                stale = keep_up_to_step is not None and step > keep_up_to_step
                if stale or not g.attrs.get("complete", False):
                    del ck[name]
                    removed.append(step)
            sealed = root_integrity(f).get("checkpoints", [])
            seal_root(f, [t for t in sealed if t not in removed])
            f.flush()
        return removed

    def write_run_metadata(
        self,
        attrs: Mapping[str, Any],
        compare: tuple[str, ...] = (),
        schema_version: int = schema.SCHEMA_VERSION,
    ) -> None:
        """Create the file's root attributes, or check that an existing file is the same run layout.

        ``schema_version``: the layout version to write (and expect on resume); in-flight stores are
        ``schema.IN_FLIGHT_SCHEMA_VERSION``."""
        with _open(self.path, "a") as f:
            fmt = f.attrs.get("format")
            if fmt is None:
                f.attrs["format"] = schema.FORMAT
                f.attrs["schema_version"] = schema_version
                f.attrs["storage_dtype"] = self.storage_dtype
                for k, v in attrs.items():
                    f.attrs[k] = _attr(v)
                f.flush()
                return
            if fmt != schema.FORMAT or int(f.attrs.get("schema_version", -1)) != schema_version:
                raise StoreError(
                    f"{self.path} is not a lightning_tda schema-{schema_version} store "
                    f"(format={fmt!r}, schema_version={f.attrs.get('schema_version')!r}); pass a new path."
                )
            if f.attrs.get("storage_dtype") != self.storage_dtype:
                raise StoreError(
                    f"{self.path} stores {f.attrs.get('storage_dtype')} rows but this logger writes "
                    f"{self.storage_dtype}; use the same dtype= or a new path."
                )
            for k in compare:
                if k in f.attrs and k in attrs and f.attrs[k] != attrs[k]:
                    raise StoreError(
                        f"{self.path} was written with a different {k} than this run has (model layers, projection or "
                        "storage= changed). Use a new path, or overwrite=True to start the file again."
                    )
            for k, v in attrs.items():
                if k not in f.attrs:
                    f.attrs[k] = _attr(v)
            f.flush()

    def set_root_attrs(self, attrs: Mapping[str, Any]) -> None:
        with _open(self.path, "a") as f:
            for k, v in attrs.items():
                f.attrs[k] = _attr(v)
            f.flush()

    def read_bases(self) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] | None:
        """Stored PCA bases, or ``None`` when the file has none yet."""
        if not self.path.exists():
            return None
        with _open(self.path, "r") as f:
            return read_bases(f)

    def write_bases(
        self, bases: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]]
    ) -> None:
        with _open(self.path, "a") as f:
            if schema.BASES in f:
                del f[schema.BASES]
            g = f.create_group(schema.BASES)
            for name, (p_out, p_in) in bases.items():
                lg = g.create_group(name)
                for side, mat in (("out", p_out), ("in", p_in)):
                    if mat is not None:
                        lg.create_dataset(side, data=mat.detach().float().cpu().numpy())
            g.attrs["complete"] = True
            seal_group(g)
            f.flush()

    # -- checkpoint level --------------------------------------------------------------------
    def begin_checkpoint(
        self,
        global_step: int,
        num_rows: int,
        width: int,
        num_queries: int = 0,
        precond: bool = False,
        factors: FactorLayout | None = None,
    ) -> CheckpointWriter:
        """Start checkpoint ``global_step``; with ``factors`` the train rows are stored as rank-c factors."""
        return CheckpointWriter(self, global_step, num_rows, width, num_queries, precond, factors)


class CheckpointWriter:
    """Writes one checkpoint's rows; use as a context manager, call :meth:`commit` at the end.

    With ``factors`` (``GradientLogger(storage="lorif")``) the dense ``[B, D]`` rows given to
    :meth:`write_rows` are factored per layer (:meth:`FactorLayout.factor`) and stored in
    ``train_factors`` / ``train_precond_factors`` (``[N, W]``) instead of ``train`` / ``train_precond``.
    """

    def __init__(
        self,
        store: StoreWriter,
        global_step: int,
        num_rows: int,
        width: int,
        num_queries: int,
        precond: bool,
        factors: FactorLayout | None = None,
    ) -> None:
        self.store = store
        self.step = int(global_step)
        self.n = int(num_rows)
        self.q = int(num_queries)
        self.width = int(width)
        self.precond = precond
        self.factors = factors
        if factors is not None and factors.dense_width != self.width:
            raise StoreError(
                f"factor layout covers {factors.dense_width} columns but rows have D={self.width}"
            )
        self.dtype = store.storage_dtype
        self.file = _open(store.path, "a")
        try:
            self._setup()
        except BaseException:
            self.file.close()
            raise

    def _setup(self) -> None:
        f = self.file
        canonical = f.get(schema.EXAMPLE_IDS)
        self.canonical = None
        if canonical is not None:
            ids = canonical[()]
            if len(ids) != self.n:
                raise StoreError(
                    f"attribution data has {self.n} examples but earlier checkpoints in {self.store.path} have "
                    f"{len(ids)}; attribute the same examples at every checkpoint (or use a new store)."
                )
            self.canonical = {int(i): r for r, i in enumerate(ids)}
        name = schema.checkpoint_name(self.step)
        if name in f:
            if f[name].attrs.get("complete", False):
                raise StoreError(
                    f"checkpoint at step {self.step} already exists and is complete in {self.store.path}"
                )
            del f[name]
        g = f.create_group(name, track_order=True)
        g.attrs["global_step"] = self.step
        g.attrs["complete"] = False
        enc = schema.h5_dtype(self.dtype)
        # logical name -> stored dataset name and row width (factor rows under storage="lorif")
        factored = self.factors is not None
        self.stored_name = {
            k: schema.FACTORED[k] if factored else k for k in (schema.TRAIN, schema.TRAIN_PRECOND)
        }
        row_width = self.factors.width if factored else self.width
        self.encoding = {schema.TRAIN: self.dtype, schema.QUERY: self.dtype}
        self.ds = {
            schema.TRAIN: _create_early(g, self.stored_name[schema.TRAIN], (self.n, row_width), enc)
        }
        if self.precond:
            # 1/sqrt(v) preconditioning spans a far wider range than float16 holds: keep its exponent
            self.encoding[schema.TRAIN_PRECOND] = schema.precond_encoding(self.dtype)
            self.ds[schema.TRAIN_PRECOND] = _create_early(
                g,
                self.stored_name[schema.TRAIN_PRECOND],
                (self.n, row_width),
                schema.h5_dtype(self.encoding[schema.TRAIN_PRECOND]),
            )
        if factored:
            for k in (schema.TRAIN, schema.TRAIN_PRECOND):
                if k in self.ds:
                    self.ds[k].attrs["factors_of"] = k
                    self.ds[k].attrs["lorif_rank"] = self.factors.rank
        self.ds[schema.TRAIN_LOSS] = _create_early(g, schema.TRAIN_LOSS, (self.n,), np.dtype("<f4"))
        self.ds[schema.ROW_IDS] = _create_early(g, schema.ROW_IDS, (self.n,), np.dtype("<i8"))
        if self.q:
            self.ds[schema.QUERY] = _create_early(g, schema.QUERY, (self.q, self.width), enc)
            self.ds[schema.QUERY_LOSS] = _create_early(
                g, schema.QUERY_LOSS, (self.q,), np.dtype("<f4")
            )
        for name, encoding in self.encoding.items():
            if name in self.ds:
                self.ds[name].attrs["encoding"] = encoding
        self.group = g
        self.written = np.zeros(self.n, dtype=bool)
        self.seen_ids: set[int] = set()
        self.next_row = 0
        self.query_ids: list[int] = []
        f.flush()
        # rows go to these early-allocated ranges, which nothing complete references: no journal
        self.file.journal.scratch = [
            (off, off + d.id.get_storage_size())
            for d in self.ds.values()
            if (off := d.id.get_offset()) is not None
        ]

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except Exception:
            if exc_type is None:
                raise  # otherwise the error in flight says more
        if exc_type is not None and not isinstance(exc, StoreError):
            self.file.check(exc)  # an h5py error caused by a failed write: say what failed

    def close(self) -> None:
        """Commit what is written (an incomplete checkpoint stays incomplete) and close the file."""
        self.file.close()

    def _check_io(self, err: BaseException | None = None) -> None:
        """Raise a clear :class:`StoreError` when a write to the store failed (e.g. disk full)."""
        self.file.check(err)

    def _encode(self, rows: torch.Tensor, name: str = schema.TRAIN) -> np.ndarray:
        encoding = self.encoding[name]
        if encoding == "float16":
            peak = float(rows.abs().max()) if rows.numel() else 0.0
            if peak > schema.FP16_MAX:
                raise StoreError(
                    f"a projected gradient value ({peak:.3g}) overflows float16 at step {self.step}; "
                    "use GradientLogger(dtype='bfloat16') or dtype='float32'."
                )
        return schema.encode_rows(rows, encoding)

    def write_rows(
        self,
        ids: torch.Tensor,
        rows: torch.Tensor,
        losses: torch.Tensor,
        precond: torch.Tensor | None = None,
    ) -> None:
        """Write one batch: ``ids`` ``[B]``, ``rows``/``precond`` ``[B, D]``, ``losses`` ``[B]``."""
        ids_np = ids.cpu().numpy().astype(np.int64)
        b = len(ids_np)
        if rows.shape != (b, self.width):
            raise StoreError(
                f"rows of shape {tuple(rows.shape)} do not match [batch={b}, D={self.width}]"
            )
        encoded = {schema.TRAIN: self._encode(self._stored(rows))}
        if precond is not None:
            encoded[schema.TRAIN_PRECOND] = self._encode(
                self._stored(precond), schema.TRAIN_PRECOND
            )
        self.write_encoded(ids_np, encoded, losses.detach().float().cpu().numpy())

    def _positions(self, ids_np: np.ndarray) -> np.ndarray:
        """Store row of each id in ``ids_np`` ``[B]``; refuses overflow, unknown and repeated ids."""
        b = len(ids_np)
        if self.canonical is None:
            pos = np.arange(self.next_row, self.next_row + b)
            if pos.size and pos[-1] >= self.n:
                raise StoreError(
                    f"attribution data yielded more than its {self.n} examples; its length and iteration disagree"
                )
            self.next_row += b
        else:
            try:
                pos = np.fromiter((self.canonical[int(i)] for i in ids_np), dtype=np.int64, count=b)
            except KeyError as e:
                raise StoreError(
                    f"example id {e.args[0]} is not among the store's examples; attribution data must hold the "
                    "same examples at every checkpoint."
                ) from None
        batch_ids = ids_np.tolist()
        repeated = [i for i in batch_ids if i in self.seen_ids]
        if repeated or len(set(batch_ids)) != b or self.written[pos].any():
            dup = repeated[:5] or [i for i in batch_ids if batch_ids.count(i) > 1][:5]
            raise StoreError(
                f"example ids {dup} appear twice in one checkpoint sweep; example ids must be unique "
                "(IndexedDataset(dataset, ids=...)) and each example swept once."
            )
        return pos

    def write_encoded(
        self, ids_np: np.ndarray, encoded: dict[str, np.ndarray], losses: np.ndarray
    ) -> None:
        """Write one batch already in the stored encoding: ``ids_np``/``losses`` ``[B]``,
        ``encoded[name]`` ``[B, ...]`` rows of each dataset, all in batch order."""
        pos = self._positions(ids_np)
        order = np.argsort(pos)
        b = len(ids_np)
        pos_s = pos[order]
        contiguous = b > 0 and pos_s[-1] - pos_s[0] == b - 1
        sel = slice(int(pos_s[0]), int(pos_s[-1]) + 1) if contiguous else pos_s
        try:
            for name, arr in encoded.items():
                self.ds[name][sel] = arr[order]
            self.ds[schema.TRAIN_LOSS][sel] = np.asarray(losses, dtype=np.float32)[order]
            self.ds[schema.ROW_IDS][sel] = ids_np[order]
        except (OSError, RuntimeError) as e:
            self._check_io(e)
            raise
        self._check_io()
        self.written[pos] = True
        self.seen_ids.update(ids_np.tolist())

    def _stored(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows as stored: factored per layer under ``storage="lorif"``, else as given."""
        return rows if self.factors is None else self.factors.factor(rows)

    def write_queries(
        self, ids: torch.Tensor | None, rows: torch.Tensor, losses: torch.Tensor
    ) -> None:
        start = len(self.query_ids)
        b = rows.shape[0]
        if start + b > self.q:
            raise StoreError(f"query data yielded more than its {self.q} examples")
        encoded = self._encode(rows)
        try:
            self.ds[schema.QUERY][start : start + b] = encoded
            self.ds[schema.QUERY_LOSS][start : start + b] = losses.detach().float().cpu().numpy()
        except (OSError, RuntimeError) as e:
            self._check_io(e)
            raise
        self._check_io()
        self.query_ids.extend(range(start, start + b) if ids is None else ids.cpu().tolist())

    def write_arrays(self, group: str, arrays: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        """Small per-checkpoint arrays (optimizer factors, model state): ``group/name`` datasets."""
        g = self.group.require_group(group)
        for name, value in arrays.items():
            arr = value.detach().cpu() if isinstance(value, torch.Tensor) else value
            if isinstance(arr, torch.Tensor):
                arr = arr.float().numpy() if arr.dtype == torch.bfloat16 else arr.numpy()
            try:
                g.create_dataset(name, data=np.asarray(arr), track_times=False)
            except (OSError, RuntimeError) as e:
                self._check_io(e)
                raise
        self._check_io()

    def commit(self, attrs: Mapping[str, Any]) -> None:
        """Check every row is written, then flush and mark the checkpoint complete."""
        missing = int((~self.written).sum())
        if missing:
            raise StoreError(
                f"checkpoint at step {self.step} got rows for {self.n - missing} of {self.n} examples; the "
                "attribution data must yield every example once per sweep (drop_last=False, a sized dataset)."
            )
        if self.q and len(self.query_ids) != self.q:
            raise StoreError(
                f"checkpoint at step {self.step} got {len(self.query_ids)} of {self.q} query rows"
            )
        f = self.file
        f.journal.scratch = []  # from here on the rows are (about to be) referenced: journal changes
        f.flush()
        if self.canonical is None:
            ids = self.ds[schema.ROW_IDS][()]
            if len(np.unique(ids)) != self.n:
                raise StoreError("example ids within the sweep are not unique; use IndexedDataset")
            if schema.EXAMPLE_IDS in f:
                del f[schema.EXAMPLE_IDS]
            f.create_dataset(schema.EXAMPLE_IDS, data=ids)
        if self.q:
            if schema.QUERY_IDS in f:
                del f[schema.QUERY_IDS]
            f.create_dataset(schema.QUERY_IDS, data=np.asarray(self.query_ids, dtype=np.int64))
        for k, v in attrs.items():
            self.group.attrs[k] = _attr(v)
        # one atomic commit (journal): complete, sealed and listed in the root seal, or none of it
        self.group.attrs["complete"] = True
        seal_group(self.group)
        seal_root(f, [*root_integrity(f).get("checkpoints", []), self.step])
        f.flush()
