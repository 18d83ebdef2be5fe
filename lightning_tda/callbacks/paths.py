"""Checks of a store path that touch nothing on disk (the writer creates directories at ``setup``)."""

from __future__ import annotations

import os
from pathlib import Path

from lightning_tda.errors import StoreError


def check_store_path(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path``; raises :class:`StoreError` now when the store could never be written there.

    Only reads the file system: a missing parent directory is created later, by the writer.

    >>> check_store_path("runs/tda.h5")
    PosixPath('runs/tda.h5')
    """
    p = Path(path)
    if p.is_dir():
        raise StoreError(f"store path {p} is a directory; pass a file path such as {p / 'tda.h5'}")
    parent = p.parent if str(p.parent) else Path(".")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = (
            "the store's parent"
            if existing == parent
            else f"the store's directory {parent} lies under"
        )
        raise StoreError(
            f"{where} {existing} is not a directory; pass a writable path inside a directory"
        )
    if not os.access(existing, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise StoreError(f"store path {p} is not writable; pass a path in a writable directory")
    return p
