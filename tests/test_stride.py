"""STRIDE: design, steering operators, fitting, recovery and attribution (methods.md §12)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    TinyGPT,
    TinyMLP,
    TokenDataset,
    fit_logged_mlp,
    loader,
    make_classification,
    trainer,
)

from lightning_tda import (
    AttributionStore,
    CausalLMTask,
    ClassificationTask,
    GradientLogger,
    IndexedDataset,
    StoreError,
)
from lightning_tda.stride import (
    SteeringOperators,
    Stride,
    StrideConfig,
    SubsetDesign,
    fit,
    load,
    recover,
    steered_model,
)
from lightning_tda.stride.fit import FeatureSource
from lightning_tda.stride.operator import default_layer, extract, output_module_name, token_ce
from lightning_tda.stride.recover import choose_alpha

QUIET = {"enable_progress_bar": False}


# -- design -----------------------------------------------------------------------------------
def test_design_regular_reproducible_and_round_trips(tmp_path):
    ids = np.arange(500) + 7
    d = SubsetDesign.draw(ids, num_subsets=40, degree=5, seed=3)
    m = d.matrix.toarray()
    assert m.shape == (40, 500)
    assert (m.sum(0) == 5).all() and set(np.unique(m)) == {0.0, 1.0}
    assert all(len(set(row)) == 5 for row in d.table.tolist())
    assert d == SubsetDesign.draw(ids, 40, 5, seed=3)
    assert not np.array_equal(d.table, SubsetDesign.draw(ids, 40, 5, seed=4).table)
    assert set(d.members(0).tolist()) == set(np.flatnonzero(m[0]).tolist())
    with pytest.raises(ValueError, match="K=4 < d=5"):
        SubsetDesign.draw(ids, 4, 5)
    # store round trip on a real store
    store = _mlp_store(tmp_path)
    d2 = SubsetDesign.draw(store.example_ids, 20, 4, seed=1)
    d2.save(store.path)
    assert SubsetDesign.load(store.path) == d2
    with pytest.raises(StoreError, match="different STRIDE subset design"):
        SubsetDesign.draw(store.example_ids, 20, 4, seed=2).save(store.path)


# -- recovery ---------------------------------------------------------------------------------
def _planted(design, q, k, noise, rng):
    n = design.num_examples
    w = np.zeros((q, n))
    for i in range(q):
        s = rng.choice(n, k, replace=False)
        w[i, s] = rng.choice([-1, 1], k) * rng.uniform(0.5, 1.5, k)
    y = (design.matrix @ w.T).T
    y += (
        noise
        * np.linalg.norm(y, axis=1, keepdims=True)
        / np.sqrt(y.shape[1])
        * rng.standard_normal(y.shape)
    )
    return w, torch.tensor(y, dtype=torch.float32)


@pytest.mark.parametrize("num_subsets", [300, 1000])  # the K of the benchmarks (n=1000, d=10)
def test_recovery_oracle_planted_sparse_vector(num_subsets):
    """n=1000, K=300|1000, d=10, k=10 planted, 10% noise: F1 of the top-k support > 0.9; α chosen
    by CV on separate 'training' measurements, never on the evaluated ones."""
    design = SubsetDesign.draw(np.arange(1000), num_subsets, 10, seed=0)
    rng = np.random.default_rng(1)
    _, y_train = _planted(design, 16, 10, 0.1, rng)
    alpha, scores = choose_alpha(design.matrix, y_train)
    w, y = _planted(design, 20, 10, 0.1, rng)
    for positive in (False,):
        r = recover(design.matrix, y, alpha, positive=positive)
        f1 = []
        for i in range(len(w)):
            top = set(torch.topk(r[i].abs(), 10).indices.tolist())
            true = set(np.flatnonzero(w[i]).tolist())
            f1.append(len(top & true) / 10)  # top-k vs k planted: precision = recall = F1
        print(f"recovery K={num_subsets}: F1 {np.mean(f1):.3f} at alpha {alpha}")
        assert np.mean(f1) > 0.9, (np.mean(f1), alpha, scores)
        # signs of the recovered support match the planted ones
        sup = np.flatnonzero(w[0])
        assert (np.sign(r[0].numpy()[sup]) == np.sign(w[0][sup])).mean() > 0.9
    # the non-negative variant recovers the positive part and returns no negative entries
    wp = np.abs(w)
    yp = torch.tensor((design.matrix @ wp.T).T, dtype=torch.float32)
    rp = recover(design.matrix, yp, alpha, positive=True)
    assert (rp >= 0).all()
    top = set(torch.topk(rp[0], 10).indices.tolist())
    assert len(top & set(np.flatnonzero(wp[0]).tolist())) >= 9


# -- operators --------------------------------------------------------------------------------
def test_steered_model_equals_base_at_init_classifier_and_gpt():
    torch.manual_seed(0)
    mlp = TinyMLP()
    out = output_module_name(mlp)
    layer = default_layer(mlp, out)
    assert (out, layer) == ("net.3", "net.3:input")
    ops = SteeringOperators(7, 16, 3, rank=4)
    x = torch.randn(5, 8)
    base = mlp(x)
    with steered_model(mlp, ops, 3, layer, out):
        assert torch.equal(mlp(x), base)
    gpt = TinyGPT()
    out = output_module_name(gpt)
    layer = default_layer(gpt, out)
    assert out == "lm.lm_head" and layer.startswith("lm.transformer.h.")
    batch = torch.utils.data.default_collate([TokenDataset(4)[i] for i in range(4)])
    base = gpt.lm(input_ids=batch["input_ids"]).logits
    f = extract(
        gpt, batch, layer, out, lambda m, b: m.per_example_loss(b), task=CausalLMTask(labels="hf")
    )
    for head_rank in (None, 3):  # full and factored heads
        ops = SteeringOperators(5, f.h.shape[-1], 50, rank=4, head_rank=head_rank)
        with steered_model(gpt, ops, 2, layer, out):
            assert torch.equal(gpt.lm(input_ids=batch["input_ids"]).logits, base)
        assert torch.equal(ops.measure(f), torch.zeros(4, 5))
    # features reproduce the model's own per-example loss (sum over supervised tokens)
    torch.testing.assert_close(token_ce(f.o, f.targets), gpt.per_example_loss(batch))


# -- fitting ----------------------------------------------------------------------------------
def _mlp_store(tmp_path, n=64, epochs=3, every=None):
    kw = {"every_n_epochs": every} if every else {}
    run = fit_logged_mlp(
        tmp_path, "tda.h5", n=n, mlp=dict(lr=0.2), epochs=epochs, projection="exact", **kw
    )
    store = run.store
    store.model, store.data = run.model, run.data
    return store


def test_fit_lowers_member_loss_more_than_non_member_loss(tmp_path):
    store = _mlp_store(tmp_path, n=200)
    cfg = StrideConfig(num_subsets=20, degree=3, rank=8, steps=60, holdout=16, seed=0, lr=0.05)
    res = fit(store, store.model, store.data, cfg, trainer_kwargs=QUIET, task=ClassificationTask())
    assert res.step == store.checkpoint(None).global_step and 0 < res.alpha < 1
    # per-subset mean loss drop of members vs non-members under that subset's operator
    src = FeatureSource(
        store.model,
        store.data,
        store.example_ids,
        res.layer,
        res.output_module,
        lambda m, b: m.per_example_loss(b),
        None,
        64,
        None,
        2**30,
        task=ClassificationTask(),
    )
    y = res.operators.measure(src.get(torch.arange(200)))  # [n, K] loss drops
    m = res.design.matrix.toarray().T.astype(bool)  # [n, K]
    mem = np.array([y[m[:, k], k].mean() for k in range(20)])
    non = np.array([y[~m[:, k], k].mean() for k in range(20)])
    assert (mem > non).mean() >= 0.9, (mem, non)
    assert mem.mean() > non.mean() + 1e-3
    # stored and reloadable: same operators and measurements
    again = load(store.path, res.step)
    torch.testing.assert_close(again.operators.measure(src.get(torch.arange(5))), y[:5])
    assert again.config == cfg and again.alpha == res.alpha


def test_fit_gpt_runs_and_module_is_resumable(tmp_path, logged_gpt_store):
    run = logged_gpt_store(tmp_path, "lm.h5", n=24, epochs=1, train_batch_size=8, rank=4)
    model, data = run.model, run.data
    cfg = StrideConfig(
        num_subsets=8,
        degree=2,
        rank=4,
        steps=4,
        holdout=4,
        subsets_per_step=4,
        members_per_subset=4,
        linearity_batch=2,
        sketch_dim=4,
    )
    kw = dict(QUIET, enable_checkpointing=True, default_root_dir=str(tmp_path / "ck"))
    res = fit(
        tmp_path / "lm.h5", model, data, cfg, trainer_kwargs=kw, task=CausalLMTask(labels="hf")
    )
    assert res.operators.num_outputs == 50
    ckpts = list((tmp_path / "ck").rglob("*.ckpt"))
    assert ckpts
    # resume from the Lightning checkpoint into a fresh fit (overwrite the stored operators)
    cfg2 = StrideConfig(**{**cfg.__dict__, "steps": 6})
    res2 = fit(
        tmp_path / "lm.h5",
        model,
        data,
        cfg2,
        trainer_kwargs=kw,
        ckpt_path=str(ckpts[0]),
        overwrite=True,
        task=CausalLMTask(labels="hf"),
    )
    assert res2.operators.heads.abs().sum() > 0
    queries = torch.utils.data.default_collate([TokenDataset(3, seed=5)[i] for i in range(3)])
    out = AttributionStore(tmp_path / "lm.h5").attribute(
        queries, model=model, method=Stride(), top_k=None
    )
    assert out.scores.shape == (3, 24) and torch.isfinite(out.scores).all()


# -- attribution ------------------------------------------------------------------------------
def test_attribute_with_stride_sign_and_errors(tmp_path):
    store = _mlp_store(tmp_path, n=200, epochs=2, every=1)
    model, data = store.model, store.data
    with pytest.raises(StoreError, match="lightning_tda.stride.fit"):
        store.attribute(data, model=model, method=Stride())
    with pytest.raises(ValueError, match="K=2 subsets < d=3"):
        fit(store, model, data, StrideConfig(num_subsets=2, degree=3))
    cfg = StrideConfig(num_subsets=40, degree=3, rank=8, steps=80, holdout=16, lr=0.05)
    steps = store.steps
    fit(store, model, data, cfg, checkpoints=steps, trainer_kwargs=QUIET, task=ClassificationTask())
    # queries that duplicate training examples (ids shifted so they are known as queries)
    pos = torch.arange(0, 200, 10)
    qx = torch.stack([data[int(i)].data[0] for i in pos])
    qy = torch.stack([data[int(i)].data[1] for i in pos])
    queries = IndexedDataset(torch.utils.data.TensorDataset(qx, qy), ids=list(range(len(pos))))
    dense = store.attribute(queries, model=model, method=Stride(), top_k=None)
    assert dense.scores.shape == (len(pos), 200) and dense.method == "stride"
    assert dense.checkpoints == steps[-1:]
    # library sign: a duplicated training example scores above the median (a proponent) far more
    # often than chance (1/2), and its rank is well above the middle on average
    own = dense.scores[torch.arange(len(pos)), pos]
    above = (own.unsqueeze(1) >= dense.scores).float().mean(1)
    assert (above > 0.5).float().mean() >= 0.75, above
    assert above.mean() > 0.7, above
    top = store.attribute(queries, model=model, method=Stride(), top_k=5)
    assert top.indices.shape == (len(pos), 5)
    torch.testing.assert_close(top.scores[:, 0], dense.scores.max(1).values)
    # checkpoint-aware: both fitted checkpoints, combined by lr weights
    both = store.attribute(queries, model=model, method=Stride(checkpoints="all"), top_k=None)
    assert both.checkpoints == steps and both.scores.shape == (len(pos), 200)
    # ... equal to the per-checkpoint recoveries weighted by each checkpoint's lr sum
    each = [
        store.attribute(queries, model=model, method=Stride(checkpoints=[s]), top_k=None).scores
        for s in steps
    ]
    lr = [store.checkpoint(s).lr_sum[0] for s in steps]
    ref = sum(w / sum(lr) * x for w, x in zip(lr, each, strict=True))
    torch.testing.assert_close(both.scores, ref)
    # selectable by name, with hyper-parameters as keywords
    by_name = store.attribute(queries, model=model, method="stride", top_k=None)
    torch.testing.assert_close(by_name.scores, dense.scores)
    pos_only = store.attribute(queries, model=model, method="stride", positive=True, top_k=None)
    assert (pos_only.scores >= 0).all() and (pos_only.scores > 0).any()
    with pytest.raises(StoreError, match="not fitted at checkpoints"):
        store.attribute(queries, model=model, method=Stride(checkpoints=[12345]))
    with pytest.raises(ValueError, match="pass model="):
        store.attribute(queries, method=Stride())


def test_gradient_logger_fits_stride_at_fit_end(tmp_path):
    torch.manual_seed(0)
    data = make_classification(64)
    cfg = StrideConfig(num_subsets=10, degree=2, rank=4, steps=5, holdout=8)
    logger = GradientLogger(
        tmp_path / "tda.h5",
        attribution_data=data,
        projection="exact",
        stride=cfg,
        stride_trainer_kwargs=QUIET,
        task=ClassificationTask(),
    )
    model = TinyMLP()
    trainer(tmp_path, [logger], max_epochs=2).fit(model, loader(data))
    store = AttributionStore(tmp_path / "tda.h5")
    res = load(store.path, store.steps[-1])
    assert res.config == cfg
    out = store.attribute(make_classification(4, seed=3), model=model, method=Stride(), top_k=3)
    assert out.indices.shape == (4, 3)


def test_uncached_features_equal_cached(tmp_path):
    store = _mlp_store(tmp_path, n=50, epochs=1)
    fn = lambda m, b: m.per_example_loss(b)  # noqa: E731
    args = (store.model, store.data, store.example_ids, "net.3:input", "net.3", fn, None, 16, None)
    cached, streamed = (
        FeatureSource(*args, 2**30, task=ClassificationTask()),
        FeatureSource(*args, 0, task=ClassificationTask()),
    )
    assert cached.cached and not streamed.cached
    rows = torch.tensor([49, 0, 7, 7, 23])
    a, b = cached.get(rows), streamed.get(rows)
    torch.testing.assert_close(b.h, a.h, atol=1e-2, rtol=1e-3)  # the cache is fp16
    torch.testing.assert_close(b.o, a.o, atol=1e-2, rtol=1e-3)
    assert torch.equal(a.targets, b.targets)
    torch.testing.assert_close(
        token_ce(b.o, b.targets),
        store.model.per_example_loss(
            torch.utils.data.default_collate([store.data[int(i)] for i in rows])
        ),
    )


def test_cli_stride_fit_on_a_recipe_run(tmp_path, monkeypatch):
    from pathlib import Path

    from lightning_tda.cli import main

    monkeypatch.chdir(tmp_path)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "digits_tracin.yaml"
    small = ["--data.init_args.n_train", "200", "--trainer.enable_progress_bar", "false"]
    assert main(["fit", "--config", str(recipe), "--trainer.max_epochs", "3", *small]) == 0
    cfg = tmp_path / "r.yaml"
    cfg.write_text(recipe.read_text().replace("n_train: 1000", "n_train: 200"))
    argv = ["stride", "fit", "--config", str(cfg), "--num-subsets", "30", "--degree", "3"]
    argv += ["--rank", "4", "--steps", "20", "--holdout", "16", "--positive"]
    argv += ["--task", "classification"]
    assert main(argv) == 0
    store = AttributionStore(tmp_path / "runs" / "digits_tda.h5")
    res = load(store.path, store.steps[-1])
    assert (res.config.num_subsets, res.config.degree, res.config.rank) == (30, 3, 4)
    assert res.config.steps == 20 and res.config.positive and res.operators.num_outputs == 10
    assert main(argv) == 2  # already fitted: a clear error naming overwrite
    assert main([*argv, "--overwrite", "--checkpoints", "all"]) == 0
    from lightning_tda.stride import fitted_steps

    assert fitted_steps(store.path) == store.steps
