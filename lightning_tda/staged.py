"""SOURCE over two stores: pre-training (full model) then a PEFT LoRA fine-tune (adapters only).

The two stages cannot share one store (their rows cover different parameters), so each stage is
scored on its own store and the results are joined:

* fine-tune examples: SOURCE on the LoRA store, query gradient w.r.t. the adapters at the final
  fine-tuned model (exactly ``lora_store.attribute(queries, model=lora_model, method=Source())``);
* pre-training examples: during the fine-tune the base weights are frozen, so a perturbation ``δ`` of
  them at the end of pre-training reaches the final model unchanged: the base block of the
  fine-tune's propagation is the identity (``F_S = I``, no updates touch it). The final loss also
  moves through the adapters' reaction ``∂(A_F, B_F)/∂W · δ`` (the fine-tune's trajectory shifts
  because its frozen base moved); that term is driven by the cross-curvature
  ``∂²L_ft/∂(A, B)∂W`` times the fine-tune's lr sum and is IGNORED here, just as SOURCE's block
  (per-layer) curvature ignores cross-layer terms inside one run. The pre-training examples' score
  is therefore stage-1 SOURCE on the pre-training store with the query gradient ``∇_W ℓ_q`` taken at
  the FINAL model, i.e. at the merged weights ``W + s·BA`` (adapters active), projected with the
  pre-training store's projection.

Parameters trained in the fine-tune outside the adapters (PEFT ``modules_to_save``) break the
"frozen base" assumption for those modules; a warning is raised when the LoRA store captured any.
Scores of both stages are in the library sign and the same units (change of the query loss per
unit up-weighting of the example's loss in its stage's mean loss), so they are ranked together.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_tda.attribution import AttributionStore
from lightning_tda.capture.layers import check_layers_match, discover_layers
from lightning_tda.capture.losses import LossFn
from lightning_tda.capture.replay import featurize_data
from lightning_tda.capture.task import Task
from lightning_tda.errors import ProjectionMismatchError
from lightning_tda.integrations.transformers import is_peft_model
from lightning_tda.methods.source import Source
from lightning_tda.results import AttributionResult

METHOD_NAME = "source_pretrain_then_lora"


def merge_lora(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every PEFT ``PeftModel`` in it merged (``W + s·BA``) and unloaded.

    ``model`` may be a ``PeftModel`` or a module holding one (e.g. a
    :class:`~lightning_tda.integrations.transformers.CausalLMModule`); the original is not changed. The
    copy is put in eval mode.
    """
    merged = copy.deepcopy(model)
    if is_peft_model(merged):
        return merged.merge_and_unload().eval()
    if not _merge_children(merged):
        raise ValueError(
            f"{type(model).__name__} holds no PEFT model to merge; pass the fine-tuned PEFT model (or the "
            "LightningModule wrapping it) as lora_model, or build the merged model yourself with "
            "pretrain_model_factory=..."
        )
    return merged.eval()


def _merge_children(module: nn.Module) -> int:
    count = 0
    for name, child in module.named_children():
        if is_peft_model(child):
            setattr(module, name, child.merge_and_unload())
            count += 1
        else:
            count += _merge_children(child)
    return count


def _as_store(store: AttributionStore | str | os.PathLike) -> AttributionStore:
    return store if isinstance(store, AttributionStore) else AttributionStore(store)


def _trainable_names(store: AttributionStore) -> set[str]:
    """Parameter names that were trainable in the logged run (captured or not)."""
    captured = {p for s in store.layers for p in s.params}
    return captured | set(json.loads(store.attrs.get("other_params", "[]")))


def prepare_merged_model(store: AttributionStore, merged: nn.Module) -> nn.Module:
    """Make ``merged`` reproduce ``store``'s capture: the run's trainable parameters get
    ``requires_grad=True`` (PEFT froze them), every other parameter ``False``; in place.

    Raises:
        ProjectionMismatchError: the model lacks the store's parameters or layer shapes.
    """
    wanted = _trainable_names(store)
    names = dict(merged.named_parameters())
    missing = sorted(wanted - set(names))
    if missing:
        raise ProjectionMismatchError(
            f"the merged fine-tuned model lacks parameters of the pre-training store {store.path}, e.g. "
            f"{missing[:4]} (model has e.g. {sorted(names)[:4]}). Pass lora_model wrapped exactly like the "
            "pre-trained model was when it was logged (e.g. the CausalLMModule, not the bare PeftModel), or "
            "pass pretrain_model_factory= returning a merged model with the pre-training module names."
        )
    for n, p in names.items():
        p.requires_grad_(n in wanted)
    selection = json.loads(store.attrs.get("capture_selection", "{}"))
    layers, _ = discover_layers(
        merged, store.projection, selection.get("modules"), selection.get("exclude")
    )
    try:
        check_layers_match(store.layers, layers)
    except ProjectionMismatchError as e:
        raise ProjectionMismatchError(
            f"{e} (the merged fine-tuned model vs the pre-training store {store.path}; fix the module "
            "names/shapes with pretrain_model_factory=...)"
        ) from e
    return merged


def featurize_current(
    store: AttributionStore,
    model: nn.Module,
    data: Any,
    *,
    task: Task | None = None,
    loss_fn: LossFn | None = None,
    batch_size: int = 64,
    collate_fn: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Projected query gradients (of ``task.measurement``; ``loss_fn`` a shorthand; default the
    module's own task) of ``data`` at ``model``'s CURRENT weights in ``store``'s projection.

    Unlike :meth:`AttributionStore.query_vectors` no checkpoint state is loaded.

    Returns:
        ``(rows [Q, D], ids [Q] or None)``.
    """
    if store.projection.basis == "pca" and store.bases is None:
        raise ValueError(f"{store.path} uses a PCA projection basis but stores none")
    rows, ids, _ = featurize_data(
        model,
        data,
        store.layers,
        store.projection,
        loss_fn,
        batch_size,
        collate_fn,
        store.bases,
        task=task,
        description="query gradients at the merged model",
    )
    return rows, ids


def merged_query_vectors(
    pretrain_store: AttributionStore,
    lora_model: nn.Module,
    queries: Any,
    *,
    source: Source,
    pretrain_model_factory: Callable[[nn.Module], nn.Module] | None = None,
    task: Task | None = None,
    loss_fn: LossFn | None = None,
    batch_size: int = 64,
    collate_fn: Any = None,
    lora_targets: set[str] | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """``({last_step: [Q, D]}, query ids)``: query gradients w.r.t. the base weights at the merged
    fine-tuned model, in the pre-training store's projection, keyed by ``source``'s query step.

    With ``lora_targets`` (see :func:`adapter_targets`) the merged model's other weights are checked
    against the pre-training state at that step (:func:`check_base_matches`)."""
    factory = merge_lora if pretrain_model_factory is None else pretrain_model_factory
    merged = prepare_merged_model(pretrain_store, factory(lora_model))
    (last,) = source.query_steps(pretrain_store)
    if lora_targets is not None:
        check_base_matches(pretrain_store, last, merged, lora_targets)
    rows, ids = featurize_current(
        pretrain_store,
        merged,
        queries,
        task=task,
        loss_fn=loss_fn,
        batch_size=batch_size,
        collate_fn=collate_fn,
    )
    return {last: rows}, ids


def adapter_targets(lora_store: AttributionStore) -> set[str]:
    """Module paths the LoRA store's adapters sit on, without PEFT's prefixes (e.g. ``transformer.h.0.attn.c_attn``)."""
    return {
        s.name.split(".lora_")[0].split("base_model.model.")[-1]
        for s in lora_store.layers
        if ".lora_A" in s.name or ".lora_B" in s.name
    }


def check_base_matches(
    store: AttributionStore, step: int, merged: nn.Module, targets: set[str], rtol: float = 1e-3
) -> None:
    """Raise if the merged model's untouched weights differ from ``store``'s state at ``step``.

    The fine-tune must start from the weights SOURCE queries at (the last used pre-training checkpoint).
    Weights of the LoRA-targeted modules (``targets``) changed in the merge and are skipped; a
    checkpoint without saved state is not checked.
    """
    try:
        state = store.state(step)
    except KeyError:
        return
    params = dict(merged.named_parameters())
    bad = []
    for name, saved in state.items():
        p = params.get(name)
        if p is None or any(name.rsplit(".", 1)[0].endswith(t) for t in targets):
            continue
        ref = saved.to(p.device, torch.float32)
        if (p.detach().float() - ref).norm() > rtol * ref.norm() + 1e-12:
            bad.append(name)
    if bad:
        raise ValueError(
            f"the fine-tuned model's frozen base differs from pre-training checkpoint {step} of "
            f"{store.path} at {bad[:4]}; SOURCE's pre-training stage assumes the fine-tune started from "
            "that checkpoint. Fine-tune from the final logged weights (GradientLogger(log_at_fit_end=True)) "
            "or pass pretrain_source=Source(checkpoints=[...]) ending at the step you fine-tuned from."
        )


def source_pretrain_then_lora(
    pretrain_store: AttributionStore | str | os.PathLike,
    lora_store: AttributionStore | str | os.PathLike,
    queries: Any,
    lora_model: nn.Module,
    *,
    pretrain_model_factory: Callable[[nn.Module], nn.Module] | None = None,
    pretrain_source: Source | None = None,
    lora_source: Source | None = None,
    top_k: int | None = 10,
    lora_id_offset: int = 0,
    task: Task | None = None,
    loss_fn: LossFn | None = None,
    batch_size: int = 64,
    collate_fn: Any = None,
    check_model: bool = True,
) -> AttributionResult:
    """SOURCE scores of pre-training AND LoRA fine-tuning examples for the final fine-tuned model.

    Args:
        pretrain_store: store logged during pre-training (full-model rows).
        lora_store: store logged during the PEFT LoRA fine-tune that started from the pre-trained
            weights (adapter rows only).
        queries: query data (Dataset, DataLoader or collated batch).
        lora_model: the fine-tuned model (a ``PeftModel`` or the LightningModule wrapping it) at its
            final weights; it also defines the query loss (``per_example_loss``) unless ``loss_fn``.
        pretrain_model_factory: ``lora_model -> plain model`` with merged weights and the pre-training
            module names (default :func:`merge_lora`: deep copy + ``merge_and_unload``).
        pretrain_source: SOURCE settings for the pre-training store (default ``Source()``).
        lora_source: SOURCE settings for the LoRA store (default ``Source()``).
        top_k: strongest proponents/opponents per query over both stages; ``None`` for dense.
        lora_id_offset: added to the fine-tune example ids in the result (to make them disjoint
            from the pre-training ids).
        task: what the queries measure, for both stages (default: the task recorded in the LoRA
            store, else the module's own; see :meth:`AttributionStore.attribute`).
        loss_fn: query loss ``loss_fn(model, batch) -> Tensor[B]`` (shorthand of a task).
        batch_size: batch size of the query sweeps.
        collate_fn: collate function for a query Dataset.
        check_model: compare ``lora_model`` with the LoRA store's fingerprints (frozen base,
            architecture) first, as ``AttributionStore.attribute`` does; ``False`` skips it.

    Returns:
        An :class:`AttributionResult` over the union of examples: ``example_ids`` are the
        pre-training ids then the (offset) fine-tune ids, the dense column order;
        ``checkpoints`` the pre-training steps then the fine-tune steps.

    Raises:
        ValueError: pre-training and (offset) fine-tune ids collide, or the fine-tuned model's frozen
            base is not the pre-training store's last used checkpoint.
        ProjectionMismatchError: the merged model does not reproduce the pre-training capture.
    """
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    pre, ft = _as_store(pretrain_store), _as_store(lora_store)
    ids = _joint_ids(pre, ft, int(lora_id_offset))
    _warn_non_adapter_layers(ft)
    pre_src = Source() if pretrain_source is None else pretrain_source
    ft_src = Source() if lora_source is None else lora_source
    if task is None and loss_fn is None:
        task = ft.recorded_task()  # the query side is the fine-tuned model's
    kw = dict(task=task, loss_fn=loss_fn, batch_size=batch_size, collate_fn=collate_fn)
    qvecs, qids = merged_query_vectors(
        pre,
        lora_model,
        queries,
        source=pre_src,
        pretrain_model_factory=pretrain_model_factory,
        lora_targets=adapter_targets(ft),
        **kw,
    )
    ft_res = ft.attribute(
        queries, model=lora_model, method=ft_src, top_k=top_k, check_model=check_model, **kw
    )
    pre_res = pre.attribute(qvecs, method=pre_src, top_k=top_k)
    qids = ft_res.query_ids if ft_res.query_ids is not None else qids
    return _join(pre_res, ft_res, ids, qids, top_k, int(lora_id_offset))


def _joint_ids(pre: AttributionStore, ft: AttributionStore, offset: int) -> torch.Tensor:
    """``[N_pre + N_ft]`` pre-training ids then the fine-tune ids plus ``offset``; raises on a clash."""
    pre_ids, ft_ids = pre.example_ids, ft.example_ids + offset
    clash = sorted(set(pre_ids.tolist()) & set(ft_ids.tolist()))
    if clash:
        raise ValueError(
            f"{len(clash)} example ids occur in both the pre-training and the fine-tuning store, e.g. "
            f"{clash[:5]}; log the stages with disjoint ids (IndexedDataset(..., ids=...)) or pass "
            f"lora_id_offset= (e.g. {int(pre_ids.max()) + 1 - int(ft.example_ids.min())})"
        )
    return torch.cat([pre_ids, ft_ids])


def _warn_non_adapter_layers(ft: AttributionStore) -> None:
    """Warn when the LoRA store captured parameters outside the adapters (``modules_to_save``)."""
    other = [s.name for s in ft.layers if ".lora_A" not in s.name and ".lora_B" not in s.name]
    other += [n for n in json.loads(ft.attrs.get("other_params", "[]")) if ".lora_" not in n]
    if other:
        warnings.warn(
            f"the LoRA store also captured non-adapter layers {other[:4]} (e.g. modules_to_save); the "
            "pre-training stage treats every base parameter as frozen during the fine-tune, which is "
            "not true for these",
            stacklevel=3,
        )


def _join(
    pre_res: AttributionResult,
    ft_res: AttributionResult,
    ids: torch.Tensor,
    qids: torch.Tensor | None,
    top_k: int | None,
    offset: int,
) -> AttributionResult:
    """One result over both stages: dense ``[Q, N_pre + N_ft]`` scores, or the top-``k`` of both."""
    steps = [*pre_res.checkpoints, *ft_res.checkpoints]
    if top_k is None:
        dense = torch.cat([pre_res.scores, ft_res.scores.to(pre_res.scores.device)], dim=1)
        return AttributionResult(METHOD_NAME, dense, None, None, None, ids, qids, steps)
    k = min(top_k, len(ids))
    hi_s, hi_i = _merge(
        pre_res.scores, pre_res.indices, ft_res.scores, ft_res.indices + offset, k, True
    )
    lo_s, lo_i = _merge(
        pre_res.opponent_scores,
        pre_res.opponents,
        ft_res.opponent_scores,
        ft_res.opponents + offset,
        k,
        False,
    )
    return AttributionResult(METHOD_NAME, hi_s, hi_i, lo_s, lo_i, ids, qids, steps)


def _merge(
    a_s: torch.Tensor,
    a_i: torch.Tensor,
    b_s: torch.Tensor,
    b_i: torch.Tensor,
    k: int,
    largest: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of two per-store top-k lists ``[Q, k_a]``, ``[Q, k_b]`` (scores, ids)."""
    s = torch.cat([a_s, b_s.to(a_s.device)], dim=1)
    i = torch.cat([a_i.to(s.device), b_i.to(s.device)], dim=1)
    top = s.topk(k, dim=1, largest=largest)
    return top.values, torch.gather(i, 1, top.indices)


__all__ = [
    "adapter_targets",
    "check_base_matches",
    "featurize_current",
    "merge_lora",
    "merged_query_vectors",
    "prepare_merged_model",
    "source_pretrain_then_lora",
]
