"""After the fact (issue 14, item 5): a finished run logged from its Lightning .ckpt files gives the
same store, and the same scores for every method, as the GradientLogger during the fit."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TinyMLP, loader, make_classification, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tda import AttributionStore, GradientLogger
from lightning_tda.errors import ConfigError, StoreError
from lightning_tda.posthoc import (
    APPROXIMATE,
    LOGGED_FROM_CHECKPOINTS,
    REPLAYED,
    checkpoint_files,
    log_checkpoints,
)
from lightning_tda.store import schema

METHODS = ("tracin", "influence", "tracin_adam", "auto")
LOGGER = dict(rank=4, verbose=False, dtype="float32")


class ScheduledMLP(TinyMLP):
    """TinyMLP under AdamW with a per-step linear decay, a per-epoch StepLR or a plateau schedule."""

    def __init__(self, schedule: str = "linear_step") -> None:
        super().__init__(optimizer="adamw", lr=0.05)
        self.schedule = schedule

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)
        lr = torch.optim.lr_scheduler
        if self.schedule == "linear_step":
            sched = lr.LinearLR(opt, start_factor=1.0, end_factor=0.05, total_iters=15)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if self.schedule == "cosine_epoch":
            sched = lr.CosineAnnealingLR(opt, T_max=3)
            return [opt], [sched]  # interval "epoch"
        sched = lr.ReduceLROnPlateau(opt, patience=0, factor=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "train_loss"}}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss


def fit_with_checkpoints(
    tmp, schedule: str, accumulate: int = 1, epochs: int = 3, every_n_train_steps: int | None = None
):
    """One fit with both a GradientLogger and ModelCheckpoint(every_n_epochs=1, save_top_k=-1) (or
    both every ``every_n_train_steps``)."""
    torch.manual_seed(0)
    data, queries = make_classification(48), make_classification(5, seed=1)
    model = ScheduledMLP(schedule)
    every = (
        {"every_n_epochs": 1}
        if every_n_train_steps is None
        else {"every_n_train_steps": every_n_train_steps}
    )
    live = GradientLogger(tmp / "live.h5", attribution_data=data, **every, **LOGGER)
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpts", save_top_k=-1, **every)
    tr = trainer(
        tmp,
        [live, ckpt],
        max_epochs=epochs,
        enable_checkpointing=True,
        accumulate_grad_batches=accumulate,
    )
    train = loader(data, batch_size=12)
    tr.fit(model, train)
    return model, data, queries, train, tr


def after_the_fact(tmp, model, data, train, accumulate: int = 1, **kw):
    path = log_checkpoints(
        tmp / "posthoc.h5",
        model,
        tmp / "ckpts",
        data,
        train_dataloaders=train,
        trainer_kwargs={"accelerator": "cpu", "accumulate_grad_batches": accumulate},
        **LOGGER,
        **kw,
    )
    return AttributionStore(path)


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("posthoc_linear")
    model, data, queries, train, _ = fit_with_checkpoints(tmp, "linear_step")
    return (
        AttributionStore(tmp / "live.h5"),
        after_the_fact(tmp, model, data, train),
        model,
        queries,
    )


def assert_same_store(live: AttributionStore, post: AttributionStore) -> None:
    """Same checkpoints, epochs, triggers, learning-rate sums, rows and optimizer-scaled rows."""
    assert post.steps == live.steps and len(live.steps) >= 2
    for a, b in zip(live.checkpoints, post.checkpoints, strict=True):
        assert (a.epoch, a.trigger, a.steps_since_previous) == (
            b.epoch,
            b.trigger,
            b.steps_since_previous,
        )
        assert a.lr_sum == pytest.approx(b.lr_sum, rel=1e-12) and a.lr_sum[0] > 0
        assert a.lr_cumsum == pytest.approx(b.lr_cumsum, rel=1e-12)
        for name in (schema.TRAIN, schema.TRAIN_PRECOND):
            torch.testing.assert_close(
                post.read(b.global_step, name), live.read(a.global_step, name)
            )
    assert post.attrs["lr_cumsum_final"] == pytest.approx(live.attrs["lr_cumsum_final"], rel=1e-12)
    assert int(post.attrs["final_global_step"]) == int(live.attrs["final_global_step"])


def test_checkpoint_files_are_read_in_step_order(linear_run, tmp_path_factory):
    live, post, _, _ = linear_run
    files = checkpoint_files(post.path.parent / "ckpts")
    assert [c.global_step for c in files] == live.steps == [4, 8, 12]
    assert [c.epoch for c in files] == [0, 1, 2] and all(c.at_epoch_end for c in files)
    provenance = json.loads(post.attrs[LOGGED_FROM_CHECKPOINTS])
    assert provenance["lr_sums"] == REPLAYED and provenance["lr_note"] == ""
    assert sorted(provenance["checkpoints"]) == ["12", "4", "8"]


def test_per_step_schedule_gives_the_live_store_and_scores(linear_run):
    live, post, model, queries = linear_run
    assert_same_store(live, post)
    # the decay is real: the three lr sums differ (a replay that ignored it would be caught)
    sums = [c.lr_sum[0] for c in live.checkpoints]
    assert len({round(s, 12) for s in sums}) == 3
    for method in METHODS:
        a = live.attribute(queries, model=model, method=method, top_k=None)
        b = post.attribute(queries, model=model, method=method, top_k=None)
        assert a.method == b.method and a.checkpoints == b.checkpoints
        # the same floats in, the same float operations: equal up to float32 rounding of the
        # (identical) query gradients recomputed twice
        torch.testing.assert_close(b.scores, a.scores, rtol=1e-6, atol=1e-9)
        assert a.scores.abs().max() > 0


def test_epoch_schedule_with_accumulation(tmp_path):
    model, data, queries, train, _ = fit_with_checkpoints(tmp_path, "cosine_epoch", accumulate=3)
    live = AttributionStore(tmp_path / "live.h5")
    post = after_the_fact(tmp_path, model, data, train, accumulate=3)
    assert live.steps == [2, 4, 6]  # 4 batches per epoch, accumulate 3: steps after batches 3 and 4
    assert_same_store(live, post)
    assert json.loads(post.attrs[LOGGED_FROM_CHECKPOINTS])["lr_sums"] == REPLAYED
    a = live.attribute(queries, model=model, method="tracin", top_k=None).scores
    b = post.attribute(queries, model=model, method="tracin", top_k=None).scores
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)


def test_mid_epoch_checkpoints(tmp_path):
    model, data, queries, train, _ = fit_with_checkpoints(
        tmp_path, "linear_step", every_n_train_steps=5
    )
    live = AttributionStore(tmp_path / "live.h5")
    post = after_the_fact(tmp_path, model, data, train, fit_end_step=12)
    assert live.steps == [5, 10] and [c.trigger for c in live.checkpoints] == ["step", "step"]
    assert [c.epoch for c in live.checkpoints] == [1, 2]  # mid-epoch: 4 steps per epoch
    assert_same_store(live, post)
    for method in ("tracin", "tracin_adam"):
        a = live.attribute(queries, model=model, method=method, top_k=None).scores
        b = post.attribute(queries, model=model, method=method, top_k=None).scores
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)


def test_plateau_schedule_is_approximated_and_recorded(tmp_path):
    model, data, _, train, _ = fit_with_checkpoints(tmp_path, "plateau")
    post = after_the_fact(tmp_path, model, data, train)
    provenance = json.loads(post.attrs[LOGGED_FROM_CHECKPOINTS])
    assert provenance["lr_sums"] == APPROXIMATE and "ReduceLROnPlateau" in provenance["lr_note"]
    files = checkpoint_files(tmp_path / "ckpts")
    prev = 0
    for c, f in zip(post.checkpoints, files, strict=True):
        assert c.lr_sum == pytest.approx([f.lrs[0] * (f.global_step - prev)], rel=1e-12)
        prev = f.global_step


def test_refusals(tmp_path, linear_run):
    live, _, model, _ = linear_run
    ckpts = live.path.parent / "ckpts"
    with pytest.raises(ConfigError, match="every_n_epochs"):
        log_checkpoints(tmp_path / "x.h5", model, ckpts, every_n_epochs=2)
    with pytest.raises(ConfigError, match="train_dataloaders"):
        log_checkpoints(tmp_path / "x.h5", model, ckpts)
    with pytest.raises(ConfigError, match="no Lightning checkpoint"):
        log_checkpoints(tmp_path / "x.h5", model, tmp_path / "none", train_dataloaders=[])
    weights_only = tmp_path / "w.ckpt"
    torch.save({"global_step": 4, "epoch": 0, "state_dict": model.state_dict()}, weights_only)
    with pytest.raises(ConfigError, match="save_weights_only"):
        log_checkpoints(tmp_path / "x.h5", model, weights_only, train_dataloaders=[])
    with pytest.raises(StoreError, match="overwrite=True"):  # the logger's own refusal
        log_checkpoints(live.path, model, ckpts, train_dataloaders=loader(make_classification(48)))
    with pytest.raises(StoreError, match="no training batch"):  # Lightning skips an empty fit
        log_checkpoints(tmp_path / "x.h5", model, ckpts, train_dataloaders=[])
