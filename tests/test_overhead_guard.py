"""Regression guard for the in-flight overhead that needs no timing: it counts work, not seconds.

Per logged optimizer step, on the training thread: no host synchronisation (``.item()``, ``.cpu()``,
``bool(tensor)``, ``torch.unique`` ...) and no HDF5 call; per group of ``flush_every`` steps: one
store open and one commit; per step: the group's datasets only (``row_ids``, ``train``), plus the
state's one packed dataset at the few steps ``save_state="auto"`` saves it, and 8 attributes, none
read back. Counts are marginal: the difference
between a fit of 2 epochs and one of 4, so one-off work (setup, the first-batch check) cancels.
"""

from __future__ import annotations

import os
import threading
from collections import Counter

import h5py
import torch
from helpers import FastLogger, TinyGPT, TokenDataset, loader, trainer
from torch.overrides import TorchFunctionMode

from lightning_tda import AttributionStore, IndexedDataset
from lightning_tda.callbacks.config import InFlightConfig
from lightning_tda.store import journal, schema

SYNCS = {
    "item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__",
    "unique", "nonzero", "any", "all", "equal", "allclose",
}  # fmt: skip
"""Tensor calls that make the host wait for the device (or read a tensor's values on the host)."""


class SyncCounter(TorchFunctionMode):
    """Counts host-synchronising tensor calls made on the thread that entered it (modes are per thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            self.calls[name] += 1
        elif name == "to" and any(str(a) == "cpu" for a in (*args[1:], *(kwargs or {}).values())):
            self.calls["to(cpu)"] += 1
        return func(*args, **(kwargs or {}))


class StoreCalls:
    """Counts HDF5 dataset creations (by thread), store opens and commits during a fit."""

    def __init__(self, monkeypatch) -> None:
        self.datasets: Counter = Counter()
        self.attrs: Counter = Counter()  # attribute writes ("set") and reads ("get")
        self.opens = self.commits = 0
        create, init, commit = (
            h5py.Group.create_dataset,
            journal.JournaledFile.__init__,
            journal.JournaledFile._commit,
        )
        main = threading.main_thread()

        def counting_create(group, name, *a, **kw):
            where = "training thread" if threading.current_thread() is main else "writer"
            self.datasets[where] += 1
            return create(group, name, *a, **kw)

        def counting_init(f, *a, **kw):
            self.opens += 1
            init(f, *a, **kw)

        def counting_commit(f):
            changed = f.creating or f._jfd is not None or os.fstat(f.fd).st_size != f.base
            self.commits += int(changed)  # (close() after a flush commits nothing new)
            commit(f)

        put, get = h5py.AttributeManager.__setitem__, h5py.AttributeManager.__getitem__

        def counting_put(attrs, name, value):
            self.attrs["set"] += 1
            put(attrs, name, value)

        def counting_get(attrs, name):
            self.attrs["get"] += 1
            return get(attrs, name)

        monkeypatch.setattr(h5py.AttributeManager, "__setitem__", counting_put)
        monkeypatch.setattr(h5py.AttributeManager, "__getitem__", counting_get)
        monkeypatch.setattr(h5py.Group, "create_dataset", counting_create)
        monkeypatch.setattr(journal.JournaledFile, "__init__", counting_init)
        monkeypatch.setattr(journal.JournaledFile, "_commit", counting_commit)


def _fit(tmp_path, monkeypatch, epochs: int, **kw) -> tuple[Counter, StoreCalls, AttributionStore]:
    torch.manual_seed(0)
    data = IndexedDataset(TokenDataset(n=32))
    path = tmp_path / f"e{epochs}-{len(kw)}.h5"
    kw = {"rank": 4, **kw}
    flight = InFlightConfig(flush_every=4, background=True)  # as on an accelerator ("auto")
    logger = FastLogger(path, mode="in_flight", in_flight=flight, verbose=False, **kw)
    calls = StoreCalls(monkeypatch)
    t = trainer(tmp_path, [logger], max_epochs=epochs)
    with SyncCounter() as syncs:
        t.fit(TinyGPT(), loader(data, batch_size=4))
    monkeypatch.undo()
    return syncs.calls, calls, AttributionStore(path)


def _plain_syncs(tmp_path, epochs: int) -> Counter:
    torch.manual_seed(0)
    t = trainer(tmp_path, [], max_epochs=epochs)
    with SyncCounter() as syncs:
        t.fit(TinyGPT(), loader(IndexedDataset(TokenDataset(n=32)), batch_size=4))
    return syncs.calls


def test_no_host_sync_and_batched_writes_per_logged_step(tmp_path, monkeypatch):
    (s2, c2, st2), (s4, c4, st4) = (
        _fit(tmp_path, monkeypatch, e, save_state=False) for e in (2, 4)
    )
    steps = len(st4.steps) - len(st2.steps)
    assert steps == 16  # 8 batches of 4 per epoch, each step logged
    # host syncs on the training thread: those of the plain fit (Lightning's own), nothing more
    p2, p4 = _plain_syncs(tmp_path, 2), _plain_syncs(tmp_path, 4)
    extra = (s4 - p4) - (s2 - p2)
    extra.update({k: -v for k, v in ((s2 - p2) - (s4 - p4)).items()})
    per_step = {k: v / steps for k, v in extra.items() if v}
    assert not per_step, f"host syncs per logged step on the training thread: {per_step}"
    # HDF5: nothing on the training thread per step; one open and one commit per flush of 4 steps
    assert c4.datasets["training thread"] == c2.datasets["training thread"]
    flushes = steps // 4
    assert c4.opens - c2.opens == flushes, (c2.opens, c4.opens)
    assert c4.commits - c2.commits == flushes, (c2.commits, c4.commits)
    # datasets: row_ids + train per step, examples/ids at most once per flush (when new ids came)
    made = c4.datasets["writer"] - c2.datasets["writer"]
    assert 2 * steps <= made <= 2 * steps + flushes, made
    # attributes: 8 per step (global_step, rows, step_meta, complete, integrity; train's encoding;
    # the two datasets' CRCs), none read back to seal a step; per flush, the root's are read to check
    # it at open and to re-seal it (three times each at most, whatever the number of steps)
    sets, gets = (c4.attrs[k] - c2.attrs[k] for k in ("set", "get"))
    assert 8 * steps <= sets <= 8 * steps + 2 * flushes, sets
    with h5py.File(st4.path, "r") as f:
        root = len(f.attrs)
    assert gets <= 3 * (root + 1) * flushes, (gets, root, flushes)


def test_auto_state_is_saved_within_the_row_budget(tmp_path, monkeypatch):
    _, _, store = _fit(tmp_path, monkeypatch, 2, rank=8)  # save_state="auto"
    with h5py.File(store.path, "r") as f:
        saved = [t for t in store.steps if schema.STATE_PACKED in f[schema.checkpoint_name(t)]]
        state_bytes = f[schema.checkpoint_name(saved[0])][schema.STATE_PACKED].nbytes
        row_bytes = sum(f[schema.checkpoint_name(t)][schema.TRAIN].nbytes for t in store.steps)
    assert saved[0] == store.steps[0] and 1 < len(saved) < len(store.steps)
    assert (len(saved) - 1) * state_bytes <= row_bytes  # state never more than the rows
    for t in store.steps:  # every step points to the latest saved state at or before it
        want = max(s for s in saved if s <= t)
        assert store.state_step(t) == want
        got, ref = store.state(t), store.state(want)
        assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_background_and_inline_writers_write_identical_stores(tmp_path):
    stores = {}
    for background in (True, False):
        torch.manual_seed(0)
        path = tmp_path / f"{background}.h5"
        flight = InFlightConfig(flush_every=3, background=background, max_pending=1)
        logger = FastLogger(path, mode="in_flight", rank=4, in_flight=flight, verbose=False)
        trainer(tmp_path, [logger], max_epochs=2).fit(
            TinyGPT(), loader(IndexedDataset(TokenDataset(n=24)), batch_size=4)
        )
        stores[background] = AttributionStore(path)
    a, b = stores[True], stores[False]
    assert a.steps == b.steps == list(range(12))
    assert torch.equal(a.example_ids, b.example_ids)
    for t in a.steps:
        (ia, ra), (ib, rb) = a.batch_rows(t), b.batch_rows(t)
        assert torch.equal(ia, ib) and torch.equal(ra, rb) and ra.abs().sum() > 0
        assert a.checkpoint_attrs(t)["lr_sum"] == b.checkpoint_attrs(t)["lr_sum"]


def test_background_auto_is_the_thread_on_accelerators_only():
    auto = InFlightConfig()
    assert auto.background == "auto"
    assert auto.background_for(torch.device("cuda", 0)) is True
    assert auto.background_for(torch.device("cpu")) is False
    assert InFlightConfig(background=True).background_for(torch.device("cpu")) is True
    assert InFlightConfig(background=False).background_for(torch.device("cuda")) is False
