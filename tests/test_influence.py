"""Influence (raw / ekfac / trak) and SOURCE against explicit dense references."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import TinyMLP, fit_logged_mlp, loader, make_classification, trainer
from oracles import reference_rows
from scipy.stats import pearsonr, spearmanr
from torch import nn
from torch.func import functional_call, hessian
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda import AttributionStore, GradientLogger, IndexedDataset, classification_loss
from lightning_tda.capture.projection import projection_matrix
from lightning_tda.methods import Influence, Source
from lightning_tda.methods.source import phi1, source_functions
from lightning_tda.store import schema


def _batch(ds):
    return next(iter(DataLoader(ds, batch_size=len(ds))))


def _rows_by_layer(store, step, dataset=schema.TRAIN):
    x = store.read(step, dataset).double()
    return {s.name: x[:, s.offset : s.offset + s.size] for s in store.layers}


def _mean_spearman(a, b):
    return sum(spearmanr(x, y)[0] for x, y in zip(a, b, strict=True)) / len(a)


# -- influence: logistic regression against the explicit Hessian influence function -------------


class LogReg(pl.LightningModule):
    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.lin = nn.Linear(d, 1)

    def per_example_loss(self, batch):
        _, (x, y) = batch
        return F.binary_cross_entropy_with_logits(self.lin(x).squeeze(1), y, reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):  # full-batch L-BFGS: converges to the optimum the IF assumes
        return torch.optim.LBFGS(self.parameters(), lr=1.0, max_iter=100, tolerance_grad=1e-12)


def test_influence_matches_explicit_hessian_on_logistic_regression(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, d = 10000, 6  # empirical Fisher -> Hessian at a well-specified optimum as n grows
    x = torch.randn(n + 20, d, generator=g)
    w_true = torch.randn(d, generator=g)
    y = torch.bernoulli(torch.sigmoid(x @ w_true + 0.3), generator=g)  # well-specified model
    train = IndexedDataset(TensorDataset(x[:n], y[:n]))
    queries = IndexedDataset(TensorDataset(x[n:], y[n:]))
    torch.manual_seed(0)
    model = LogReg(d)
    logger = GradientLogger(
        tmp_path / "lr.h5",
        attribution_data=train,
        every_n_epochs=5,
        projection="exact",
        dtype="float32",
        verbose=False,
    )
    trainer(tmp_path, [logger], max_epochs=5).fit(model, loader(train, batch_size=n))
    store = AttributionStore(tmp_path / "lr.h5")
    ours = store.attribute(
        queries, model=model, method=Influence(mode="raw", damping=1e-6), top_k=None
    ).scores.double()

    params = {k: v.detach().double() for k, v in model.named_parameters()}

    def mean_loss(p, xs, ys):
        logits = functional_call(model.lin, {"weight": p["lin.weight"], "bias": p["lin.bias"]}, xs)
        return F.binary_cross_entropy_with_logits(logits.squeeze(1), ys)

    h = hessian(lambda v: mean_loss(_unflat(v), x[:n].double(), y[:n].double()))(_flat(params))

    def grads(xs, ys):
        one = torch.func.grad(lambda v, xi, yi: mean_loss(_unflat(v), xi[None], yi[None]))
        return torch.func.vmap(one, in_dims=(None, 0, 0))(_flat(params), xs, ys)

    gt, gq = grads(x[:n].double(), y[:n].double()), grads(x[n:].double(), y[n:].double())
    ref = gq @ torch.linalg.solve(h + 1e-6 * torch.eye(d + 1, dtype=h.dtype), gt.T)
    rho = _mean_spearman(ours.numpy(), ref.numpy())
    print(f"influence vs explicit Hessian IF: mean per-query Spearman {rho:.4f}")
    assert rho > 0.99, rho
    # sign: both agree which examples help (positive) and hurt
    assert float((torch.sign(ours) == torch.sign(ref)).double().mean()) > 0.95


def _flat(p):
    return torch.cat([p["lin.weight"].reshape(-1), p["lin.bias"]])


def _unflat(v):
    return {"lin.weight": v[:-1].reshape(1, -1), "lin.bias": v[-1:]}


# -- influence: EK-FAC and TRAK modes ----------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infl")
    torch.manual_seed(0)
    data = make_classification(96)
    queries = make_classification(12, seed=1)
    model = TinyMLP(optimizer="sgd_sched", lr=0.2)
    kron = GradientLogger(
        tmp / "kron.h5",
        attribution_data=data,
        every_n_epochs=2,
        rank=4,
        basis="random",  # the K-FAC factor test regenerates the seeded random matrices
        dtype="float32",
        verbose=False,
    )
    exact = GradientLogger(
        tmp / "exact.h5",
        attribution_data=data,
        every_n_epochs=2,
        projection="exact",
        dtype="float32",
        verbose=False,
    )
    trainer(tmp, [kron, exact], max_epochs=6).fit(model, loader(data))
    return (
        model,
        data,
        queries,
        AttributionStore(tmp / "kron.h5"),
        AttributionStore(tmp / "exact.h5"),
    )


def test_logged_kfac_input_factor_equals_explicit(mlp_run):
    model, data, _, kron, _ = mlp_run
    step = kron.steps[-1]
    a, _ = kron.kfac_factors(step)["net.0"]
    spec = next(s for s in kron.layers if s.name == "net.0")
    x = torch.cat([_batch(data).data[0], torch.ones(len(data), 1)], 1).double()
    p_in = projection_matrix(
        kron.projection.seed, "net.0", "in", spec.in_features, spec.k_in, "orthogonal"
    ).double()
    xp = x @ p_in
    torch.testing.assert_close(a.double(), xp.T @ xp / len(data), rtol=1e-5, atol=1e-6)


def test_ekfac_equals_dense_kronecker_eigenbasis_reference(mlp_run):
    model, _, queries, kron, _ = mlp_run
    step = kron.steps[-1]
    lam = 1e-3
    ours = kron.attribute(
        queries, model=model, method=Influence(mode="ekfac", damping=lam), top_k=None
    ).scores.double()
    qv, _ = kron.query_vectors(queries, model, [step])
    rows = _rows_by_layer(kron, step)
    ref = 0
    for s in kron.layers:
        a, sf = kron.kfac_factors(step)[s.name]
        q = torch.kron(torch.linalg.eigh(sf.double())[1], torch.linalg.eigh(a.double())[1])
        g = rows[s.name]
        lam_ab = ((g @ q) ** 2).mean(0)
        inv = q @ torch.diag(1 / (lam_ab + lam)) @ q.T
        ref = ref + qv[step][:, s.offset : s.offset + s.size].double() @ inv @ g.T
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_raw_influence_is_damped_block_inverse_and_self_influence(mlp_run):
    model, _, queries, kron, _ = mlp_run
    step = kron.steps[-1]
    ours = kron.attribute(queries, model=model, method="influence", top_k=None).scores.double()
    qv, _ = kron.query_vectors(queries, model, [step])
    rows = _rows_by_layer(kron, step)
    ref, self_ref = 0, 0
    for s in kron.layers:
        g = rows[s.name]
        f = g.T @ g / len(g)
        lam = torch.trace(f) / f.shape[0]  # documented default: 1.0 x mean eigenvalue
        inv = torch.linalg.inv(f + lam * torch.eye(f.shape[0], dtype=f.dtype))
        ref = ref + qv[step][:, s.offset : s.offset + s.size].double() @ inv @ g.T
        self_ref = self_ref + ((g @ inv) * g).sum(1)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    si = kron.self_influence(method="influence").double()
    torch.testing.assert_close(si, self_ref, rtol=1e-4, atol=1e-5 * float(self_ref.abs().max()))


def _margin(model, batch):
    _, (x, y) = batch
    logits = model(x)
    correct = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).logsumexp(1)
    return correct - others


def test_trak_mode_equals_margin_gradient_trak(mlp_run):
    """TRAK from torch.func margin gradients (features Φ, kernel Φ^T Φ, Q = 1 - p), one checkpoint."""
    model, data, queries, _, exact = mlp_run
    step = exact.steps[-1]
    ours = exact.attribute(
        queries, model=model, method=Influence(mode="trak", checkpoints=[step]), top_k=None
    ).scores.double()
    phi = reference_rows(model, _margin, _batch(data), exact.layers, exact.projection).double()
    phi_q = reference_rows(model, _margin, _batch(queries), exact.layers, exact.projection).double()
    with torch.no_grad():
        _, (x, y) = _batch(data)
        p = torch.exp(-classification_loss(model(x), y)).double()
    ref = 0
    for s in exact.layers:
        sl = slice(s.offset, s.offset + s.size)
        k = phi[:, sl].T @ phi[:, sl]
        lam = torch.trace(k) / k.shape[0]  # default: 1.0 x mean eigenvalue
        ref = ref + phi_q[:, sl] @ torch.linalg.solve(k + lam * torch.eye(k.shape[0]), phi[:, sl].T)
    ref = ref * (1 - p)[None, :]
    assert min(pearsonr(a, b)[0] for a, b in zip(ours.numpy(), ref.numpy(), strict=True)) > 0.9999
    torch.testing.assert_close(ours, ref, rtol=2e-3, atol=2e-3 * float(ref.abs().max()))


def test_influence_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        Influence(mode="kfac2")
    with pytest.raises(ValueError, match="damping"):
        Influence(damping=0.0)


# -- SOURCE -------------------------------------------------------------------------------------


def test_source_matrix_functions_are_finite_and_have_the_right_limits():
    sigma = torch.tensor([0.0, 1e-300, 1e-12, 1e-3, 1.0, 1e3, 1e30, -1e-12], dtype=torch.float64)
    fr, fs = source_functions(sigma, eta_k=5.0)
    assert torch.isfinite(fr).all() and torch.isfinite(fs).all()
    assert float(fr[0]) == 5.0 and float(fs[0]) == 1.0 and float(fr[-1]) == 5.0
    torch.testing.assert_close(
        fr[4], torch.tensor(1 - torch.exp(torch.tensor(-5.0)).item()).double()
    )
    assert float(fr[6]) == pytest.approx(1e-30) and float(fs[6]) == 0.0
    x = torch.tensor([1e-9, 1e-7, 1e-4], dtype=torch.float64)
    torch.testing.assert_close(phi1(x), -torch.expm1(-x) / x, rtol=1e-12, atol=0)


def _tiny_loss(model, batch):
    return 1e-4 * model.per_example_loss(batch)


def _tiny_curvature_run(tmp_path, optimizer: str, lr: float):
    """A run whose loss is scaled by 1e-4, so ``η̄K H`` → 0; returns the store and query vectors at θ_T."""
    run = fit_logged_mlp(
        tmp_path,
        n=64,
        n_queries=8,
        mlp=dict(optimizer=optimizer, lr=lr),
        epochs=6,
        every_n_epochs=2,
        rank=4,
        loss_fn=_tiny_loss,
        dtype="float32",
        verbose=False,
    )
    store = run.store
    last = store.steps[-1]
    qv, _ = store.query_vectors(run.queries, run.model, [last], loss_fn=_tiny_loss)
    return store, {s: qv[last] for s in store.steps}, len(run.data)


def test_source_without_curvature_is_lr_weighted_tracin(tmp_path):
    """L = 1 and H → 0: SOURCE = Σ_c η_c <g_q(θ_T), g_i(θ_c)> / N."""
    store, at_t, n = _tiny_curvature_run(tmp_path, "sgd_sched", 0.2)
    src = store.attribute(at_t, method=Source(segments=1), top_k=None).scores.double()
    tracin = store.attribute(at_t, method="tracin", top_k=None).scores.double()
    # momentum 0.9: SOURCE uses η/(1-β)
    torch.testing.assert_close(src * n * (1 - 0.9), tracin, rtol=1e-3, atol=0)


def _dense_source(store, qv_last, groups, masks, beta=0.0):
    """Explicit SOURCE with dense matrix exponentials per block (torch.linalg.matrix_exp, solve)."""
    n = store.num_examples
    cks = {c.global_step: c for c in store.checkpoints}
    u = qv_last.double()
    total = 0
    prev = 0.0
    segs = []
    for steps, mask in zip(groups, masks, strict=True):
        end = cks[steps[-1]].lr_cumsum[0]
        eta_k = (end - prev) / (1 - beta)
        prev = end
        lrs = torch.tensor([cks[s].lr_sum[0] for s in steps], dtype=torch.float64)
        segs.append((steps, mask, eta_k, lrs / lrs.sum()))
    for steps, mask, eta_k, w in reversed(segs):
        m = mask.double() if mask is not None else torch.ones(n, dtype=torch.float64)
        rows = {s: _rows_by_layer(store, s) for s in steps}
        contrib_u, next_u = [], []
        for s in store.layers:
            sl = slice(s.offset, s.offset + s.size)
            h = sum(
                (rows[st][s.name] * m[:, None]).T @ rows[st][s.name] / m.sum() for st in steps
            ) / len(steps)
            ident = torch.eye(h.shape[0], dtype=h.dtype)
            e = torch.linalg.matrix_exp(-eta_k * h)
            fr = torch.linalg.solve(h, ident - e)
            contrib_u.append(u[:, sl] @ fr)
            next_u.append(u[:, sl] @ e)
        cu = torch.cat(contrib_u, 1)
        gbar = sum(wi * store.read(st).double() for wi, st in zip(w, steps, strict=True))
        total = total + (cu @ gbar.T) * (m / m.sum())[None, :]
        u = torch.cat(next_u, 1)
    return total


def test_source_two_stage_equals_dense_matrix_exponential_reference(mlp_run):
    model, data, queries, kron, _ = mlp_run
    steps = kron.steps  # 3 checkpoints (epochs 2, 4, 6), SGD momentum 0.9 + StepLR
    ids = kron.example_ids.tolist()
    stage1 = ids[::2]  # stage 1 saw half the examples; stage 2 all of them
    masks = [
        torch.tensor([i in set(stage1) for i in ids], dtype=torch.float32),
        None,
    ]
    method = Source(boundaries=[steps[0]], stage_members=[stage1, None])
    qv, _ = kron.query_vectors(queries, model, [steps[-1]])
    ours = kron.attribute(qv, method=method, top_k=None).scores.double()
    ref = _dense_source(kron, qv[steps[-1]], [[steps[0]], steps[1:]], masks, beta=0.9)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    # examples absent from stage 1 get only their stage-2 contribution; equal splits differ
    equal = kron.attribute(qv, method=Source(segments=2), top_k=None).scores.double()
    assert not torch.allclose(equal, ours)


def test_source_self_influence_matches_scores_of_logged_rows(mlp_run):
    """Self-influence = the example's own row (at θ_T) used as the query."""
    _, _, _, kron, _ = mlp_run
    last = kron.steps[-1]
    rows = kron.read(last)[:10]
    dense = kron.attribute({last: rows}, method=Source(segments=2), top_k=None).scores
    si = kron.self_influence(method=Source(segments=2))[:10]
    torch.testing.assert_close(si, dense.diagonal(), rtol=1e-4, atol=1e-6)


def test_source_bad_arguments(mlp_run):
    *_, kron, _ = mlp_run
    with pytest.raises(ValueError, match="not logged checkpoints"):
        Source(boundaries=[7]).build(kron)
    with pytest.raises(ValueError, match="stage_members"):
        Source(boundaries=[kron.steps[0]], stage_members=[[1000]]).build(kron)
    with pytest.raises(ValueError, match="not in the store"):
        Source(boundaries=[kron.steps[0]], stage_members=[[5], None]).build(kron)
    with pytest.raises(ValueError, match="segments"):
        Source(segments=0)


def test_source_adam_form_without_curvature_is_preconditioned_tracin(tmp_path):
    """optimizer='adam', L = 1, H → 0: SOURCE = Σ_c η_c <D g_q(θ_T), g_i(θ_c)> / N with D the
    per-coordinate projected Adam preconditioner (ratio of the stored precond and plain rows)."""
    store, at_t, n = _tiny_curvature_run(tmp_path, "adam", 0.01)
    src = store.attribute(at_t, method=Source(segments=1, optimizer="adam"), top_k=None).scores
    g = {s: store.read(s, schema.TRAIN).double() for s in store.steps}
    r = {s: store.read(s, schema.TRAIN_PRECOND).double() for s in store.steps}
    d = sum((g[s] * r[s]).sum(0) for s in g) / sum((g[s] ** 2).sum(0) for s in g)
    last = store.steps[-1]
    ref = sum(
        c.lr_sum[0] * (at_t[last].double() * d) @ g[c.global_step].T for c in store.checkpoints
    )
    torch.testing.assert_close(src.double() * n, ref, rtol=2e-3, atol=0)
    auto = store.attribute(at_t, method=Source(segments=1, optimizer="auto"), top_k=None).scores
    torch.testing.assert_close(auto, src)
