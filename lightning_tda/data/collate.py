"""Collate functions for tokenized text: prompt-masked ``(prompt, completion)`` pairs and labelled texts.

A tokenizer is anything callable as ``tokenizer(text, add_special_tokens=...)["input_ids"]`` (a Hugging
Face tokenizer); transformers is not imported here. Items may carry example ids (``IndexedDataset``);
the batches keep them under ``"example_id"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_tda.data.indexed import EXAMPLE_ID_KEY, Indexed

IGNORE_INDEX = -100
"""Label of tokens that are not supervised (prompt and padding), as in Hugging Face."""


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    raise ValueError(
        "the tokenizer has neither a pad nor an eos token; set one, e.g. tokenizer.pad_token = tokenizer.eos_token "
        "or tokenizer.add_special_tokens({'pad_token': '<pad>'}) (and resize the model's embeddings)"
    )


def _split_item(item: Any) -> tuple[Any, Any]:
    """``(example id or None, data)`` of one dataset item."""
    if isinstance(item, Indexed):
        return item.example_id, item.data
    if isinstance(item, Mapping) and EXAMPLE_ID_KEY in item:
        return item[EXAMPLE_ID_KEY], item
    return None, item


def _collect_ids(ids: list[Any]) -> dict[str, torch.Tensor]:
    if all(i is None for i in ids):
        return {}
    if any(i is None for i in ids):
        raise ValueError(
            "some items carry example ids and some do not; wrap the whole dataset in IndexedDataset"
        )
    return {EXAMPLE_ID_KEY: torch.as_tensor([int(i) for i in ids], dtype=torch.int64)}


@dataclass
class PromptCompletionCollator:
    """Tokenize ``(prompt, completion)`` pairs into a right-padded, prompt-masked batch.

    Items are dicts with ``"prompt"`` and ``"completion"`` (``IndexedDataset`` adds ``"example_id"``),
    ``Indexed(example_id, (prompt, completion))`` or plain ``(prompt, completion)`` pairs. Prompt and
    completion are tokenized separately (the prompt with the tokenizer's special tokens, e.g. BOS; the
    completion without) and concatenated, so the label mask is exact whatever the tokenizer merges.
    The first token of a sequence has no context and is never supervised: give a non-empty prompt
    (or a tokenizer that adds BOS) to score the whole completion.

    Args:
        tokenizer: a Hugging Face tokenizer (needs a pad or eos token for padding).
        max_length: truncate longer sequences: prompt tokens are dropped from the left first (keeping
            at least one, so the first completion token keeps its context), then completion tokens
            from the right.
        add_eos: append the eos token to every completion (supervised), teaching the model to stop.
        pad_to_multiple_of: round the padded length up to a multiple of this.

    Returns (``__call__``):
        ``{"input_ids" [B, T], "attention_mask" [B, T], "labels" [B, T], "example_id" [B]}`` (int64;
        ``example_id`` only when the items carry ids).
    """

    tokenizer: Any
    max_length: int | None = None
    add_eos: bool = False
    pad_to_multiple_of: int | None = None

    def encode(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """Token ids of the prompt and of the completion (after truncation)."""
        p = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else []
        c = list(self.tokenizer(completion, add_special_tokens=False)["input_ids"])
        if self.add_eos:
            eos = getattr(self.tokenizer, "eos_token_id", None)
            if eos is None:
                raise ValueError("add_eos=True needs a tokenizer with an eos token")
            c.append(int(eos))
        if self.max_length is not None and len(p) + len(c) > self.max_length:
            keep_p = max(self.max_length - len(c), min(len(p), 1))
            p = p[len(p) - keep_p :] if keep_p else []
            c = c[: self.max_length - len(p)]
        return p, c

    def __call__(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        ids, seqs = [], []
        for item in items:
            example_id, data = _split_item(item)
            if isinstance(data, Mapping):
                if "prompt" not in data or "completion" not in data:
                    raise KeyError(
                        f"items need 'prompt' and 'completion' keys, got {sorted(data)}; "
                        "for plain text use prompt=''"
                    )
                prompt, completion = data["prompt"], data["completion"]
            else:
                prompt, completion = data
            ids.append(example_id)
            seqs.append(self.encode(prompt, completion))
        t = max(len(p) + len(c) for p, c in seqs)
        if self.pad_to_multiple_of:
            t = -(-t // self.pad_to_multiple_of) * self.pad_to_multiple_of
        b = len(seqs)
        input_ids = torch.full((b, t), _pad_id(self.tokenizer), dtype=torch.int64)
        attention_mask = torch.zeros(b, t, dtype=torch.int64)
        labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.int64)
        for i, (p, c) in enumerate(seqs):
            n = len(p) + len(c)
            input_ids[i, :n] = torch.tensor(p + c, dtype=torch.int64)
            attention_mask[i, :n] = 1
            labels[i, len(p) : n] = torch.tensor(c, dtype=torch.int64)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            **_collect_ids(ids),
        }


@dataclass
class TextClassificationCollator:
    """Tokenize ``{"text", "label"}`` items (``IndexedDataset`` adds ``"example_id"``) into a padded batch.

    Returns (``__call__``):
        ``{"input_ids" [B, T], "attention_mask" [B, T], "labels" [B], "example_id" [B]}``.
    """

    tokenizer: Any
    max_length: int | None = None
    text_key: str = "text"
    label_key: str = "label"

    def __call__(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        ids, texts, labels = [], [], []
        for item in items:
            example_id, data = _split_item(item)
            if isinstance(data, Mapping):
                text, label = data[self.text_key], data[self.label_key]
            else:
                text, label = data
            ids.append(example_id)
            texts.append(text)
            labels.append(label)
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=self.max_length is not None,
            max_length=self.max_length,
            return_tensors="pt",
        )
        out = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        out["labels"] = torch.as_tensor(labels)
        return {**out, **_collect_ids(ids)}


__all__ = ["IGNORE_INDEX", "PromptCompletionCollator", "TextClassificationCollator"]
