"""Safety (issue 14, item 4): the store records fingerprints of the frozen weights and the captured
architecture; attributing with a model that differs is a clear StoreError naming the override."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from helpers import TinyMLP, fit_logged, make_classification, tiny_gpt2_config, trainer
from torch.utils.data import DataLoader

from lightning_tda import AttributionStore, GradientLogger
from lightning_tda.capture import fingerprint as fp
from lightning_tda.errors import ProjectionMismatchError, StoreError
from lightning_tda.integrations.transformers import (
    CausalLMModule,
    PromptCompletionCollator,
    prompt_completion_dataset,
    train_bpe_tokenizer,
)
from lightning_tda.methods.base import ModelMethod
from lightning_tda.store import open_for_update
from lightning_tda.store.fingerprints import model_differences

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

COLORS = ["red", "blue", "green", "black", "white", "pink", "gold", "grey"]
ANIMALS = ["fox", "owl", "cat", "eel", "yak", "ant", "bee", "emu"]
PAIRS = [
    (f"Q: {ANIMALS[i]} {i}?", f" {COLORS[(3 * i) % 8]} {ANIMALS[(5 * i + 1) % 8]}")
    for i in range(6)
]
OVERRIDE = "check_model=False"


def gpt2(vocab: int, seed: int):
    """The config-built GPT-2 base of tests/test_transformers.py, initialised from ``seed``."""
    torch.manual_seed(seed)
    cfg = tiny_gpt2_config(vocab)
    return transformers.GPT2LMHeadModel(cfg)


def lora_lm(vocab: int, base_seed: int = 0, r: int = 4, targets=("c_attn",)) -> CausalLMModule:
    """PEFT LoRA on ``c_attn`` (``lora_B`` moved off zero so every adapter gradient is non-zero)."""
    base = gpt2(vocab, base_seed)
    torch.manual_seed(123)  # the adapters' initialisation, the same for every base
    cfg = peft.LoraConfig(
        r=r, lora_alpha=8, target_modules=list(targets), fan_in_fan_out=True, lora_dropout=0.0
    )
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    return CausalLMModule(model, lr=0.05)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Two AdamW steps of a LoRA fine-tune logged after each step; ``(lm, store, data, collate, tok)``."""
    tmp = tmp_path_factory.mktemp("safety_lora")
    tok = train_bpe_tokenizer([p + c for p, c in PAIRS], vocab_size=300)
    collate = PromptCompletionCollator(tok)
    data = prompt_completion_dataset(PAIRS, ids=[100 + i for i in range(len(PAIRS))])
    lm = lora_lm(len(tok))
    logger = GradientLogger(
        tmp / "lora.h5",
        attribution_data=data,
        collate_fn=collate,
        batch_size=3,
        every_n_train_steps=1,
        rank=4,
        verbose=False,
    )
    trainer(tmp, [logger], max_steps=2).fit(
        lm, DataLoader(data, batch_size=3, shuffle=False, collate_fn=collate)
    )
    return lm, AttributionStore(tmp / "lora.h5"), data, collate, tok


def scores(store, lm, data, collate, **kw) -> torch.Tensor:
    return store.attribute(
        data, model=lm, method="tracin", top_k=None, collate_fn=collate, **kw
    ).scores


def independent_digest(p: torch.Tensor) -> str:
    """BLAKE2b-64 of dtype, shape and the raw bytes, written out here (not the library's helper)."""
    raw = p.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(f"{p.dtype}|{tuple(p.shape)}|".encode() + raw, digest_size=8).hexdigest()


def test_store_records_frozen_and_architecture_fingerprints(lora_run):
    lm, store, *_ = lora_run
    frozen = json.loads(store.attrs[fp.FROZEN_FINGERPRINT])
    expected = {n: independent_digest(p) for n, p in lm.named_parameters() if not p.requires_grad}
    assert frozen["granularity"] == "tensor" and frozen["hash"] == "blake2b-64"
    assert list(frozen["entries"]) == list(expected) and len(expected) > 10
    assert frozen["entries"] == expected
    assert frozen["numel"] == sum(p.numel() for p in lm.parameters() if not p.requires_grad)
    arch = json.loads(store.attrs[fp.ARCHITECTURE_FINGERPRINT])
    assert list(arch["entries"]) == [s.name for s in store.layers]
    assert all(".lora_" in name for name in arch["entries"])  # adapters only: the base is frozen


def test_another_frozen_base_is_refused_before_any_query_gradient(lora_run, monkeypatch):
    lm, store, data, collate, tok = lora_run
    other = lora_lm(len(tok), base_seed=1)  # same architecture, re-initialised base weights

    def no_featurizing(*a, **k):
        raise AssertionError("query gradients were computed before the check")

    with monkeypatch.context() as m:
        m.setattr("lightning_tda.attribution.featurize_data", no_featurizing)
        with pytest.raises(StoreError, match=OVERRIDE) as err:
            scores(store, other, data, collate)
    msg = str(err.value)
    assert "frozen weights differ" in msg and "transformer.wte.weight" in msg
    assert "captured layers differ" not in msg  # the architecture is the same
    with pytest.raises(StoreError, match=OVERRIDE):
        store.query_vectors(data, other, store.steps, collate_fn=collate)


def test_the_same_base_passes_and_the_override_skips_the_check(lora_run):
    lm, store, data, collate, tok = lora_run
    reference = scores(store, lm, data, collate)
    same = scores(store, lora_lm(len(tok), base_seed=0), data, collate)  # rebuilt: the same base
    torch.testing.assert_close(same, reference)
    other = scores(store, lora_lm(len(tok), base_seed=1), data, collate, check_model=False)
    assert other.shape == reference.shape
    # what the check protects against: another base gives other scores, silently
    assert (other - reference).abs().max() > 0.05 * reference.abs().max()


def test_another_architecture_is_refused(lora_run):
    lm, store, data, collate, tok = lora_run
    # another LoRA rank or target module changes the captured layout: refused whatever check_model
    for changed in (lora_lm(len(tok), r=8), lora_lm(len(tok), targets=("c_proj",))):
        for check in (True, False):
            with pytest.raises(ProjectionMismatchError, match="same architecture"):
                scores(store, changed, data, collate, check_model=check)
    # the same layout through another module class: the architecture fingerprint names it
    patched = lora_lm(len(tok))
    attn = patched.model.base_model.model.transformer.h[0].attn
    attn.__class__ = type("PatchedAttention", (type(attn),), {})
    with pytest.raises(StoreError, match=OVERRIDE) as err:
        scores(store, patched, data, collate)
    msg = str(err.value)
    assert "captured layers differ" in msg and "h.0.attn.c_attn.lora_A" in msg
    assert "h.1." not in msg and "frozen weights differ" not in msg
    scores(store, patched, data, collate, check_model=False)


@pytest.fixture(scope="module")
def frozen_mlp_run(tmp_path_factory):
    """TinyMLP with its first layer frozen, logged for two epochs (SGD)."""
    tmp = tmp_path_factory.mktemp("safety_mlp")
    torch.manual_seed(0)
    model = TinyMLP()
    model.net[0].requires_grad_(False)
    run = fit_logged(tmp, model, make_classification(32), epochs=2, rank=4, verbose=False)
    return run.model, run.store, make_classification(4, seed=1)


def test_mlp_with_a_perturbed_frozen_layer_is_refused(frozen_mlp_run):
    model, store, queries = frozen_mlp_run
    assert [s.name for s in store.layers] == ["net.3"]  # the frozen layer is not captured
    reference = store.attribute(queries, model=model, method="tracin", top_k=None).scores
    untouched = copy.deepcopy(model)
    torch.testing.assert_close(
        store.attribute(queries, model=untouched, method="tracin", top_k=None).scores, reference
    )
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.net[0].weight[3, 5] += 1e-4
    with pytest.raises(StoreError, match=OVERRIDE) as err:
        store.attribute(queries, model=moved, method="tracin")
    assert "net.0.weight" in str(err.value) and "net.0.bias" not in str(err.value)
    assert "1 of the store's 2 frozen parameters" in str(err.value)
    store.attribute(queries, model=moved, method="tracin", check_model=False)
    # a model in another dtype is named as such
    (note,) = model_differences(store, copy.deepcopy(model).double())
    assert "float32" in note and "float64" in note


def test_a_store_without_fingerprints_is_not_checked(frozen_mlp_run, tmp_path):
    model, store, queries = frozen_mlp_run
    old = tmp_path / "old.h5"
    shutil.copy(store.path, old)
    with open_for_update(old) as f:  # as written before the fingerprints existed
        del f.attrs[fp.FROZEN_FINGERPRINT]
        del f.attrs[fp.ARCHITECTURE_FINGERPRINT]
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.net[0].weight.add_(0.5)
    assert model_differences(AttributionStore(old), moved) == []
    AttributionStore(old).attribute(queries, model=moved, method="tracin")


def test_large_models_are_fingerprinted_by_block(lora_run, monkeypatch):
    lm, *_ = lora_run
    monkeypatch.setattr(fp, "MAX_ENTRIES_CHARS", 10)  # as if the per-tensor JSON were too large
    stored = fp.frozen_fingerprint(lm).compact()
    assert stored.granularity == "block"
    assert list(stored.entries) == [
        "model",
        "model.base_model.model.transformer.h.0",
        "model.base_model.model.transformer.h.1",
    ]
    stored = fp.Fingerprint.from_json(stored.to_json())
    assert fp.frozen_mismatches(stored, lm) == []
    moved = copy.deepcopy(lm)
    with torch.no_grad():
        moved.model.base_model.model.transformer.h[1].mlp.c_fc.weight.add_(1e-3)
    assert fp.frozen_mismatches(stored, moved) == ["model.base_model.model.transformer.h.1"]


@dataclass
class _ModelMeasuring(ModelMethod):
    """A model method (``kind = "model"``, as STRIDE) that records the model it was handed."""

    name: ClassVar[str] = "model_measuring"
    seen: list = field(default_factory=list)

    def used_checkpoints(self, store):
        return list(store.checkpoints)

    def scores(self, store, queries, model, spec=None):
        self.seen.append(model)
        return torch.zeros(len(queries), store.num_examples), None


def test_model_methods_are_checked_too(frozen_mlp_run):
    model, store, queries = frozen_mlp_run
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.net[0].bias[0] += 1e-3
    method = _ModelMeasuring()
    with pytest.raises(StoreError, match=OVERRIDE):
        store.attribute(queries, model=moved, method=method)
    assert method.seen == []  # refused before the method measured anything
    store.attribute(queries, model=moved, method=method, check_model=False)
    store.attribute(queries, model=model, method=method)
    assert method.seen == [moved, model]
