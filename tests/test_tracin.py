"""TracIn-CP and friends against brute force with exact torch.func gradients."""

from __future__ import annotations

import copy

import h5py
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import FastLogger, TinyMLP, loader, make_classification, trainer
from oracles import per_example_grads
from scipy.stats import pearsonr, spearmanr
from torch.utils.data import DataLoader, Subset

from lightning_tda import AttributionStore
from lightning_tda.capture.losses import resolve_loss_fn
from lightning_tda.data.digits import load_digits_splits
from lightning_tda.demo import DigitsMLP
from lightning_tda.store import schema


class Snapshots(pl.Callback):
    """Independent record of the weights (and optimizer state) at epoch ends."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.states: dict[int, dict] = {}
        self.opt_states: dict[int, dict] = {}

    def on_train_epoch_end(self, trainer, pl_module):
        if (trainer.current_epoch + 1) % self.every == 0:
            self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())
            self.opt_states[trainer.global_step] = copy.deepcopy(trainer.optimizers[0].state_dict())


def full_grads(model, batch) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    g = per_example_grads(model, resolve_loss_fn(model, None), batch, set(names))
    return torch.cat([g[n].reshape(g[n].shape[0], -1) for n in names], dim=1)


def _batch(ds):
    return next(iter(DataLoader(ds, batch_size=len(ds))))


@pytest.fixture(scope="module")
def sched_run(logged_mlp_store):
    """SGD + momentum + StepLR(3, 0.5) per epoch; 64 examples, batch 16 -> 4 steps/epoch; 6 epochs."""
    snap = Snapshots(every=2)
    run = logged_mlp_store(
        "tracin",
        "exact.h5",
        n=64,
        n_queries=10,
        mlp=dict(optimizer="sgd_sched", lr=0.2),
        log_queries=True,
        logger_cls=FastLogger,
        epochs=6,
        callbacks=[snap],
        every_n_epochs=2,
        projection="exact",
    )
    return run.model, run.data, run.queries, snap, run.store


def brute_tracin(model, data, queries, snap, weights):
    total = 0
    for step, w in weights.items():
        m = copy.deepcopy(model)
        m.load_state_dict(snap.states[step])
        total = total + w * full_grads(m, _batch(queries)) @ full_grads(m, _batch(data)).T
    return total


def test_lr_sums_follow_the_schedule(sched_run):
    _, _, _, _, store = sched_run
    # epochs 0-2 at lr 0.2, epochs 3-5 at 0.1; 4 steps per epoch; checkpoints every 2 epochs
    assert store.steps == [8, 16, 24]
    got = [c.lr_sum[0] for c in store.checkpoints]
    np.testing.assert_allclose(got, [8 * 0.2, 4 * 0.2 + 4 * 0.1, 8 * 0.1], rtol=1e-6)
    assert [c.steps_since_previous for c in store.checkpoints] == [8, 8, 8]


def test_exact_tracin_equals_brute_force(sched_run):
    model, data, queries, snap, store = sched_run
    ref = brute_tracin(model, data, queries, snap, {8: 1.6, 16: 1.2, 24: 0.8})
    res = store.attribute(queries, model=model, method="tracin", top_k=None)
    assert res.scores.shape == (10, 64)
    r = pearsonr(res.scores.flatten().numpy(), ref.flatten().detach().numpy())[0]
    assert r > 0.9999, r


def test_logged_queries_equal_recomputed(sched_run):
    model, _, queries, _, store = sched_run
    a = store.attribute("logged", method="tracin", top_k=None).scores
    b = store.attribute(queries, model=model, method="tracin", top_k=None).scores
    torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-3 * float(b.abs().max()))


def test_graddot_gradcos_and_self_influence(sched_run):
    model, data, queries, snap, store = sched_run
    m = copy.deepcopy(model)
    m.load_state_dict(snap.states[24])
    gq, gt = full_grads(m, _batch(queries)).detach(), full_grads(m, _batch(data)).detach()
    dot = store.attribute(queries, model=model, method="graddot", top_k=None).scores
    assert pearsonr(dot.flatten(), (gq @ gt.T).flatten())[0] > 0.9999
    cos = store.attribute(queries, model=model, method="gradcos", top_k=None).scores
    ref_cos = (gq / gq.norm(dim=1, keepdim=True)) @ (gt / gt.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(cos, ref_cos, atol=2e-3, rtol=0)
    self_inf = store.self_influence(method="tracin")
    ref_self = 0
    for step, w in {8: 1.6, 16: 1.2, 24: 0.8}.items():
        m.load_state_dict(snap.states[step])
        ref_self = ref_self + w * full_grads(m, _batch(data)).detach().pow(2).sum(1)
    assert pearsonr(self_inf, ref_self)[0] > 0.9999
    # model state was restored after attribution
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), snap.states[24].values(), strict=True)
    )


def test_top_k_agrees_with_dense(sched_run):
    model, _, queries, _, store = sched_run
    dense = store.attribute(queries, model=model, method="tracin", top_k=None)
    top = store.attribute(
        queries, model=model, method="tracin", top_k=5, block_rows=7
    )  # many blocks
    ids = store.example_ids
    for q in range(10):
        order = torch.argsort(dense.scores[q], descending=True)
        assert torch.equal(top.indices[q], ids[order[:5]])
        torch.testing.assert_close(top.scores[q], dense.scores[q][order[:5]])
        low = torch.argsort(dense.scores[q])
        assert torch.equal(top.opponents[q], ids[low[:5]])
        assert (top.opponent_scores[q] <= top.scores[q].min()).all()


def test_sign_convention_first_order(sched_run):
    """score > 0 <=> one small SGD step on the training example lowers the query loss."""
    model, data, queries, _, store = sched_run
    scores = store.attribute(queries, model=model, method="graddot", top_k=None).scores
    eps = 1e-3
    loss_fn = resolve_loss_fn(model, None)
    qb = _batch(queries)
    model.eval()
    with torch.no_grad():
        base = loss_fn(model, qb)
    delta = torch.zeros(10, 64)
    for i in range(64):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=eps)
        loss_fn(m, _batch(Subset(data, [i]))).sum().backward()
        opt.step()
        with torch.no_grad():
            delta[:, i] = loss_fn(m, qb) - base
    pred = -delta / eps  # first-order: -Δloss/eps = <g_q, g_i>
    assert pearsonr(pred.flatten(), scores.flatten())[0] > 0.999
    big = scores.abs() > 0.1 * scores.abs().max()
    assert ((scores[big] > 0) == (delta[big] < 0)).all()


def test_tracin_adam_equals_factored_brute_force(tmp_path):
    torch.manual_seed(0)
    data = make_classification(48)
    queries = make_classification(6, seed=1)
    model = TinyMLP(optimizer="adam", lr=0.01)
    snap = Snapshots(every=1)
    logger = FastLogger(
        tmp_path / "a.h5", attribution_data=data, every_n_epochs=1, projection="exact"
    )
    trainer(tmp_path, [logger, snap], max_epochs=2).fit(model, loader(data))
    store = AttributionStore(tmp_path / "a.h5")
    with h5py.File(
        tmp_path / "a.h5", "r"
    ) as f:  # float16 rows, preconditioned rows keep bf16's range
        ck = f[schema.checkpoint_name(store.steps[0])]
        assert ck[schema.TRAIN].attrs["encoding"] == "float16"
        assert ck[schema.TRAIN_PRECOND].attrs["encoding"] == "bfloat16"
    got = store.attribute(queries, model=model, method="tracin_adam", top_k=None).scores
    names = [
        n for n, _ in model.named_parameters()
    ]  # net.0.weight, net.0.bias, net.3.weight, net.3.bias
    ref = 0
    for ck in store.checkpoints:
        m = copy.deepcopy(model)
        m.load_state_dict(snap.states[ck.global_step])
        opt_state = snap.opt_states[ck.global_step]["state"]
        gq = per_example_grads(m, resolve_loss_fn(m, None), _batch(queries), set(names))
        gt = per_example_grads(m, resolve_loss_fn(m, None), _batch(data), set(names))
        for w, b in [(0, 1), (2, 3)]:
            step = float(opt_state[w]["step"])
            v = torch.cat([opt_state[w]["exp_avg_sq"], opt_state[b]["exp_avg_sq"][:, None]], 1) / (
                1 - 0.999**step
            )
            r, c = v.mean(1), v.mean(0)
            a = 1 / ((r / r.mean()).sqrt() + 1e-4)
            bb = 1 / (c.sqrt() + 1e-4)
            Gq = torch.cat([gq[names[w]], gq[names[b]][:, :, None]], 2)
            Gt = torch.cat([gt[names[w]], gt[names[b]][:, :, None]], 2) * a[:, None] * bb[None, :]
            ref = ref + ck.lr_sum[0] * torch.einsum("qoi,noi->qn", Gq, Gt)
    assert pearsonr(got.flatten(), ref.detach().flatten())[0] > 0.9999
    plain = store.attribute(queries, model=model, method="tracin", top_k=None).scores
    assert pearsonr(got.flatten(), plain.flatten())[0] < 0.999  # the preconditioner matters


def test_kronecker_projection_ranks_like_exact(tmp_path):
    """Digits MLP (128x65 and 10x129 layers): Kronecker TracIn at rank 16 and 32 vs exact TracIn.

    With the PCA basis (K-FAC eigenvectors) rank 16 keeps per-query Spearman ~0.99. Random bases at
    rank 16 give Pearson ~0.93 but Spearman only ~0.65-0.74 (projection noise over the bulk of
    near-zero scores; a dense Gaussian JL projection with the same 416 dims gives ~0.56); rank 32
    gives ~0.85. Thresholds sit under those values with margin, far above a wrong projection (~0).
    """
    torch.manual_seed(0)
    splits = load_digits_splits(n_train=300, n_test=20)
    scores = {}
    configs = [("exact", 16, "random"), ("kronecker", 16, "random"), ("kronecker", 32, "random")]
    for kind, rank, basis in [*configs, ("kronecker", 16, "pca")]:
        pl.seed_everything(0, verbose=False)
        model = DigitsMLP()
        path = tmp_path / f"{kind}{rank}{basis}.h5"
        logger = FastLogger(
            path,
            attribution_data=splits.train,
            every_n_epochs=1,
            projection=kind,
            rank=rank,
            basis=basis,
            basis_examples=256,
        )
        trainer(tmp_path, [logger], max_epochs=3).fit(model, loader(splits.train, batch_size=32))
        store = AttributionStore(path)
        if kind == "kronecker" and rank == 16:
            assert store.width == 16 * 16 + 10 * 16
        res = store.attribute(splits.test, model=model, method="tracin", top_k=None)
        scores[(kind, rank, basis)] = res.scores
    ex = scores[("exact", 16, "random")]

    def agreement(key, corr):
        s = scores[key]
        return float(np.mean([corr(ex[q], s[q])[0] for q in range(len(ex))]))

    pca16, random16, random32 = (
        ("kronecker", 16, "pca"),
        ("kronecker", 16, "random"),
        ("kronecker", 32, "random"),
    )
    assert agreement(pca16, spearmanr) > 0.95  # the acceptance bar is 0.9
    assert agreement(pca16, pearsonr) > 0.98
    assert agreement(random16, pearsonr) > 0.9
    assert agreement(random16, spearmanr) > 0.55
    assert agreement(random32, spearmanr) > max(0.75, agreement(random16, spearmanr))
