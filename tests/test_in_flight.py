"""FastLogger(mode="in_flight"): rows from the training batches themselves, per optimizer step.

References are independent of the in-flight code path: a sweep-mode logger in the same fit (same
weights θ_t, its own hooks and autograd.grad on the per-example loss), exact torch.func gradients at
weights snapshotted by a separate callback, and a fit without the logger.
"""

from __future__ import annotations

import copy

import h5py
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    FastLogger,
    TinyGPT,
    TinyMLP,
    TokenDataset,
    loader,
    make_classification,
    spy_first_batch_checks,
    trainer,
)
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from oracles import per_example_grads
from scipy.stats import pearsonr
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_tda import AttributionStore, IndexedDataset, MissingExampleIdsError
from lightning_tda.capture.in_flight import token_mean
from lightning_tda.capture.losses import resolve_loss_fn
from lightning_tda.data.indexed import get_example_ids
from lightning_tda.store import schema
from lightning_tda.store.batches import InFlightRowsError


class StepRecorder(pl.Callback):
    """Batch ids of every micro-batch, and weights + learning rate right before each optimizer step."""

    def __init__(self) -> None:
        self.ids: dict[int, list[torch.Tensor]] = {}
        self.states: dict[int, dict] = {}
        self.lrs: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.setdefault(trainer.global_step, []).append(get_example_ids(batch).clone())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())
        self.lrs[trainer.global_step] = float(optimizer.param_groups[0]["lr"])

    def batch_ids(self, step: int) -> torch.Tensor:
        return torch.sort(torch.cat(self.ids[step])).values


class SumMLP(TinyMLP):
    """Training loss = SUM of the per-example losses."""

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).sum()


class TokenMeanGPT(TinyGPT):
    """Training loss = mean over every supervised token of the batch (Hugging Face's ``outputs.loss``)."""

    def training_step(self, batch, batch_idx):
        logits = self.lm(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        v = logits.shape[-1]
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, v), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
        )


class LoraGPT(TinyGPT):
    """TinyGPT with PEFT LoRA on ``c_attn`` (GPT-2 Conv1D, ``fan_in_fan_out``); ``lora_B`` perturbed."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(lr=lr)
        import peft

        cfg = peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0
        )
        self.lm = peft.get_peft_model(self.lm, cfg)
        with torch.no_grad():
            for n, p in self.lm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.2)


def _gpt_loader(ds, batch_size: int) -> DataLoader:
    return DataLoader(
        ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


CASES = {
    # name: (model factory, data factory, loader factory, accumulate, logger kwargs)
    "mlp-mean-exact": (
        lambda: TinyMLP(lr=0.1),
        lambda: make_classification(48),
        lambda d: loader(d, batch_size=16),
        1,
        dict(projection="exact"),
    ),
    "mlp-mean-kron-acc2": (  # 3 batches per epoch: windows of 2 and a partial window of 1
        lambda: TinyMLP(lr=0.1, optimizer="adam"),
        lambda: make_classification(48),
        lambda d: loader(d, batch_size=16),
        2,
        dict(projection="kronecker", rank=4),
    ),
    "mlp-sum-exact-acc2": (
        lambda: SumMLP(lr=0.02),
        lambda: make_classification(40),
        lambda d: loader(d, batch_size=8),
        2,
        dict(projection="exact", in_flight_reduction="sum"),
    ),
    "gpt-mean-of-sums-kron": (  # per_example_loss summed over tokens, mean over sequences
        lambda: TinyGPT(lr=0.01),
        lambda: IndexedDataset(TokenDataset(12), ids=range(500, 512)),
        lambda d: _gpt_loader(d, 4),
        1,
        dict(projection="kronecker", rank=6),
    ),
    "gpt-lora-mean-exact-acc2": (  # adapters only; 12 examples in batches of 5: a short last batch
        lambda: LoraGPT(),
        lambda: IndexedDataset(TokenDataset(12), ids=range(500, 512)),
        lambda d: _gpt_loader(d, 5),
        2,
        dict(projection="exact"),
    ),
    "gpt-token-mean-exact-acc2": (
        lambda: TokenMeanGPT(lr=0.01),
        lambda: IndexedDataset(TokenDataset(12), ids=range(500, 512)),
        lambda d: _gpt_loader(d, 3),
        2,
        dict(projection="exact", in_flight_reduction=token_mean()),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_in_flight_rows_equal_the_sweep_at_the_same_weights(tmp_path, case):
    """Rows at step t == a sweep logger's rows (same fit, weights θ_t) for the examples of batch t."""
    make_model, make_data, make_loader, accumulate, kw = CASES[case]
    torch.manual_seed(0)
    data, model = make_data(), make_model()
    common = dict(
        dtype="float32",
        verbose=False,
        **{k: v for k, v in kw.items() if k != "in_flight_reduction"},
    )
    in_flight = FastLogger(
        tmp_path / "if.h5",
        mode="in_flight",
        save_state=True,  # θ_t at every step (the default "auto" saves it only every few steps)
        **common,
        **(
            {"in_flight_reduction": kw["in_flight_reduction"]}
            if "in_flight_reduction" in kw
            else {}
        ),
    )
    sweep = FastLogger(
        tmp_path / "sweep.h5",
        attribution_data=data,
        every_n_train_steps=1,
        log_at_fit_start=True,
        optimizer_state=False,
        curvature=False,
        **common,
    )
    rec = StepRecorder()
    trainer(
        tmp_path, [in_flight, sweep, rec], max_epochs=2, accumulate_grad_batches=accumulate
    ).fit(model, make_loader(data))
    a, b = AttributionStore(tmp_path / "if.h5"), AttributionStore(tmp_path / "sweep.h5")
    assert a.steps == sorted(
        rec.states
    )  # every optimizer step logged, keyed by the weights θ_t it used
    assert set(a.steps) <= set(b.steps)
    assert all(c.in_flight for c in a.checkpoints) and not any(c.in_flight for c in b.checkpoints)
    assert torch.equal(
        a.example_ids, torch.sort(b.example_ids).values
    )  # every example was trained on
    with h5py.File(a.path, "r") as f:
        assert f.attrs["schema_version"] == schema.IN_FLIGHT_SCHEMA_VERSION
    worst = 0.0
    for t in a.steps:
        ids, rows = a.batch_rows(t)
        assert torch.equal(ids, rec.batch_ids(t))
        pos = {int(i): r for r, i in enumerate(b.example_ids.tolist())}
        ref = b.read(t, schema.TRAIN)[[pos[int(i)] for i in ids]]
        scale = float(ref.abs().max())
        torch.testing.assert_close(rows, ref, rtol=1e-5, atol=1e-5 * scale)
        worst = max(worst, float((rows - ref).abs().max()) / scale)
        # the saved state is the pre-step weights θ_t, exactly
        state = a.state(t)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable <= set(state)
        for k in state:
            assert torch.equal(state[k], rec.states[t][k]), k
        assert a.checkpoint(t).lr_sum[0] == pytest.approx(rec.lrs[t], rel=1e-12)
    print(f"{case}: {len(a.steps)} steps, max |in-flight - sweep| / max|sweep| = {worst:.2e}")


def test_wrong_reduction_contract_scales_rows(tmp_path):
    """Negative control: declaring 'sum' for a mean loss leaves every row 1/B of the sweep's."""
    torch.manual_seed(0)
    data, model = make_classification(32), TinyMLP(lr=0.1)
    common = dict(projection="exact", dtype="float32", verbose=False)
    wrong = FastLogger(tmp_path / "w.h5", mode="in_flight", in_flight_reduction="sum", **common)
    sweep = FastLogger(
        tmp_path / "s.h5",
        attribution_data=data,
        log_at_fit_start=True,
        every_n_train_steps=1,
        **common,
    )
    trainer(tmp_path, [wrong, sweep], max_epochs=1).fit(model, loader(data, batch_size=8))
    a, b = AttributionStore(tmp_path / "w.h5"), AttributionStore(tmp_path / "s.h5")
    ids, rows = a.batch_rows(2)
    pos = {int(i): r for r, i in enumerate(b.example_ids.tolist())}
    ref = b.read(2, schema.TRAIN)[[pos[int(i)] for i in ids]]
    assert not torch.allclose(rows, ref, rtol=1e-3)
    torch.testing.assert_close(rows * 8, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_training_is_bit_identical_with_the_logger(tmp_path):
    """Dropout (RNG), Adam, accumulation and logged queries: the weights end bit for bit the same."""

    def fit(callbacks):
        torch.manual_seed(0)
        model = TinyMLP(optimizer="adam", lr=0.01, dropout=0.3)
        trainer(tmp_path, callbacks, max_epochs=2, accumulate_grad_batches=2).fit(
            model, loader(make_classification(48), batch_size=8)
        )
        return model.state_dict()

    plain = fit([])
    logger = FastLogger(
        tmp_path / "a.h5",
        mode="in_flight",
        query_data=make_classification(5, seed=1),
        rank=4,
        flush_every=2,
        verbose=False,
    )
    logged = fit([logger])
    assert all(torch.equal(plain[k], logged[k]) for k in plain)
    store = AttributionStore(tmp_path / "a.h5")
    assert store.steps == list(range(6))  # 6 batches of 8, two per optimizer step, 2 epochs
    assert all(c.has_queries for c in store.checkpoints)


def _full_grads(model, batch) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    g = per_example_grads(model, resolve_loss_fn(model, None), batch, set(names))
    return torch.cat([g[n].reshape(g[n].shape[0], -1) for n in names], dim=1).detach()


def _batch(ds):
    return next(iter(DataLoader(ds, batch_size=len(ds))))


@pytest.mark.parametrize("every", [1, 2])
def test_in_flight_tracin_equals_per_step_brute_force(tmp_path, every):
    """TracIn = Σ_t η_t <∇ℓ_q(θ_t), ∇ℓ_z(θ_t)> over logged steps t whose batch held z (torch.func)."""
    torch.manual_seed(0)
    data = make_classification(36)
    queries = make_classification(6, seed=1)
    model = TinyMLP(optimizer="sgd_sched", lr=0.2)  # SGD momentum, StepLR halving every 3 epochs
    logger = FastLogger(
        tmp_path / "a.h5",
        mode="in_flight",
        every_n_train_steps=every,
        projection="exact",
        dtype="float32",
        query_data=queries,
        verbose=False,
    )
    rec = StepRecorder()
    trainer(tmp_path, [logger, rec], max_epochs=4).fit(model, loader(data, batch_size=12))
    store = AttributionStore(tmp_path / "a.h5")
    logged = [t for t in sorted(rec.states) if t % every == 0]
    assert store.steps == logged
    assert len({rec.lrs[t] for t in logged}) == 2  # the schedule changed the learning rate

    pos = {int(i): r for r, i in enumerate(store.example_ids.tolist())}
    ref = torch.zeros(len(queries), store.num_examples, dtype=torch.float64)
    ref_self = torch.zeros(store.num_examples, dtype=torch.float64)
    m = copy.deepcopy(model)
    for t in logged:
        m.load_state_dict(rec.states[t])
        ids = rec.batch_ids(t)
        sub = Subset(data, [int(i) - 1000 for i in ids])  # make_classification ids are 1000 + index
        gz, gq = _full_grads(m, _batch(sub)).double(), _full_grads(m, _batch(queries)).double()
        cols = [pos[int(i)] for i in ids]
        ref[:, cols] += rec.lrs[t] * gq @ gz.T
        ref_self[cols] += rec.lrs[t] * gz.pow(2).sum(1)

    got = store.attribute(queries, model=model, method="tracin", top_k=None).scores
    r = pearsonr(got.flatten().numpy(), ref.flatten().numpy())[0]
    print(f"every={every}: Pearson(in-flight TracIn, brute force) = {r:.7f}")
    assert r > 0.9999, r
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    logged_q = store.attribute("logged", method="tracin", top_k=None).scores
    torch.testing.assert_close(logged_q, got, rtol=1e-5, atol=1e-6 * float(got.abs().max()))
    self_inf = store.self_influence(method="tracin")
    torch.testing.assert_close(self_inf.double(), ref_self, rtol=1e-4, atol=1e-6)
    top = store.attribute(queries, model=model, method="tracin", top_k=3, block_rows=5)
    for q in range(len(queries)):
        order = torch.argsort(got[q], descending=True)[:3]
        assert torch.equal(top.indices[q], store.example_ids[order])


def test_only_batch_aware_methods_read_in_flight_checkpoints(tmp_path):
    torch.manual_seed(0)
    data = make_classification(24)
    logger = FastLogger(tmp_path / "a.h5", mode="in_flight", rank=4, verbose=False)
    trainer(tmp_path, [logger], max_epochs=1).fit(TinyMLP(), loader(data, batch_size=8))
    store = AttributionStore(tmp_path / "a.h5")
    q = make_classification(3, seed=1)
    for method in ("influence", "source", "datainf", "tracin_adam"):
        with pytest.raises(InFlightRowsError, match="logged in flight.*mode='sweep'"):
            store.attribute(q, model=TinyMLP(), method=method)
    with pytest.raises(InFlightRowsError):
        store.read(store.steps[0], schema.TRAIN)
    dense = store.read(
        store.steps[0], schema.batch_view(schema.TRAIN)
    )  # sparse view, zeros off the batch
    ids, rows = store.batch_rows(store.steps[0])
    nz = dense.abs().sum(1) > 0
    assert torch.equal(store.example_ids[nz], ids) and torch.equal(dense[nz], rows)
    gd = store.attribute(q, model=TinyMLP(), method="graddot", top_k=None).scores
    assert (gd[:, ~torch.isin(store.example_ids, store.batch_rows(store.steps[-1])[0])] == 0).all()


def test_bad_in_flight_configuration_names_the_fix(tmp_path):
    data = make_classification(8)
    with pytest.raises(MisconfigurationException, match="drop attribution_data"):
        FastLogger(tmp_path / "a.h5", attribution_data=data, mode="in_flight")
    with pytest.raises(MisconfigurationException, match="every_n_train_steps"):
        FastLogger(tmp_path / "a.h5", every_n_epochs=1, mode="in_flight")
    with pytest.raises(MisconfigurationException, match="dense_dim=0"):
        FastLogger(tmp_path / "a.h5", dense_dim=8, mode="in_flight")
    with pytest.raises(MisconfigurationException, match="'mean', 'sum' or a callable"):
        FastLogger(tmp_path / "a.h5", mode="in_flight", in_flight_reduction="avg")
    with pytest.raises(MisconfigurationException, match="mode must be 'sweep'"):
        FastLogger(tmp_path / "a.h5", mode="inflight")
    plain = TensorDataset(torch.randn(8, 8), torch.randint(0, 3, (8,)))

    class NoIds(TinyMLP):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

    logger = FastLogger(tmp_path / "b.h5", mode="in_flight", verbose=False)
    with pytest.raises(MissingExampleIdsError, match="IndexedDataset"):
        trainer(tmp_path, [logger], max_epochs=1).fit(NoIds(), DataLoader(plain, batch_size=4))


def test_resume_relogs_the_steps_after_the_lightning_checkpoint(tmp_path):
    """Resuming from the epoch-0 checkpoint drops the later steps and logs them again, once each."""
    data = make_classification(24)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    torch.manual_seed(0)
    first = FastLogger(tmp_path / "a.h5", mode="in_flight", rank=4, verbose=False)
    trainer(tmp_path, [first, ckpt], max_epochs=2, enable_checkpointing=True).fit(
        TinyMLP(), loader(data, batch_size=8)
    )
    assert AttributionStore(tmp_path / "a.h5").steps == list(range(6))
    epoch0 = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]
    torch.manual_seed(1)
    again = FastLogger(tmp_path / "a.h5", mode="in_flight", rank=4, verbose=False)
    rec = StepRecorder()
    trainer(tmp_path, [again, rec], max_epochs=2).fit(
        TinyMLP(), loader(data, batch_size=8, seed=5), ckpt_path=epoch0
    )
    store = AttributionStore(tmp_path / "a.h5")
    assert store.steps == list(range(6)) and store.incomplete == []
    assert sorted(rec.states) == [3, 4, 5]
    for t in (3, 4, 5):  # the resumed run's batches (another data order), not the first run's
        assert torch.equal(store.batch_rows(t)[0], rec.batch_ids(t))
    seen = torch.cat([store.batch_rows(t)[0] for t in store.steps])
    assert torch.equal(store.example_ids, torch.unique(seen))
    assert np.isfinite(store.self_influence(method="tracin").numpy()).all()


def test_in_flight_first_batch_check_runs_on_the_first_examples_of_the_batch(monkeypatch, tmp_path):
    """The in-flight check costs CHECK_BATCH_SIZE examples of the first training batch, not the batch."""
    from lightning_tda.callbacks import context

    seen, first = spy_first_batch_checks(monkeypatch), []

    class FirstIds(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not first:
                first.append(get_example_ids(batch).tolist())

    logger = FastLogger(tmp_path / "c.h5", mode="in_flight", rank=4, verbose=False)
    torch.manual_seed(0)
    trainer(tmp_path, [FirstIds(), logger], max_epochs=1).fit(
        TinyMLP(), loader(make_classification(32), batch_size=16)
    )
    assert seen == [first[0][: context.CHECK_BATCH_SIZE]]


def test_first_examples_slices_only_a_batch_it_can_read():
    from lightning_tda.capture.first_batch import first_examples

    ids = torch.arange(10, 16)
    batch = {"x": torch.randn(6, 3), "y": torch.arange(6), "meta": "text"}
    head, hid = first_examples(batch, ids, 4)
    assert torch.equal(head["x"], batch["x"][:4]) and head["meta"] == "text"
    assert hid.tolist() == [10, 11, 12, 13]
    odd = {"x": torch.randn(6, 3), "table": torch.randn(2, 3)}  # another leading dimension
    whole, wid = first_examples(odd, ids, 4)
    assert whole is odd and wid is ids
    assert first_examples(batch, ids, 8)[0] is batch
