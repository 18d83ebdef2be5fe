"""SIGKILL at seeded random points of an in-flight fit never corrupts the store, and resume completes.

``GradientLogger(mode="in_flight")`` logs every optimizer step of a 36-step fit (rows, learning rates,
state, logged queries) and writes them in flushes of 4 steps and at each Lightning checkpoint (one per
epoch). The fork server of ``kill_resume_script.py`` (``"mode": "in_flight"`` trials) kills the fit at
seeded random points, stratified over the training steps (inside ``training_step``: between flushes)
and over the low-level store writes (:func:`lightning_tda.store.journal.pwrite_all`, from whichever
thread writes: inside a flush's rows, metadata, journal records and commits; some torn half-way).

Each killed store must open (or not exist, when the kill came before its first commit), list only
complete steps, a prefix of the uninterrupted reference run's, each equal to the reference exactly
(ids, rows, logged queries, state, learning rates), hold every step a saved Lightning checkpoint
covers, and be left unchanged by reading it. Resuming from the last Lightning checkpoint must finish
and list every reference step with equal rows. Nothing depends on timing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_tda import AttributionStore
from lightning_tda.store import journal, schema

HERE = Path(__file__).parent
STEPS = list(range(36))  # 48 examples / batches of 8 = 6 optimizer steps per epoch, 6 epochs
EPOCH_STEPS = 6
EXPECTED_IDS = np.arange(1000, 1048)


class ForkServer:
    """``kill_resume_script.py serve``: one JSON trial in, one JSON return code out."""

    def __init__(self) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "kill_resume_script.py"), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )

    def run(self, **trial) -> int:
        self.proc.stdin.write(json.dumps({"mode": "in_flight", **trial}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 300)
        assert ready, f"the fork server did not answer trial {trial}"
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)["returncode"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server():
    srv = ForkServer()
    yield srv
    srv.close()


def _log_tail(store: Path) -> str:
    log = Path(str(store) + ".log")
    return log.read_text()[-3000:] if log.exists() else "(no log)"


def _trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _files_digest(store: Path) -> str:
    h = hashlib.sha256()
    for p in (store, journal.journal_path(store), journal.creating_path(store)):
        h.update(p.read_bytes() if p.exists() else b"-")
    return h.hexdigest()


def snapshot(path: Path) -> dict:
    """Everything a complete in-flight step holds, per step, plus the store's example and query ids."""
    s = AttributionStore(path)
    out: dict = {
        "example_ids": s.example_ids.numpy(),
        "query_ids": None if s.query_ids is None else s.query_ids.numpy(),
        "steps": {},
    }
    for c in s.checkpoints:
        t = c.global_step
        assert c.in_flight, t
        ids, rows = s.batch_rows(t)
        out["steps"][t] = {
            "ids": ids.numpy(),
            "rows": rows.numpy(),
            "query": s.read(t, schema.QUERY).numpy(),
            "query_loss": s.read(t, schema.QUERY_LOSS).numpy(),
            "state": {k: v.numpy() for k, v in s.state(t).items()},
            "attrs": (c.lr_sum, c.lr_cumsum, c.epoch, c.steps_since_previous, c.trigger),
        }
    return out


def assert_same_step(got: dict, ref: dict, where: str) -> None:
    """Same seed, same data order, same weights: the step's rows are the reference's bit for bit."""
    for name in ("ids", "rows", "query", "query_loss"):
        assert got[name].dtype == ref[name].dtype, f"{where}: {name} dtype"
        assert np.array_equal(got[name], ref[name]), f"{where}: {name} differs"
    assert got["state"].keys() == ref["state"].keys(), where
    for k in ref["state"]:
        assert np.array_equal(got["state"][k], ref["state"][k]), f"{where}: state {k}"
    assert got["attrs"] == ref["attrs"], (where, got["attrs"], ref["attrs"])


def _ckpt_covered(ckpt: Path) -> list[int]:
    """The steps the last saved Lightning checkpoint says are logged (they must be on disk)."""
    last = ckpt / "last.ckpt"
    if not last.exists():
        return []
    state = torch.load(last, map_location="cpu", weights_only=False)
    logged = [v["logged_steps"] for v in state["callbacks"].values() if "logged_steps" in v]
    assert len(logged) == 1, state["callbacks"].keys()
    return list(logged[0])


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    """An uninterrupted in-flight fit: its store snapshot, TracIn scores and the trace of its writes."""
    d = tmp_path_factory.mktemp("reference")
    store = d / "tda.h5"
    rc = server.run(store=str(store), ckpt=str(d / "ckpt"), trace=str(d / "trace"))
    assert rc == 0, _log_tail(store)
    snap = snapshot(store)
    assert sorted(snap["steps"]) == STEPS
    assert np.array_equal(snap["example_ids"], EXPECTED_IDS)
    for t in STEPS:  # no shuffling: step t trains on batch t % 6
        start = 1000 + (t % EPOCH_STEPS) * 8
        assert np.array_equal(snap["steps"][t]["ids"], np.arange(start, start + 8))
    assert _ckpt_covered(d / "ckpt") == STEPS
    scores = AttributionStore(store).attribute("logged", method="tracin", top_k=None).scores
    trace = _trace(d / "trace")
    assert {r["phase"] for r in trace} >= {"metadata", "flush", "root_attrs"}, Counter(
        r["phase"] for r in trace
    )
    return {"snap": snap, "scores": scores, "trace": trace}


def _stratified(rng: random.Random, items: list, k: int) -> list:
    """``k`` random picks, one from each of ``k`` equal consecutive strata of ``items``."""
    bounds = np.linspace(0, len(items), k + 1).astype(int)
    return [items[rng.randrange(lo, hi)] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def _trials(trace: list[dict]) -> list[dict]:
    """Seeded kill points: training steps, flush writes (store and journal), torn writes, the file's
    creation and the fit's end, and resumes killed too. Write indices stay below 90 % of the
    reference's writes, so a kill lands even where a background writer groups steps differently."""
    rng = random.Random(20261207)
    limit = int(0.9 * len(trace))
    flush = [r["n"] for r in trace if r["phase"] == "flush" and r["n"] <= limit]
    flush_journal = [
        r["n"]
        for r in trace
        if r["phase"] == "flush" and r["file"] == "journal" and r["n"] <= limit
    ]
    by_phase: dict[str, list[int]] = {}
    for r in trace:
        by_phase.setdefault(r["phase"], []).append(r["n"])
    trials = [{"fault": {"kind": "step", "at": t}} for t in _stratified(rng, STEPS[1:], 7)]
    trials += [{"fault": {"kind": "io", "at": n}} for n in _stratified(rng, flush, 9)]
    trials += [{"fault": {"kind": "io", "at": n}} for n in _stratified(rng, flush_journal, 2)]
    trials += [{"fault": {"kind": "io_torn", "at": n}} for n in _stratified(rng, flush, 3)]
    trials.append({"fault": {"kind": "io_torn", "at": rng.choice(flush_journal)}})
    trials.append({"fault": {"kind": "io", "at": rng.choice(by_phase["metadata"])}})
    trials.append({"fault": {"kind": "io", "at": rng.choice(by_phase["root_attrs"])}})
    for n in _stratified(
        rng, flush, 2
    ):  # the resume is killed too (rollback, prune, rebuild, flush)
        trials.append(
            {
                "fault": {"kind": "io", "at": n},
                "resume_fault": {"kind": "io", "at": rng.randint(1, 300)},
            }
        )
    return trials


def _expected_after_step_kill(trace: list[dict], at: int) -> list[int]:
    """Steps a synchronous writer has committed when killed inside ``training_step`` at step ``at``:
    those of the reference's flushes made before that step was trained."""
    done: set[int] = set()
    for r in trace:
        if r["phase"] == "flush" and r["steps"] and r["train_step"] < at:
            done.update(r["steps"])
    return sorted(done)


def _check_killed(store: Path, ckpt: Path, last: dict, ref: dict, synchronous: bool) -> None:
    """The killed store opens, lists only complete, reference-equal steps (a prefix of the reference,
    including every step the saved Lightning checkpoint covers), and reading it is read-only."""
    phase, flushing = last["phase"], last.get("steps")
    covered = _ckpt_covered(ckpt)
    where = f"killed in {phase} (write {last['n']}, training step {last['train_step']})"
    if not store.exists():
        assert phase == "metadata", f"the store vanished after a kill {where}"
        assert not journal.journal_path(store).exists() and covered == [], where
        return
    digest = _files_digest(store)
    s = AttributionStore(store)  # must not raise
    steps, incomplete = s.steps, s.incomplete
    assert steps == STEPS[: len(steps)], f"{where}: listed steps {steps} are not a prefix"
    assert not set(steps) & set(incomplete), (where, steps, incomplete)
    assert all(t in STEPS and t > max(steps, default=-1) for t in incomplete), (where, incomplete)
    assert set(covered) <= set(steps), (
        f"{where}: Lightning checkpoint covers {covered}, has {steps}"
    )
    if phase == "training":  # no step after the one being trained can be on disk
        assert all(t < last["train_step"] for t in steps), (where, steps)
        if synchronous:
            assert steps == _expected_after_step_kill(ref["trace"], last["train_step"]), where
    elif phase == "flush" and flushing:  # a flush commits its steps all together, after the earlier
        before = [t for t in STEPS if t < flushing[0]]
        assert steps in (before, before + flushing), (where, flushing, steps)
        if synchronous:
            assert set(incomplete) <= set(flushing), (where, flushing, incomplete)
    elif phase == "metadata":
        assert steps == [] and incomplete == [], (where, steps, incomplete)
    elif phase == "root_attrs":
        assert steps == STEPS and incomplete == [], (where, steps, incomplete)
    snap = snapshot(store)
    for t in steps:  # a listed step is never half-written
        assert_same_step(snap["steps"][t], ref["snap"]["steps"][t], f"{where}: step {t}")
    seen = {int(i) for t in steps for i in snap["steps"][t]["ids"]}
    assert seen <= set(snap["example_ids"].tolist()) <= set(EXPECTED_IDS.tolist()), where
    if steps:
        assert np.array_equal(snap["query_ids"], ref["snap"]["query_ids"]), where
    assert _files_digest(store) == digest, f"{where}: reading the killed store changed it"


def _kill_record(trace: Path, fault: dict) -> dict:
    """The trace record of the kill (not necessarily the last line: another thread may trace a write
    between the kill's record and the signal)."""
    recs = _trace(trace)
    killed = [r for r in recs if r["killed"]]
    writes = sum(r["n"] is not None for r in recs)
    assert len(killed) == 1, f"{fault}: {len(killed)} kill records in {writes} traced writes"
    rec = killed[0]
    if fault["kind"] == "step":
        assert rec["phase"] == "training" and rec["train_step"] == fault["at"], rec
    else:
        assert rec["n"] == fault["at"], rec
    return rec


@pytest.mark.slow
def test_sigkill_during_in_flight_runs_never_corrupts_and_resume_completes(
    server, reference, tmp_path
):
    trials = _trials(reference["trace"])
    assert len(trials) >= 20
    # a synchronous writer writes from the training thread only; then the killed state is exact
    synchronous = all(r["thread"] == "main" for r in reference["trace"])
    seen: Counter = Counter()  # (fault kind, phase, file written) of each kill
    threads: Counter = Counter()
    events: Counter = Counter()
    for i, trial in enumerate(trials):
        d = tmp_path / f"t{i}"
        store, ckpt = d / "tda.h5", d / "ckpt"
        d.mkdir()
        fault = trial["fault"]
        rc = server.run(store=str(store), ckpt=str(ckpt), fault=fault, trace=str(d / "kill.trace"))
        assert rc == -signal.SIGKILL, (
            f"trial {trial}: {rc} after {len(_trace(d / 'kill.trace'))} traced writes (the "
            f"reference made {len(reference['trace'])}; kill points come from its trace)\n"
            + _log_tail(store)
        )
        last = _kill_record(d / "kill.trace", fault)
        seen[fault["kind"], last["phase"], last.get("file")] += 1
        threads[last["thread"]] += 1
        if journal.journal_path(store).exists():
            events["journal left"] += 1
        _check_killed(store, ckpt, last, reference, synchronous)

        if "resume_fault" in trial:
            rc = server.run(
                store=str(store),
                ckpt=str(ckpt),
                resume=True,
                fault=trial["resume_fault"],
                trace=str(d / "resume.trace"),
            )
            assert rc in (0, -signal.SIGKILL), _log_tail(store)
            if rc:
                events["resume killed"] += 1
                last = _kill_record(d / "resume.trace", trial["resume_fault"])
                events[f"resume killed in {last['phase']}"] += 1
                _check_killed(store, ckpt, last, reference, synchronous=False)
        rc = server.run(store=str(store), ckpt=str(ckpt), resume=True)
        assert rc == 0, f"resume after {trial}\n{_log_tail(store)}"

        s = AttributionStore(store)
        assert s.steps == STEPS and s.incomplete == [], (trial, s.steps, s.incomplete)
        assert not journal.journal_path(store).exists()
        assert not journal.creating_path(store).exists()
        snap = snapshot(store)
        assert np.array_equal(snap["example_ids"], EXPECTED_IDS)
        assert np.array_equal(snap["query_ids"], reference["snap"]["query_ids"])
        for t in STEPS:
            assert_same_step(
                snap["steps"][t], reference["snap"]["steps"][t], f"resumed after {trial}: {t}"
            )
        scores = s.attribute("logged", method="tracin", top_k=None).scores
        torch.testing.assert_close(scores, reference["scores"], rtol=0, atol=0)
    print(f"\n{len(trials)} trials; kills (kind, phase, file): {dict(seen)}")
    print(f"threads: {dict(threads)}; events: {dict(events)}")
    # the seeded points cover every way to die
    between = sum(n for (kind, phase, _), n in seen.items() if phase == "training")
    in_flush = sum(n for (kind, phase, _), n in seen.items() if kind == "io" and phase == "flush")
    torn = sum(n for (kind, phase, _), n in seen.items() if kind == "io_torn" and phase == "flush")
    assert between >= 7 and in_flush >= 11 and torn >= 4, seen
    assert {f for (kind, phase, f) in seen if phase == "flush"} >= {"store", "journal"}, seen
    assert sum(n for (kind, phase, _), n in seen.items() if phase == "metadata") >= 1, seen
    assert events["journal left"] >= 3 and events["resume killed"] >= 1, events
    if (
        not synchronous
    ):  # a background writer: kills must land in its writes, not only the trainer's
        assert threads["background"] >= 5, threads
