"""The task description on the attribution side and in STRIDE (issue 14, item 2).

Modules are written as a user would: a nanoGPT-style char LM on ``(x, y)`` pairs with ``y = x``
shifted by one, a config-built GPT-2 in a user module on Hugging Face dict batches with ``labels``,
and the tiny ``(x, y)`` MLP. Every batch here comes from an ``IndexedDataset`` (``Indexed(ids,
data)`` or dicts with ``example_id``); the user-batch id work (``example_ids=``) is tested elsewhere.
Each check compares against an independent path: torch.func gradients, the module's own loss, or
the same run through another description of the same model.
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    TinyMLP,
    TokenDataset,
    causal_lm_loss,
    fit_logged,
    fit_logged_mlp,
    tiny_gpt2_config,
)
from oracles import reference_rows
from torch import nn
from torch.utils.data import TensorDataset, default_collate

from lightning_tda import (
    AttributionStore,
    CausalLMTask,
    ClassificationTask,
    IndexedDataset,
    Targets,
    Task,
)
from lightning_tda.capture.replay import loaded_state
from lightning_tda.errors import ConfigError
from lightning_tda.integrations.transformers import CausalLMModule
from lightning_tda.methods import Influence, Source
from lightning_tda.store.writer import open_for_update, seal_root
from lightning_tda.stride import Stride, StrideConfig, SubsetDesign, fit, fitted_steps, load
from lightning_tda.stride.fit import FeatureSource
from lightning_tda.stride.operator import token_ce

QUIET = {"enable_progress_bar": False}
VOCAB, BLOCK = 11, 8
STRIDE_CFG = StrideConfig(
    num_subsets=8,
    degree=2,
    rank=4,
    steps=6,
    holdout=6,
    subsets_per_step=4,
    members_per_subset=4,
    linearity_batch=2,
    sketch_dim=4,
)
ROW_METHODS = [
    "graddot",
    "gradcos",
    "tracin",
    "influence",
    Influence(mode="ekfac"),
    Source(segments=1),
    "datainf",
]


# -- modules written as a user would ------------------------------------------------------------
class CharLM(pl.LightningModule):
    """nanoGPT-style char LM: token + position embeddings, a causal running mean, one hidden Linear
    and the LM head; batches ``(x, y)`` with ``y`` = ``x`` shifted by one (here from an
    IndexedDataset, so ``Indexed(ids, (x, y))``)."""

    def __init__(self, d: int = 16, lr: float = 0.5) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(BLOCK, d)
        self.mix, self.head = nn.Linear(d, d), nn.Linear(d, VOCAB)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.arange(x.shape[1], device=x.device)
        h = (self.tok(x) + self.pos(t)).cumsum(1) / (t + 1)[:, None]
        return self.head(torch.tanh(self.mix(h)))

    def per_example_loss(self, batch) -> torch.Tensor:
        _, (x, y) = batch
        logits = self(x)
        b, t, v = logits.shape
        tok = F.cross_entropy(logits.reshape(b * t, v), y.reshape(b * t), reduction="none")
        return tok.view(b, t).sum(1)

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class DeclaredCharLM(CharLM):
    """The same module declaring its label convention itself (the module's own task)."""

    def targets(self, batch) -> Targets:
        _, (_, y) = batch
        return Targets(y, shift=False)


def char_data(n: int, seed: int, ids=None) -> IndexedDataset:
    """Noisy cyclic character blocks: ``x = s[:-1]``, ``y = s[1:]``."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    s = (start + torch.arange(BLOCK + 1)) % VOCAB
    noise = torch.rand(n, BLOCK + 1, generator=g) < 0.2
    s = torch.where(noise, torch.randint(0, VOCAB, s.shape, generator=g), s)
    return IndexedDataset(TensorDataset(s[:, :-1], s[:, 1:]), ids=ids)


class UserGPT(pl.LightningModule):
    """A config-built GPT-2 in a user's module; dict batches with Hugging Face ``labels``."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        from transformers import GPT2LMHeadModel

        cfg = tiny_gpt2_config(50, n_positions=16)
        cfg._attn_implementation = "eager"
        self.model = GPT2LMHeadModel(cfg)  # the attribute name CausalLMModule uses too
        self.lr = lr

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def per_example_loss(self, batch):
        return causal_lm_loss(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def margin(model, batch) -> torch.Tensor:
    """``max_{c != y} z_c - z_y``, written independently of ClassificationTask."""
    _, (x, y) = batch
    z = model(x)
    onehot = F.one_hot(y, z.shape[1]).to(z.dtype)
    return (z - 1e9 * onehot).max(dim=1).values - (z * onehot).sum(1)


class MarginMLP(TinyMLP):
    """A module whose own query measurement is the margin."""

    def query_measurement(self, batch):
        return margin(self, batch)


def record_task(path, settings: dict) -> None:
    """Write the store's root ``task`` attribute (as the logger records it) and reseal the root."""
    with open_for_update(path) as f:
        f.attrs["task"] = json.dumps(settings, sort_keys=True)
        seal_root(f)
        f.flush()


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("char")
    torch.manual_seed(0)
    data = char_data(32, seed=0)
    run = fit_logged(tmp, CharLM(), data, "char.h5", epochs=2, projection="exact", verbose=False)
    return run, char_data(4, seed=1, ids=[500, 501, 502, 503])


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpt")
    torch.manual_seed(0)
    data = IndexedDataset(TokenDataset(16))
    run = fit_logged(
        tmp, UserGPT(), data, "gpt.h5", epochs=1, train_batch_size=8, rank=4, verbose=False
    )
    return run, IndexedDataset(TokenDataset(3, seed=5), ids=[70, 71, 72])


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlp")
    return fit_logged_mlp(tmp, "mlp.h5", n=48, n_queries=5, epochs=2, projection="exact")


# -- the nanoGPT-style LM: pre-shifted targets ----------------------------------------------------
def test_char_lm_stride_needs_the_convention_and_sees_aligned_targets(char_run):
    run, queries = char_run
    model, data, path = run.model, run.data, run.path
    with pytest.raises(ConfigError, match=r"CausalLMTask\(labels='hf'\).*labels='shifted'"):
        fit(path, model, data, STRIDE_CFG, trainer_kwargs=QUIET)
    assert fitted_steps(path) == [] and SubsetDesign.load(path) is None  # nothing was written
    # the per-token CE STRIDE measures at init equals the module's own per_example_loss ...
    step = run.store.steps[-1]
    rows = torch.arange(len(data))

    def source(targets_fn=None, task=None):  # streamed (cache_bytes=0): fp32, no fp16 cache
        fwd = lambda m, b: m.per_example_loss(b)  # noqa: E731
        args = (model, data, run.store.example_ids, "head:input", "head", fwd, targets_fn)
        return FeatureSource(*args, 16, None, 0, task=task)

    with loaded_state(model, run.store.state(step)):
        f = source(task=CausalLMTask(labels="shifted")).get(rows)
        own = model.per_example_loss(default_collate([data[int(i)] for i in rows]))
        # ... which a second shift (reading the pre-shifted y as Hugging Face labels) breaks
        double = source(targets_fn=lambda b: Targets(b.data[1], shift=True)).get(rows)
    assert f.targets.shape == (len(data), BLOCK)
    torch.testing.assert_close(token_ce(f.o, f.targets), own, rtol=1e-5, atol=1e-5)
    assert double.targets.shape == (len(data), BLOCK - 1)
    assert (token_ce(double.o, double.targets) - own).abs().max() > 1.0
    # fitted with the convention: recorded next to the operators and used at attribution
    res = fit(
        path, model, data, STRIDE_CFG, trainer_kwargs=QUIET, task=CausalLMTask(labels="shifted")
    )
    assert load(path, res.step).task == CausalLMTask(labels="shifted").settings()
    out = run.store.attribute(queries, model=model, method=Stride(), top_k=None)
    assert out.scores.shape == (4, 32) and torch.isfinite(out.scores).all()
    assert out.query_ids.tolist() == [500, 501, 502, 503]


def test_char_lm_every_method_same_scores_module_and_task(char_run):
    run, queries = char_run
    store, model, data = AttributionStore(run.path), run.model, run.data
    task = CausalLMTask(labels="shifted")
    for method in ROW_METHODS:
        own = store.attribute(queries, model=model, method=method, top_k=None).scores
        described = store.attribute(queries, model=model, method=method, top_k=None, task=task)
        assert torch.equal(own, described.scores), method
    declared = DeclaredCharLM()
    declared.load_state_dict(model.state_dict())
    kw = dict(trainer_kwargs=QUIET, overwrite=True)
    fit(store.path, declared, data, STRIDE_CFG, **kw)
    assert load(store.path, store.steps[-1]).task == {"task": "module"}
    a = store.attribute(queries, model=declared, method=Stride(), top_k=None).scores
    fit(store.path, model, data, STRIDE_CFG, task=task, **kw)
    b = store.attribute(queries, model=model, method=Stride(), top_k=None).scores
    assert a.abs().max() > 0 and torch.equal(a, b)


# -- a Hugging Face causal LM with labels ----------------------------------------------------------
def test_hf_causal_lm_task_equals_causal_lm_module_declared_targets(gpt_run):
    run, queries = gpt_run
    store, user, data = AttributionStore(run.path), run.model, run.data
    with pytest.raises(ConfigError, match=r"task=CausalLMTask\(labels='hf'\)"):
        fit(store.path, user, data, STRIDE_CFG, trainer_kwargs=QUIET)
    wrapped = CausalLMModule(user.model)  # same weights, same parameter names
    kw = dict(trainer_kwargs=QUIET, overwrite=True)
    fit(store.path, user, data, STRIDE_CFG, task=CausalLMTask(labels="hf"), **kw)
    assert load(store.path, store.steps[-1]).task["labels"] == "hf"
    a = store.attribute(queries, model=user, method=Stride(), top_k=None)
    fit(
        store.path, wrapped, data, STRIDE_CFG, **kw
    )  # CausalLMModule declares Targets(labels, shift=True)
    b = store.attribute(queries, model=wrapped, method=Stride(), top_k=None)
    assert a.scores.shape == (3, 16) and a.scores.abs().max() > 0
    assert torch.equal(a.scores, b.scores)
    assert a.query_ids.tolist() == b.query_ids.tolist() == [70, 71, 72]
    # every row method: the module's own loss and the task-described one agree
    for method in ROW_METHODS[:4]:
        own = store.attribute(queries, model=user, method=method, top_k=None).scores
        task = CausalLMTask(labels="hf")
        described = store.attribute(queries, model=user, method=method, top_k=None, task=task)
        assert torch.equal(own, described.scores), method
        via_module = store.attribute(queries, model=wrapped, method=method, top_k=None).scores
        torch.testing.assert_close(via_module, own, rtol=1e-4, atol=1e-6)


# -- query measurements: margin, the default, the store's record ----------------------------------
def test_margin_query_gradients_equal_torch_func_and_default_is_the_loss(mlp_run):
    store, model, queries = mlp_run.store, mlp_run.model, mlp_run.queries
    step = store.steps[-1]
    batch = default_collate([queries[i] for i in range(len(queries))])
    margin_task = ClassificationTask(measurement_kind="margin")
    qv, qids = store.query_vectors(queries, model, [step], task=margin_task)
    with loaded_state(model, store.state(step)):
        ref = reference_rows(model, margin, batch, store.layers, store.projection, use_vmap=False)
        want = margin(model, batch)
    assert ref.abs().max() > 0
    torch.testing.assert_close(qv[step], ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(qv.losses[step], want.detach())  # the measured margins
    # the default measurement is the loss: module default == explicit loss_fn == ClassificationTask()
    default, _ = store.query_vectors(queries, model, [step])
    by_fn, _ = store.query_vectors(
        queries, model, [step], loss_fn=lambda m, b: m.per_example_loss(b)
    )
    by_task, _ = store.query_vectors(queries, model, [step], task=ClassificationTask())
    assert torch.equal(default[step], by_fn[step]) and torch.equal(default[step], by_task[step])
    assert (default[step] - qv[step]).norm() > 0.1 * qv[step].norm()
    # a module's own query_measurement is the default measurement
    own = MarginMLP()
    own.load_state_dict(model.state_dict())
    mv, _ = store.query_vectors(queries, own, [step])
    torch.testing.assert_close(mv[step], qv[step])


def test_store_recorded_task_is_the_default(tmp_path):
    run = fit_logged_mlp(tmp_path, "rec.h5", n=32, n_queries=4, epochs=1, projection="exact")
    model, queries, path = run.model, run.queries, run.path
    margin_task = ClassificationTask(measurement_kind="margin")
    loss_scores = AttributionStore(path).attribute(queries, model, "graddot", None).scores
    record_task(path, margin_task.settings())
    store = AttributionStore(path)
    assert store.recorded_task() == margin_task
    got = store.attribute(queries, model, "graddot", None).scores
    want = store.attribute(queries, model, "graddot", None, task=margin_task).scores
    assert torch.equal(got, want) and not torch.allclose(got, loss_scores)
    back = store.attribute(queries, model, "graddot", None, task=Task()).scores
    assert torch.equal(back, loss_scores)
    # STRIDE reads the same record for its targets (TinyMLP declares none)
    res = fit(store, model, run.data, STRIDE_CFG, trainer_kwargs=QUIET)
    assert res.task == margin_task.settings()
    # a recorded loss_fn cannot be rebuilt: asked for again, precomputed queries need nothing
    record_task(path, {"task": "loss_fn", "loss_fn": "my_loss"})
    store = AttributionStore(path)
    with pytest.raises(ConfigError, match=r"cannot be rebuilt.*task=.*loss_fn="):
        store.attribute(queries, model, "graddot", None)
    fn = lambda m, b: m.per_example_loss(b)  # noqa: E731
    assert torch.equal(store.attribute(queries, model, "graddot", None, loss_fn=fn).scores, back)
    qv, _ = store.query_vectors(queries, model, store.steps, loss_fn=fn)
    assert torch.equal(store.attribute(dict(qv), method="graddot", top_k=None).scores, back)
    with pytest.raises(ConfigError, match="either task= or loss_fn="):
        store.attribute(queries, model, "graddot", task=Task(), loss_fn=fn)
    with pytest.raises(ConfigError, match="must be a lightning_tda Task"):
        store.self_influence(task="margin")


def test_mlp_every_method_same_scores_module_and_task(mlp_run):
    store, model, data, queries = mlp_run.store, mlp_run.model, mlp_run.data, mlp_run.queries
    task = ClassificationTask()
    for method in ROW_METHODS:
        own = store.attribute(queries, model=model, method=method, top_k=None).scores
        described = store.attribute(queries, model=model, method=method, top_k=None, task=task)
        assert torch.equal(own, described.scores), method
    kw = dict(trainer_kwargs=QUIET, overwrite=True)
    fit(store.path, model, data, STRIDE_CFG, task=task, **kw)
    a = store.attribute(queries, model=model, method=Stride(), top_k=None).scores
    explicit = lambda b: Targets(b.data[1], shift=False)  # noqa: E731
    fit(store.path, model, data, STRIDE_CFG, targets_fn=explicit, **kw)
    b = store.attribute(queries, model=model, method=Stride(targets_fn=explicit), top_k=None)
    assert a.abs().max() > 0 and torch.equal(a, b.scores)
    with pytest.raises(ConfigError, match="plain tensor is ambiguous"):
        fit(store.path, model, data, STRIDE_CFG, targets_fn=lambda b: b.data[1], **kw)
    with pytest.raises(ConfigError, match=r"ClassificationTask\(\)"):
        store.attribute(queries, model=model, method=Stride(task=Task()), top_k=None)
    # dropout-ensemble members differentiate the task's training loss: the same rows either way
    store.add_dropout_ensemble(model, data, members=1, overwrite=True)
    rows = store.read(store.steps[-1], "train_dropout0")
    store.add_dropout_ensemble(model, data, members=1, overwrite=True, task=task)
    assert rows.abs().max() > 0 and torch.equal(rows, store.read(store.steps[-1], "train_dropout0"))
