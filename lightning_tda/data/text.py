"""Offline text data for the LightningCLI recipes, built from CPython's ``pydoc_data.topics``.

``pydoc_data`` ships with the standard library (the text of ``help("topics")``: 79 topics, ~465 kB),
so everything here works without a download:

- :class:`PydocBlocksDataModule`: byte-level LM pre-training on fixed-size blocks of the text.
- :class:`PromptCompletionDataModule`: ``(prompt, completion)`` pairs for LoRA fine-tuning, from a
  synthetic fact table or from the topics (prompt = topic name, completion = its first sentence).
- :class:`MislabeledTextDataModule`: paragraphs labelled by topic family, with a seeded fraction of
  the training labels flipped (the flipped ids are recorded) for mislabel detection.

Example ids are stable: block row in the text, pair number, paragraph number.

The tokenizer-based datamodules take their tokenizer from the model being fitted
(``trainer.lightning_module.tokenizer``, e.g. :class:`~lightning_tda.integrations.lightning_modules.LoraCausalLM`),
so a YAML recipe names the base model once; outside a Trainer set ``dm.tokenizer = tok`` first.
The training loader's ``collate_fn`` is what :class:`~lightning_tda.GradientLogger` reuses when its
``attribution_data`` is omitted.
"""

from __future__ import annotations

import re
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from lightning_tda.data.collate import PromptCompletionCollator, TextClassificationCollator
from lightning_tda.data.indexed import IndexedDataset
from lightning_tda.data.tokenizer import train_bpe_tokenizer

# Topic families for the classification task (every other topic is left out).
PYDOC_FAMILIES: dict[str, tuple[str, ...]] = {
    "statements": (
        "compound", "assignment", "augassign", "import", "try", "raise", "with", "async", "for",
        "while", "if", "else", "break", "continue", "return", "del", "global", "nonlocal",
        "assert", "pass", "yield", "await",
    ),
    "expressions": (
        "comparisons", "calls", "binary", "operator-summary", "subscriptions", "slicings", "unary",
        "power", "in", "booleans", "bitwise", "shifting", "lambda", "exprlists", "conversions",
        "atom-identifiers", "atom-literals", "attribute-references", "integers", "floating",
        "imaginary", "strings", "identifiers",
    ),
    "data model": (
        "specialnames", "customization", "attribute-access", "specialattrs", "id-classes",
        "objects", "types", "class", "function", "callable-types", "context-managers",
        "numeric-types", "sequence-types", "naming", "execmodel", "dynamic-features", "exceptions",
    ),
    "built-in types": (
        "string-methods", "typesseq", "typesseq-mutable", "typesmapping", "dict", "lists",
        "formatstrings", "typesfunctions", "typesmethods", "typesmodules", "bltin-code-objects",
        "bltin-type-objects", "bltin-null-object", "bltin-ellipsis-object", "numbers", "truth",
    ),
}  # fmt: skip

_NAMES = ("Ada", "Bram", "Cleo", "Dov", "Esme", "Fenn", "Gita", "Hugo", "Ines", "Joss")
_THINGS = (
    "red kites",
    "blue tea",
    "green maps",
    "old clocks",
    "wet stones",
    "cold soup",
    "tall ships",
)
_CITIES = ("Oslo", "Lima", "Pune", "Kyiv", "Nara")


# -- raw text --------------------------------------------------------------------------------------
def pydoc_topics() -> dict[str, str]:
    """``{topic: text}`` of CPython's ``pydoc_data.topics`` (sorted by topic name)."""
    from pydoc_data.topics import topics

    return {k: topics[k] for k in sorted(topics)}


def pydoc_blocks(block_size: int = 64) -> torch.Tensor:
    """Every complete ``block_size``-byte block of the topics text, in order.

    Returns:
        ``[n_blocks, block_size]`` int64 byte values (ASCII; other characters become ``?``).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (one byte of context), got {block_size}")
    text = "".join(pydoc_topics().values()).encode("ascii", "replace")
    n = len(text) // block_size
    raw = torch.frombuffer(bytearray(text[: n * block_size]), dtype=torch.uint8)
    return raw.long().view(n, block_size)


def pydoc_paragraphs(min_chars: int = 60, max_chars: int = 400) -> list[tuple[str, str]]:
    """``(topic, paragraph)`` pairs: blank-line separated paragraphs, whitespace collapsed, cut at
    ``max_chars``; shorter ones (headings, one-liners) are dropped."""
    out = []
    for topic, text in pydoc_topics().items():
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if len(para) >= min_chars:
                out.append((topic, para[:max_chars]))
    return out


def _first_sentence(text: str, max_chars: int) -> str:
    paras = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    body = [p for p in paras if len(p) >= 40 and not re.search(r"[*=-]{3}", p)]  # no headings
    if not body:
        return ""
    s = re.split(r"(?<=[.:])\s", body[0], maxsplit=1)[0]
    return s[:max_chars]


def qa_pairs(source: str = "facts", n: int | None = None) -> list[tuple[str, str]]:
    """``(prompt, completion)`` pairs, each completion starting with a space.

    Args:
        source: ``"facts"``: a synthetic fact table, ``"Q: What does Ada like? A:" -> " red kites in
            Oslo."`` (as many as asked, distinct); ``"pydoc"``: ``"Q: What is the Python topic 'if'
            about? A:"`` -> the topic's first sentence (79 pairs at most).
        n: number of pairs (default: 64 facts / every topic).
    """
    if source == "facts":
        n = 64 if n is None else n
        out = []
        for i in range(n):
            r = i // len(_NAMES)
            name = _NAMES[i % len(_NAMES)] + (f" {r + 1}" if r else "")
            thing, city = _THINGS[(3 * i) % len(_THINGS)], _CITIES[(2 * i + r) % len(_CITIES)]
            out.append((f"Q: What does {name} like? A:", f" {thing} in {city}."))
        return out
    if source == "pydoc":
        pairs = [
            (f"Q: What is the Python topic {k!r} about? A:", " " + s)
            for k, t in pydoc_topics().items()
            if (s := _first_sentence(t, 160))
        ]
        if n is not None and n > len(pairs):
            raise ValueError(f"source='pydoc' has {len(pairs)} pairs, asked for n={n}")
        return pairs[:n]
    raise ValueError(f"source must be 'facts' or 'pydoc', got {source!r}")


def pydoc_bpe_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained on the topics text (offline, ~0.2 s); ids 0/1 = eos/pad."""
    return train_bpe_tokenizer(pydoc_topics().values(), vocab_size=vocab_size)


# -- datamodules -----------------------------------------------------------------------------------
def _split(n_total: int, n_train: int, n_val: int, seed: int, what: str) -> tuple[np.ndarray, ...]:
    if n_train < 1 or n_val < 0 or n_train + n_val > n_total:
        raise ValueError(
            f"n_train={n_train} + n_val={n_val} must be within the {n_total} available {what}; "
            "lower n_train/n_val"
        )
    perm = np.random.default_rng(seed).permutation(n_total)
    return perm[:n_train], perm[n_train : n_train + n_val]


class _TokenizedDataModule(pl.LightningDataModule):
    """Shared tokenizer lookup, collate function and loaders; subclasses define
    ``_collator(tokenizer)``."""

    def __init__(self, batch_size: int, seed: int) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed
        self.tokenizer: Any = None
        self.train: IndexedDataset

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            model = self.trainer.lightning_module if self.trainer is not None else None
            self.tokenizer = getattr(model, "tokenizer", None)
        if self.tokenizer is None:
            raise RuntimeError(
                f"{type(self).__name__} needs a tokenizer: fit a model that has a .tokenizer attribute "
                "(LoraCausalLM, LoraSequenceClassifier) or set dm.tokenizer = tokenizer before setup()"
            )
        self.collate_fn = self._collator(self.tokenizer)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train, self.batch_size, shuffle=True, generator=g, collate_fn=self.collate_fn
        )


class PydocBlocksDataModule(pl.LightningDataModule):
    """Byte-level language modelling on ``block_size``-byte blocks of the pydoc topics text.

    Items are ``{"input_ids": LongTensor[block_size], "example_id": int}`` (default collate; every
    byte after the first is supervised). The ~7,200 blocks of 64 bytes are split with
    ``default_rng(seed).permutation``; example ids are block rows of :func:`pydoc_blocks`.

    Args:
        n_train: training blocks.
        n_val: held-out blocks (``0``: no validation).
        block_size: bytes per block.
        batch_size: training batch size.
        seed: split and shuffle seed.
    """

    def __init__(
        self,
        n_train: int = 1000,
        n_val: int = 100,
        block_size: int = 64,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed
        blocks = pydoc_blocks(block_size)
        tr, va = _split(len(blocks), n_train, n_val, seed, f"{block_size}-byte blocks")
        self.train = IndexedDataset([{"input_ids": blocks[i]} for i in tr], ids=tr.tolist())
        self.val = IndexedDataset([{"input_ids": blocks[i]} for i in va], ids=va.tolist())

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train, self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader | list:
        return DataLoader(self.val, 256) if len(self.val) else []


class PromptCompletionDataModule(_TokenizedDataModule):
    """``(prompt, completion)`` pairs (see :func:`qa_pairs`) collated by
    :class:`~lightning_tda.data.collate.PromptCompletionCollator` (prompt tokens masked).

    Items are ``{"prompt", "completion", "example_id"}``; ids are ``0..n_train-1`` in ``pairs`` order.

    Args:
        source: ``"facts"`` (synthetic fact table) or ``"pydoc"`` (topic name -> first sentence).
        n_train: training pairs (``source="pydoc"`` has 79 at most).
        batch_size: training batch size.
        max_length: truncate longer sequences to this many tokens.
        add_eos: append eos to every completion (teaches the model to stop).
        seed: shuffle seed.
    """

    def __init__(
        self,
        source: str = "facts",
        n_train: int = 64,
        batch_size: int = 8,
        max_length: int = 64,
        add_eos: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, seed)
        self.max_length, self.add_eos = max_length, add_eos
        self.pairs = qa_pairs(source, n_train)
        self.train = IndexedDataset([{"prompt": p, "completion": c} for p, c in self.pairs])

    def _collator(self, tokenizer: Any) -> Any:
        return PromptCompletionCollator(tokenizer, max_length=self.max_length, add_eos=self.add_eos)


class MislabeledTextDataModule(_TokenizedDataModule):
    """Pydoc paragraphs labelled by topic family (:data:`PYDOC_FAMILIES`), a seeded fraction flipped.

    ``noise * n_train`` training rows (rounded), chosen by ``default_rng(seed)``, get a label drawn
    uniformly from the other classes. Items are ``{"text", "label", "example_id"}`` collated by
    :class:`~lightning_tda.data.collate.TextClassificationCollator`; ids are paragraph
    numbers in :func:`pydoc_paragraphs` order. Validation labels are clean.

    Attributes:
        classes: family names; label ``i`` is ``classes[i]``.
        flipped_ids: sorted example ids whose training label was flipped.
        clean_labels: ``{example_id: true label}`` of the training rows.

    Args:
        n_train: training paragraphs (about 1,600 are available).
        n_val: held-out paragraphs.
        noise: fraction of training labels to flip, in ``[0, 1)``.
        batch_size: training batch size.
        max_length: truncate texts to this many tokens.
        seed: split, flip and shuffle seed.
    """

    def __init__(
        self,
        n_train: int = 512,
        n_val: int = 128,
        noise: float = 0.1,
        batch_size: int = 16,
        max_length: int = 48,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, seed)
        if not 0.0 <= noise < 1.0:
            raise ValueError(f"noise must be a fraction in [0, 1), got {noise!r}")
        self.max_length, self.noise = max_length, noise
        self.classes = list(PYDOC_FAMILIES)
        family = {t: i for i, ts in enumerate(PYDOC_FAMILIES.values()) for t in ts}
        # (example id = paragraph number, text, family) of the paragraphs of the chosen topics
        paras = [(k, x, family[t]) for k, (t, x) in enumerate(pydoc_paragraphs()) if t in family]
        tr, va = _split(len(paras), n_train, n_val, seed, "labelled paragraphs")
        rng = np.random.default_rng([seed, 1])
        labels = np.array([paras[i][2] for i in tr])
        flip = rng.choice(n_train, size=round(noise * n_train), replace=False)
        shift = rng.integers(1, len(self.classes), size=len(flip))
        noisy = labels.copy()
        noisy[flip] = (labels[flip] + shift) % len(self.classes)
        train_ids = [paras[i][0] for i in tr]
        self.flipped_ids = sorted(train_ids[i] for i in flip)
        self.clean_labels = dict(zip(train_ids, labels.tolist(), strict=True))
        self.train = IndexedDataset(
            [{"text": paras[i][1], "label": int(y)} for i, y in zip(tr, noisy, strict=True)],
            ids=train_ids,
        )
        self.val = IndexedDataset(
            [{"text": paras[i][1], "label": paras[i][2]} for i in va],
            ids=[paras[i][0] for i in va],
        )

    def val_dataloader(self) -> DataLoader | list:
        if not len(self.val):
            return []
        return DataLoader(self.val, 64, collate_fn=self.collate_fn)

    def is_flipped(self, example_ids: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: which of ``example_ids`` (e.g. ``store.example_ids``) carry a flipped label."""
        return torch.isin(torch.as_tensor(example_ids), torch.as_tensor(self.flipped_ids))

    def _collator(self, tokenizer: Any) -> Any:
        return TextClassificationCollator(tokenizer, max_length=self.max_length)


__all__ = [
    "PYDOC_FAMILIES",
    "MislabeledTextDataModule",
    "PromptCompletionDataModule",
    "PydocBlocksDataModule",
    "pydoc_blocks",
    "pydoc_bpe_tokenizer",
    "pydoc_paragraphs",
    "pydoc_topics",
    "qa_pairs",
]
