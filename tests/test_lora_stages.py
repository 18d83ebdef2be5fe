"""Pre-training store + LoRA fine-tune store as one two-stage SOURCE run, against torch.func oracles."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import trainer
from torch.func import functional_call, grad
from torch.utils.data import DataLoader

from lightning_tda import AttributionStore, GradientLogger, Task
from lightning_tda.capture.layers import ProjectionMismatchError
from lightning_tda.integrations.transformers import (
    CausalLMModule,
    PromptCompletionCollator,
    completion_queries,
    prompt_completion_dataset,
    train_bpe_tokenizer,
)
from lightning_tda.methods import Source
from lightning_tda.staged import merge_lora, source_pretrain_then_lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

COLORS = ["red", "blue", "green", "black", "white", "pink", "gold", "grey"]
ANIMALS = ["fox", "owl", "cat", "eel", "yak", "ant", "bee", "emu"]
PRE = [
    (f"Q: {ANIMALS[i]} {i}?", f" {COLORS[(3 * i) % 8]} {ANIMALS[(5 * i + 1) % 8]}")
    for i in range(8)
]
FT = [
    (f"Q: {COLORS[i]} {i}?", f" {ANIMALS[(3 * i) % 8]} {COLORS[(5 * i + 2) % 8]}") for i in range(8)
]
QUERIES = [PRE[1], FT[2], (f"Q: {ANIMALS[3]} 3?", f" {COLORS[1]} {ANIMALS[0]}")]
SCALE = (
    1e-4  # logged pre-training rows are SCALE * gradient, so η̄K·H → 0: SOURCE = lr-weighted TracIn
)
LORA_SCALING = 8 / 4  # lora_alpha / r


def _scaled_loss(model, batch):
    return SCALE * model.per_example_loss(batch)


def _fit(tmp, name, lm, pairs, ids, tok, loss_fn=None):
    collate = PromptCompletionCollator(tok)
    data = prompt_completion_dataset(pairs, ids=ids)
    logger = GradientLogger(
        tmp / f"{name}.h5",
        attribution_data=data,
        collate_fn=collate,
        batch_size=4,
        every_n_train_steps=1,
        projection="exact",
        dtype="float32",
        loss_fn=loss_fn,
        verbose=False,
    )
    loader = DataLoader(data, batch_size=4, shuffle=False, collate_fn=collate)
    trainer(tmp, [logger], max_steps=3).fit(lm, loader)
    return AttributionStore(tmp / f"{name}.h5")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    tok = train_bpe_tokenizer([p + c for p, c in PRE + FT + QUERIES], vocab_size=300)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    pre_lm = CausalLMModule(transformers.GPT2LMHeadModel(cfg), lr=0.5, optimizer="sgd")
    pre = _fit(tmp, "pre", pre_lm, PRE, list(range(8)), tok, _scaled_loss)
    lcfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.1
    )
    lora = peft.get_peft_model(copy.deepcopy(pre_lm.model), lcfg)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 1.0)
    ft_lm = CausalLMModule(lora, lr=0.05, optimizer="sgd")
    ft = _fit(tmp, "ft", ft_lm, FT, [100 + i for i in range(8)], tok)
    queries = completion_queries(tok, QUERIES, ids=[7, 8, 9])
    return pre_lm, ft_lm, pre, ft, queries, tok


def _nll(gpt, theta, prompt_ids, completion_ids):
    ids = torch.tensor([prompt_ids + completion_ids])
    pos = torch.arange(len(prompt_ids), ids.shape[1])
    logits = functional_call(gpt, theta, (), {"input_ids": ids}).logits[0]
    return -logits.log_softmax(-1)[pos - 1, ids[0, pos]].sum()


def _grads(gpt, full, names, pairs, tok) -> torch.Tensor:
    """``[len(pairs), P]`` exact gradients w.r.t. ``names`` at parameters ``full`` (one example at a time)."""
    collate = PromptCompletionCollator(tok)
    out = []
    for prompt, completion in pairs:
        p, c = collate.encode(prompt, completion)

        def f(sub, p=p, c=c):
            return _nll(gpt, {**full, **sub}, p, c)

        g = grad(f)({n: full[n] for n in names})
        out.append(torch.cat([g[n].reshape(-1) for n in names]))
    return torch.stack(out).double()


def _oracle_stage1(pre_lm, ft_lm, pre, tok) -> torch.Tensor:
    """``[Q, N1]`` Σ_c η_c <∇_W ℓ_q(merged final), SCALE·∇ℓ_z(θ_c)> / N1 with a hand-made merge."""
    gpt = copy.deepcopy(pre_lm.model).eval()
    names = [p.removeprefix("model.") for s in pre.layers for p in s.params]
    # final fine-tuned model, merged by hand: W + s·(B A)^T for GPT-2's Conv1D (fan_in_fan_out)
    ft_params = dict(ft_lm.model.named_parameters())
    merged = {}
    for n, _ in gpt.named_parameters():
        key = n.replace(".c_attn.", ".c_attn.base_layer.")
        src = ft_params.get(f"base_model.model.{key}", ft_params.get(f"base_model.model.{n}"))
        merged[n] = src.detach().clone()
        if n.endswith("c_attn.weight"):
            mod = n.removesuffix(".weight")
            a = ft_params[f"base_model.model.{mod}.lora_A.default.weight"].detach()
            b = ft_params[f"base_model.model.{mod}.lora_B.default.weight"].detach()
            merged[n] = merged[n] + LORA_SCALING * (b @ a).T
    gq = _grads(gpt, merged, names, QUERIES, tok)
    order = [int(i) for i in pre.example_ids]
    total = 0
    for c in pre.checkpoints:
        state = {k.removeprefix("model."): v for k, v in pre.state(c.global_step).items()}
        full = {n: state.get(n, t.detach()) for n, t in gpt.named_parameters()}
        gz = _grads(gpt, full, names, [PRE[i] for i in order], tok)
        total = total + c.lr_sum[0] * (gq @ (SCALE * gz).T)
    return total / len(order)


def _centered_pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson of per-query centred scores (the rows share a large common offset)."""
    a, b = (x - x.mean(1, keepdim=True) for x in (a, b))
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def test_stage_scores_equal_oracles_and_union(run):
    pre_lm, ft_lm, pre, ft, queries, tok = run
    assert pre.steps == [1, 2, 3] and ft.steps == [1, 2, 3]
    # the fine-tune froze the pre-trained weights: the LoRA model's base is the last pre-training state
    last = pre.state(pre.steps[-1])
    base = dict(ft_lm.model.named_parameters())
    w = "model.transformer.h.0.mlp.c_fc.weight"
    torch.testing.assert_close(base["base_model.model.transformer.h.0.mlp.c_fc.weight"], last[w])
    dense = source_pretrain_then_lora(
        pre, ft, queries, ft_lm, pretrain_source=Source(segments=1), top_k=None
    )
    n1 = pre.num_examples
    assert dense.example_ids.tolist() == pre.example_ids.tolist() + ft.example_ids.tolist()
    assert dense.scores.shape == (3, n1 + ft.num_examples)
    assert dense.query_ids.tolist() == [7, 8, 9]
    # (1) stage 1 == lr-weighted TracIn at the merged final model (torch.func brute force)
    ref = _oracle_stage1(pre_lm, ft_lm, pre, tok)
    got = dense.scores[:, :n1].double()
    assert ref.abs().max() > 0 and got.std() > 0
    assert _centered_pearson(got, ref) > 0.9999
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    ft_alone = ft.attribute(queries, model=ft_lm, method=Source(), top_k=None)
    # stage 2 == SOURCE on the LoRA store alone
    torch.testing.assert_close(dense.scores[:, n1:], ft_alone.scores, rtol=0, atol=0)
    # (2) top-k over the union: every example exactly once in a full-width ranking, equals dense
    n = n1 + ft.num_examples
    full = source_pretrain_then_lora(
        pre, ft, queries, ft_lm, pretrain_source=Source(segments=1), top_k=n
    )
    for q in range(3):
        assert sorted(full.indices[q].tolist()) == sorted(dense.example_ids.tolist())
        assert sorted(full.opponents[q].tolist()) == sorted(dense.example_ids.tolist())
    k = 5
    top = source_pretrain_then_lora(
        pre, ft, queries, ft_lm, pretrain_source=Source(segments=1), top_k=k
    )
    exp = dense.scores.topk(k, dim=1)
    torch.testing.assert_close(top.scores, exp.values)
    assert torch.equal(top.indices, dense.example_ids[exp.indices])
    low = dense.scores.topk(k, dim=1, largest=False)
    torch.testing.assert_close(top.opponent_scores, low.values)
    assert torch.equal(top.opponents, dense.example_ids[low.indices])
    # the top-k lists mix both stages (stage-1 rows are SCALE-d, so they sit near 0)
    ranked = torch.cat([top.indices, top.opponents], 1)
    assert {int(i) >= 100 for i in ranked.flatten()} == {True, False}


def test_merged_weights_matter(run):
    """Stage-1 query gradients at the pre-trained weights (adapters off) give different scores."""
    pre_lm, ft_lm, pre, ft, queries, _ = run
    src = Source(segments=1)
    merged = source_pretrain_then_lora(pre, ft, queries, ft_lm, pretrain_source=src, top_k=None)
    # the pre-training store was logged with a loss_fn (not rebuildable from the file): say that
    # the queries measure the module's own loss, as the merged path does
    unmerged = pre.attribute(queries, model=pre_lm, method=src, top_k=None, task=Task())
    n1 = pre.num_examples
    ref = merged.scores[:, :n1].double()
    assert (unmerged.scores.double() - ref).norm() > 0.2 * ref.norm()
    assert _centered_pearson(unmerged.scores.double(), ref) < 0.99


def test_clear_errors(run):
    pre_lm, ft_lm, pre, ft, queries, _ = run
    with pytest.raises(ValueError, match="lora_id_offset"):
        source_pretrain_then_lora(pre, ft, queries, ft_lm, lora_id_offset=-100)
    with pytest.raises(ProjectionMismatchError, match="pretrain_model_factory"):
        source_pretrain_then_lora(
            pre, ft, queries, ft_lm.model
        )  # bare PeftModel: no "model." prefix
    with pytest.raises(ProjectionMismatchError, match="pretrain_model_factory"):
        source_pretrain_then_lora(
            pre, ft, queries, ft_lm, pretrain_model_factory=lambda m: merge_lora(m).model
        )
    with pytest.raises(ValueError, match="no PEFT model"):
        source_pretrain_then_lora(pre, ft, queries, pre_lm)
    # a fine-tune that did not start from the last pre-training checkpoint
    moved = copy.deepcopy(ft_lm)
    with torch.no_grad():
        moved.model.base_model.model.transformer.h[1].mlp.c_fc.weight.add_(0.1)
    with pytest.raises(ValueError, match=r"frozen base differs.*h\.1\.mlp\.c_fc\.weight"):
        source_pretrain_then_lora(pre, ft, queries, moved)
    with pytest.raises(ValueError, match="frozen base differs"):  # step 2 is not where it started
        source_pretrain_then_lora(
            pre, ft, queries, ft_lm, pretrain_source=Source(checkpoints=[1, 2])
        )
    # an offset renames the fine-tune ids (100..107 -> 8..15) in the result
    res = source_pretrain_then_lora(pre, ft, queries, ft_lm, lora_id_offset=-92, top_k=2)
    assert res.example_ids.tolist() == list(range(16))
    assert res.indices.shape == (3, 2) and int(res.indices.max()) <= 15
    # merge_lora leaves the fine-tuned model untouched
    assert any("lora_A" in n for n, _ in ft_lm.named_parameters())
