"""Sweep speed-ups (issue 15) change nothing that is stored: the PCA basis pass's kept batches, the
partial eigendecomposition, the one-sync finiteness test and the sweep batch-size rule."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from helpers import fit_logged_gpt, fit_logged_mlp, spy_first_batch_checks

from lightning_tda.callbacks.sweep import SweepLogging
from lightning_tda.capture import basis
from lightning_tda.errors import NonFiniteError


def _datasets(path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "fiu":
                out[name] = obj[()]

        f.visititems(visit)
    return out


def _fit_with_reuse(monkeypatch, tmp_path, name, reuse, fit=fit_logged_gpt, **kw):
    budget = basis.reuse_budget  # capture.basis_reuse_bytes = reuse (None: the default budget)
    monkeypatch.setattr(
        "lightning_tda.callbacks.sweep.reuse_budget", lambda device, _=None: budget(device, reuse)
    )
    calls = []
    real = SweepLogging._log_single

    def counting(self, trainer, pl_module, trigger):
        calls.append(trigger)
        return real(self, trainer, pl_module, trigger)

    monkeypatch.setattr(SweepLogging, "_log_single", counting)
    run = fit(tmp_path, name, basis="pca", rank=4, dtype="float32", **kw)
    return _datasets(run.path), calls


def _count_kept(monkeypatch) -> list[int]:
    """Each PCA basis pass of the sweep appends how many batches it kept for reuse."""
    kept: list[int] = []
    real_fit = basis.fit_pca_bases

    def spy(*a, **kw):
        out = real_fit(*a, **kw)
        kept.append(len(kw.get("keep") or []))
        return out

    monkeypatch.setattr("lightning_tda.callbacks.sweep.fit_pca_bases", spy)
    return kept


@pytest.mark.parametrize("fit", [fit_logged_gpt, fit_logged_mlp])
def test_kept_basis_batches_store_the_same_rows(monkeypatch, tmp_path, fit):
    """Rows, preconditioned rows, K-FAC factors and bases with the basis pass's batches reused equal
    those of a sweep that runs its own forward and backward (reuse off), dataset by dataset."""
    kept = _count_kept(monkeypatch)
    on, _ = _fit_with_reuse(monkeypatch, tmp_path, "on.h5", None, fit=fit, batch_size=8)
    assert kept[-1] > 0, "the basis pass kept no batch"
    off, _ = _fit_with_reuse(monkeypatch, tmp_path, "off.h5", 0, fit=fit, batch_size=8)
    assert kept[-1] == 0
    assert sorted(on) == sorted(off)
    rows = [k for k in on if k.endswith("/train") or k.endswith("train_precond")]
    assert rows, sorted(on)
    for k in on:
        np.testing.assert_allclose(on[k], off[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert any(np.abs(on[k]).max() > 0 for k in rows)


def test_partial_reuse_within_budget(monkeypatch, tmp_path):
    """A budget of about two batches keeps two; the rest of the sweep recomputes; rows equal."""
    one = {}

    def spy_bytes(calls):
        b = real_bytes(calls)
        one.setdefault("b", b)
        return b

    real_bytes = basis._calls_bytes
    monkeypatch.setattr(basis, "_calls_bytes", spy_bytes)
    full, _ = _fit_with_reuse(monkeypatch, tmp_path, "off.h5", 0, batch_size=4, n=24)
    probe, _ = _fit_with_reuse(monkeypatch, tmp_path, "probe.h5", 10**12, batch_size=4, n=24)
    kept = _count_kept(monkeypatch)
    part, _ = _fit_with_reuse(
        monkeypatch, tmp_path, "part.h5", 2 * one["b"] + 1, batch_size=4, n=24
    )
    assert kept[-1] == 2
    for k in full:
        np.testing.assert_allclose(part[k], full[k], rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(probe[k], full[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_partial_eigh_matches_full():
    """The CPU top-k path (LAPACK syevr) gives the full decomposition's top eigenvectors, signs fixed."""
    g = torch.Generator().manual_seed(0)
    n, k = basis.PARTIAL_EIGH_MIN_DIM + 3, 7
    x = torch.randn(4 * n, n, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, n).double()
    cov = (x.T @ x).float()
    got = basis.top_eigenvectors(cov, k)
    _, vecs = np.linalg.eigh(cov.double().numpy())
    ref = vecs[:, ::-1][:, :k]
    ref = ref * np.sign(ref[np.abs(ref).argmax(0), np.arange(k)])
    assert got.shape == (n, k)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)


def test_non_finite_rows_still_name_the_example(monkeypatch, tmp_path):
    """The one-sync finiteness test still raises NonFiniteError naming the example's id."""
    from lightning_tda.capture import featurize

    real = featurize.Featurizer._checked
    poisoned = []

    def poison(ids, losses, rows, scaled):
        if ids is not None and ids.shape[0] > 2:
            rows = rows.clone()
            rows[2, 0] = float("nan")
            poisoned.append(int(ids[2]))
        return real(ids, losses, rows, scaled)

    monkeypatch.setattr(featurize.Featurizer, "_checked", staticmethod(poison))
    with pytest.raises(NonFiniteError, match="ids \\[(\\d+)\\]") as err:
        fit_logged_mlp(tmp_path, "nan.h5", basis="pca", rank=4, batch_size=8)
    assert f"[{poisoned[0]}]" in str(err.value)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_loss_gives_equal_rows(backend):
    """``compile_loss`` (here cheap backends; AOT autograd included, where a captured output would
    otherwise be a sibling of the loss in one compiled node) gives the eager rows, and they are the
    torch.func reference's."""
    from helpers import TinyMLP, make_classification
    from oracles import reference_rows
    from torch.utils.data import DataLoader

    from lightning_tda.capture.featurize import Featurizer
    from lightning_tda.capture.layers import discover_layers
    from lightning_tda.capture.losses import resolve_loss_fn
    from lightning_tda.capture.projection import ProjectionConfig

    torch.manual_seed(0)
    model = TinyMLP().eval()
    batch = next(iter(DataLoader(make_classification(20), batch_size=20)))
    config = ProjectionConfig("kronecker", rank=4)
    layers, _ = discover_layers(model, config)
    loss = resolve_loss_fn(model, None)
    cpu = torch.device("cpu")
    plain = Featurizer(model, layers, config, loss, cpu, require_ids=False)(batch).rows
    torch._dynamo.reset()
    compiled = Featurizer(model, layers, config, loss, cpu, require_ids=False, compile_loss=backend)
    rows = compiled(batch).rows
    ref = reference_rows(model, loss, batch, layers, config)
    assert rows.abs().max() > 0
    torch.testing.assert_close(rows, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows, ref, rtol=1e-4, atol=1e-5)


def test_sweep_batch_size_rule():
    """The user's size wins; else the training batch raised to 64 but at most 8x; else 64."""
    from lightning_tda.callbacks.context import sweep_batch_size

    assert sweep_batch_size(7, 256) == 7
    assert sweep_batch_size(None, None) == 64
    assert [sweep_batch_size(None, b) for b in (1, 4, 8, 32, 64, 300)] == [8, 32, 64, 64, 64, 300]


def test_sweep_autocast_flag_picks_the_forward_context(monkeypatch, tmp_path):
    """On by default the sweep runs under the training precision's forward context (a no-op at
    32-true on CPU); ``sweep_autocast=False`` runs it in a null context; the rows agree."""
    from lightning_tda.callbacks.config import CaptureConfig

    seen = []
    real = SweepLogging._forward_context

    def spy(self, trainer):
        ctx = real(self, trainer)
        seen.append(ctx == trainer.precision_plugin.forward_context)
        return ctx

    monkeypatch.setattr(SweepLogging, "_forward_context", spy)
    on = _datasets(fit_logged_mlp(tmp_path, "on.h5", rank=4, batch_size=16).path)
    assert seen and all(seen)
    seen.clear()
    post_init = CaptureConfig.__post_init__

    def autocast_off(self):
        post_init(self)
        object.__setattr__(self, "sweep_autocast", False)

    monkeypatch.setattr(CaptureConfig, "__post_init__", autocast_off)
    off = _datasets(fit_logged_mlp(tmp_path, "off.h5", rank=4, batch_size=16).path)
    assert seen and not any(seen)
    for k in on:
        np.testing.assert_allclose(on[k], off[k], rtol=1e-6, err_msg=k)


@pytest.mark.parametrize(
    "bad",
    [
        {"sweep_autocast": "yes"},
        {"compile_loss": ""},
        {"compile_loss": 3},
        {"basis_reuse_bytes": -1},
    ],
)
def test_sweep_speed_switches_are_validated(bad):
    from lightning_tda.callbacks.config import CaptureConfig
    from lightning_tda.errors import ConfigError

    with pytest.raises(ConfigError, match=next(iter(bad))):
        CaptureConfig(**bad)


def test_first_batch_check_runs_on_a_few_examples_whatever_the_sweep_batch(monkeypatch, tmp_path):
    """The sweep's first-batch check costs CHECK_BATCH_SIZE examples, not a sweep batch of 32: the
    first 8 ids of the data in order."""
    from lightning_tda.callbacks import context

    seen = spy_first_batch_checks(monkeypatch)
    run = fit_logged_mlp(tmp_path, "c.h5", rank=4, batch_size=32)
    ids = run.store.example_ids.tolist()
    assert len(ids) == 64  # the sweep itself still covers every example
    assert seen == [ids[: context.CHECK_BATCH_SIZE]]
