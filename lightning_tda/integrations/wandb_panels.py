"""Weights & Biases influence panels: top-k tables, score histograms, self-influence, checkpoints.

``wandb`` is imported lazily, inside the functions, so the core library never needs it.

Example::

    from lightning_tda.integrations.wandb_panels import log_influence_panels

    res = store.attribute(queries, model=model, method="tracin", top_k=10)
    log_influence_panels(wandb_logger, res, train, queries,
                         self_influence=store.self_influence(method="tracin"))

The panels render one :class:`~lightning_tda.explain.Explanation` (the same model the HTML report
renders): :func:`log_influence_panels` builds it with :func:`~lightning_tda.explain.explain`,
:func:`log_explanation` logs one built elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lightning_tda.capture.task import Task
from lightning_tda.data.indexed import strip_example_ids
from lightning_tda.explain import (
    CheckpointShares,
    ExampleLookup,
    Explanation,
    checkpoint_shares,
    explain,
    ids_record,
    query_ids_spec,
    task_rendering,
)
from lightning_tda.results import AttributionResult

Render = Callable[[Any], Any]

INFLUENCE_COLUMNS = [
    "query_id",
    "query",
    "query_label",
    "kind",
    "rank",
    "example_id",
    "score",
    "example",
    "label",
]
SELF_INFLUENCE_COLUMNS = ["rank", "example_id", "self_influence", "example", "label"]
CHECKPOINT_COLUMNS = ["query_id", "step", "abs_total", "share", "total"]
_LABEL_KEYS = ("label", "labels", "y", "target")
_TEXT_KEYS = ("text", "sentence", "content")
_IMAGE_KEYS = ("image", "pixel_values", "img")
_MIN_IMAGE_SIDE = (
    64  # tiny images (8x8 digits) are upscaled (nearest) so they are visible in a table
)


def require_wandb() -> Any:
    """Import and return ``wandb``; raise an ImportError that names the install command."""
    try:
        import wandb
    except ImportError as e:
        raise ImportError(
            "W&B influence panels need wandb (and pillow for images): pip install wandb pillow"
        ) from e
    return wandb


def resolve_run(run_or_logger: Any) -> Any:
    """The wandb run behind a Lightning ``WandbLogger`` (either Lightning package) or a wandb run.

    ``None`` means the active run (``wandb.run``).
    """
    wandb = require_wandb()
    if run_or_logger is None:
        if wandb.run is None:
            raise ValueError(
                "no active wandb run: pass a Lightning WandbLogger or a run from wandb.init(...)"
            )
        return wandb.run
    run = run_or_logger
    if _is_wandb_logger(run_or_logger):
        run = run_or_logger.experiment
    if not callable(getattr(run, "log", None)) or not hasattr(run, "summary"):
        raise TypeError(
            f"expected a Lightning WandbLogger or a wandb run, got {type(run_or_logger).__name__}; "
            "use lightning.pytorch.loggers.WandbLogger or wandb.init(...)"
        )
    return run


def _is_wandb_logger(obj: Any) -> bool:
    return any(c.__name__ == "WandbLogger" for c in type(obj).__mro__)


# -- rendering ---------------------------------------------------------------------------------
def split_example(example: Any) -> tuple[Any, Any]:
    """``(content, label)`` of an item without its id: ``(x, y)`` tuples, dicts or plain values."""
    if isinstance(example, Mapping):
        label = next((example[k] for k in _LABEL_KEYS if k in example), None)
        for keys in (_TEXT_KEYS, _IMAGE_KEYS):
            for k in keys:
                if k in example:
                    return example[k], _scalar(label)
        if "input_ids" in example:
            ids = torch.as_tensor(example["input_ids"])
            mask = example.get("attention_mask")
            if mask is not None:
                ids = ids[torch.as_tensor(mask).bool()]
            return ids, _scalar(label)
        rest = [v for k, v in example.items() if k not in _LABEL_KEYS]
        return (rest[0] if len(rest) == 1 else example), _scalar(label)
    if isinstance(example, (tuple, list)) and len(example) == 2:
        return example[0], _scalar(example[1])
    if isinstance(example, (tuple, list)) and len(example) == 1:
        return example[0], None
    return example, None


def _scalar(v: Any) -> Any:
    """A JSON-friendly scalar label, or ``None`` when ``v`` is not a scalar."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (np.generic,)):
        return v.item()
    if torch.is_tensor(v) or isinstance(v, np.ndarray):
        t = torch.as_tensor(v)
        if t.numel() == 1:
            return t.item()
    return None


def _image_like(t: torch.Tensor, force: bool) -> torch.Tensor | None:
    """``t`` as ``[H, W]`` or ``[H, W, C]`` when it looks like an image, else ``None``."""
    if t.dtype == torch.bool or (not t.is_floating_point() and t.dtype != torch.uint8):
        return None
    if t.dim() == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
        t = t.permute(1, 2, 0)
    if t.dim() == 3 and t.shape[-1] == 1:
        t = t[..., 0]
    if t.dim() == 2 or (t.dim() == 3 and t.shape[-1] in (3, 4)):
        return t
    if force and t.dim() == 1:
        side = math.isqrt(t.numel())
        if side * side == t.numel() and side > 1:
            return t.reshape(side, side)
    return None


def image_array(t: torch.Tensor) -> np.ndarray:
    """``uint8`` pixels of an ``[H, W(, C)]`` tensor: min-max scaled (floats), upscaled (nearest).

    Small images are repeated by an integer factor so the short side is at least 64 pixels.
    """
    x = t.detach().cpu()
    if x.dtype != torch.uint8:
        x = x.double()
        lo, hi = float(x.min()), float(x.max())
        x = (
            ((x - lo) / (hi - lo) * 255.0 if hi > lo else torch.zeros_like(x))
            .round()
            .to(torch.uint8)
        )
    a = x.numpy()
    f = max(1, math.ceil(_MIN_IMAGE_SIDE / min(a.shape[0], a.shape[1])))
    return np.repeat(np.repeat(a, f, axis=0), f, axis=1)


def render_example(
    example: Any,
    render: str | Render | None = None,
    tokenizer: Any = None,
    task: Task | None = None,
) -> tuple[Any, Any]:
    """``(cell, label)``: how an item (without its id) shows in a table, and its label.

    Args:
        example: the item, e.g. ``(x, y)``, ``{"input_ids": ..., "attention_mask": ...}`` or a string.
        render: ``None``/``"auto"`` (float tensors with 2-3 dims become images, the rest text);
            ``"image"`` (also square 1-D vectors, e.g. 64 features -> 8x8); ``"text"`` (never images);
            or a callable ``render(example) -> str | wandb.Image | array image``.
        tokenizer: decodes 1-D integer token ids (``tokenizer.decode``); without one ids are listed.
        task: a :class:`~lightning_tda.capture.task.Task`: ``task.render(example)``, when it returns
            something (an image tensor, e.g. an un-standardised digit, or a str), is the cell; a
            callable ``render`` comes first, ``"auto"``/``"image"``/``"text"`` apply otherwise.

    Returns:
        A ``str`` or a ``wandb.Image``, and the scalar label (``None`` when there is none).
    """
    content, label = split_example(example)
    if callable(render):
        return _cell(render(example)), label
    if render not in (None, "auto", "image", "text"):
        raise ValueError(f"render must be 'auto', 'image', 'text' or a callable, got {render!r}")
    out = task_rendering(task, example)
    if out is not None:
        return _cell(out), label
    return _render_content(content, render, tokenizer), label


def _cell(out: Any) -> Any:
    """A user renderer's output as a table cell."""
    if out is None or isinstance(out, str):
        return out
    wandb = require_wandb()
    if isinstance(out, wandb.Image):
        return out
    if torch.is_tensor(out) or isinstance(out, np.ndarray):
        t = _image_like(torch.as_tensor(np.asarray(out) if not torch.is_tensor(out) else out), True)
        if t is None:
            raise ValueError(
                f"render returned an array of shape {tuple(out.shape)}; return [H, W] or [H, W, C] pixels, "
                "a str or a wandb.Image"
            )
        return wandb.Image(image_array(t))
    if type(out).__module__.startswith("PIL"):
        return wandb.Image(out)
    return str(out)


def _render_content(content: Any, mode: str | None, tokenizer: Any) -> Any:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, (bytes, bytearray)):
        return bytes(content).decode("utf-8", errors="replace")
    if type(content).__module__.startswith("PIL"):
        return require_wandb().Image(content) if mode != "text" else repr(content)
    if isinstance(content, np.ndarray) or torch.is_tensor(content):
        t = torch.as_tensor(content)
        if t.dim() == 0:
            return str(t.item())
        if mode != "text":
            img = _image_like(t, force=mode == "image")
            if img is not None:
                return require_wandb().Image(image_array(img))
        if not t.is_floating_point() and t.dim() == 1:
            ids = t.tolist()
            if tokenizer is not None:
                return tokenizer.decode(ids)
            if t.dtype == torch.uint8:
                return bytes(ids).decode("utf-8", errors="replace")
            return " ".join(str(i) for i in ids)
        flat = t.flatten()
        vals = " ".join(f"{v:.3g}" for v in flat[:64].tolist())
        return vals + (" ..." if flat.numel() > 64 else "")
    text = repr(content)
    return text if len(text) <= 500 else text[:500] + " ..."


# -- panels ------------------------------------------------------------------------------------
def log_influence_panels(
    run_or_logger: Any,
    result: AttributionResult,
    train_data: Any,
    query_data: Any = None,
    *,
    store: Any = None,
    self_influence: torch.Tensor | str | None = None,
    checkpoint_scores: Mapping[int, AttributionResult | torch.Tensor] | None = None,
    render: str | Render | None = None,
    tokenizer: Any = None,
    task: Task | None = None,
    top_k: int | None = 10,
    self_influence_top: int = 20,
    bins: int = 64,
    max_query_histograms: int = 16,
    prefix: str = "tda",
) -> dict[str, int]:
    """Log influence panels of an attribution result to Weights & Biases, in one ``run.log`` call.

    The panels (keys under ``prefix``; see :func:`log_explanation`): ``influence`` (the top-k
    proponents and opponents of every query, with the examples), ``scores`` (and ``scores_q<id>``
    per query of dense results), ``self_influence`` and ``self_influence_hist``, ``checkpoints``
    and the ``checkpoint_share`` bar chart. They render the :func:`~lightning_tda.explain.explain`
    of ``result``.

    Args:
        run_or_logger: a Lightning ``WandbLogger`` (its ``experiment`` is used), a wandb run, or ``None``
            for the active run.
        result: an :class:`AttributionResult`, top-k (``indices [Q, k]``) or dense (``scores [Q, N]``).
        train_data: the logged training data (an ``IndexedDataset``; items are looked up by example id),
            or ``None`` to leave the ``example``/``label`` columns empty.
        query_data: the queries that were attributed (looked up by ``result.query_ids`` when both carry
            ids, else by position), or ``None``.
        store: the :class:`~lightning_tda.AttributionStore` (gives the row order of ``self_influence`` and
            computes it when ``self_influence`` is a method name).
        self_influence: ``[N]`` self-influence in store row order (e.g. ``store.self_influence()``), or a
            method name to compute it with ``store``.
        checkpoint_scores: ``{global_step: AttributionResult or Tensor [Q, N]}``, each checkpoint's
            scores alone (e.g. ``store.attribute(q, model=m, method="tracin", checkpoints=[s],
            top_k=None)``). Dense scores give totals over every training example, top-k results over
            the kept proponents and opponents only.
        render: ``"auto"`` (default), ``"image"``, ``"text"`` or ``render(example) -> str | wandb.Image |
            array``; see :func:`render_example`.
        tokenizer: decodes token-id examples (``tokenizer.decode``).
        task: renders each example as ``task.render(item)`` when it returns something (recorded
            on the explanation; see :func:`render_example`).
        top_k: proponents and opponents shown per query (``None``: all of a top-k result's).
        self_influence_top: rows of the self-influence table.
        bins: histogram bins.
        max_query_histograms: per-query histograms logged at most (dense results).
        prefix: key prefix (a W&B panel section).

    Returns:
        ``{key: rows}`` of what was logged (histograms: number of values).
    """
    require_wandb()
    run = resolve_run(run_or_logger)
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    _check_render(render)
    ex = explain(
        result,
        top_k=top_k,
        train=None
        if train_data is None
        else ExampleLookup(train_data, "train_data", strict=True, example_ids=ids_record(store)),
        queries=None
        if query_data is None
        else ExampleLookup(query_data, "query_data", example_ids=query_ids_spec(store)),
        self_influence=None if self_influence is None else _self_influence(self_influence, store),
        self_influence_ids=None if store is None else store.example_ids,
        num_outliers=self_influence_top,
        checkpoint_scores=checkpoint_scores,
        task=task,
    )
    return log_explanation(
        run, ex, render=render, tokenizer=tokenizer, bins=bins,
        max_query_histograms=max_query_histograms, prefix=prefix,
    )  # fmt: skip


def log_explanation(
    run_or_logger: Any,
    explanation: Explanation,
    *,
    render: str | Render | None = None,
    tokenizer: Any = None,
    bins: int = 64,
    max_query_histograms: int = 16,
    prefix: str = "tda",
) -> dict[str, int]:
    """Log an :class:`~lightning_tda.explain.Explanation` as W&B panels, in one ``run.log`` call.

    - ``{prefix}/influence``: a table of the top-k proponents and opponents of every query (columns
      ``query_id, query, query_label, kind, rank, example_id, score, example, label``; filter it by
      ``query_id`` in the UI); ``example``/``query`` are text or images (see ``render``).
    - ``{prefix}/scores``: a histogram of every score in the table (dense results: of all ``[Q, N]``
      scores), and ``{prefix}/scores_q<query_id>`` per query for dense results (the first
      ``max_query_histograms`` queries).
    - ``{prefix}/self_influence``: the self-influence outliers (mislabel candidates) with their
      example and label, and ``{prefix}/self_influence_hist``.
    - ``{prefix}/checkpoints``: per query and checkpoint the total |score| (``abs_total``), its
      ``share`` of the sum over checkpoints and the signed ``total``; ``{prefix}/checkpoint_share``
      is a bar chart of the mean share per checkpoint.

    ``render``, ``tokenizer``: as for :func:`render_example`; examples go through
    ``explanation.task`` (:func:`render_example`'s ``task``). Returns ``{key: rows}`` of what was
    logged (histograms: number of values).
    """
    wandb = require_wandb()
    run = resolve_run(run_or_logger)
    _check_render(render)
    ex, cell = explanation, _cell_cache(render, tokenizer, explanation.task)
    qids = [qe.position if qe.query_id is None else qe.query_id for qe in ex.queries]
    payload: dict[str, Any] = {}
    counts: dict[str, int] = {}

    def table(key: str, columns: list[str], rows: list[list[Any]], **kw: Any) -> None:
        payload[f"{prefix}/{key}"] = wandb.Table(columns=columns, data=rows, **kw)
        counts[f"{prefix}/{key}"] = len(rows)

    def hist(key: str, values: torch.Tensor) -> None:
        _histogram(wandb, payload, counts, f"{prefix}/{key}", values, bins)

    table("influence", INFLUENCE_COLUMNS, _influence_rows(ex, qids, cell), allow_mixed_types=True)
    hist("scores", ex.scores)
    if ex.dense:
        for r in range(min(len(ex.queries), max_query_histograms)):
            hist(f"scores_q{qids[r]}", ex.scores[r])
    si = ex.self_influence
    if si is not None:
        rows = [
            [o.rank, o.example_id, o.score, *cell("t", o.example_id, o.example)]
            for o in si.outliers
        ]
        table("self_influence", SELF_INFLUENCE_COLUMNS, rows, allow_mixed_types=True)
        hist("self_influence_hist", si.scores)
    if ex.checkpoint_shares is not None:
        ck_rows, bar_rows = _checkpoint_rows(ex.checkpoint_shares, qids)
        table("checkpoints", CHECKPOINT_COLUMNS, ck_rows)
        bar = wandb.Table(columns=["checkpoint", "mean_share"], data=bar_rows)
        payload[f"{prefix}/checkpoint_share"] = wandb.plot.bar(
            bar, "checkpoint", "mean_share", title="share of |score| per checkpoint"
        )
        counts[f"{prefix}/checkpoint_share"] = len(bar_rows)
    run.log(payload)
    return counts


def _check_render(render: Any) -> None:
    if not callable(render) and render not in (None, "auto", "image", "text"):
        raise ValueError(f"render must be 'auto', 'image', 'text' or a callable, got {render!r}")


def _cell_cache(
    render: str | Render | None, tokenizer: Any, task: Task | None = None
) -> Callable[[str, int, Any], Any]:
    """``cell(kind, key, item) -> (cell, label)``, each ``(kind, key)`` rendered once."""
    cache: dict[tuple[str, int], tuple[Any, Any]] = {}

    def cell(kind: str, key: int, item: Any) -> tuple[Any, Any]:
        if item is None:
            return None, None
        if (kind, key) not in cache:
            cache[kind, key] = render_example(strip_example_ids(item), render, tokenizer, task)
        return cache[kind, key]

    return cell


def _influence_rows(ex: Explanation, qids: list[int], cell: Callable) -> list[list[Any]]:
    rows = []
    for qe, qid in zip(ex.queries, qids, strict=True):
        qcell, qlabel = cell("q", qe.position, qe.query)
        for kind, ranked in (("proponent", qe.proponents), ("opponent", qe.opponents)):
            for x in ranked:
                rows.append(
                    [qid, qcell, qlabel, kind, x.rank, x.example_id, x.score]
                    + list(cell("t", x.example_id, x.example))
                )
    return rows


def _histogram(
    wandb: Any, payload: dict, counts: dict, key: str, values: torch.Tensor, bins: int
) -> None:
    v = values.detach().float().flatten().cpu().numpy()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return
    payload[key] = wandb.Histogram(np_histogram=np.histogram(v, bins=bins))
    counts[key] = int(v.size)


def _self_influence(value: torch.Tensor | str, store: Any) -> torch.Tensor:
    if isinstance(value, str):
        if store is None:
            raise ValueError(
                f"self_influence={value!r} names a method; pass store= to compute it, or pass the "
                "[N] tensor of store.self_influence(...)"
            )
        return store.self_influence(method=value)
    return torch.as_tensor(value).detach().cpu()


def checkpoint_table(
    checkpoint_scores: Mapping[int, AttributionResult | torch.Tensor], query_ids: Sequence[int]
) -> tuple[list[list[Any]], list[list[Any]]]:
    """Rows ``[query_id, step, abs_total, share, total]`` (per query and checkpoint) and bar rows
    ``[str(step), mean share over queries]``.

    Each value is an :class:`AttributionResult` or a ``[Q, N]`` (or ``[Q, k]``) tensor of that
    checkpoint's scores; ``abs_total`` sums ``|score|`` over the last dim (and the opponents of
    top-k results), ``share`` divides it by the sum over checkpoints
    (:func:`~lightning_tda.explain.checkpoint_shares`).
    """
    return _checkpoint_rows(checkpoint_shares(checkpoint_scores, len(query_ids)), query_ids)


def _checkpoint_rows(
    shares: CheckpointShares, query_ids: Sequence[int]
) -> tuple[list[list[Any]], list[list[Any]]]:
    a, t, share, steps = shares.abs_total, shares.total, shares.share, shares.steps
    rows = [
        [int(query_ids[r]), s, float(a[r, j]), float(share[r, j]), float(t[r, j])]
        for r in range(len(query_ids))
        for j, s in enumerate(steps)
    ]
    bar = [[str(s), float(share[:, j].mean())] for j, s in enumerate(steps)]
    return rows, bar
