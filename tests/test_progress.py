"""Progress bars: final counts equal the work done, and nothing is printed when not wanted."""

from __future__ import annotations

import io
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyMLP, loader, make_classification, trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from rich.console import Console

from lightning_tda import AttributionStore, GradientLogger
from lightning_tda import progress as P
from lightning_tda.eval.retrain import BankSpec, RetrainRecipe, build_bank

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BAR_LINE = re.compile(r"(\d+)/(\d+) (examples|queries|rows|batches|runs|members)\b")


def tiny_factory():
    return TinyMLP(lr=0.2)


def tiny_measure(model, queries):
    x = torch.stack([queries[i].data[0] for i in range(len(queries))])
    y = torch.stack([queries[i].data[1] for i in range(len(queries))])
    return {"loss": F.cross_entropy(model(x), y, reduction="none").numpy()}


@pytest.fixture
def forced(monkeypatch):
    """``LIGHTNING_TDA_PROGRESS=1`` with the standalone bars drawn into a terminal-like buffer."""
    buf = io.StringIO()
    monkeypatch.setenv(P.ENV_VAR, "1")
    monkeypatch.setattr(
        P,
        "console_factory",
        lambda: Console(file=buf, force_terminal=True, width=200, color_system=None),
    )
    return buf


@pytest.fixture
def spy(monkeypatch):
    """Every rich task advanced by the library: ``[(progress, (description, unit), completed, total)]``."""
    log = []
    advance = P._RichBar.advance

    def recording(self, n=1):
        advance(self, n)
        task = next(t for t in self.progress.tasks if t.id == self.task)
        key = (task.description, task.fields.get("unit"))
        log.append((self.progress, key, task.completed, task.total))

    monkeypatch.setattr(P._RichBar, "advance", recording)
    return log


def finals(log) -> dict[tuple[str, str], tuple[float, float]]:
    """Last ``(completed, total)`` per ``(description, unit)``."""
    return {key: (done, total) for _, key, done, total in log}


def counts(log, description: str, unit: str) -> list[float]:
    """The completed counts of one bar after each update."""
    return [done for _, key, done, _ in log if key == (description, unit)]


def fit(tmp_path, name="s.h5", callbacks=(), **kw):
    data = make_classification(64)
    logger = GradientLogger(
        tmp_path / name,
        attribution_data=data,
        query_data=make_classification(8, seed=1),
        rank=4,
        batch_size=16,
        **kw,
    )
    kw_trainer = {"enable_progress_bar": True} if callbacks else {}
    trainer(tmp_path, [logger, *callbacks], max_epochs=2, **kw_trainer).fit(TinyMLP(), loader(data))
    return AttributionStore(tmp_path / name), data


def test_logged_fit_counts_every_example_at_every_checkpoint(tmp_path, forced, spy):
    store, data = fit(tmp_path)
    got = finals(spy)
    assert store.steps == [4, 8]
    for step in store.steps:  # one transient bar per sweep, ending at N examples and Q queries
        assert got[(f"GradientLogger step {step}", "examples")] == (len(data), len(data))
        assert got[(f"GradientLogger step {step}", "queries")] == (8, 8)
        assert counts(spy, f"GradientLogger step {step}", "examples") == [16, 32, 48, 64]
    assert len(got) == 4
    text = ANSI.sub("", forced.getvalue())
    assert "GradientLogger step 4" in text and "64/64 examples" in text and "8/8 queries" in text
    assert all(int(a) <= int(b) for a, b, _ in BAR_LINE.findall(text))


def test_attribute_and_self_influence_count_rows_and_match_quiet_results(
    tmp_path, forced, spy, monkeypatch
):
    monkeypatch.setenv(P.ENV_VAR, "0")
    store, data = fit(tmp_path)
    queries = make_classification(8, seed=2)
    quiet = store.attribute(queries, model=TinyMLP(), method="tracin", top_k=None, batch_size=4)
    quiet_self = store.self_influence(method="tracin")
    assert spy == [] and forced.getvalue() == ""  # 0 turns every bar off

    monkeypatch.setenv(P.ENV_VAR, "1")
    res = store.attribute(
        queries, model=TinyMLP(), method="tracin", top_k=None, batch_size=4, block_rows=16
    )
    self_inf = store.self_influence(method="tracin")
    assert torch.equal(res.scores, quiet.scores) and torch.equal(self_inf, quiet_self)
    got = finals(spy)
    n = len(data)
    assert got[("scoring tracin: 2 checkpoints", "rows")] == (n, n)
    assert got[("self-influence tracin: 2 checkpoints", "rows")] == (n, n)
    for i in (1, 2):  # 8 queries in batches of 4
        assert got[(f"query gradients: checkpoint {i}/2", "batches")] == (2, 2)
    # one update per 16-row block
    assert counts(spy, "scoring tracin: 2 checkpoints", "rows") == [16, 32, 48, 64]
    assert counts(spy, "self-influence tracin: 2 checkpoints", "rows") == [64]  # one block
    text = ANSI.sub("", forced.getvalue())
    assert "scoring tracin: 2 checkpoints" in text and "64/64 rows" in text
    assert all(int(a) <= int(b) for a, b, _ in BAR_LINE.findall(text))


def test_bank_and_dropout_ensemble_count_runs_and_members(tmp_path, forced, spy):
    store, data = fit(tmp_path, verbose=False)
    assert spy == []  # verbose=False: no sweep bar even when forced
    store.add_dropout_ensemble(TinyMLP(), data, members=3, batch_size=32)
    got = finals(spy)
    assert got[("dropout ensemble", "members")] == (3, 3)
    for m in (1, 2, 3):
        assert got[(f"member {m}/3 @ step 8", "batches")] == (2, 2)
    assert len({id(p) for p, *_ in spy}) == 1  # nested bars share the one Progress on screen

    spy.clear()
    train, queries = make_classification(16), make_classification(4, seed=1)
    spec = BankSpec(num_subsets=3, alpha=0.5, num_seeds=1)
    recipe = RetrainRecipe(max_epochs=1, batch_size=8)
    calls = []
    args = (tiny_factory, train, queries, tiny_measure, {"loss": "loss"}, spec, recipe)
    build_bank(tmp_path / "bank", *args, processes=1, progress=lambda d, t: calls.append(d))
    desc = "retraining bank: 3 subsets x 1 seeds"
    assert counts(spy, desc, "runs") == [1, 2, 3] == calls
    (tmp_path / "bank" / "jobs" / "0001_00.npz").unlink()
    spy.clear()
    build_bank(tmp_path / "bank", *args, processes=1)
    assert counts(spy, desc, "runs") == [3]  # the two finished runs count as done
    assert "3/3 runs" in ANSI.sub("", forced.getvalue())


def test_nothing_printed_without_a_terminal(tmp_path, capfd, monkeypatch, spy):
    monkeypatch.delenv(P.ENV_VAR, raising=False)
    store, data = fit(tmp_path)  # verbose=True, but stderr is not a terminal
    store.attribute(make_classification(8, seed=2), model=TinyMLP(), batch_size=4, block_rows=16)
    store.self_influence()
    store.add_dropout_ensemble(TinyMLP(), data, members=2, batch_size=32)
    build_bank(
        tmp_path / "bank",
        tiny_factory,
        make_classification(16),
        make_classification(4, seed=1),
        tiny_measure,
        {"loss": "loss"},
        BankSpec(num_subsets=2, alpha=0.5, num_seeds=1),
        RetrainRecipe(max_epochs=1, batch_size=8),
        processes=1,
    )
    out, err = capfd.readouterr()
    assert spy == []
    for stream in (out, err):
        assert "━" not in stream and not BAR_LINE.search(stream)


def test_rules_rank_trainer_setting_and_terminal(monkeypatch, spy):
    monkeypatch.delenv(P.ENV_VAR, raising=False)
    buf = io.StringIO()
    monkeypatch.setattr(P, "console_factory", lambda: Console(file=buf, force_terminal=True))

    class FakeTrainer:
        is_global_zero = True
        progress_bar_callback = None  # Trainer(enable_progress_bar=False)

    def shown(**kw) -> bool:
        with P.progress_bar("x", 3, **kw) as bar:
            bar.advance(3)
            return bar.enabled

    monkeypatch.setattr(P, "_stderr_is_terminal", lambda: True)
    assert shown() and not shown(verbose=False) and not shown(trainer=FakeTrainer())
    monkeypatch.setattr(P, "_stderr_is_terminal", lambda: False)
    assert not shown()
    monkeypatch.setenv(P.ENV_VAR, "1")
    assert shown() and shown(trainer=FakeTrainer()) and not shown(verbose=False)
    FakeTrainer.is_global_zero = False
    assert not shown(trainer=FakeTrainer())  # only rank zero, even when forced
    monkeypatch.setenv(P.ENV_VAR, "0")
    monkeypatch.setattr(P, "_stderr_is_terminal", lambda: True)
    assert not shown()
    monkeypatch.setenv(P.ENV_VAR, "maybe")
    with pytest.warns(UserWarning, match="LIGHTNING_TDA_PROGRESS"):
        assert shown()  # not understood: automatic (a terminal here)
    assert [c for *_, c, _ in spy] == [3, 3, 3, 3]  # exactly the shown bars advanced
    assert P._active is None


def test_sweep_joins_the_trainers_rich_bar(tmp_path, monkeypatch, spy):
    monkeypatch.delenv(P.ENV_VAR, raising=False)
    cb = RichProgressBar()
    store, _ = fit(tmp_path, callbacks=[cb])
    assert {p for p, *_ in spy} == {cb.progress}  # tasks of the trainer's own Progress
    got = finals(spy)
    assert got == {
        **{(f"GradientLogger step {s}", "examples"): (64, 64) for s in store.steps},
        **{(f"GradientLogger step {s}", "queries"): (8, 8) for s in store.steps},
    }
    assert counts(spy, "GradientLogger step 4", "examples") == [16, 32, 48, 64]
    assert not any(t.description.startswith("GradientLogger") for t in cb.progress.tasks)


def test_sweep_uses_a_second_tqdm_line(tmp_path, monkeypatch):
    monkeypatch.delenv(P.ENV_VAR, raising=False)

    class Recording(TQDMProgressBar):
        def __init__(self) -> None:
            super().__init__()
            self.made = []

        def init_validation_tqdm(self):
            bar = super().init_validation_tqdm()
            self.made.append(bar)
            return bar

    cb = Recording()
    store, _ = fit(tmp_path, callbacks=[cb])
    got = [(b.desc.rstrip(": "), b.unit, b.n, b.total) for b in cb.made]
    expect = []
    for s in store.steps:
        expect += [(f"GradientLogger step {s}", "examples", 64, 64)]
        expect += [(f"GradientLogger step {s}", "queries", 8, 8)]
    assert got == expect
