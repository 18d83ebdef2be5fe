"""Atomic, durable HDF5 flushes: a write-ahead rollback journal under h5py's file-object driver.

HDF5 updates its metadata in place, so a process killed inside a flush (or between two flushes that
belong together), or a power cut, can leave groups pointing at half-written structures. The store's
writer therefore hands HDF5 a :class:`JournaledFile` instead of a path:

- before a byte of the file as it was at the last commit is overwritten or truncated away, its old
  value is appended to ``<store>.journal`` (records carry a CRC; a torn or missing tail is ignored);
- the new value of such a byte is held in memory (reads see it) until the commit, or until a
  truncation or :data:`PENDING_LIMIT` bytes of them force it out; only then, after the journal is
  fsync'ed (and, the first time, its directory), is it written to the store (write-ahead);
- a completed HDF5 flush (the driver's ``flush`` call) and a completed close are commits (the flush
  HDF5 makes inside a close is not: ``closing`` is set, so a close is one commit): the held
  bytes are written, the store is fsync'ed, the journal is deleted and the directory fsync'ed. So a
  commit costs at most four fsyncs however many writes it holds (journal, directory, store,
  directory), and a flush that wrote nothing costs none;
- whoever opens the store next and finds a journal left by a dead writer undoes it: a writer rolls
  the file back in place (:func:`roll_back`: undo, fsync, delete the journal, fsync the directory), a
  reader reads it through :class:`RolledBackView` without changing it;
- a new file is written as ``<store>.creating``; its first commit fsyncs it, renames it onto the
  store and fsyncs the directory;
- writes inside ``scratch`` ranges (the raw rows of the checkpoint being written, which nothing
  complete references) skip the journal, so a sweep costs no extra I/O; the commit that completes
  the checkpoint fsyncs them with the rest.

Guarantee: when a flush (commit) returns, it is on disk. A process killed, or the power cut, at any
moment leaves a store that opens as of one commit: the last one that returned, or a later one that
reached the disk. This holds where ``fsync`` keeps its promise (on macOS ``F_FULLFSYNC`` is used);
the directory holding the store is assumed to exist durably already.

:data:`DURABLE` (default ``True``) is what :class:`JournaledFile` and :func:`roll_back` use when not
told otherwise (``durable=``). With ``False`` nothing is fsync'ed: commits stay atomic against a
killed process, not against a power cut (for scratch disks, and to measure what fsync costs). Every
call that changes a file on disk goes through :func:`open_fd`, :func:`pwrite_all`, :func:`truncate`,
:func:`sync`, :func:`sync_dir`, :func:`unlink` and :func:`replace` (tests intercept them).

Concurrency: a writer holds an exclusive ``flock`` on the store from its first journaled write to
the commit; readers take a shared one while they read (:func:`lock`). A reader therefore never sees
a half-done commit, and a writer waits at most :data:`LOCK_TIMEOUT` seconds for a reader.

An I/O error (a full disk) cannot be raised inside the driver callback (h5py's file-object driver
does not propagate it safely), so the file stops writing, records it in ``error`` and the caller
raises it (:meth:`JournaledFile.check`); closing then rolls the unfinished transaction back.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from lightning_tda.errors import LockTimeout  # noqa: F401 (re-exported)

try:
    import fcntl
except ImportError:  # Windows: no flock; the journal still makes commits atomic
    fcntl = None

DURABLE = True  # fsync commits and journal (the default of JournaledFile(durable=None), roll_back)
PENDING_LIMIT = 64 << 20  # bytes of held overwrites before they are forced out (one more fsync)
JOURNAL_SUFFIX = ".journal"
CREATING_SUFFIX = ".creating"
MAGIC = b"LTDAJRN2"
MAGIC_V1 = b"LTDAJRN1"  # before per-record CRCs: still read
_HEADER = struct.Struct("<8sQQI")  # magic, inode of the store, its size at the last commit, CRC
_RECORD = struct.Struct("<QQI")  # offset, length, CRC of both and the old bytes; then the old bytes
_HEADER_V1 = struct.Struct("<8sQQ")
_RECORD_V1 = struct.Struct("<QQ")
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


def durable_default(durable: bool | None) -> bool:
    """``durable``, or :data:`DURABLE` when it is ``None``."""
    return DURABLE if durable is None else bool(durable)


# -- every call that changes what is on disk (tests intercept these) ------------------------------
def open_fd(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """``os.open`` (binary): with ``O_CREAT`` it may add a directory entry, with ``O_TRUNC`` empty it."""
    return os.open(path, flags | O_BINARY, mode)


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


def truncate(fd: int, size: int) -> None:
    """Set the file's size to ``size`` bytes."""
    os.ftruncate(fd, size)


def sync(fd: int) -> None:
    """Put the file's data and size on disk (``F_FULLFSYNC`` where ``fsync`` stops at the drive cache)."""
    if fcntl is not None and hasattr(fcntl, "F_FULLFSYNC"):  # pragma: no cover - macOS
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
    os.fsync(fd)


def sync_dir(path: str | os.PathLike) -> None:
    """Put the directory ``path``'s entries (files created, renamed, deleted in it) on disk.

    A no-op on Windows (no directory handles) and on filesystems that cannot fsync a directory."""
    if os.name == "nt":  # pragma: no cover - Windows
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # pragma: no cover - e.g. EINVAL on some network filesystems
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def unlink(path: str | os.PathLike) -> bool:
    """Delete ``path``; ``False`` if it did not exist."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` onto ``dst`` atomically."""
    os.replace(src, dst)


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


def _crc(*parts: bytes) -> int:
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    return crc


def header_bytes(inode: int, base: int) -> bytes:
    """The journal's header for the store with ``inode``, ``base`` bytes long at the last commit."""
    fields = _HEADER.pack(MAGIC, inode, base, 0)[:-4]
    return fields + struct.pack("<I", _crc(fields))


def record_bytes(offset: int, old: bytes) -> bytes:
    """One journal record: the bytes ``old`` found at ``offset`` before they changed."""
    head = struct.pack("<QQ", offset, len(old))
    return head + struct.pack("<I", _crc(head, old)) + old


def read_journal(path: str | os.PathLike, inode: int) -> Undo | None:
    """The undo record of the store with ``inode``; ``None`` when there is nothing to undo.

    A journal whose header is torn, or that belongs to another file (a store deleted and created
    again), holds nothing to undo. Records end at the first torn or missing one: the store writes
    it and any later record protect were held back until the journal was on disk, so never happened.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    if data[:8] == MAGIC_V1:
        return _read_v1(data, inode)
    if len(data) < _HEADER.size or data[:8] != MAGIC:
        return None
    _, ino, base, crc = _HEADER.unpack_from(data)
    if ino != inode or crc != _crc(data[: _HEADER.size - 4]):
        return None
    records, pos = [], _HEADER.size
    while pos + _RECORD.size <= len(data):
        off, n, crc = _RECORD.unpack_from(data, pos)
        old = data[pos + _RECORD.size : pos + _RECORD.size + n]
        if len(old) < n or crc != _crc(data[pos : pos + 16], old):
            break
        records.append((off, old))
        pos += _RECORD.size + n
    return Undo(base, tuple(records))


def _read_v1(data: bytes, inode: int) -> Undo | None:
    """A journal of the format without CRCs (left by an older version)."""
    if len(data) < _HEADER_V1.size:
        return None
    _, ino, base = _HEADER_V1.unpack_from(data)
    if ino != inode:
        return None
    records, pos = [], _HEADER_V1.size
    while pos + _RECORD_V1.size <= len(data):
        off, n = _RECORD_V1.unpack_from(data, pos)
        pos += _RECORD_V1.size
        if pos + n > len(data):
            break
        records.append((off, data[pos : pos + n]))
        pos += n
    return Undo(base, tuple(records))


def roll_back(fd: int, journal: Path, base: int | None = None, durable: bool | None = None) -> None:
    """Undo an unfinished commit of the store open (read-write) at ``fd`` and delete its journal.

    ``base``: size to truncate to when there is no journal (bytes appended since the last commit).
    ``durable`` (default :data:`DURABLE`): the undone store is fsync'ed before the journal is deleted,
    and the deletion is fsync'ed. Idempotent: a rollback killed half-way is redone by the next opener.
    """
    durable = durable_default(durable)
    undo = read_journal(journal, os.fstat(fd).st_ino)
    changed = False
    if undo is not None:
        for off, old in reversed(undo.records):  # the oldest value of each byte is written last
            pwrite_all(fd, old, off)
        base, changed = undo.base, bool(undo.records)
    if base is not None and os.fstat(fd).st_size != base:
        truncate(fd, base)
        changed = True
    if changed and durable:
        sync(fd)
    if unlink(journal) and durable:
        sync_dir(journal.parent)


def recover(
    path: str | os.PathLike, timeout: float = LOCK_TIMEOUT, durable: bool | None = None
) -> bool:
    """Roll back a commit left unfinished by a dead writer; ``False`` if another process kept the
    store locked (a live writer's commit: nothing to recover) or there was nothing to do."""
    path = Path(path)
    jpath = journal_path(path)
    if not jpath.exists() or not path.exists():
        return False
    fd = open_fd(path, os.O_RDWR)
    try:
        if not lock(fd, True, timeout):
            return False
        if not jpath.exists():  # the writer we waited for committed
            return False
        roll_back(fd, jpath, durable=durable)
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
    """Read-write binary file for h5py's file-object driver whose every completed flush is an atomic,
    durable commit.

    Args:
        path: the store. A missing store is created as ``<store>.creating`` and renamed onto ``path``
            at the first commit. An existing store left with a journal by a dead writer is rolled back.
        lock_timeout: seconds to wait for readers before a commit (then it goes ahead with a warning),
            and for another writer's commit before a rollback (then :class:`LockTimeout`).
        durable: fsync journal, store and directory so that a returned commit survives a power cut
            (``None``: :data:`DURABLE`). ``False`` keeps commits atomic against a killed process only.

    Attributes:
        scratch: ``[(start, stop)]`` byte ranges whose old content nothing complete references (the
            rows of the checkpoint being written); writes inside one skip the journal.
        error: the first failure (``OSError`` of a write, or an interrupt); later writes are dropped,
            nothing is committed and the caller raises it (:meth:`check`).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        lock_timeout: float = LOCK_TIMEOUT,
        durable: bool | None = None,
    ) -> None:
        self.path = Path(path)
        self.journal = journal_path(self.path)
        self.lock_timeout = lock_timeout
        self.durable = durable_default(durable)
        self.scratch: list[tuple[int, int]] = []
        self.error: BaseException | None = None
        self.closing = False  # set before HDF5 closes the file: its flush() then does not commit
        self.pos = 0
        self._jfd: int | None = None
        self._jsize = 0
        self._jdirty = False  # journal records not yet fsync'ed
        self._jlisted = False  # the journal's directory entry is fsync'ed
        self._held: list[tuple[int, bytes]] = []  # overwrites of committed bytes, not yet written
        self._held_bytes = 0
        self._held_span = (0, 0)
        self._dirty = False  # anything changed since the last commit
        self._locked = False
        self.fresh = not self.path.exists()  # h5py creates the file structure
        # (Windows cannot rename a file that is open: a new store is created in place there)
        self.creating = self.fresh and os.name != "nt"
        new = os.O_RDWR | os.O_CREAT | os.O_TRUNC
        if self.fresh and not self.creating:
            self.fd = open_fd(self.path, new)
        elif self.creating:
            self._tmp = creating_path(self.path)
            self.fd = open_fd(self._tmp, new)
            # a journal left by a store deleted since must be gone for good before a new store (whose
            # inode number may be the old one's) appears at the path
            if unlink(self.journal) and self.durable:
                sync_dir(self.path.parent)
        else:
            self.fd = open_fd(self.path, os.O_RDWR)
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
            roll_back(self.fd, self.journal, durable=self.durable)
        finally:
            unlock(self.fd)

    # -- the file-object protocol h5py's driver uses ------------------------------------------------
    # Nothing here may raise into HDF5 (h5py's driver cannot carry the exception safely): a failure,
    # a full disk or a KeyboardInterrupt alike, is kept in ``error``; from then on writes are dropped,
    # reads come back short (HDF5 fails cleanly) and nothing is committed.
    def seek(self, pos: int, whence: int = 0) -> int:
        try:
            if whence == 2:
                pos += self._size()
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
                n = max(0, self._size() - self.pos)
            data = pread(self.fd, n, self.pos)
            if len(data) < n:  # past the end of the file reads as zeros, as with HDF5's sec2 driver
                data += bytes(n - len(data))
            if self._overlaps(self.pos, self.pos + n):
                data = self._overlay(data, self.pos)
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
                self._dirty = True
                if off < self.base and not self._in_scratch(off, off + n):
                    self._save(off, min(off + n, self.base) - off)
                    self._hold(off, bytes(memoryview(data).cast("B")))
                else:
                    if self._overlaps(off, off + n):  # a held write to these bytes comes first
                        self._write_held()
                    pwrite_all(self.fd, data, off)
            except BaseException as e:
                self._fail(e)
        return n

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else int(size)
        if self.error is None:
            try:
                self._dirty = True
                keep = min(os.fstat(self.fd).st_size, self.base)
                if size < keep:
                    self._save(size, keep - size)
                if size < keep or (self._held and self._held_span[1] > size):
                    self._write_held()  # the journal goes to disk before committed bytes go
                truncate(self.fd, size)
            except BaseException as e:
                self._fail(e)
        return size

    def flush(self) -> None:
        """HDF5 calls this last in a flush: the file is consistent, so commit. Not while ``closing``:
        HDF5 flushes, then still writes (free space, superblock) before a close returns, so
        :meth:`close` makes all of it one commit (one set of fsyncs)."""
        if self.error is None and not self.closing:
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
            self._clear_held()  # never written: nothing to undo for them
            if not self.creating and (self.error is not None or self._jfd is not None):
                if self._jfd is not None:
                    os.close(self._jfd)
                    self._jfd = None
                roll_back(self.fd, self.journal, self.base, self.durable)
        finally:
            if self._jfd is not None:
                os.close(self._jfd)
            self._release()
            os.close(self.fd)
            self.fd = -1
            if self.creating:  # never committed: nothing was published
                unlink(self._tmp)

    def _in_scratch(self, start: int, stop: int) -> bool:
        return any(a <= start and stop <= b for a, b in self.scratch)

    def _size(self) -> int:
        """The file's size as HDF5 sees it (held writes may end past the end of the file)."""
        size = os.fstat(self.fd).st_size
        return max(size, self._held_span[1]) if self._held else size

    def _save(self, off: int, n: int) -> None:
        """Append the current bytes ``[off, off + n)`` to the journal before they change."""
        if self._jfd is None:
            self._begin()
        record = record_bytes(off, pread(self.fd, n, off))
        pwrite_all(self._jfd, record, self._jsize)
        self._jsize += len(record)
        self._jdirty = True

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
        self._jfd = open_fd(self.journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        header = header_bytes(os.fstat(self.fd).st_ino, self.base)
        pwrite_all(self._jfd, header, 0)
        self._jsize = len(header)
        self._jdirty, self._jlisted = True, False

    # -- overwrites of committed bytes wait in memory until their journal records are on disk ------
    def _hold(self, off: int, data: bytes) -> None:
        lo, hi = self._held_span if self._held else (off, off)
        self._held.append((off, data))
        self._held_span = (min(lo, off), max(hi, off + len(data)))
        self._held_bytes += len(data)
        if self._held_bytes > PENDING_LIMIT:
            self._write_held()

    def _overlaps(self, start: int, stop: int) -> bool:
        if not self._held or stop <= self._held_span[0] or start >= self._held_span[1]:
            return False
        return any(off < stop and start < off + len(d) for off, d in self._held)

    def _overlay(self, data: bytes, start: int) -> bytes:
        """``data`` read at ``start`` with the held writes applied (in the order they were made)."""
        buf, stop = bytearray(data), start + len(data)
        for off, d in self._held:
            lo, hi = max(off, start), min(off + len(d), stop)
            if lo < hi:
                buf[lo - start : hi - start] = d[lo - off : hi - off]
        return bytes(buf)

    def _write_held(self) -> None:
        """Put the journal on disk (write-ahead), then write the held overwrites to the store."""
        if self._jfd is not None and self.durable and (self._jdirty or not self._jlisted):
            sync(self._jfd)
            if not self._jlisted:
                sync_dir(self.path.parent)
        self._jdirty, self._jlisted = False, self._jfd is not None
        for off, d in self._held:
            pwrite_all(self.fd, d, off)
        self._clear_held()

    def _clear_held(self) -> None:
        self._held, self._held_bytes, self._held_span = [], 0, (0, 0)

    def _commit(self) -> None:
        if self.creating:
            if self.durable:
                sync(self.fd)
            replace(self._tmp, self.path)  # publish the new store, complete as of this flush
            if self.durable:
                sync_dir(self.path.parent)
            self.creating = False
        else:
            self._write_held()
            if self._dirty and self.durable:
                sync(self.fd)  # the commit's data is on disk before its journal goes
            if self._jfd is not None:
                os.close(self._jfd)
                self._jfd = None
                unlink(self.journal)
            if self._dirty and self.durable:
                sync_dir(self.path.parent)  # the journal's deletion (and earlier ones) is on disk
        self._dirty = False
        self._release()
        self.base = os.fstat(self.fd).st_size

    def _release(self) -> None:
        if self._locked:
            unlock(self.fd)
            self._locked = False
