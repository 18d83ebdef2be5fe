"""An offline byte-level BPE tokenizer for demos and tests with config-built models."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    eos_token: str = "<|endoftext|>",
    pad_token: str = "<pad>",
) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (offline, well under a second).

    For demos and tests with config-built models; ids ``0`` and ``1`` are ``eos_token`` and ``pad_token``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token, pad_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, pad_token=pad_token)


__all__ = ["train_bpe_tokenizer"]
