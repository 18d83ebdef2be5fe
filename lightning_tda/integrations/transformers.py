"""Hugging Face transformers and PEFT LoRA: Lightning wrappers, prompt-masked batches and queries.

A causal LM (plain or a ``peft`` ``PeftModel``) goes into :class:`CausalLMModule`; batches of
``(prompt, completion)`` pairs come from :class:`PromptCompletionCollator` (prompt tokens and padding
carry label ``-100``, example ids are kept); the :class:`~lightning_tda.GradientLogger` then captures
every trainable linear layer. On a PEFT model the base is frozen, so only the adapter matrices
(``lora_A`` and ``lora_B`` of every targeted module, plus any ``modules_to_save`` head) are captured
and saved; queries are recomputed at each checkpoint with that adapter state loaded into the model
you pass (its frozen base weights must be the ones that were fine-tuned).

Example::

    from peft import LoraConfig, get_peft_model
    lm = CausalLMModule(get_peft_model(hf_model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])))
    collate = PromptCompletionCollator(tokenizer)
    train = prompt_completion_dataset(pairs)                        # IndexedDataset, ids 0..N-1
    logger = GradientLogger("lora.h5", attribution_data=train, collate_fn=collate, projection="exact")
    L.Trainer(max_epochs=1, callbacks=[logger]).fit(lm, DataLoader(train, 8, collate_fn=collate))
    res = AttributionStore("lora.h5").attribute(
        completion_queries(tokenizer, [("Q: capital of France?", " Paris")]), model=lm, method="datainf"
    )

transformers is not imported by this module (only :func:`train_bpe_tokenizer` imports it); a
tokenizer is anything callable as ``tokenizer(text, add_special_tokens=...)["input_ids"]``. The
collators and the tokenizer live in :mod:`lightning_tda.data.collate` and
:mod:`lightning_tda.data.tokenizer` and are re-exported here under their old names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tda.data.collate import (  # noqa: F401 (re-exported; the collators live in data/)
    IGNORE_INDEX,
    PromptCompletionCollator,
    TextClassificationCollator,
)
from lightning_tda.data.indexed import EXAMPLE_ID_KEY, IndexedDataset, strip_example_ids
from lightning_tda.data.targets import Targets
from lightning_tda.data.tokenizer import train_bpe_tokenizer  # noqa: F401 (re-exported)
from lightning_tda.errors import ConfigError

_NON_INPUT_KEYS = ("labels", EXAMPLE_ID_KEY)


# -- models ----------------------------------------------------------------------------------------
def is_peft_model(model: nn.Module) -> bool:
    """``True`` for a ``peft`` ``PeftModel`` (duck-typed: peft need not be installed)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def check_adapters_active(model: nn.Module) -> None:
    """Raise if a PEFT model's adapters are merged into the base weights or disabled.

    Either way the ``lora_A``/``lora_B`` linears are skipped in the forward pass, so their captured
    gradients would be silently zero.
    """
    for name, module in model.named_modules():
        if (
            getattr(module, "merged", False) is True
            or getattr(module, "disable_adapters", False) is True
        ):
            state = "merged into the base weights" if module.merged else "disabled"
            raise ValueError(
                f"the LoRA adapters of {name!r} are {state}, so their gradients (and every attribution "
                "score) would be zero. Call model.unmerge_adapter() / leave the disable_adapter() context "
                "before logging or attributing."
            )


def _model_inputs(batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """``(model kwargs, labels)`` of a dict batch (``Indexed`` batches are unwrapped)."""
    data = strip_example_ids(batch)
    if not isinstance(data, Mapping) or "input_ids" not in data:
        raise TypeError(
            "transformers wrappers expect dict batches with 'input_ids' (and 'attention_mask', 'labels'); "
            f"got {type(data).__name__}. Collate with PromptCompletionCollator / TextClassificationCollator."
        )
    inputs = {
        k: v for k, v in data.items() if k not in _NON_INPUT_KEYS and isinstance(v, torch.Tensor)
    }
    return inputs, data.get("labels")


class _HFModule(pl.LightningModule):
    """Shared optimiser setup and loss logging of the transformers wrappers; subclasses define
    ``per_example_loss(batch) -> Tensor[B]``."""

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        weight_decay: float,
        optimizer: str,
        momentum: float,
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"optimizer must be 'adamw', 'adam' or 'sgd', got {optimizer!r}")
        self.model = model
        self.lr, self.weight_decay, self.optimizer, self.momentum = (
            lr,
            weight_decay,
            optimizer,
            momentum,
        )

    @property
    def is_peft(self) -> bool:
        """Whether the wrapped model is a PEFT ``PeftModel`` (only its adapters train)."""
        return is_peft_model(self.model)

    def _peft_guard(self) -> None:
        if self.is_peft:
            check_adapters_active(self.model)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        losses = self.per_example_loss(batch)
        if self._trainer is not None:
            self.log("train_loss", losses.mean(), prog_bar=True, batch_size=losses.numel())
        return losses.mean()

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        losses = self.per_example_loss(batch)
        if self._trainer is not None:
            self.log("val_loss", losses.mean(), prog_bar=True, batch_size=losses.numel())
        return losses.mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                "the model has no trainable parameters; unfreeze some or wrap it with peft.get_peft_model"
            )
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        cls = torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=self.lr, weight_decay=self.weight_decay)


class CausalLMModule(_HFModule):
    """LightningModule around a transformers causal LM (plain or a PEFT ``PeftModel``).

    Batches are dicts with ``input_ids`` ``[B, T]``, optional ``attention_mask`` ``[B, T]`` and
    ``labels`` ``[B, T]`` (``-100`` on prompt and padding tokens; without ``labels`` every attended
    token is supervised), plus the ``example_id`` ``[B]`` the logger needs. Any other tensor key is
    passed to the model. Labels follow the Hugging Face convention: ``labels[:, t]`` is predicted
    from ``logits[:, t-1]``; :meth:`targets` declares it (``Targets(labels, shift=True)``) for STRIDE.

    Args:
        model: e.g. ``GPT2LMHeadModel``, ``LlamaForCausalLM`` or ``get_peft_model(...)`` of one.
        lr: learning rate.
        weight_decay: weight decay.
        optimizer: ``"adamw"`` (default), ``"adam"`` or ``"sgd"``; only trainable parameters are optimised.
        momentum: SGD momentum.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        momentum: float = 0.0,
    ) -> None:
        super().__init__(model, lr, weight_decay, optimizer, momentum)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """``[B, T, V]`` logits."""
        return self.model(**inputs, use_cache=False).logits

    def per_token_loss(self, batch: Any) -> torch.Tensor:
        """``[B, T]`` token losses aligned with ``labels``: entry ``t`` is ``-log p(labels[t] | tokens < t)``,
        0 at position 0 and wherever the label is ``-100``."""
        inputs, labels = _model_inputs(batch)
        self._peft_guard()
        if labels is None:
            labels = _labels_from_inputs(inputs)
        logits = self(**inputs)
        b, t, v = logits.shape
        if labels.shape != (b, t):
            raise ValueError(
                f"labels have shape {tuple(labels.shape)} but the logits are [B, T] = [{b}, {t}]"
            )
        tok = F.cross_entropy(
            logits[:, :-1].reshape(-1, v).float(),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(b, t - 1)
        return F.pad(tok, (1, 0))

    def per_example_loss(self, batch: Any) -> torch.Tensor:
        """``[B]`` completion losses: token cross-entropies SUMMED over supervised tokens."""
        return self.per_token_loss(batch).sum(dim=1)

    def targets(self, batch: Any) -> Targets:
        """The batch's ``labels`` ``[B, T]`` (every attended token without them), in the Hugging
        Face convention: the output at ``t`` predicts ``labels[:, t + 1]`` (``shift=True``)."""
        inputs, labels = _model_inputs(batch)
        return Targets(_labels_from_inputs(inputs) if labels is None else labels, shift=True)


class SequenceClassifierModule(_HFModule):
    """LightningModule around a transformers sequence classifier (plain or PEFT ``SEQ_CLS``).

    Batches are dicts with ``input_ids``, ``attention_mask``, ``labels`` ``[B]`` (``[B, C]`` floats for
    multi-label, ``[B]`` floats for regression) and ``example_id``. The per-example loss is
    cross-entropy (single label), squared error (``num_labels == 1``, regression) or binary
    cross-entropy summed over labels (``problem_type="multi_label_classification"``).

    Args:
        model: e.g. ``BertForSequenceClassification`` or ``GPT2ForSequenceClassification`` (set
            ``config.pad_token_id`` so GPT-2 finds the last real token).
        lr, weight_decay, optimizer, momentum: see :class:`CausalLMModule`.
        problem_type: override ``model.config.problem_type``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        momentum: float = 0.0,
        problem_type: str | None = None,
    ) -> None:
        super().__init__(model, lr, weight_decay, optimizer, momentum)
        config = getattr(model, "config", None)
        if problem_type is None:
            problem_type = getattr(config, "problem_type", None)
        if problem_type is None:
            problem_type = (
                "regression"
                if getattr(config, "num_labels", 2) == 1
                else "single_label_classification"
            )
        kinds = ("single_label_classification", "multi_label_classification", "regression")
        if problem_type not in kinds:
            raise ValueError(f"problem_type must be one of {kinds}, got {problem_type!r}")
        self.problem_type = problem_type

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` logits."""
        return self.model(**inputs).logits

    def per_example_loss(self, batch: Any) -> torch.Tensor:
        """``[B]`` per-example losses."""
        inputs, labels = _model_inputs(batch)
        self._peft_guard()
        if labels is None:
            raise KeyError("the batch has no 'labels'")
        logits = self(**inputs).float()
        if self.problem_type == "single_label_classification":
            return F.cross_entropy(logits, labels.long(), reduction="none")
        if self.problem_type == "regression":
            return (
                (logits.reshape(labels.shape[0], -1) - labels.float().reshape(labels.shape[0], -1))
                .pow(2)
                .sum(1)
            )
        return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").sum(1)

    def targets(self, batch: Any) -> Targets:
        """The class ids ``labels`` ``[B]``, aligned with the logits ``[B, C]`` (``shift=False``)."""
        _, labels = _model_inputs(batch)
        if labels is None:
            raise KeyError("the batch has no 'labels'")
        if self.problem_type != "single_label_classification":
            raise ConfigError(
                f"STRIDE measures cross-entropy against class ids; problem_type="
                f"{self.problem_type!r} has none (single_label_classification only)"
            )
        return Targets(labels.long(), shift=False)


def _labels_from_inputs(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    labels = inputs["input_ids"].clone()
    mask = inputs.get("attention_mask")
    if mask is not None:
        labels[mask == 0] = IGNORE_INDEX
    return labels


def _unwrap(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, _HFModule) else model


def prompt_completion_dataset(
    pairs: Iterable[tuple[str, str]], ids: Sequence[int] | None = None
) -> IndexedDataset:
    """An :class:`~lightning_tda.IndexedDataset` of ``{"prompt", "completion"}`` items (ids default ``0..N-1``);
    collate it with :class:`PromptCompletionCollator`."""
    items = [{"prompt": p, "completion": c} for p, c in pairs]
    return IndexedDataset(items, ids=ids)


class BatchRows(torch.utils.data.Dataset):
    """The rows of a collated batch as a dataset: item ``i`` is ``{key: tensor[i]}`` (default-collatable)."""

    def __init__(self, batch: Mapping[str, torch.Tensor]) -> None:
        self.batch = {
            k: v for k, v in batch.items() if k != EXAMPLE_ID_KEY and isinstance(v, torch.Tensor)
        }
        sizes = {v.shape[0] for v in self.batch.values()}
        if len(sizes) != 1:
            raise ValueError(f"batch tensors disagree on the batch size: {sorted(sizes)}")
        (self.n,) = sizes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


def completion_queries(
    tokenizer: Any,
    pairs: Iterable[tuple[str, str]],
    ids: Sequence[int] | None = None,
    **collator_kwargs: Any,
) -> IndexedDataset:
    """Queries measuring ``log p(completion | prompt)`` for each pair, ready for ``store.attribute``.

    The query loss is the summed negative log-likelihood of the completion tokens, so a proponent
    (score > 0) is a training example that made the completion more likely. The pairs are tokenized
    with :class:`PromptCompletionCollator` and padded to one length, so the default ``collate_fn``
    batches them.

    Returns:
        an :class:`~lightning_tda.IndexedDataset` of ``{"input_ids", "attention_mask", "labels"}`` rows
        (``[T]`` each), query ids ``ids`` (default ``0..Q-1``).
    """
    pairs = list(pairs)
    if not pairs:
        raise ValueError("completion_queries got no (prompt, completion) pairs")
    batch = PromptCompletionCollator(tokenizer, **collator_kwargs)(pairs)
    return IndexedDataset(BatchRows(batch), ids=ids)


def per_token_queries(batch: Mapping[str, torch.Tensor], row: int = 0) -> IndexedDataset:
    """Split one sequence of a collated batch into one query per supervised token.

    Query ``j`` repeats row ``row`` with every label but the ``j``-th supervised one set to ``-100``;
    its query id is that token's position. The query losses sum to the sequence's loss, and for
    methods linear in the query gradient (``graddot``, ``tracin``, ``influence``, ``datainf``) the
    per-token scores sum to the sequence's scores.

    Returns:
        an :class:`~lightning_tda.IndexedDataset` of ``J`` rows (``J`` = supervised tokens of the row),
        ids = token positions.
    """
    labels = batch["labels"][row]
    pos = (labels != IGNORE_INDEX).nonzero().flatten()
    if pos.numel() == 0:
        raise ValueError(f"row {row} has no supervised token (every label is -100)")
    j = pos.numel()
    out = {
        k: v[row : row + 1].expand(j, *v.shape[1:]).clone()
        for k, v in batch.items()
        if k not in _NON_INPUT_KEYS and isinstance(v, torch.Tensor)
    }
    tok_labels = torch.full((j, labels.shape[0]), IGNORE_INDEX, dtype=labels.dtype)
    tok_labels[torch.arange(j), pos] = labels[pos]
    out["labels"] = tok_labels
    return IndexedDataset(BatchRows(out), ids=pos.tolist())


@torch.no_grad()
def completion_logprob(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[str],
    completion: str | Sequence[str],
    **collator_kwargs: Any,
) -> torch.Tensor:
    """``log p(completion | prompt)``: the summed log-probability of the completion tokens.

    Args:
        model: a transformers causal LM, a ``PeftModel`` of one, or a :class:`CausalLMModule`.
        tokenizer: its tokenizer.
        prompt, completion: strings, or equal-length lists of strings.
        **collator_kwargs: passed to :class:`PromptCompletionCollator` (e.g. ``add_eos=True``).

    Returns:
        a 0-d tensor for strings, ``[B]`` for lists (eval mode; the model's mode is restored).
    """
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    completions = [completion] if isinstance(completion, str) else list(completion)
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if any(not p for p in prompts) and getattr(tokenizer, "bos_token_id", None) is None:
        raise ValueError(
            "an empty prompt leaves the first completion token without context; pass a non-empty prompt"
        )
    lm = model if isinstance(model, CausalLMModule) else CausalLMModule(_unwrap(model))
    batch = PromptCompletionCollator(tokenizer, **collator_kwargs)(
        list(zip(prompts, completions, strict=True))
    )
    device = next(lm.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = lm.model.training
    lm.model.eval()
    try:
        out = -lm.per_example_loss(batch)
    finally:
        lm.model.train(was_training)
    return out[0] if single else out


__all__ = [
    "IGNORE_INDEX",
    "BatchRows",
    "CausalLMModule",
    "PromptCompletionCollator",
    "SequenceClassifierModule",
    "TextClassificationCollator",
    "check_adapters_active",
    "completion_logprob",
    "completion_queries",
    "is_peft_model",
    "per_token_queries",
    "prompt_completion_dataset",
    "train_bpe_tokenizer",
]
