"""A power cut at any point of the store writer's I/O never loses a reported commit or damages the store.

A recorder stands in for the disk. It intercepts every call in ``lightning_tda.store.journal`` that
changes a file (``open_fd`` with ``O_CREAT``/``O_TRUNC``, ``pwrite_all``, ``truncate``, ``sync``,
``sync_dir``, ``unlink``, ``replace``), performs it (the fsyncs themselves are skipped: the recorder is
the disk) and logs it. A power cut after the ``n``-th call leaves:

- of each file, the writes and truncations up to its last ``sync``; in the ``"random"`` model also a
  seeded random subset of the 512-byte sectors written (and truncations made) since: the disk may have
  persisted any of them;
- of the directory, the entries as of its last ``sync_dir``; in the ``"random"`` model also a seeded
  prefix of the later creations, renames and deletions (directory changes reach the disk in order).

(A killed process, ``"kill"``, leaves everything written.) That state is written to a fresh directory
(the journal's header names the store by inode: it is renumbered to the new file's) and opened as the
user would: ``AttributionStore`` (reading through a journal left behind), then the next writer's
recovery (``open_for_update``), then ``AttributionStore`` again. Every checkpoint reported complete
before the cut must be there with the rows written, every listed checkpoint must hold exactly what was
written, and the store must open. The same holds for a cut inside that recovery.

Cut points: in the ``"drop"`` model the disk changes only at an fsync, so every distinct state is
checked (just after each fsync and at each reported commit); in the ``"random"`` model just before
each fsync (most unsynced writes), at each reported commit and at a seeded sample of the other calls
(every call in the slow test). With ``journal.DURABLE = False``, or with the journal's fsync left out
(no write-ahead), the same simulation finds cuts that lose or damage a checkpoint: it has teeth.
Nothing depends on timing.
"""

from __future__ import annotations

import os
import random
import select
import signal
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch

from lightning_tda import AttributionStore
from lightning_tda.capture.layers import LayerSpec
from lightning_tda.capture.projection import ProjectionConfig
from lightning_tda.store import journal, schema
from lightning_tda.store.batches import BatchStep, write_batch_steps
from lightning_tda.store.writer import StoreWriter, open_for_update

SECTOR = 512
DIR_OPS = ("link", "unlink", "rename")
SYNCS = ("sync", "syncdir")
SAMPLE = 32  # seeded random-model cuts per workload beyond those next to fsyncs and commits
HANG = 60.0  # seconds a check may run before it counts as hung (it takes milliseconds)
PIPE_MAX = 4096  # bytes of a check's message (one write to a pipe, never blocks)
SEEDS = 8  # seeds of the random model tried on the store without write-ahead
NO_INODE = 2**64 - 1  # the journal of a store that did not survive: matches no file
HEADER = journal._HEADER


class Disk:
    """The recorded disk of one directory: ``ops`` in call order, ``marks`` of reported commits.

    Ops: ``("w", inode, offset, bytes)``, ``("t", inode, size)``, ``("sync", inode)``,
    ``("link", name, inode)``, ``("unlink", name)``, ``("rename", src, dst)``, ``("syncdir",)``.
    Inodes are the model's (a new one per file created, even where the filesystem reuses numbers).
    Files already in the directory when recording starts count as on disk.
    """

    def __init__(self, root: Path, sync_journal: bool = True) -> None:
        self.root = root
        self.sync_journal = sync_journal  # False: the journal's fsyncs are lost (no write-ahead)
        self.ops: list[tuple] = []
        self.marks: list[tuple[int, object]] = []
        self.inode: dict[int, int] = {}  # st_ino -> model inode
        self.headers: dict[bytes, int] = {}  # journal header written -> model inode of its store
        self.created = 0
        for p in sorted(root.iterdir()):
            ino = self._new(p)
            self.ops += [("link", p.name, ino), ("w", ino, 0, p.read_bytes()), ("sync", ino)]
        for op in self.ops:
            if op[0] == "w":
                self._note_header(op[3])
        self.ops.append(("syncdir",))

    def _new(self, path: Path) -> int:
        self.created += 1
        ino = self.created
        self.inode[os.stat(path).st_ino] = ino
        return ino

    def _ino(self, fd: int) -> int:
        return self.inode[os.fstat(fd).st_ino]

    def _name(self, path) -> str:
        p = Path(path)
        assert p.parent.resolve() == self.root.resolve(), p
        return p.name

    def _note_header(self, data: bytes) -> None:
        if len(data) >= HEADER.size and data[:8] == journal.MAGIC:
            _, st_ino, _, _ = HEADER.unpack_from(data)
            if st_ino in self.inode:
                self.headers[data[: HEADER.size]] = self.inode[st_ino]

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
        data = bytes(memoryview(data).cast("B"))
        if offset == 0:
            self._note_header(data)
        self.ops.append(("w", self._ino(fd), offset, data))

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


def _content(ops: list[tuple], ino: int, model: str, rng: random.Random) -> bytes:
    mine = [(i, op) for i, op in enumerate(ops) if op[0] in ("w", "t", "sync") and op[1] == ino]
    synced = max((i for i, op in mine if op[0] == "sync"), default=-1)
    buf = bytearray()
    for i, op in mine:
        if op[0] == "sync":
            continue
        if i < synced or model == "kill":
            _apply(buf, op)
        elif model == "random":
            for piece in _sectors(op) if op[0] == "w" else [op]:
                if rng.random() < 0.5:
                    _apply(buf, piece)
    return bytes(buf)


Files = dict[str, tuple[int, bytes]]  # name -> (model inode, bytes)


def crash(disk: Disk, cut: int, model: str = "drop", seed: int = 0) -> Files:
    """The files a power cut (``model`` "drop" or "random"; "kill": a killed process) after
    ``disk.ops[:cut]`` leaves."""
    rng = random.Random(f"{seed}-{cut}")
    ops = disk.ops[:cut]
    synced = max((i for i, op in enumerate(ops) if op[0] == "syncdir"), default=-1)
    dir_ops = [(i, op) for i, op in enumerate(ops) if op[0] in DIR_OPS]
    kept = [op for i, op in dir_ops if i < synced or model == "kill"]
    later = [op for i, op in dir_ops if i > synced]
    if model == "random":
        kept += later[: rng.randint(0, len(later))]
    entries: dict[str, int] = {}
    for op in kept:
        if op[0] == "link":
            entries[op[1]] = op[2]
        elif op[0] == "unlink":
            entries.pop(op[1], None)
        elif op[1] in entries:
            entries[op[2]] = entries.pop(op[1])
    return {name: (ino, _content(ops, ino, model, rng)) for name, ino in entries.items()}


def materialise(disk: Disk, files: Files, where: Path) -> Path:
    """Write ``files`` to the new directory ``where``; a journal's header is renumbered to the inode
    its store got there (``NO_INODE`` if the store did not survive)."""
    where.mkdir(parents=True)
    for name, (_, data) in files.items():
        (where / name).write_bytes(data)
    st_ino = {ino: os.stat(where / name).st_ino for name, (ino, _) in files.items()}
    for name, (_, data) in files.items():
        store = disk.headers.get(data[: HEADER.size])
        if store is not None:
            _, _, base, _ = HEADER.unpack_from(data)
            with open(where / name, "r+b") as f:
                f.write(journal.header_bytes(st_ino.get(store, NO_INODE), base))
    return where


# -- where to cut --------------------------------------------------------------------------------
def _syncs(disk: Disk) -> list[int]:
    return [i for i, op in enumerate(disk.ops) if op[0] in SYNCS]


def drop_cuts(disk: Disk) -> list[int]:
    """One cut per distinct "drop" state: just after each fsync, and at each reported commit."""
    n = len(disk.ops)
    return sorted({0, n, *(i + 1 for i in _syncs(disk)), *(at for at, _ in disk.marks)})


def random_cuts(disk: Disk, sample: int | None, seed: int) -> list[int]:
    """Just before each fsync, at each reported commit, the end, and ``sample`` seeded other cuts
    (``None``: all of them)."""
    n = len(disk.ops)
    must = {n, *_syncs(disk), *(at for at, _ in disk.marks)}
    rest = sorted(set(range(n + 1)) - must)
    if sample is not None:
        rest = random.Random(seed).sample(rest, min(sample, len(rest)))
    return sorted(must | set(rest))


def plan(disk: Disk, sample: int | None = SAMPLE, seed: int = 15) -> list[tuple[int, str]]:
    return [(c, "drop") for c in drop_cuts(disk)] + [
        (c, "random") for c in random_cuts(disk, sample, seed)
    ]


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


def isolated(check: Callable[[], object]) -> str | None:
    """Run ``check`` in a forked process: ``None`` if it returned, else what it raised, or that it
    hung (a damaged file can send HDF5 into an endless loop; a check takes milliseconds)."""
    if not hasattr(os, "fork"):  # pragma: no cover - Windows: in this process
        try:
            check()
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {e}"
        return None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running anything of the parent's
        try:
            check()
            msg = b"ok"
        except BaseException as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {e}".encode()[:PIPE_MAX]
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    try:
        if not select.select([r], [], [], HANG)[0]:
            os.kill(pid, signal.SIGKILL)
            return f"the check hung (more than {HANG:.0f} s)"
        msg = b"".join(iter(lambda: os.read(r, PIPE_MAX), b""))
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return None if msg == b"ok" else msg.decode(errors="replace") or "the check's process died"


def failures(
    disk: Disk,
    path: Path,
    tmp: Path,
    expect: Expect,
    cuts: Iterable[tuple[int, str]],
    first: bool = False,
    seed: int = 15,
) -> list[str]:
    """The cuts whose store fails a check (``first``: stop at the first, as after a hang). A state
    already checked (with the same commits reported) is not checked again."""
    bad, seen = [], set()
    for cut, model in cuts:
        state = crash(disk, cut, model, seed)
        reported = [int(x) for x in disk.reported(cut)]
        key = (tuple(sorted((k, v[1]) for k, v in state.items())), tuple(reported))
        if key in seen:
            continue
        seen.add(key)
        where = materialise(disk, state, tmp / f"{model}{cut}-{seed}") / path.name
        err = isolated(lambda where=where, reported=reported: check_store(where, reported, expect))
        if err is not None:
            bad.append(f"cut {cut} ({model}): {err}"[:300])
            if first or "hung" in err:
                break
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
    return (
        torch.randn(16, WIDTH, generator=g),
        torch.rand(16, generator=g),
        torch.randn(4, 8, generator=g),
    )


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


def _store_syncs(disk: Disk, ops: list[tuple]) -> int:
    journals = {op[2] for op in disk.ops if op[0] == "link" and op[1].endswith(".journal")}
    return sum(op[0] == "sync" and op[1] not in journals for op in ops)


# -- the tests ---------------------------------------------------------------------------------------
WORKLOADS = [sweep_workload, in_flight_workload]


@pytest.mark.parametrize("workload", WORKLOADS)
def test_a_power_cut_anywhere_keeps_every_reported_commit(tmp_path, workload):
    disk, path, expect = record(tmp_path, workload)
    done = [t for _, t in disk.marks]
    assert check_store(path, done, expect) == sorted(done)  # the store as written
    cuts = plan(disk)
    assert len([c for c, m in cuts if m == "random"]) >= SAMPLE + len(_syncs(disk))
    bad = failures(disk, path, tmp_path, expect, cuts)
    assert not bad, f"{len(bad)} cuts failed:\n" + "\n".join(bad[:10])


@pytest.mark.slow
@pytest.mark.parametrize("workload", WORKLOADS)
def test_a_power_cut_at_every_call_keeps_every_reported_commit(tmp_path, workload):
    disk, path, expect = record(tmp_path, workload)
    bad = failures(disk, path, tmp_path, expect, plan(disk, sample=None))
    assert not bad, f"{len(bad)} cuts failed:\n" + "\n".join(bad[:10])


def test_a_power_cut_inside_recovery_keeps_the_last_commit(tmp_path):
    """A process killed just before the store's fsync of the second checkpoint's commit (its journal
    on disk, the commit's overwrites in the store); the next writer's recovery is cut at every call."""
    disk, path, expect = record(tmp_path, sweep_workload)
    second = next(at for at, t in disk.marks if t == 2)
    cut = max(i for i in range(second) if _store_syncs(disk, disk.ops[i : i + 1]))
    where = materialise(disk, crash(disk, cut, "kill"), tmp_path / "killed")
    assert journal.journal_path(where / path.name).exists()
    rec = Disk(where)
    before = len(rec.ops)
    with pytest.MonkeyPatch.context() as mp:
        rec.install(mp)
        with open_for_update(where / path.name):
            pass
    store = rec.inode[os.stat(where / path.name).st_ino]
    assert any(op[:2] == ("w", store) for op in rec.ops[before:]), (
        "the recovery wrote nothing back: the kill left nothing to undo"
    )
    rec.marks = [(0, 1)]  # reported before the kill
    cuts = [(c, m) for m in ("drop", "random") for c in range(before, len(rec.ops) + 1)]
    bad = failures(rec, where / path.name, tmp_path / "cuts", expect, cuts)
    assert not bad, f"{len(bad)} cuts failed:\n" + "\n".join(bad[:10])


def test_a_flush_is_one_commit_with_at_most_four_fsyncs(tmp_path):
    """Each write_batch_steps call: one fsync of the store, at most four in all (journal, directory,
    store, directory), however many steps it writes."""
    disk, _, _ = record(tmp_path, in_flight_workload)
    ends = [next(at for at, t in disk.marks if t == steps[-1]) for steps in IN_FLIGHT_CALLS]
    for a, b in zip(ends, ends[1:], strict=False):
        syncs = [op for op in disk.ops[a:b] if op[0] in SYNCS]
        assert _store_syncs(disk, syncs) == 1 and len(syncs) <= 4, syncs


@pytest.mark.parametrize("workload", WORKLOADS)
def test_the_simulation_finds_lost_commits_without_fsync(tmp_path, workload):
    """durable=False: a power cut loses checkpoints the writer had reported complete."""
    disk, path, expect = record(tmp_path, workload, durable=False)
    assert not _syncs(disk)[1:]  # (the first is the empty directory's, before recording)
    cuts = [(at, "drop") for at, _ in disk.marks]
    bad = failures(disk, path, tmp_path, expect, cuts, first=True)
    assert bad, "the simulation found nothing wrong with a store that was never fsync'ed"


def test_the_simulation_finds_damage_without_write_ahead(tmp_path):
    """The store and directory are fsync'ed but the journal is not: some cut just before a store
    fsync, with the disk keeping part of the commit's overwrites and not of its journal, leaves a
    store that is damaged or lost a reported checkpoint."""
    disk, path, expect = record(tmp_path, sweep_workload, sync_journal=False)
    before = [i for i in range(len(disk.ops)) if _store_syncs(disk, disk.ops[i : i + 1])]
    bad = []
    for seed in range(SEEDS):
        bad = failures(disk, path, tmp_path, expect, [(c, "random") for c in before], True, seed)
        if bad:
            break
    assert bad, "no cut found the missing write-ahead fsync"
