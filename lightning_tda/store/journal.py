"""Atomic HDF5 flushes: a rollback journal under h5py's file-object driver.

HDF5 updates its metadata in place, so a process killed inside a flush (or between two flushes that
belong together) can leave groups pointing at half-written structures. The store's writer therefore
hands HDF5 a :class:`JournaledFile` instead of a path:

- before a byte of the file as it was at the last commit is overwritten or truncated away, its old
  value is appended to ``<store>.journal`` (always written before the store itself);
- a completed HDF5 flush (the driver's ``flush`` call, and a completed close) is a commit: the
  journal is deleted;
- whoever opens the store next and finds a journal left by a dead writer undoes it: a writer rolls
  the file back in place (:func:`roll_back`), a reader reads it through :class:`RolledBackView`
  without changing it;
- a new file is written as ``<store>.creating`` and renamed onto the store at its first commit;
- writes inside ``scratch`` ranges (the raw rows of the checkpoint being written, which nothing
  complete references) skip the journal, so a sweep costs no extra I/O.

Concurrency: a writer holds an exclusive ``flock`` on the store from its first journaled write to
the commit; readers take a shared one while they read (:func:`lock`). A reader therefore never sees
a half-done commit, and a writer waits at most :data:`LOCK_TIMEOUT` seconds for a reader.

An I/O error (a full disk) cannot be raised inside the driver callback (h5py's file-object driver
does not propagate it safely), so the file stops writing, records it in ``error`` and the caller
raises it (:meth:`JournaledFile.check`); closing then rolls the unfinished transaction back.

The journal is not fsync'ed: it protects against a killed or crashed process, not a power cut.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from lightning_tda.errors import LockTimeout  # noqa: F401 (re-exported)

try:
    import fcntl
except ImportError:  # Windows: no flock; the journal still makes commits atomic
    fcntl = None

JOURNAL_SUFFIX = ".journal"
CREATING_SUFFIX = ".creating"
MAGIC = b"LTDAJRN1"
_HEADER = struct.Struct("<8sQQ")  # magic, inode of the store, its size at the last commit
_RECORD = struct.Struct("<QQ")  # offset, length; followed by the old bytes
LOCK_TIMEOUT = 10.0  # seconds a reader waits for a writer's commit, and a writer for readers
_POLL = 0.005
O_BINARY = getattr(os, "O_BINARY", 0)  # Windows opens in text mode otherwise
_CONTENDED: set[str] = set()  # stores whose readers kept a writer waiting: do not wait again


def journal_path(path: str | os.PathLike) -> Path:
    """``<store>.journal``: old bytes of an unfinished commit."""
    p = Path(path)
    return p.with_name(p.name + JOURNAL_SUFFIX)


def creating_path(path: str | os.PathLike) -> Path:
    """``<store>.creating``: a new store before its first commit."""
    p = Path(path)
    return p.with_name(p.name + CREATING_SUFFIX)


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` at ``offset``: the one place where the store's bytes change."""
    view = memoryview(data).cast("B")
    while len(view):
        if hasattr(os, "pwrite"):
            n = os.pwrite(fd, view, offset)
        else:  # pragma: no cover - Windows
            os.lseek(fd, offset, os.SEEK_SET)
            n = os.write(fd, view)
        view, offset = view[n:], offset + n


def pread(fd: int, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes at ``offset`` (fewer at the end of the file)."""
    if hasattr(os, "pread"):
        return os.pread(fd, n, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - Windows
    return os.read(fd, n)  # pragma: no cover


def lock(fd: int, exclusive: bool, timeout: float) -> bool:
    """Take a ``flock`` on ``fd`` within ``timeout`` seconds; ``False`` if it stayed taken.

    Filesystems without ``flock`` (and Windows) count as locked: the journal alone then guards commits.
    """
    if fcntl is None:
        return True
    kind = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL)
        except OSError:  # ENOLCK, EOPNOTSUPP: no locking on this filesystem
            return True


def unlock(fd: int) -> None:
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Undo:
    """What an unfinished commit changed: the file's size and old bytes before it began."""

    base: int
    records: tuple[tuple[int, bytes], ...]


def read_journal(path: str | os.PathLike, inode: int) -> Undo | None:
    """The undo record of the store with ``inode``; ``None`` when there is nothing to undo.

    A journal whose header is torn, or that belongs to another file (a store deleted and created
    again), holds nothing to undo. A torn last record is dropped: its store write never happened.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < _HEADER.size:
        return None
    magic, ino, base = _HEADER.unpack_from(data)
    if magic != MAGIC or ino != inode:
        return None
    records, pos = [], _HEADER.size
    while pos + _RECORD.size <= len(data):
        off, n = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        if pos + n > len(data):
            break
        records.append((off, data[pos : pos + n]))
        pos += n
    return Undo(base, tuple(records))


def roll_back(fd: int, journal: Path, base: int | None = None) -> None:
    """Undo an unfinished commit of the store open (read-write) at ``fd`` and delete its journal.

    ``base``: size to truncate to when there is no journal (bytes appended since the last commit).
    Idempotent: a rollback killed half-way is redone by the next opener.
    """
    undo = read_journal(journal, os.fstat(fd).st_ino)
    if undo is not None:
        for off, old in reversed(undo.records):  # the oldest value of each byte is written last
            pwrite_all(fd, old, off)
        base = undo.base
    if base is not None and os.fstat(fd).st_size != base:
        os.ftruncate(fd, base)
    with contextlib.suppress(FileNotFoundError):
        journal.unlink()


def recover(path: str | os.PathLike, timeout: float = LOCK_TIMEOUT) -> bool:
    """Roll back a commit left unfinished by a dead writer; ``False`` if another process kept the
    store locked (a live writer's commit: nothing to recover) or there was nothing to do."""
    path = Path(path)
    jpath = journal_path(path)
    if not jpath.exists() or not path.exists():
        return False
    fd = os.open(path, os.O_RDWR | O_BINARY)
    try:
        if not lock(fd, True, timeout):
            return False
        if not jpath.exists():  # the writer we waited for committed
            return False
        roll_back(fd, jpath)
        return True
    finally:
        unlock(fd)
        os.close(fd)


class RolledBackView:
    """Read-only file object showing a store as of its last commit (``undo`` applied in memory)."""

    def __init__(self, fd: int, undo: Undo) -> None:
        self.fd = fd
        self.undo = undo
        self.pos = 0

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.undo.base + pos}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        start = self.pos
        end = self.undo.base if n is None or n < 0 else start + n
        buf = bytearray(pread(self.fd, max(0, min(end, self.undo.base) - start), start))
        buf.extend(bytes(end - start - len(buf)))
        for off, old in reversed(self.undo.records):
            lo, hi = max(off, start), min(off + len(old), end)
            if lo < hi:
                buf[lo - start : hi - start] = old[lo - off : hi - off]
        self.pos = end
        return bytes(buf)

    def write(self, data) -> int:
        raise OSError("a rolled-back view of a store is read-only")

    def truncate(self, size: int | None = None) -> int:
        raise OSError("a rolled-back view of a store is read-only")

    def flush(self) -> None:
        pass


class JournaledFile:
    """Read-write binary file for h5py's file-object driver whose every completed flush is atomic.

    Args:
        path: the store. A missing store is created as ``<store>.creating`` and renamed onto ``path``
            at the first commit. An existing store left with a journal by a dead writer is rolled back.
        lock_timeout: seconds to wait for readers before a commit (then it goes ahead with a warning),
            and for another writer's commit before a rollback (then :class:`LockTimeout`).

    Attributes:
        scratch: ``[(start, stop)]`` byte ranges whose old content nothing complete references (the
            rows of the checkpoint being written); writes inside one skip the journal.
        error: the first failure (``OSError`` of a write, or an interrupt); later writes are dropped,
            nothing is committed and the caller raises it (:meth:`check`).
    """

    def __init__(self, path: str | os.PathLike, lock_timeout: float = LOCK_TIMEOUT) -> None:
        self.path = Path(path)
        self.journal = journal_path(self.path)
        self.lock_timeout = lock_timeout
        self.scratch: list[tuple[int, int]] = []
        self.error: BaseException | None = None
        self.pos = 0
        self._jfd: int | None = None
        self._jsize = 0
        self._locked = False
        self.fresh = not self.path.exists()  # h5py creates the file structure
        # (Windows cannot rename a file that is open: a new store is created in place there)
        self.creating = self.fresh and os.name != "nt"
        if self.fresh and not self.creating:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | O_BINARY, 0o666)
        elif self.creating:
            self._tmp = creating_path(self.path)
            self.fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | O_BINARY, 0o666)
            with contextlib.suppress(FileNotFoundError):
                self.journal.unlink()  # left by a store that was deleted since
        else:
            self.fd = os.open(self.path, os.O_RDWR | O_BINARY)
            try:
                self._recover()
            except BaseException:
                os.close(self.fd)
                raise
        self.base = 0 if self.creating else os.fstat(self.fd).st_size

    def _recover(self) -> None:
        if not self.journal.exists():
            return
        if not lock(self.fd, True, self.lock_timeout):
            raise LockTimeout(
                f"{self.path} has an unfinished commit and another process holds it locked"
            )
        try:
            roll_back(self.fd, self.journal)
        finally:
            unlock(self.fd)

    # -- the file-object protocol h5py's driver uses ------------------------------------------------
    # Nothing here may raise into HDF5 (h5py's driver cannot carry the exception safely): a failure,
    # a full disk or a KeyboardInterrupt alike, is kept in ``error``; from then on writes are dropped,
    # reads come back short (HDF5 fails cleanly) and nothing is committed.
    def seek(self, pos: int, whence: int = 0) -> int:
        try:
            if whence == 2:
                pos += os.fstat(self.fd).st_size
            elif whence == 1:
                pos += self.pos
            self.pos = pos
        except BaseException as e:
            self._fail(e)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if self.error is not None:
            return b""
        try:
            if n is None or n < 0:
                n = max(0, os.fstat(self.fd).st_size - self.pos)
            data = pread(self.fd, n, self.pos)
            if len(data) < n:  # past the end of the file reads as zeros, as with HDF5's sec2 driver
                data += bytes(n - len(data))
            self.pos += n
            return data
        except BaseException as e:
            self._fail(e)
            return b""

    def write(self, data) -> int:
        n = len(data)
        off, self.pos = self.pos, self.pos + n
        if self.error is None:
            try:
                if off < self.base and not self._in_scratch(off, off + n):
                    self._save(off, min(off + n, self.base) - off)
                pwrite_all(self.fd, data, off)
            except BaseException as e:
                self._fail(e)
        return n

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else int(size)
        if self.error is None:
            try:
                keep = min(os.fstat(self.fd).st_size, self.base)
                if size < keep:
                    self._save(size, keep - size)
                os.ftruncate(self.fd, size)
            except BaseException as e:
                self._fail(e)
        return size

    def flush(self) -> None:
        """HDF5 calls this last in a flush: the file is consistent, so commit."""
        if self.error is None:
            try:
                self._commit()
            except BaseException as e:
                self._fail(e)

    def _fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e

    # -- transactions -------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise the failure that stopped the writes, if any."""
        if self.error is not None:
            raise self.error

    def close(self, commit: bool = True) -> None:
        """Commit (``commit=True`` and no error) or roll back what is not committed, then close."""
        if self.fd < 0:
            return
        try:
            if commit and self.error is None:
                self._commit()
        except BaseException as e:
            self._fail(e)
        try:
            if not self.creating and (self.error is not None or self._jfd is not None):
                if self._jfd is not None:
                    os.close(self._jfd)
                    self._jfd = None
                roll_back(self.fd, self.journal, self.base)
        finally:
            if self._jfd is not None:
                os.close(self._jfd)
            self._release()
            os.close(self.fd)
            self.fd = -1
            if self.creating:  # never committed: nothing was published
                with contextlib.suppress(FileNotFoundError):
                    self._tmp.unlink()

    def _in_scratch(self, start: int, stop: int) -> bool:
        return any(a <= start and stop <= b for a, b in self.scratch)

    def _save(self, off: int, n: int) -> None:
        """Append the current bytes ``[off, off + n)`` to the journal before they change."""
        if self._jfd is None:
            self._begin()
        old = pread(self.fd, n, off)
        record = _RECORD.pack(off, len(old)) + old
        pwrite_all(self._jfd, record, self._jsize)
        self._jsize += len(record)

    def _begin(self) -> None:
        key = str(self.path.resolve())
        timeout = 0.0 if key in _CONTENDED else self.lock_timeout
        self._locked = lock(self.fd, True, timeout)
        if self._locked:
            _CONTENDED.discard(key)
        elif key not in _CONTENDED:
            _CONTENDED.add(key)
            warnings.warn(
                f"a reader has kept {self.path} open for more than {timeout:.0f}s; committing without "
                "waiting for it (that reader may see the file change). Close long-lived h5py handles "
                "on the store, or read it with lightning_tda.AttributionStore.",
                RuntimeWarning,
                stacklevel=2,
            )
        self._jfd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_BINARY, 0o666)
        header = _HEADER.pack(MAGIC, os.fstat(self.fd).st_ino, self.base)
        pwrite_all(self._jfd, header, 0)
        self._jsize = len(header)

    def _commit(self) -> None:
        if self.creating:
            os.replace(self._tmp, self.path)  # publish the new store, complete as of this flush
            self.creating = False
        elif self._jfd is not None:
            os.close(self._jfd)
            self._jfd = None
            os.unlink(self.journal)
        self._release()
        self.base = os.fstat(self.fd).st_size

    def _release(self) -> None:
        if self._locked:
            unlock(self.fd)
            self._locked = False
