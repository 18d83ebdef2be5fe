"""The store's extension API: groups added to a store after training, written crash-safe.

Code outside the core writer (``stride/``, dropout-ensemble members in a checkpoint, in-flight batch
checkpoints) writes the file only through :func:`~lightning_tda.store.writer.open_for_update` or the
:class:`ExtensionGroup` built on it, never through the writer's private helpers. Both give the
writer's guarantees: an exclusive lock while open, a rollback journal, each flush one atomic commit.

A member becomes visible atomically: it is built under ``<group>/partial/<name>`` and moved to
``<group>/<name>`` only after a commit, so a crash never leaves a half-written member in place::

    with ExtensionGroup("tda.h5", "stride") as ext:
        dg = ext.partial("design").create_group("design")   # stride/partial/design
        dg.create_dataset("ids", data=ids)
        ext.publish("design")                                # commit, move to stride/design, commit
"""

from __future__ import annotations

import os
from types import TracebackType

import h5py

from lightning_tda.store.writer import StoreFile, open_for_update

PARTIAL = "partial"
"""Sub-group where members are built before :meth:`ExtensionGroup.publish` moves them into place."""


class ExtensionGroup:
    """Context manager: the store at ``path`` open for writing, with its group ``name`` at hand.

    Args:
        path: the store file.
        name: group path inside the file (e.g. ``"stride"`` or ``"checkpoints/0000000010"``).
        create: create the group when missing; with ``False`` a missing group leaves
            :attr:`group` ``None`` (the caller says what is wrong).

    Attributes:
        file: the :class:`~lightning_tda.store.writer.StoreFile` (``None`` outside ``with``).
        group: the ``h5py.Group`` ``name`` (``None`` outside ``with`` or when missing).
    """

    def __init__(self, path: str | os.PathLike, name: str, *, create: bool = True) -> None:
        self.path, self.name, self.create = path, name.strip("/"), create
        self.file: StoreFile | None = None
        self.group: h5py.Group | None = None

    def __enter__(self) -> ExtensionGroup:
        self.file = open_for_update(self.path)
        try:
            if self.create:
                self.group = self.file.require_group(self.name)
            else:
                found = self.file.get(self.name)
                self.group = found if isinstance(found, h5py.Group) else None
        except BaseException as e:
            self.file.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        file, self.file, self.group = self.file, None, None
        if file is not None:
            file.__exit__(exc_type, exc, tb)

    def _require_open(self) -> h5py.Group:
        if self.file is None or self.group is None:
            raise RuntimeError(
                f"ExtensionGroup({self.name!r}) is not open (use it in a with block)"
            )
        return self.group

    def partial(self, name: str) -> h5py.Group:
        """The ``partial`` sub-group, with any leftover ``name`` of an interrupted write deleted;
        create the member ``name`` in it, then :meth:`publish` it."""
        part = self._require_open().require_group(PARTIAL)
        if name in part:
            del part[name]
        return part

    def publish(self, name: str) -> None:
        """Commit, move ``partial/<name>`` to ``<name>`` (replacing nothing: delete first), commit."""
        group = self._require_open()
        self.file.flush()
        self.file.move(f"{group.name}/{PARTIAL}/{name}", f"{group.name}/{name}")
        self.file.flush()


__all__ = ["PARTIAL", "ExtensionGroup", "open_for_update"]
