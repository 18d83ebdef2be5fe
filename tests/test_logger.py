"""GradientLogger behaviour: non-interference, triggers, optimizer state, dense and LoRA capture."""

from __future__ import annotations

import copy
import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import TinyGPT, TinyMLP, TokenDataset, loader, make_classification, trainer
from oracles import per_example_grads, rel_err
from torch.utils.data import DataLoader

from lightning_tda import AttributionStore, GradientLogger, IndexedDataset
from lightning_tda.capture.featurize import Featurizer
from lightning_tda.capture.layers import discover_layers
from lightning_tda.capture.losses import resolve_loss_fn
from lightning_tda.capture.projection import ProjectionConfig, projection_matrix
from lightning_tda.store import schema


def _fit(tmp_path, with_logger: bool, name: str = "s.h5"):
    pl.seed_everything(0, verbose=False)
    data = make_classification(48)
    model = TinyMLP(optimizer="adam", lr=0.01, dropout=0.3)
    cbs = []
    if with_logger:
        shuffled = DataLoader(
            data, batch_size=10, shuffle=True
        )  # its iterator draws from the global RNG
        cbs.append(
            GradientLogger(
                tmp_path / name,
                attribution_data=shuffled,
                query_data=make_classification(5, 1),
                every_n_train_steps=4,
                log_at_fit_start=True,
                log_at_fit_end=True,
            )
        )
    tr = trainer(tmp_path, cbs, max_epochs=3)
    tr.fit(model, DataLoader(data, batch_size=16, shuffle=True))
    return model, tr


def test_bit_identical_weights_with_and_without_logger(tmp_path):
    a, tra = _fit(tmp_path, with_logger=False)
    b, trb = _fit(tmp_path, with_logger=True)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    sa, sb = tra.optimizers[0].state_dict()["state"], trb.optimizers[0].state_dict()["state"]
    for k in sa:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[k][key], sb[k][key])
    assert b.training  # modes restored
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in b.parameters())
    store = AttributionStore(tmp_path / "s.h5")
    assert store.steps == [0, 4, 8, 9]
    assert store.checkpoints[0].lr_sum == (0.0,) and store.checkpoints[0].trigger == "fit_start"
    assert store.checkpoints[-1].trigger == "fit_end"
    assert store.checkpoint(4).has_queries and store.checkpoint(4).has_precond


def test_triggers_and_gradient_accumulation(tmp_path):
    data = make_classification(64)  # batch 16 -> 4 batches per epoch
    cases = {
        "steps": (dict(every_n_train_steps=2), [2, 4, 6]),
        "at": (dict(at_steps=[1, 5]), [1, 5]),
        "epochs": (dict(every_n_epochs=2), [4]),
        "ends": (dict(log_at_fit_start=True, log_at_fit_end=True), [0, 6]),
    }
    for name, (kw, steps) in cases.items():
        logger = GradientLogger(tmp_path / f"{name}.h5", attribution_data=data, verbose=False, **kw)
        trainer(tmp_path, [logger], max_epochs=3, accumulate_grad_batches=2).fit(
            TinyMLP(lr=0.1), loader(data)
        )
        store = AttributionStore(tmp_path / f"{name}.h5")
        assert store.steps == steps, name
        # lr sums count optimizer steps (2 per epoch under accumulation), not batches
        expect = np.diff([0, *steps]) * 0.1
        np.testing.assert_allclose(
            [c.lr_sum[0] for c in store.checkpoints], expect, rtol=1e-6, err_msg=name
        )
    # the state round-trips for resume
    state = logger.state_dict()
    other = GradientLogger(tmp_path / "ends.h5", attribution_data=data)
    other.load_state_dict(state)
    assert other.state_dict() == state and other._resumed


def test_optimizer_state_is_recorded(tmp_path):
    data = make_classification(32)

    class Keep(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            self.state = copy.deepcopy(trainer.optimizers[0].state_dict())

    keep = Keep()
    model = TinyMLP(optimizer="adam", lr=0.01)
    logger = GradientLogger(
        tmp_path / "o.h5", attribution_data=data, log_at_fit_end=True, verbose=False
    )
    trainer(tmp_path, [logger, keep], max_epochs=2).fit(model, loader(data))
    store = AttributionStore(tmp_path / "o.h5")
    arr = store.arrays(store.steps[-1], schema.OPTIMIZER)
    st = keep.state["state"]
    v0 = torch.cat([st[0]["exp_avg_sq"], st[1]["exp_avg_sq"][:, None]], dim=1)  # net.0: [W | b]
    np.testing.assert_allclose(arr["net.0/row"], v0.mean(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(arr["net.0/col"], v0.mean(0).numpy(), rtol=1e-6)
    assert float(arr["net.0/step"]) == float(st[0]["step"])
    opt = json.loads(store.checkpoint_attrs(store.steps[-1])["optimizer"])[0]
    assert opt["class"].endswith("Adam") and opt["groups"][0]["betas"] == [0.9, 0.999]
    # trainable state saved: loading it reproduces the final weights
    state = store.state(store.steps[-1])
    for n, p in model.state_dict().items():
        assert torch.equal(state[n], p)


def test_dense_fallback_matches_torch_func():
    torch.manual_seed(0)
    model = TinyGPT()
    config = ProjectionConfig("kronecker", rank=4, dense_dim=32, seed=5)
    layers, other = discover_layers(model, config)
    assert other == [] and layers[-1].kind == "dense"
    dense = layers[-1]
    assert "lm.transformer.wte.weight" in dense.params  # the tied embedding / lm_head
    batch = next(iter(DataLoader(TokenDataset(5), batch_size=5)))
    model.eval()
    fb = Featurizer(
        model, layers, config, resolve_loss_fn(model, None), torch.device("cpu"), require_ids=False
    )(batch)
    grads = per_example_grads(
        model, resolve_loss_fn(model, None), batch, set(dense.params), use_vmap=False
    )
    ref = sum(
        grads[n].reshape(5, -1) @ projection_matrix(5, "dense", n, grads[n][0].numel(), 32)
        for n in dense.params
    )
    got = fb.rows[:, dense.offset : dense.offset + dense.size]
    assert rel_err(got, ref) < 1e-4


def test_dense_block_with_adam_is_logged_during_fit(tmp_path, logged_gpt_store):
    """Regression: the dense block's rows must leave the functorch graph before they are stored."""
    store = logged_gpt_store(  # TinyGPT uses AdamW: the Adam-scaled dense rows are logged too
        tmp_path,
        "d.h5",
        n=12,
        epochs=1,
        train_batch_size=4,
        dense_dim=16,
        log_at_fit_end=True,
        verbose=False,
    ).store
    dense = store.layers[-1]
    block = store.read(store.steps[-1])[:, dense.offset : dense.offset + dense.size]
    assert dense.kind == "dense" and block.shape == (12, 16) and float(block.abs().sum()) > 0


def test_peft_lora_adapters_are_captured_exactly():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = TinyGPT()
    base.lm = get_peft_model(
        base.lm, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.1)
    )
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # lora_B starts at zero, which would make lora_A gradients vanish
    config = ProjectionConfig("kronecker", rank=3)
    layers, other = discover_layers(base, config)
    assert other == []
    assert len(layers) == 4 and all(
        "lora_" in s.name for s in layers
    )  # A and B of 2 blocks; base frozen
    batch = next(iter(DataLoader(TokenDataset(4), batch_size=4)))
    base.eval()
    from oracles import reference_rows

    fb = Featurizer(
        base, layers, config, resolve_loss_fn(base, None), torch.device("cpu"), require_ids=False
    )(batch)
    ref = reference_rows(base, resolve_loss_fn(base, None), batch, layers, config, use_vmap=False)
    assert rel_err(fb.rows, ref) < 1e-4
    assert float(fb.rows.abs().sum()) > 0


def test_works_with_the_standalone_pytorch_lightning_package(tmp_path):
    import pytorch_lightning as PL

    class PLMLP(PL.LightningModule):
        def __init__(self):
            super().__init__()
            self.inner = TinyMLP()

        def per_example_loss(self, batch):
            return self.inner.per_example_loss(batch)

        def training_step(self, batch, i):
            return self.inner.training_step(batch, i)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = make_classification(32)
    model = PLMLP()
    logger = GradientLogger(
        tmp_path / "pl.h5", attribution_data=data, every_n_epochs=1, verbose=False
    )
    PL.Trainer(
        max_epochs=2,
        callbacks=[logger],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    ).fit(model, loader(data))
    store = AttributionStore(tmp_path / "pl.h5")
    assert store.steps == [2, 4]
    res = store.attribute(
        IndexedDataset(make_classification(3, 1).dataset), model=model, method="tracin", top_k=4
    )
    assert res.indices.shape == (3, 4) and set(res.indices.flatten().tolist()) <= set(
        range(1000, 1032)
    )
    with pytest.raises(KeyError):
        store.checkpoint(3)
