"""Weights & Biases influence panels: top-k tables, score histograms, self-influence, checkpoints.

``wandb`` is imported lazily, inside the functions, so the core library never needs it.

Example::

    from lightning_tda.integrations.wandb_panels import log_influence_panels

    res = store.attribute(queries, model=model, method="tracin", top_k=10)
    log_influence_panels(wandb_logger, res, train, queries,
                         self_influence=store.self_influence(method="tracin"))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from lightning_tda.data.indexed import EXAMPLE_ID_KEY, Indexed, get_example_ids, strip_example_ids
from lightning_tda.errors import MissingExampleIdsError
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


# -- example lookup and rendering --------------------------------------------------------------
class ExampleLookup:
    """Items of an indexed dataset by example id (or by position when ids are unknown).

    Args:
        data: an :class:`~lightning_tda.IndexedDataset`, any map-style dataset whose items carry ids,
            a DataLoader over one (its ``dataset``), or a collated batch (``Indexed`` or a dict).
    """

    def __init__(self, data: Any) -> None:
        if isinstance(data, DataLoader):
            data = data.dataset
        self.batch = _is_batch(data)
        self.data = data
        if self.batch:
            self.ids = get_example_ids(data).tolist() if _has_ids(data) else None
        elif hasattr(data, "ids"):
            self.ids = [int(i) for i in data.ids]
        else:
            try:
                self.ids = [int(get_example_ids(_batched_id(data[i]))) for i in range(len(data))]
            except (MissingExampleIdsError, TypeError, ValueError):  # no ids: lookup by position
                self.ids = None
        self.pos = {i: p for p, i in enumerate(self.ids)} if self.ids is not None else None

    def __len__(self) -> int:
        if self.batch:
            return len(self.ids) if self.ids is not None else _batch_len(self.data)
        return len(self.data)

    def by_id(self, example_id: int) -> Any:
        """The item (without its id) of ``example_id``."""
        if self.pos is None:
            raise KeyError(
                "the data carries no example ids; wrap it in lightning_tda.IndexedDataset"
            )
        p = self.pos.get(int(example_id))
        if p is None:
            raise KeyError(
                f"example id {int(example_id)} is not in the data given for rendering; pass the "
                "IndexedDataset that was logged (same ids)"
            )
        return self.at(p)

    def at(self, position: int) -> Any:
        """The item (without its id) at ``position``."""
        item = _index_batch(self.data, position) if self.batch else self.data[position]
        return strip_example_ids(item)


def _is_batch(data: Any) -> bool:
    if isinstance(data, Indexed):
        return torch.is_tensor(data.example_id) and data.example_id.dim() == 1
    return isinstance(data, Mapping)


def _has_ids(batch: Any) -> bool:
    return isinstance(batch, Indexed) or (isinstance(batch, Mapping) and EXAMPLE_ID_KEY in batch)


def _batched_id(item: Any) -> Any:
    """A single item as a one-element 'batch' so :func:`get_example_ids` can read its id."""
    if isinstance(item, Indexed):
        return Indexed(torch.tensor([int(item.example_id)]), item.data)
    if isinstance(item, Mapping) and EXAMPLE_ID_KEY in item:
        return {EXAMPLE_ID_KEY: torch.tensor([int(item[EXAMPLE_ID_KEY])])}
    return item


def _batch_len(batch: Any) -> int:
    for v in batch.values() if isinstance(batch, Mapping) else [batch]:
        if torch.is_tensor(v):
            return len(v)
    raise TypeError("cannot tell the size of this batch; pass a Dataset instead")


def _index_batch(batch: Any, i: int) -> Any:
    if torch.is_tensor(batch) or isinstance(batch, np.ndarray):
        return batch[i]
    if isinstance(batch, Indexed):
        return Indexed(int(batch.example_id[i]), _index_batch(batch.data, i))
    if isinstance(batch, Mapping):
        return {k: _index_batch(v, i) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_index_batch(v, i) for v in batch)
    return batch


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
    example: Any, render: str | Render | None = None, tokenizer: Any = None
) -> tuple[Any, Any]:
    """``(cell, label)``: how an item (without its id) shows in a table, and its label.

    Args:
        example: the item, e.g. ``(x, y)``, ``{"input_ids": ..., "attention_mask": ...}`` or a string.
        render: ``None``/``"auto"`` (float tensors with 2-3 dims become images, the rest text);
            ``"image"`` (also square 1-D vectors, e.g. 64 features -> 8x8); ``"text"`` (never images);
            or a callable ``render(example) -> str | wandb.Image | array image``.
        tokenizer: decodes 1-D integer token ids (``tokenizer.decode``); without one ids are listed.

    Returns:
        A ``str`` or a ``wandb.Image``, and the scalar label (``None`` when there is none).
    """
    content, label = split_example(example)
    if callable(render):
        return _cell(render(example)), label
    if render not in (None, "auto", "image", "text"):
        raise ValueError(f"render must be 'auto', 'image', 'text' or a callable, got {render!r}")
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
    top_k: int | None = 10,
    self_influence_top: int = 20,
    bins: int = 64,
    max_query_histograms: int = 16,
    prefix: str = "tda",
) -> dict[str, int]:
    """Log influence panels of an attribution result to Weights & Biases.

    Logged in one ``run.log`` call (keys under ``prefix``):

    - ``{prefix}/influence``: a table of the top-k proponents and opponents of every query (columns
      ``query_id, query, query_label, kind, rank, example_id, score, example, label``; filter it by
      ``query_id`` in the UI); ``example``/``query`` are text or images (see ``render``).
    - ``{prefix}/scores``: a histogram of every score in the table (dense results: of all ``[Q, N]``
      scores), and ``{prefix}/scores_q<query_id>`` per query for dense results (the first
      ``max_query_histograms`` queries).
    - ``{prefix}/self_influence``: the ``self_influence_top`` examples with the largest self-influence
      (mislabel candidates) with their example and label, and ``{prefix}/self_influence_hist``.
    - ``{prefix}/checkpoints``: per query and checkpoint the total |score| (``abs_total``), its
      ``share`` of the sum over checkpoints and the signed ``total``; ``{prefix}/checkpoint_share``
      is a bar chart of the mean share per checkpoint.

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
        top_k: proponents and opponents shown per query (``None``: all of a top-k result's).
        self_influence_top: rows of the self-influence table.
        bins: histogram bins.
        max_query_histograms: per-query histograms logged at most (dense results).
        prefix: key prefix (a W&B panel section).

    Returns:
        ``{key: rows}`` of what was logged (histograms: number of values).
    """
    wandb = require_wandb()
    run = resolve_run(run_or_logger)
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if not callable(render) and render not in (None, "auto", "image", "text"):
        raise ValueError(f"render must be 'auto', 'image', 'text' or a callable, got {render!r}")
    train = ExampleLookup(train_data) if train_data is not None else None
    queries = ExampleLookup(query_data) if query_data is not None else None
    cache: dict[tuple[str, int], tuple[Any, Any]] = {}

    def show(lookup: ExampleLookup | None, kind: str, key: int, by_id: bool) -> tuple[Any, Any]:
        if lookup is None:
            return None, None
        if (kind, key) not in cache:
            item = lookup.by_id(key) if by_id else lookup.at(key)
            cache[kind, key] = render_example(item, render, tokenizer)
        return cache[kind, key]

    q = result.scores.shape[0]
    qids = _query_ids(result, queries)
    by_qid = (
        queries is not None
        and result.query_ids is not None
        and queries.pos is not None
        and all(int(i) in queries.pos for i in qids)
    )
    if queries is not None and not by_qid and len(queries) != q:
        raise ValueError(
            f"query_data has {len(queries)} items but the result has {q} queries; pass the queries "
            "that were attributed, in the same order"
        )
    payload: dict[str, Any] = {}
    counts: dict[str, int] = {}

    hi_ids, hi_scores, lo_ids, lo_scores = _top_rows(result, top_k)
    rows = []
    for r in range(q):
        qcell, qlabel = show(queries, "q", qids[r] if by_qid else r, by_qid)
        for kind, ids, scores in (
            ("proponent", hi_ids[r], hi_scores[r]),
            ("opponent", lo_ids[r], lo_scores[r]),
        ):
            for rank, (eid, s) in enumerate(zip(ids.tolist(), scores.tolist(), strict=True), 1):
                cell, label = show(train, "t", eid, True)
                rows.append([qids[r], qcell, qlabel, kind, rank, eid, s, cell, label])
    key = f"{prefix}/influence"
    payload[key] = wandb.Table(columns=INFLUENCE_COLUMNS, data=rows, allow_mixed_types=True)
    counts[key] = len(rows)

    values = result.scores if result.dense else torch.cat([hi_scores, lo_scores], dim=1)
    _histogram(wandb, payload, counts, f"{prefix}/scores", values, bins)
    if result.dense:
        for r in range(min(q, max_query_histograms)):
            _histogram(wandb, payload, counts, f"{prefix}/scores_q{qids[r]}", values[r], bins)

    if self_influence is not None:
        si = _self_influence(self_influence, store)
        ids = store.example_ids if store is not None else result.example_ids
        if si.dim() != 1 or len(si) != len(ids):
            raise ValueError(
                f"self_influence has shape {tuple(si.shape)} but the store has {len(ids)} examples; "
                "pass the [N] tensor of store.self_influence(...) (store row order)"
            )
        top = torch.topk(si.float(), min(self_influence_top, len(si)))
        si_rows = []
        for rank, (row, v) in enumerate(
            zip(top.indices.tolist(), top.values.tolist(), strict=True), 1
        ):
            eid = int(ids[row])
            cell, label = show(train, "t", eid, True)
            si_rows.append([rank, eid, v, cell, label])
        key = f"{prefix}/self_influence"
        payload[key] = wandb.Table(
            columns=SELF_INFLUENCE_COLUMNS, data=si_rows, allow_mixed_types=True
        )
        counts[key] = len(si_rows)
        _histogram(wandb, payload, counts, f"{prefix}/self_influence_hist", si, bins)

    if checkpoint_scores:
        ck_rows, bar_rows = checkpoint_table(checkpoint_scores, qids)
        key = f"{prefix}/checkpoints"
        payload[key] = wandb.Table(columns=CHECKPOINT_COLUMNS, data=ck_rows)
        counts[key] = len(ck_rows)
        bar = wandb.Table(columns=["checkpoint", "mean_share"], data=bar_rows)
        key = f"{prefix}/checkpoint_share"
        payload[key] = wandb.plot.bar(
            bar, "checkpoint", "mean_share", title="share of |score| per checkpoint"
        )
        counts[key] = len(bar_rows)
    run.log(payload)
    return counts


def _query_ids(result: AttributionResult, queries: ExampleLookup | None) -> list[int]:
    q = result.scores.shape[0]
    if result.query_ids is not None:
        return [int(i) for i in result.query_ids.tolist()]
    if queries is not None and queries.ids is not None and len(queries.ids) == q:
        return [int(i) for i in queries.ids]
    return list(range(q))


def _top_rows(
    result: AttributionResult, top_k: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, scores)`` of proponents (descending) and opponents (ascending), ``[Q, k]`` each."""
    if result.dense:
        k = min(top_k or 10, result.scores.shape[1])
        hi = result.scores.float().topk(k, dim=1)
        lo = result.scores.float().topk(k, dim=1, largest=False)
        ids = result.example_ids
        return ids[hi.indices], hi.values, ids[lo.indices], lo.values
    k = result.scores.shape[1] if top_k is None else min(top_k, result.scores.shape[1])
    if result.opponents is None or result.opponent_scores is None:
        raise ValueError("a top-k AttributionResult needs opponents and opponent_scores")
    return (
        result.indices[:, :k],
        result.scores[:, :k].float(),
        result.opponents[:, :k],
        result.opponent_scores[:, :k].float(),
    )


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
    top-k results), ``share`` divides it by the sum over checkpoints.
    """
    steps = sorted(int(s) for s in checkpoint_scores)
    q = len(query_ids)
    abs_tot, tot = [], []
    for s in steps:
        v = checkpoint_scores[s]
        if isinstance(v, AttributionResult):
            parts = [v.scores] if v.dense else [v.scores, v.opponent_scores]
        else:
            parts = [torch.as_tensor(v)]
        parts = [p.detach().float().cpu().reshape(p.shape[0], -1) for p in parts]
        if any(p.shape[0] != q for p in parts):
            raise ValueError(
                f"checkpoint_scores[{s}] has {parts[0].shape[0]} queries but the result has {q}; "
                "attribute the same queries at every checkpoint"
            )
        abs_tot.append(sum(p.abs().sum(1) for p in parts))
        tot.append(sum(p.sum(1) for p in parts))
    a, t = torch.stack(abs_tot, 1).double(), torch.stack(tot, 1).double()  # [Q, S]
    denom = a.sum(1, keepdim=True)
    share = torch.where(denom > 0, a / denom.clamp_min(1e-300), torch.zeros_like(a))
    rows = [
        [int(query_ids[r]), s, float(a[r, j]), float(share[r, j]), float(t[r, j])]
        for r in range(q)
        for j, s in enumerate(steps)
    ]
    bar = [[str(s), float(share[:, j].mean())] for j, s in enumerate(steps)]
    return rows, bar
