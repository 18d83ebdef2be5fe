"""A power cut at seeded points of the store writer's I/O never loses a reported commit or damages the store.

A recorder stands in for the disk. It intercepts every call in ``lightning_tda.store.journal`` that
changes a file (``open_fd`` with ``O_CREAT``/``O_TRUNC``, ``pwrite_all``, ``truncate``, ``sync``,
``sync_dir``, ``unlink``, ``replace``), performs it (the fsyncs themselves are skipped: the recorder is
the disk) and logs it. A power cut after the ``n``-th call leaves:

- of each file, the writes and truncations up to its last ``sync``; in the ``"random"`` model also a
  seeded random subset of the 512-byte sectors written (and truncations made) since: the disk may have
  persisted any of them;
- of the directory, the entries as of its last ``sync_dir``; in the ``"random"`` model also a seeded
  prefix of the later creations, renames and deletions (directory changes reach the disk in order).

That state is written to a fresh directory and opened as the user would: ``AttributionStore`` (reading
through a journal left behind), then the next writer's recovery (``open_for_update``), then
``AttributionStore`` again. Every checkpoint reported complete before the cut must be there with the
rows written, every listed checkpoint must hold exactly what was written, and the store must open. The
same holds for a cut inside that recovery. With ``journal.DURABLE = False``, or with the journal's
fsync left out (no write-ahead), the same simulation finds cuts that lose or damage a checkpoint: it has
teeth. Nothing depends on timing.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import FastLogger, TinyMLP, loader, make_classification

from lightning_tda import AttributionStore
from lightning_tda.capture.layers import LayerSpec
from lightning_tda.capture.projection import ProjectionConfig
from lightning_tda.store import journal, schema
from lightning_tda.store.batches import BatchStep, write_batch_steps
from lightning_tda.store.writer import CheckpointWriter, StoreWriter, open_for_update

SECTOR = 512
DIR_OPS = ("link", "unlink", "rename")


class Disk:
    """The recorded disk of one directory: ``ops`` in call order, ``marks`` of reported commits.

    Ops: ``("w", inode, offset, bytes)``, ``("t", inode, size)``, ``("sync", inode)``,
    ``("link", name, inode)``, ``("unlink", name)``, ``("rename", src, dst)``, ``("syncdir",)``.
    Files already in the directory when recording starts count as on disk.
    """

    def __init__(self, root: Path, sync_journal: bool = True) -> None:
        self.root = root
        self.sync_journal = sync_journal  # False: the journal's fsyncs are lost (no write-ahead)
        self.ops: list[tuple] = []
        self.marks: list[tuple[int, object]] = []
        self.inode: dict[int, int] = {}  # st_ino -> model inode
        self.created = 0
        for p in sorted(root.iterdir()):
            ino = self._new(p)
            self.ops += [("link", p.name, ino), ("w", ino, 0, p.read_bytes()), ("sync", ino)]
        self.ops.append(("syncdir",))

    def _new(self, path: Path) -> int:
        self.created += 1  # a new model inode even when the filesystem reuses st_ino
        ino = self.created
        self.inode[os.stat(path).st_ino] = ino
        return ino

    def _ino(self, fd: int) -> int:
        return self.inode[os.fstat(fd).st_ino]

    def _name(self, path) -> str:
        p = Path(path)
        assert p.parent.resolve() == self.root.resolve(), p
        return p.name

    def mark(self, label) -> None:
        """``label`` is reported complete from here on."""
        self.marks.append((len(self.ops), label))

    def reported(self, cut: int) -> list:
        return [label for at, label in self.marks if at <= cut]

    # -- the intercepted calls -----------------------------------------------------------------
    def open_fd(self, path, flags: int, mode: int = 0o666) -> int:
        existed = os.path.lexists(path)
        fd = os.open(path, flags | journal.O_BINARY, mode)
        if not existed:
            self.ops.append(("link", self._name(path), self._new(Path(path))))
        elif flags & os.O_TRUNC:
            self.ops.append(("t", self._ino(fd), 0))
        return fd

    def pwrite_all(self, fd: int, data, offset: int) -> None:
        self.real_pwrite(fd, data, offset)
        self.ops.append(("w", self._ino(fd), offset, bytes(memoryview(data).cast("B"))))

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)
        self.ops.append(("t", self._ino(fd), size))

    def sync(self, fd: int) -> None:
        ino = self._ino(fd)
        names = {op[1] for op in self.ops if op[0] == "link" and op[2] == ino}
        if self.sync_journal or not any(n.endswith(journal.JOURNAL_SUFFIX) for n in names):
            self.ops.append(("sync", ino))

    def sync_dir(self, path) -> None:
        assert Path(path).resolve() == self.root.resolve(), path
        self.ops.append(("syncdir",))

    def unlink(self, path) -> bool:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        self.ops.append(("unlink", self._name(path)))
        return True

    def replace(self, src, dst) -> None:
        os.replace(src, dst)
        self.ops.append(("rename", self._name(src), self._name(dst)))

    def install(self, mp: pytest.MonkeyPatch) -> None:
        self.real_pwrite = journal.pwrite_all
        for name in ("open_fd", "pwrite_all", "truncate", "sync", "sync_dir", "unlink", "replace"):
            mp.setattr(journal, name, getattr(self, name))


# -- what a power cut leaves -------------------------------------------------------------------------
def _apply(buf: bytearray, op: tuple) -> None:
    if op[0] == "t":
        del buf[op[2] :]
        buf.extend(bytes(op[2] - len(buf)))
        return
    _, _, off, data = op
    if off > len(buf):
        buf.extend(bytes(off - len(buf)))
    buf[off : off + len(data)] = data


def _sectors(op: tuple) -> list[tuple]:
    """A write split at 512-byte boundaries (each may or may not have reached the disk)."""
    _, ino, off, data = op
    cuts = [off, *range((off // SECTOR + 1) * SECTOR, off + len(data), SECTOR), off + len(data)]
    return [("w", ino, a, data[a - off : b - off]) for a, b in zip(cuts, cuts[1:], strict=False)]


def _content(ops: list[tuple], ino: int, rng: random.Random | None) -> bytes:
    mine = [(i, op) for i, op in enumerate(ops) if op[0] in ("w", "t", "sync") and op[1] == ino]
    synced = max((i for i, op in mine if op[0] == "sync"), default=-1)
    buf = bytearray()
    for i, op in mine:
        if op[0] == "sync":
            continue
        if i < synced:
            _apply(buf, op)
        elif rng is not None:
            for piece in _sectors(op) if op[0] == "w" else [op]:
                if rng.random() < 0.5:
                    _apply(buf, piece)
    return bytes(buf)


def crash(disk: Disk, cut: int, rng: random.Random | None = None) -> dict[str, bytes]:
    """The files (name -> bytes) a power cut after ``disk.ops[:cut]`` leaves."""
    ops = disk.ops[:cut]
    synced = max((i for i, op in enumerate(ops) if op[0] == "syncdir"), default=-1)
    dir_ops = [(i, op) for i, op in enumerate(ops) if op[0] in DIR_OPS]
    kept = [op for i, op in dir_ops if i < synced]
    later = [op for i, op in dir_ops if i > synced]
    if rng is not None:
        kept += later[: rng.randint(0, len(later))]
    entries: dict[str, int] = {}
    for op in kept:
        if op[0] == "link":
            entries[op[1]] = op[2]
        elif op[0] == "unlink":
            entries.pop(op[1], None)
        elif op[1] in entries:
            entries[op[2]] = entries.pop(op[1])
    return {name: _content(ops, ino, rng) for name, ino in entries.items()}


def materialise(files: dict[str, bytes], where: Path) -> Path:
    where.mkdir(parents=True)
    for name, data in files.items():
        (where / name).write_bytes(data)
    return where


def cut_points(disk: Disk, every: int) -> list[int]:
    """Every ``every``-th call, and just before and after each fsync and each reported commit."""
    n = len(disk.ops)
    syncs = [i for i, op in enumerate(disk.ops) if op[0] in ("sync", "syncdir")]
    points = {*range(0, n + 1, every), n, *syncs, *(i + 1 for i in syncs)}
    points |= {at for at, _ in disk.marks}
    return sorted(p for p in points if p <= n)


# -- checking a cut ----------------------------------------------------------------------------------
Expect = Callable[[AttributionStore, int], None]


def _visible(path: Path, reported: list[int], expect: Expect) -> list[int]:
    s = AttributionStore(path)
    steps = s.steps
    assert set(reported) <= set(steps), f"reported complete {reported}, the store has {steps}"
    for t in steps:
        expect(s, t)
    return steps


def check_store(path: Path, reported: list[int], expect: Expect) -> list[int] | None:
    """The cut store opens, holds every reported checkpoint and only checkpoints as written; the next
    writer's recovery keeps exactly those. Returns the steps (``None``: no store at the path)."""
    if not path.exists():
        assert not reported, f"the store is gone, {reported} were reported complete"
        return None
    steps = _visible(path, reported, expect)
    with open_for_update(path):  # the next writer: rolls a journal left behind back
        pass
    assert not journal.journal_path(path).exists()
    assert _visible(path, reported, expect) == steps
    return steps


def failures(
    disk: Disk, path: Path, tmp: Path, expect: Expect, every: int, seed: int
) -> list[str]:
    """Cut after each of ``cut_points``, in both models; the cuts whose store fails a check."""
    bad = []
    rng = random.Random(seed)
    for cut in cut_points(disk, every):
        for model in ("drop", "random"):
            state = crash(disk, cut, random.Random(rng.random()) if model == "random" else None)
            where = materialise(state, tmp / f"{model}{cut}")
            try:
                check_store(where / path.name, [int(x) for x in disk.reported(cut)], expect)
            except Exception as e:  # noqa: BLE001 (any failure to open or verify is a finding)
                bad.append(f"cut {cut} ({model}): {type(e).__name__}: {e}"[:300])
    return bad


# -- workloads ---------------------------------------------------------------------------------------
LAYER = LayerSpec("l", "linear", 4, 8, False, 4, 8, 0, ("l.weight",))
WIDTH = LAYER.size


def _metadata(path: Path, version: int = schema.SCHEMA_VERSION) -> StoreWriter:
    w = StoreWriter(path)
    w.write_run_metadata(
        {
            "layers": schema.to_json([LAYER.to_dict()]),
            "projection": schema.to_json(ProjectionConfig(kind="exact").to_dict()),
            "layer_groups": "{}",
        },
        schema_version=version,
    )
    return w


def _sweep_rows(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, WIDTH, generator=g), torch.rand(16, generator=g), torch.randn(4, 8, generator=g)


def sweep_workload(path: Path, disk: Disk) -> Expect:
    """Three sweep checkpoints written with StoreWriter (16 examples, two batches each)."""
    w = _metadata(path)
    for step in (1, 2, 3):
        rows, losses, state = _sweep_rows(step)
        with w.begin_checkpoint(step, 16, WIDTH) as cw:
            for start in (0, 8):
                ids = torch.arange(start, start + 8) + 100
                cw.write_rows(ids, rows[start : start + 8], losses[start : start + 8])
            cw.write_arrays(schema.STATE, {"l|weight": state})
            cw.commit({"lr_sum": [0.1], "lr_cumsum": [0.1 * step]})
            disk.mark(step)

    def expect(s: AttributionStore, t: int) -> None:
        rows, losses, state = _sweep_rows(t)
        assert torch.equal(s.read(t), rows.half().float()), t
        assert torch.equal(s.read(t, "loss"), losses), t
        assert torch.equal(s.read(t, "ids"), torch.arange(16) + 100), t
        assert torch.equal(s.state(t)["l.weight"], state), t

    return expect


def _batch(step: int, n: int = 6) -> BatchStep:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.sort(torch.randperm(40, generator=g)[:n]).values.to(torch.int64)
    state = {"l|weight": torch.randn(4, 8, generator=g)} if step % 2 == 0 else None
    queries = (torch.randn(3, WIDTH, generator=g), torch.rand(3, generator=g))
    attrs = {"lr_sum": [0.1], "lr_cumsum": [0.1 * (step + 1)], "epoch": 0}
    return BatchStep(step, ids, torch.randn(n, WIDTH, generator=g), attrs, state, queries)


IN_FLIGHT_CALLS = ((0, 1, 2), (3,), (4, 5, 6, 7), (8, 9))


def in_flight_workload(path: Path, disk: Disk) -> Expect:
    """Ten batch checkpoints appended by write_batch_steps in four calls (1 to 4 steps each)."""
    _metadata(path, schema.IN_FLIGHT_SCHEMA_VERSION)
    for steps in IN_FLIGHT_CALLS:
        write_batch_steps(path, "float16", [_batch(t) for t in steps], torch.arange(3))
        for t in steps:
            disk.mark(t)

    def expect(s: AttributionStore, t: int) -> None:
        b = _batch(t)
        ids, rows = s.batch_rows(t)
        assert torch.equal(ids, b.ids) and torch.equal(rows, b.rows.half().float()), t
        assert set(b.ids.tolist()) <= set(s.example_ids.tolist()), t
        assert torch.equal(s.read(t, "query"), b.queries[0].half().float()), t
        if b.state is not None:
            assert torch.equal(s.state(t)["l.weight"], b.state["l|weight"]), t

    return expect


def record(tmp: Path, workload, durable: bool = True, sync_journal: bool = True):
    """Run ``workload`` on a recorded disk; returns ``(disk, store path, expect)``."""
    root = tmp / "live"
    root.mkdir()
    path = root / "tda.h5"
    disk = Disk(root, sync_journal)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(journal, "DURABLE", durable)
        disk.install(mp)
        expect = workload(path, disk)
    return disk, path, expect


# -- the tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("workload", [sweep_workload, in_flight_workload])
def test_a_power_cut_anywhere_keeps_every_reported_commit(tmp_path, workload):
    disk, path, expect = record(tmp_path, workload)
    assert sorted(disk.reported(len(disk.ops))) == sorted(
        t for _, t in disk.marks
    ) and check_store(path, [t for _, t in disk.marks], expect)
    bad = failures(disk, path, tmp_path, expect, every=17, seed=15)
    assert not bad, f"{len(bad)} cuts failed:\n" + "\n".join(bad[:10])


@pytest.mark.parametrize("workload", [sweep_workload, in_flight_workload])
def test_the_simulation_finds_lost_commits_without_fsync(tmp_path, workload):
    """durable=False: a power cut loses checkpoints the writer had reported complete."""
    disk, path, expect = record(tmp_path, workload, durable=False)
    assert not any(op[0] in ("sync", "syncdir") for op in disk.ops[1:])
    bad = failures(disk, path, tmp_path, expect, every=17, seed=15)
    assert bad, "the simulation found nothing wrong with a store that was never fsync'ed"


def test_the_simulation_finds_damage_without_write_ahead(tmp_path):
    """The store and directory are fsync'ed but the journal is not: some cut, with the disk keeping
    part of the commit's overwrites, leaves a store that is damaged or lost a reported checkpoint."""
    disk, path, expect = record(tmp_path, sweep_workload, sync_journal=False)
    bad = failures(disk, path, tmp_path, expect, every=3, seed=15)
    assert any("random" in b for b in bad), "no cut found the missing write-ahead fsync"
