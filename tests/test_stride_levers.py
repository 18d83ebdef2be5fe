"""STRIDE's levers (issue 16): the residual-stream layer, operators at an earlier checkpoint, and
the two label conventions measuring the same thing."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import TinyGPT, TinyMLP
from torch import nn

from lightning_tda import CausalLMTask
from lightning_tda.capture.replay import loaded_state
from lightning_tda.stride import SteeringOperators, StrideConfig, fit
from lightning_tda.stride.operator import (
    default_layer,
    extract,
    feature_forward,
    output_module_name,
    transformer_blocks,
)

QUIET = {"enable_progress_bar": False, "logger": False}
SMALL = StrideConfig(
    num_subsets=8, degree=2, rank=4, steps=3, holdout=4, subsets_per_step=4,
    members_per_subset=4, linearity_batch=2, sketch_dim=4,
)  # fmt: skip


class _Block(nn.Module):
    """A residual block that returns a tuple, as many transformer layers do."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x + torch.tanh(self.fc(x)), None


class _Stack(nn.Module):
    def __init__(self, n: int, d: int = 6, vocab: int = 11) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_Block(d) for _ in range(n))
        self.head = nn.Linear(d, vocab)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for block in self.layers:
            h, _ = block(h)
            self.seen.append(h)
        return self.head(h)


@pytest.mark.parametrize(("n", "block"), [(2, 0), (3, 1), (6, 3), (12, 7)])
def test_default_layer_is_the_residual_stream_at_about_63_percent_depth(n, block):
    model = _Stack(n)
    assert transformer_blocks(model) == [f"layers.{i}" for i in range(n)]
    assert default_layer(model, output_module_name(model)) == f"layers.{block}"


def test_block_tuple_outputs_are_read_as_hidden_states_and_mlps_keep_their_rule():
    model = _Stack(3)
    x = torch.randint(0, 11, (2, 5))
    task = CausalLMTask(labels="shifted", forward=lambda m, b: m(b[0]))
    f = extract(model, (x, x), "layers.1", "head", feature_forward(model, task), task=task)
    torch.testing.assert_close(f.h, model.seen[1])  # the block's hidden states, not its tuple
    gpt = TinyGPT()
    assert default_layer(gpt, output_module_name(gpt)) == "lm.transformer.h.0"
    mlp = TinyMLP()
    assert default_layer(mlp, output_module_name(mlp)) == "net.3:input"


def _tokens(n: int = 6, t: int = 10) -> torch.Tensor:
    return torch.randint(2, 50, (n, t), generator=torch.Generator().manual_seed(4))


def test_hf_and_shifted_label_conventions_give_identical_measurements():
    """The same sequences as Hugging Face labels (shifted inside) and as pre-shifted ``(x, y)``
    pairs: equal aligned targets and equal operator measurements; a double shift differs."""
    torch.manual_seed(0)
    gpt = TinyGPT().eval()
    tokens = _tokens()
    hf = CausalLMTask(labels="hf", forward=lambda m, b: m.lm(input_ids=b["input_ids"]).logits)
    shifted = CausalLMTask(labels="shifted", forward=lambda m, b: m.lm(input_ids=b[0]).logits)
    layer, out = default_layer(gpt, "lm.lm_head"), "lm.lm_head"
    f_hf = extract(
        gpt, {"input_ids": tokens, "labels": tokens}, layer, out, hf.per_example_loss, task=hf
    )
    pair = (tokens[:, :-1], tokens[:, 1:])
    f_sh = extract(gpt, pair, layer, out, shifted.per_example_loss, task=shifted)
    assert torch.equal(f_hf.targets, f_sh.targets)
    ops = SteeringOperators(5, f_hf.h.shape[-1], 50, rank=3)
    with torch.no_grad():
        ops.heads.normal_(generator=torch.Generator().manual_seed(1))
    y_hf, y_sh = ops.measure(f_hf), ops.measure(f_sh)
    assert y_hf.abs().max() > 1e-2
    torch.testing.assert_close(y_hf, y_sh, rtol=1e-4, atol=1e-5)
    double = CausalLMTask(labels="hf", inputs=0, label_key=1, forward=shifted.forward)
    f_bad = extract(gpt, pair, layer, out, double.per_example_loss, task=double)
    assert f_bad.targets.shape != f_sh.targets.shape


def test_operators_at_an_earlier_checkpoint_see_that_checkpoints_weights(
    tmp_path, logged_gpt_store, monkeypatch
):
    """Fitting at the first of two checkpoints reads features from that checkpoint's saved weights
    (the base logits equal a forward of a model holding them, not the final weights), and the
    user's model comes back unchanged."""
    run = logged_gpt_store(
        tmp_path, "two.h5", n=16, epochs=2, train_batch_size=8, rank=4, every_n_epochs=1
    )
    store, model, data = run.store, run.model, run.data
    first, last = store.steps[0], store.steps[-1]
    assert first < last
    final = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    source = importlib.import_module("lightning_tda.stride.fit").FeatureSource
    real = source.__init__

    def spy(self, *a, **kw):
        real(self, *a, **kw)
        seen.append(self.o.float().clone())

    monkeypatch.setattr(source, "__init__", spy)
    fit(store.path, model, data, SMALL, checkpoint=first, trainer_kwargs=QUIET,
        task=CausalLMTask(labels="hf"))  # fmt: skip
    for k, v in model.state_dict().items():
        assert torch.equal(v, final[k]), k
    batch = torch.utils.data.default_collate([data[i] for i in range(len(data))])
    ids, items = batch["example_id"], batch
    order = torch.argsort(torch.argsort(ids))  # the cache follows the store's row order
    with loaded_state(model, store.state(first)):
        at_first = model.lm(input_ids=items["input_ids"]).logits[:, :-1]
    at_last = model.lm(input_ids=items["input_ids"]).logits[:, :-1]
    cached = seen[0][order]
    mask = items["labels"][:, 1:] != -100
    torch.testing.assert_close(cached[mask], at_first[mask], rtol=2e-3, atol=2e-3)  # fp16 cache
    assert (cached[mask] - at_last[mask]).abs().max() > 1e-2


def test_sampled_linearity_term_measures_only_the_sampled_operators(monkeypatch):
    """``linearity_subsets=S`` computes responses of S operators, not K (cost independent of K·C),
    and its loss is the ridge residual of those S responses on their own sketched rows."""
    fit_mod = importlib.import_module("lightning_tda.stride.fit")
    n, k, c = 40, 30, 7
    ids = torch.arange(n)
    design = fit_mod.SubsetDesign.draw(ids, k, 3, seed=0)
    ops = SteeringOperators(k, 5, c, rank=3)
    with torch.no_grad():
        ops.heads.normal_(generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(5)
    feats = fit_mod.Features(
        torch.randn(4, 1, 5, generator=g), torch.randn(4, 1, c, generator=g),
        torch.randint(0, c, (4, 1), generator=g), None,
    )  # fmt: skip
    asked = []
    real = fit_mod.responses

    def spy(operators, f, ks=None):
        asked.append(operators.num_subsets if ks is None else len(ks))
        return real(operators, f, ks)

    monkeypatch.setattr(fit_mod, "responses", spy)
    for subsets in (None, 8):
        cfg = StrideConfig(num_subsets=k, degree=3, linearity_subsets=subsets, holdout=4)
        module = fit_mod.StrideFitModule(ops, None, design, cfg, torch.arange(4))
        state = module.gen.get_state()
        got = module._linearity(feats)
        if subsets is None:
            y = real(ops, feats)
            hat = module.sketch @ torch.linalg.solve(
                module.sketch.T @ module.sketch + torch.eye(cfg.sketch_dim), module.sketch.T
            )
        else:
            module.gen.set_state(state)
            ks = torch.randperm(k, generator=module.gen)[:subsets]
            y = real(ops, feats, ks)
            s = module.sketch[ks]
            hat = s @ torch.linalg.solve(s.T @ s + torch.eye(cfg.sketch_dim), s.T)
        ref = ((y @ hat.T - y) ** 2).sum(1).mean() / y.shape[1]
        torch.testing.assert_close(got, ref)
    assert asked == [k, 8]


def test_linearity_subsets_is_validated():
    with pytest.raises(ValueError, match="linearity_subsets"):
        StrideConfig(linearity_subsets=1).validate(100)


def test_reference_per_subset_sizes_the_stability_batch_and_is_validated(monkeypatch):
    """``reference_per_subset=R``: the stability term reads R non-members per sampled subset (the
    fidelity term keeps ``members_per_subset``); ``None`` keeps the old equal sizes."""
    fit_mod = importlib.import_module("lightning_tda.stride.fit")
    n, k, c = 40, 6, 5
    design = fit_mod.SubsetDesign.draw(torch.arange(n), k, 2, seed=0)
    ops = SteeringOperators(k, 4, c, rank=2)
    g = torch.Generator().manual_seed(0)

    class Source:
        def get(self, positions):
            m = len(positions)
            return fit_mod.Features(
                torch.randn(m, 1, 4, generator=g), torch.randn(m, 1, c, generator=g),
                torch.randint(0, c, (m, 1), generator=g), None,
            )  # fmt: skip

    for ref, expect in ((None, 3), (7, 7)):
        cfg = StrideConfig(num_subsets=k, degree=2, members_per_subset=3, holdout=4,
                           reference_per_subset=ref, linearity_weight=0.0)  # fmt: skip
        module = fit_mod.StrideFitModule(ops, Source(), design, cfg, torch.arange(4))
        sizes: list[torch.Size] = []
        real = module._features

        def spy(p, real=real, sizes=sizes):
            sizes.append(p.shape)
            return real(p)

        monkeypatch.setattr(module, "_features", spy)
        out = module.losses(torch.tensor([0, 1]))
        assert sizes == [torch.Size([2, 3]), torch.Size([2, expect])]
        assert torch.isfinite(out["stability"])
    with pytest.raises(ValueError, match="reference_per_subset"):
        StrideConfig(reference_per_subset=0).validate(100)


def test_cosamp_recovers_a_planted_sparse_vector_exactly():
    """Noiseless y = M w with 10-sparse w on the benchmarks' design (n=1000, K=300, d=10):
    CoSaMP finds the support and the values; the sparsity bound is checked."""
    from lightning_tda.stride.design import SubsetDesign
    from lightning_tda.stride.recover import cosamp

    design = SubsetDesign.draw(torch.arange(1000), 300, 10, seed=0)
    g = torch.Generator().manual_seed(3)
    w = torch.zeros(4, 1000, dtype=torch.float64)
    for q in range(4):
        w[q, torch.randperm(1000, generator=g)[:10]] = torch.randn(10, generator=g, dtype=w.dtype)
    y = torch.from_numpy(design.matrix @ w.numpy().T).T
    got = cosamp(design.matrix, y, sparsity=10)
    torch.testing.assert_close(got.double(), w, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="sparsity"):
        cosamp(design.matrix, y, sparsity=101)
