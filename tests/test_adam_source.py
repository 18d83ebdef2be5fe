"""Optimizer-aware SOURCE (Adam/AdamW) against independent references.

* The segment walk equals explicitly unrolled preconditioned gradient descent on a quadratic (small
  steps, fixed diagonal preconditioner, decoupled weight decay), two segments with different D.
* The projected per-coordinate preconditioner equals a brute-force ratio of the stored rows.
* On a real AdamW run, Source(optimizer="auto") equals a dense matrix-exponential reference built from
  the stored rows with torch.linalg.matrix_exp.
"""

from __future__ import annotations

import pytest
import torch

from lightning_tda.methods import Source
from lightning_tda.methods.curvature import BlockEigen
from lightning_tda.methods.preconditioner import (
    optimizer_kind,
    projected_adam_diagonal,
    weight_decay_columns,
)
from lightning_tda.methods.source import Segment, preconditioned_curvature
from lightning_tda.store import schema


def _spd(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=g, dtype=torch.float64)
    return a @ a.T / k + 0.05 * torch.eye(k, dtype=torch.float64)


def _segment(h, d, eta_k, wd) -> Segment:
    k = h.shape[0]
    sigma, q = torch.linalg.eigh(h)
    raw = [BlockEigen("l", slice(0, k), sigma, q=q)]
    scale = d.sqrt()
    return Segment(
        steps=[0],
        ck_weights=[torch.ones(k)],
        eta_k=torch.full((k,), eta_k),
        shift={"l": wd},
        curvature=preconditioned_curvature(raw, scale),
        scale=scale,
        mask=None,
        members=1,
    )


def _unrolled(segments, g_i, g_q, steps_per_segment=20000):
    """Loss drop of the query after upweighting example ``i`` in segment ``s`` of preconditioned GD:
    ``δ_{t+1} = δ_t - η (D (H δ_t + ε g_i [t in segment s]) + wd δ_t)``, linear in ε (so ε = 1)."""
    out = []
    for s in range(len(segments)):
        delta = torch.zeros_like(g_i)
        for j, (h, d, eta_k, wd) in enumerate(segments):
            eta = eta_k / steps_per_segment
            a = torch.eye(len(g_i), dtype=torch.float64) - eta * (
                d[:, None] * h + wd * torch.eye(len(g_i), dtype=torch.float64)
            )
            push = -eta * d * g_i if j == s else torch.zeros_like(g_i)
            # closed-form sum of the linear recursion over the segment's steps (A^n δ + Σ A^t push)
            an = torch.linalg.matrix_power(a, steps_per_segment)
            geo = torch.linalg.solve(
                torch.eye(len(g_i), dtype=torch.float64) - a,
                torch.eye(len(g_i), dtype=torch.float64) - an,
            )
            delta = an @ delta + geo @ push
        out.append(float(-(g_q @ delta)))
    return out


def test_adam_walk_equals_unrolled_preconditioned_descent():
    k = 5
    g = torch.Generator().manual_seed(1)
    g_i = torch.randn(k, generator=g, dtype=torch.float64)
    g_q = torch.randn(k, generator=g, dtype=torch.float64)
    spec = [
        (_spd(k, 2), torch.rand(k, generator=g, dtype=torch.float64) * 3 + 0.2, 1.5, 0.1),
        (_spd(k, 3), torch.rand(k, generator=g, dtype=torch.float64) * 3 + 0.2, 0.8, 0.1),
    ]
    segs = [_segment(h, d, eta_k, wd) for h, d, eta_k, wd in spec]
    walked = list(Source()._walk(segs, g_q[None, :]))  # last segment first
    ours = [float(c[0] @ g_i) for _, c in reversed(walked)]
    ref = _unrolled(spec, g_i, g_q)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-3, atol=1e-6)
    # the SGD form (no preconditioner) is a different answer here
    plain = [_segment(h, torch.ones(k, dtype=torch.float64), e, w) for h, _, e, w in spec]
    plain_scores = [float(c[0] @ g_i) for _, c in reversed(list(Source()._walk(plain, g_q[None])))]
    assert not torch.allclose(torch.tensor(plain_scores), torch.tensor(ref), rtol=1e-2)


@pytest.fixture(scope="module")
def adamw_run(logged_mlp_store):
    run = logged_mlp_store(
        "adamw",
        n=64,
        n_queries=6,
        mlp=dict(optimizer="adamw", lr=0.02),
        epochs=6,
        every_n_epochs=2,
        rank=4,
        dtype="float32",
        verbose=False,
    )
    store = run.store
    qv, _ = store.query_vectors(run.queries, run.model, [store.steps[-1]])
    return store, qv


def test_optimizer_is_detected_and_weight_decay_read(adamw_run):
    store, _ = adamw_run
    assert optimizer_kind(store) == "adamw"
    wd = weight_decay_columns(store, store.steps[-1])
    assert torch.allclose(wd, torch.full_like(wd, 0.05))


def test_projected_adam_diagonal_is_the_row_ratio(adamw_run):
    store, _ = adamw_run
    steps = store.steps[-2:]
    g = torch.cat([store.read(s, schema.TRAIN).double() for s in steps])
    r = torch.cat([store.read(s, schema.TRAIN_PRECOND).double() for s in steps])
    ref = (g * r).sum(0) / (g * g).sum(0)
    ours = projected_adam_diagonal(store, steps)
    assert (ref > 0).all()  # Adam's preconditioner is positive along every stored direction
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=0)


def test_source_adamw_equals_dense_matrix_exponential_reference(adamw_run):
    """L = 2 segments on an AdamW run vs explicit D^½ (H̄) D^½ exponentials from the stored rows."""
    store, qv = adamw_run
    last = store.steps[-1]
    method = Source(segments=2)  # optimizer="auto" -> the AdamW form
    ours = store.attribute({last: qv[last]}, method=method, top_k=None).scores.double()
    groups = [store.steps[:2], store.steps[2:]]  # np.array_split of 3 checkpoints into 2
    n = store.num_examples
    cks = {c.global_step: c for c in store.checkpoints}
    u = qv[last].double()
    total = torch.zeros(u.shape[0], n, dtype=torch.float64)
    prev, segs = 0.0, []
    for steps in groups:
        end = cks[steps[-1]].lr_cumsum[0]
        lrs = torch.tensor([cks[s].lr_sum[0] for s in steps], dtype=torch.float64)
        segs.append((steps, end - prev, lrs / lrs.sum()))
        prev = end
    for steps, eta_k, w in reversed(segs):
        g = {s: store.read(s, schema.TRAIN).double() for s in steps}
        r = {s: store.read(s, schema.TRAIN_PRECOND).double() for s in steps}
        d = sum((g[s] * r[s]).sum(0) for s in steps) / sum((g[s] ** 2).sum(0) for s in steps)
        contrib, nxt = [], []
        for spec in store.layers:
            sl = slice(spec.offset, spec.offset + spec.size)
            h = sum(g[s][:, sl].T @ g[s][:, sl] / n for s in steps) / len(steps)
            sq = d[sl].sqrt()
            hp = sq[:, None] * h * sq[None, :] + 0.05 * torch.eye(h.shape[0], dtype=h.dtype)
            e = torch.linalg.matrix_exp(-eta_k * hp)
            fr = torch.linalg.solve(hp, torch.eye(h.shape[0], dtype=h.dtype) - e)
            w_ = u[:, sl] * sq
            contrib.append((w_ @ fr) * sq)
            nxt.append((w_ @ e) / sq)
        gbar = sum(wi * g[s] for wi, s in zip(w, steps, strict=True))
        total += torch.cat(contrib, 1) @ gbar.T / n
        u = torch.cat(nxt, 1)
    torch.testing.assert_close(ours, total, rtol=2e-4, atol=1e-6 * float(total.abs().max()))
    sgd = store.attribute({last: qv[last]}, method=Source(segments=2, optimizer="sgd"), top_k=None)
    assert not torch.allclose(sgd.scores.double(), total, rtol=1e-2)
