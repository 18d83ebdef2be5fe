"""Block reads of a row dataset for a front-to-back scan: memory-mapped where the file allows, with
the CRC of the bytes read accumulated on a background thread while the caller uses each block.

A contiguous, unfiltered dataset of a store opened from its path is read by mapping the block's bytes
(copy-on-write: the caller may write to a block without touching the file; the file's pages are
shared with the page cache, so a float32 block costs no copy at all). Anything else (chunked or
filtered datasets, a store read through a rolled-back view) is read through h5py. Either way one block
is mapped or held per dataset at a time by this module: a block is released when the caller drops it
(and, when checksumming, once its CRC is done, which the next read waits for).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import h5py
import numpy as np

from lightning_tda.store import schema

# Linux >= 5.14: fill the mapping's page tables in one call (read-only, no copy-on-write break)
_MADV_POPULATE_READ = getattr(
    mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None
)


def _file_offset(ds: h5py.Dataset) -> int | None:
    """Byte offset of ``ds``'s raw data in its file when a block of rows can be mapped, else ``None``."""
    try:
        if ds.file.driver != "sec2" or ds.ndim != 2 or ds.chunks is not None:
            return None
        if ds.dtype.kind not in "fiu" or not ds.dtype.isnative:
            return None
        dcpl = ds.id.get_create_plist()
        if (
            dcpl.get_layout() != h5py.h5d.CONTIGUOUS
            or dcpl.get_external_count()
            or dcpl.get_nfilters()
        ):
            return None
        return ds.id.get_offset()
    except (AttributeError, OSError, RuntimeError, ValueError):  # (not allocated, not a plain file)
        return None


class CrcLane:
    """One background thread that checksums blocks, one at a time: a read through any
    :class:`RowScan` of the lane first waits for the block before it, so each block's bytes are held
    here no longer than until the next read (a context manager: the thread ends on exit)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[RowScan, Future] | None = None

    def __enter__(self) -> CrcLane:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def settle(self) -> None:
        """Wait for the block being checksummed (its scan's CRC then covers it)."""
        if self._pending is not None:
            (scan, future), self._pending = self._pending, None
            scan.crc_so_far = future.result()

    def submit(self, scan: RowScan, arr: np.ndarray) -> None:
        """Continue ``scan``'s CRC over ``arr`` in the background."""
        self.settle()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="lightning_tda-crc")
        self._pending = (scan, self._pool.submit(schema.crc_update, scan.crc_so_far, arr))


class RowScan:
    """``scan[start:stop]``: rows of ``ds`` as a numpy array, read as described in the module docstring.

    Args:
        ds: a row dataset (only 2-D ones are mapped).
        lane: the :class:`CrcLane` that accumulates the CRC-32 of the rows' bytes while they are read
            front to back (one block after the other from row 0); ``None`` for no checksum.

    Attributes:
        ds, attrs, shape, dtype: the dataset's.
        next: the row the next block of a front-to-back scan starts at (``-1`` once a block was read
            out of order: nothing to verify then).
        crc_so_far: the CRC of the rows checksummed so far (:meth:`crc` waits for the last block).
    """

    def __init__(self, ds: h5py.Dataset, lane: CrcLane | None = None) -> None:
        self.ds, self.attrs, self.shape, self.dtype = ds, ds.attrs, ds.shape, ds.dtype
        self.lane = lane
        self.next = 0
        self.crc_so_far = 0
        self._offset = _file_offset(ds)
        self._path = ds.file.filename if self._offset is not None else None

    def __len__(self) -> int:
        return len(self.ds)

    @property
    def checksummed(self) -> bool:
        return self.lane is not None

    def __getitem__(self, sel: Any) -> np.ndarray:
        if self.lane is not None:
            self.lane.settle()  # the block before first: one block held by the lane at a time
        plain = isinstance(sel, slice) and sel.step is None
        arr = self._mapped(*sel.indices(len(self.ds))[:2]) if plain else None
        if arr is None:
            arr = self.ds[sel]
        if self.lane is not None:
            if plain and (sel.start or 0) == self.next >= 0:
                self.lane.submit(self, arr)
                self.next += len(arr)
            else:
                self.next = -1  # not a front-to-back scan: nothing to verify
        return arr

    def done(self) -> bool:
        """Whether every row was read front to back (so :meth:`crc` covers the whole dataset)."""
        return self.next == len(self.ds)

    def crc(self) -> int:
        """CRC-32 of the bytes read front to back so far (waits for the background thread)."""
        if self.lane is not None:
            self.lane.settle()
        return self.crc_so_far

    def _mapped(self, start: int, stop: int) -> np.ndarray | None:
        """Rows ``[start, stop)`` mapped from the file (copy-on-write), or ``None`` when not possible."""
        if self._offset is None or stop <= start:
            return None
        row = self.dtype.itemsize * int(np.prod(self.shape[1:]))
        lo = self._offset + start * row
        base = lo - lo % mmap.ALLOCATIONGRANULARITY
        try:
            fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            try:
                m = mmap.mmap(
                    fd, lo - base + (stop - start) * row, access=mmap.ACCESS_COPY, offset=base
                )
            finally:
                os.close(fd)
        except (
            OSError,
            ValueError,
            OverflowError,
        ):  # (a file shorter than the dataset: h5py says why)
            return None
        if _MADV_POPULATE_READ is not None and hasattr(m, "madvise"):
            with contextlib.suppress(OSError):  # an older kernel: pages are mapped on first touch
                m.madvise(_MADV_POPULATE_READ)
        count = (stop - start) * (row // self.dtype.itemsize)
        arr = np.frombuffer(m, self.dtype, count=count, offset=lo - base)
        return arr.reshape((stop - start, *self.shape[1:]))
