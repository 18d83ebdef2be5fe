"""Issue 14's acceptance: four modules written as users write them, the callback added unchanged.

For each module kind ((x, y, idx) tuples with ``example_ids=2``; dict batches with ``"idx"``; a
nanoGPT-style char LM with pre-shifted targets; a Hugging Face causal LM with ``labels``) every method,
STRIDE included, scores exactly as on the equivalent ``IndexedDataset`` path (same data, ids, seeds),
and in-flight logging runs on the user's unchanged loader with rows equal to the IndexedDataset path's.
The user modules never mention the library; the task says what the library cannot know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_tda import (
    AttributionStore,
    CausalLMTask,
    ClassificationTask,
    GradientLogger,
    IndexedDataset,
)
from lightning_tda.stride import StrideConfig
from lightning_tda.stride import fit as stride_fit

N, NQ, BATCH, VOCAB, T = 24, 4, 8, 14, 8
IDS = [500 + 7 * i for i in range(N)]
QIDS = list(range(NQ))
METHODS = ("graddot", "gradcos", "tracin", "tracin_adam", "influence", "source", "datainf", "auto")
STRIDE = StrideConfig(num_subsets=10, degree=2, rank=4, steps=4, holdout=6, seed=0)
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}


# -- the users' data: one table of tensors, laid out the way each user has it ------------------------
def _classes(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return {"x": x, "y": (x @ torch.randn(6, 3, generator=g)).argmax(1)}


def _tokens(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(2, VOCAB, (n, T + 1), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[::3, -2:] = 0  # some right padding
    labels = seq[:, :-1].masked_fill(mask == 0, -100)
    return {"x": seq[:, :-1], "y": seq[:, 1:], "mask": mask, "labels": labels}


class Table(Dataset):
    """Items of a column table; ``layout(row, idx)`` makes the user's item."""

    def __init__(self, cols: dict[str, torch.Tensor], ids: list[int] | None, layout) -> None:
        self.cols, self.ids_, self.layout = cols, ids, layout

    def __len__(self) -> int:
        return len(next(iter(self.cols.values())))

    def __getitem__(self, i: int) -> Any:
        row = {k: v[i] for k, v in self.cols.items()}
        return self.layout(row, None if self.ids_ is None else torch.tensor(self.ids_[i]))


def tuple_xy_idx(r, idx):
    return (r["x"], r["y"]) if idx is None else (r["x"], r["y"], idx)


def dict_xy_idx(r, idx):
    item = {"x": r["x"], "y": r["y"]}
    return item if idx is None else {**item, "idx": idx}


def hf_dict(r, idx):
    item = {"input_ids": r["x"], "attention_mask": r["mask"], "labels": r["labels"]}
    return item if idx is None else {**item, "idx": idx}


# -- the users' modules -------------------------------------------------------------------------------
class Classifier(pl.LightningModule):
    """An MLP; ``unpack`` is each user's batch layout."""

    def __init__(self, unpack) -> None:
        super().__init__()
        self.unpack = unpack
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = self.unpack(batch)
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.02)


class CharLM(pl.LightningModule):
    """nanoGPT-style: ``(x, y)`` with ``y = x`` shifted by one, loss over every position."""

    def __init__(self, unpack) -> None:
        super().__init__()
        self.unpack = unpack
        self.emb = nn.Embedding(VOCAB, 12)
        self.mix = nn.Linear(12, 12)
        self.head = nn.Linear(12, VOCAB)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(self.emb(x))))

    def training_step(self, batch, batch_idx):
        x, y = self.unpack(batch)
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.02)


class HFCausalLM(pl.LightningModule):
    """A config-built GPT-2 trained on Hugging Face batches (``labels`` shifted inside the model)."""

    def __init__(self, unpack) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=VOCAB, n_positions=T, n_embd=12, n_layer=1, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        self.unpack = unpack
        self.lm = GPT2LMHeadModel(cfg)

    def forward(self, input_ids, attention_mask=None):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch, batch_idx):
        b = self.unpack(batch)
        return self.lm(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.02)


def _own(batch):
    """The user's own layouts: ``(x, y, idx)`` -> (x, y); a dict -> its x/y (or itself for HF)."""
    if isinstance(batch, dict):
        return (batch["x"], batch["y"]) if "x" in batch else batch
    return batch[0], batch[1]


def _indexed(batch):
    """The IndexedDataset path's module: ``_, (x, y) = batch`` or a dict with ``example_id``."""
    if isinstance(batch, dict):
        return (batch["x"], batch["y"]) if "x" in batch else batch
    _, (x, y) = batch
    return x, y


@dataclass
class Case:
    module: type
    cols: Any
    layout: Any
    task: Any
    example_ids: Any  # the user's GradientLogger(example_ids=...) (None: recognised by default)


CASES = {
    "tuple_idx": Case(Classifier, _classes, tuple_xy_idx, ClassificationTask(), 2),
    "dict_idx": Case(
        Classifier, _classes, dict_xy_idx, ClassificationTask(inputs="x", targets_at="y"), None
    ),
    "nanogpt_shifted": Case(CharLM, _tokens, tuple_xy_idx, CausalLMTask(labels="shifted"), 2),
    "hf_labels": Case(HFCausalLM, _tokens, hf_dict, CausalLMTask(labels="hf"), None),
}


def _data(case: Case, user: bool, seed: int, ids: list[int]) -> Dataset:
    cols = case.cols(len(ids), seed)
    if user:  # the id is a field of the user's own items
        return Table(cols, ids, case.layout)
    return IndexedDataset(Table(cols, None, case.layout), ids=ids)


def _fit(tmp_path, name: str, case: Case, user: bool, mode: str = "sweep") -> tuple:
    train = _data(case, user, 0, IDS)
    torch.manual_seed(0)
    model = case.module(_own if user else _indexed)
    ids_kw = {"example_ids": case.example_ids} if user else {}
    if mode == "sweep":
        logger = GradientLogger(
            tmp_path / f"{name}.h5", attribution_data=train, every_n_epochs=1, preset="fast",
            task=case.task, verbose=False, **ids_kw,
        )  # fmt: skip
    else:
        logger = GradientLogger(
            tmp_path / f"{name}.h5", mode="in_flight", task=case.task, verbose=False, **ids_kw
        )
    loader = DataLoader(
        train, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    trainer(tmp_path, [logger], max_epochs=2).fit(model, loader)
    return AttributionStore(logger.path), model, train


def _all_scores(store, model, case: Case, user: bool, train) -> dict[str, torch.Tensor]:
    queries = _data(case, user, 5, QIDS)
    out = {
        m: store.attribute(queries, model=model, method=m, top_k=None, task=case.task).scores
        for m in METHODS
    }
    stride_fit(store, model, train, STRIDE, task=case.task, trainer_kwargs=QUIET)
    out["stride"] = store.attribute(
        queries, model=model, method="stride", top_k=None, task=case.task
    ).scores
    return out


@pytest.mark.parametrize("kind", sorted(CASES))
def test_every_method_scores_user_batches_as_the_indexed_path(tmp_path, kind):
    case = CASES[kind]
    store_u, model_u, train_u = _fit(tmp_path, "user", case, user=True)
    store_i, model_i, train_i = _fit(tmp_path, "indexed", case, user=False)
    assert store_u.example_ids.tolist() == IDS == store_i.example_ids.tolist()
    for step in store_u.steps:
        assert torch.equal(store_u.read(step, "train"), store_i.read(step, "train"))
    got = _all_scores(store_u, model_u, case, True, train_u)
    want = _all_scores(store_i, model_i, case, False, train_i)
    for m in (*METHODS, "stride"):
        assert torch.isfinite(got[m]).all(), m
        assert torch.equal(got[m], want[m]), m
    assert got["tracin"].abs().sum() > 0 and got["stride"].abs().sum() > 0


@pytest.mark.parametrize("kind", sorted(CASES))
def test_in_flight_logging_runs_on_the_unchanged_loader(tmp_path, kind):
    case = CASES[kind]
    store_u, _, _ = _fit(tmp_path, "user", case, user=True, mode="in_flight")
    store_i, _, _ = _fit(tmp_path, "indexed", case, user=False, mode="in_flight")
    assert store_u.steps == store_i.steps and len(store_u.steps) == 2 * (N // BATCH)
    for step in store_u.steps:
        (ids_u, rows_u), (ids_i, rows_i) = store_u.batch_rows(step), store_i.batch_rows(step)
        assert torch.equal(ids_u, ids_i) and set(ids_u.tolist()) <= set(IDS)
        assert torch.equal(rows_u, rows_i)
