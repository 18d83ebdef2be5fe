"""``lightning-tda report``: one self-contained HTML page that explains a logged run.

The page holds the store summary, for every query its strongest proponents and opponents (ids,
scores and the examples themselves: text, or a small image for image-like tensors such as 8x8
digits), each query's score distribution, and the training examples of highest self-influence
(mislabel / hard-example candidates). Plots are PNGs drawn with matplotlib's Agg backend and
embedded as base64 ``data:`` URIs, so the file can be mailed or attached as one artifact::

    from lightning_tda.report import write_report
    write_report("runs/tda.h5", test_set, model, train_set, "report.html", method="tracin")

Rows carry ``data-example-id`` and ``data-score`` attributes so tools can read the page back.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_tda._moved import moved
from lightning_tda.attribution import AttributionStore
from lightning_tda.capture.task import Task
from lightning_tda.data.indexed import EXAMPLE_ID_KEY, Indexed
from lightning_tda.explain import (
    ExampleLookup,
    Explanation,
    QueryExplanation,
    RankedExample,
    SelfInfluenceOutliers,
    explain,
    ids_record,
    query_ids_spec,
    store_self_influence,
    task_rendering,
)
from lightning_tda.methods import AttributionMethod, get_method
from lightning_tda.methods.auto import AUTO, auto_method

Rendering = str | np.ndarray | torch.Tensor | tuple[Any, str] | None
"""What a renderer returns: text, an image array (``[H, W]``, ``[H, W, 3]`` or ``[C, H, W]``), an
``(image, caption)`` pair, or ``None`` to show nothing."""
Renderer = Callable[[Any], Rendering]
"""``render(item) -> Rendering`` for one dataset item (as the dataset returns it, id included)."""

_MAX_TEXT = 2000

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:12px}
pre.text{white-space:pre-wrap;max-width:28em;margin:0;font-size:12px}
section.query{border-top:1px solid #ccc;margin-top:1.5em;padding-top:.5em}
.tables{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}
table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 6px;vertical-align:middle;text-align:left}
img.example{width:64px;image-rendering:pixelated;border:1px solid #999}
.caption{font-size:11px;color:#555}
.pos{color:#1a7f37}.neg{color:#c0392b}.note{color:#666;font-size:13px}
"""


# -- rendering ---------------------------------------------------------------------------------


def _scalar(y: Any) -> int | float | str | None:
    """A label as a plain number or string (``None`` when ``y`` is not a scalar)."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    if isinstance(y, np.ndarray | np.generic):
        if y.size != 1:
            return None
        y = y.item()
    if isinstance(y, float) and y.is_integer():
        return int(y)
    return y if isinstance(y, int | float | str) else None


def _as_image(x: Any) -> np.ndarray | None:
    """``[H, W]`` or ``[H, W, 3]`` array for image-like floats/uint8, else ``None``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray) or x.size < 16:
        return None
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        return None  # integer vectors are token ids or labels, not pixels
    if x.ndim == 1:
        side = math.isqrt(x.size)
        return x.reshape(side, side) if side * side == x.size else None
    if x.ndim == 2:
        return x
    if x.ndim == 3 and x.shape[0] in (1, 3):
        x = np.moveaxis(x, 0, -1)
    if x.ndim == 3 and x.shape[-1] == 1:
        return x[..., 0]
    if x.ndim == 3 and x.shape[-1] == 3:
        return x
    return None


def _tokens(x: Any, tokenizer: Any = None) -> str | None:
    """``tokenizer.decode(ids)`` of a 1-D integer tensor, else its ids listed (``None``: not ids)."""
    if isinstance(x, torch.Tensor) and not x.dtype.is_floating_point and x.dim() == 1:
        ids = x.tolist()
        if tokenizer is not None:
            return tokenizer.decode(ids)
        return "tokens: " + " ".join(map(str, ids[:128])) + (" ..." if len(ids) > 128 else "")
    return None


def _mapping_ids(row: Mapping) -> torch.Tensor:
    """A row's ``input_ids`` (``[T]``), without padding when it has an ``attention_mask``."""
    ids = torch.as_tensor(row["input_ids"]).reshape(-1)
    mask = row.get("attention_mask")
    if mask is not None and torch.as_tensor(mask).numel() == ids.numel():
        ids = ids[torch.as_tensor(mask).reshape(-1).bool()]
    return ids


def default_render(item: Any, tokenizer: Any = None) -> Rendering:
    """Render one dataset item: strings and ``{"text": ...}`` rows as text, token-id tensors as
    ``tokenizer.decode(ids)`` (their ids without a tokenizer), image-like float tensors (``[H, W]``,
    ``[C, H, W]``, or a 1-D vector of square length such as an 8x8 digit) as an image; an ``(x, y)``
    pair gets the caption ``label y``.

    Pass ``task=`` (its ``render``) or ``render=`` to :func:`write_report` for anything else.
    """
    if isinstance(item, Indexed):
        item = item.data
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping):
        row = {k: v for k, v in item.items() if k != EXAMPLE_ID_KEY}
        for key in ("text", "sentence", "content", "prompt"):
            if isinstance(row.get(key), str):
                return row[key]
        label = _scalar(row.get("label", row.get("labels")))
        for key in ("image", "pixel_values", "x"):
            img = _as_image(row.get(key))
            if img is not None:
                return img if label is None else (img, f"label {label}")
        if "input_ids" in row:
            return _tokens(
                _mapping_ids(row) if tokenizer else torch.as_tensor(row["input_ids"]).reshape(-1),
                tokenizer,
            )
        return repr(row)[:_MAX_TEXT]
    if isinstance(item, tuple | list) and len(item) == 2:
        x, y = item
        label = _scalar(y)
        suffix = "" if label is None else f"label {label}"
        img = _as_image(x)
        if img is not None:
            return img if label is None else (img, suffix)
        text = x if isinstance(x, str) else _tokens(x, tokenizer)
        if text is not None:
            return f"{text}\n[{suffix}]" if suffix else text
    img = _as_image(item)
    if img is not None:
        return img
    return _tokens(item, tokenizer) or repr(item)[:_MAX_TEXT]


def task_renderer(task: Task | None = None, tokenizer: Any = None) -> Renderer:
    """``render(item)``: ``task.render(item)`` when it returns something (an image tensor or array
    becomes a PNG, a string text; the default rendering's ``label y`` caption is kept), else
    :func:`default_render` with ``tokenizer`` (which decodes token ids)."""

    def render(item: Any) -> Rendering:
        base = default_render(item, tokenizer)
        out = task_rendering(task, item)
        if out is None:
            return base
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().numpy()
        caption = base[1] if isinstance(base, tuple) else ""
        return (out, caption) if caption and not isinstance(out, tuple) else out

    return render


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _image_png(img: Any) -> bytes:
    """PNG bytes of an image array (grey images drawn dark-on-light, min-max scaled; images under
    64 pixels a side upscaled by an integer factor so they stay sharp in any viewer)."""
    from matplotlib.image import imsave

    arr = _as_image(img)
    if arr is None:
        raise ValueError(
            f"cannot draw an image of shape {tuple(np.shape(img))}; return [H, W], [H, W, 3] or "
            "[C, H, W] arrays from render="
        )
    arr = arr.astype(np.float64)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    scale = max(1, 64 // max(arr.shape[:2]))  # small images: nearest-neighbour upscaling
    arr = arr.repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    imsave(buf, arr, cmap="gray_r", vmin=0.0, vmax=1.0, format="png")
    return buf.getvalue()


def _render_html(rendering: Rendering, alt: str) -> str:
    if rendering is None:
        return ""
    caption = ""
    if isinstance(rendering, tuple):
        rendering, caption = rendering
    if isinstance(rendering, str):
        text = rendering if len(rendering) <= _MAX_TEXT else rendering[:_MAX_TEXT] + " ..."
        body = f'<pre class="text">{html.escape(text)}</pre>'
    else:
        uri = _png_uri(_image_png(rendering))
        body = f'<img class="example" src="{uri}" alt="{html.escape(alt)}">'
    if caption:
        body += f'<div class="caption">{html.escape(str(caption))}</div>'
    return body


def _histogram_png(
    values: np.ndarray, marks: list[tuple[float, str]], title: str, xlabel: str
) -> bytes:
    """A small histogram with vertical marker lines, drawn with the Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 2.2), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finite = values[np.isfinite(values)]
    ax.hist(finite, bins=min(60, max(10, finite.size // 10)), color="#4c72b0")
    for x, color in marks:
        ax.axvline(x, color=color, lw=1, ls="--")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.22, top=0.88)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# -- data access -------------------------------------------------------------------------------


def _as_dataset(data: Any, what: str) -> tuple[Dataset, Any]:
    """``(map-style dataset, collate_fn)`` from a Dataset or a DataLoader over one."""
    if isinstance(data, DataLoader):
        return data.dataset, data.collate_fn
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, str):
        return data, None
    raise TypeError(
        f"{what} must be a map-style Dataset (or a DataLoader over one) so its examples can be "
        f"shown; got {type(data).__name__}"
    )


# -- the report --------------------------------------------------------------------------------


def _lookups(
    store: AttributionStore, train_data: Any, queries: Any
) -> tuple[ExampleLookup | None, ExampleLookup]:
    """Id lookups of the training data (as the store records its ids) and of the queries."""
    record = ids_record(store)
    train = (
        None if train_data is None else ExampleLookup(train_data, "train_data", example_ids=record)
    )
    return train, ExampleLookup(queries, "queries", example_ids=query_ids_spec(store))


def write_report(
    store_or_path: AttributionStore | str | os.PathLike,
    queries: Any,
    model: torch.nn.Module,
    train_data: Any,
    out_html: str | os.PathLike,
    *,
    method: str | AttributionMethod = "auto",
    top_k: int = 5,
    render: Renderer | None = None,
    task: Task | None = None,
    tokenizer: Any = None,
    self_influence: bool | str = True,
    max_queries: int = 20,
    num_outliers: int = 10,
    title: str | None = None,
    queries_note: str = "",
) -> Path:
    """Write one self-contained HTML report of a store's attributions.

    Scores are computed once per query, densely (``[Q, N]`` fp32 in memory, ``Q <= max_queries``);
    the tables show its ``top_k`` largest (proponents) and smallest (opponents) entries, the same
    ids and scores as ``store.attribute(queries, model=model, method=method, top_k=top_k)``.

    Args:
        store_or_path: an :class:`AttributionStore` or its path.
        queries: a map-style Dataset (or a DataLoader over one) of query examples; the first
            ``max_queries`` are reported.
        model: an instance of the trained architecture (each checkpoint's weights are loaded from
            the store temporarily; the model is left as it was).
        train_data: the training Dataset that was logged, used to show examples by id (``None``: ids
            and scores only).
        out_html: output file (parent folders are created).
        method: attribution method name or instance.
        top_k: proponents and opponents shown per query.
        render: ``render(item) -> str | image array | (image, caption) | None``; overrides ``task``
            and ``tokenizer``.
        task: a :class:`~lightning_tda.capture.task.Task`: examples are drawn as ``task.render(item)``
            when it returns something (``ClassificationTask(image_shape=(8, 8), mean=..., std=...)``:
            the un-standardised ``x * std + mean``), else by :func:`default_render`; the queries
            are measured with it too (``None``: the task the store records).
        tokenizer: decodes token-id examples (``tokenizer.decode``) in the default rendering.
        self_influence: ``True`` for the self-influence of ``method`` (``"tracin"`` when the method
            defines none, e.g. STRIDE), a method name for another, ``False`` to leave it out.
        max_queries, num_outliers: queries reported and self-influence outliers listed, at most.
        title, queries_note: the page title, and a sentence saying where the queries come from.

    Returns:
        The path of the written HTML file.
    """
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if not isinstance(max_queries, int) or max_queries < 1:
        raise ValueError(f"max_queries must be a positive int, got {max_queries!r}")
    store = store_or_path
    if not isinstance(store, AttributionStore):
        store = AttributionStore(store_or_path)
    qdata, collate_fn = _as_dataset(queries, "queries")
    if len(qdata) == 0:
        raise ValueError("queries is empty; pass at least one query example")
    qdata = Subset(qdata, range(min(len(qdata), max_queries)))
    train, query_lookup = _lookups(store, train_data, qdata)
    m = auto_method(store)[0] if method == AUTO else get_method(method)
    res = store.attribute(
        qdata, model=model, method=m, top_k=None, collate_fn=collate_fn, task=task
    )
    si, si_name, note = (
        store_self_influence(store, m, self_influence, model) if self_influence else (None, "", "")
    )
    ex = explain(
        res, top_k=top_k, train=train,
        queries=query_lookup,
        self_influence=si, self_influence_ids=store.example_ids, self_influence_method=si_name,
        self_influence_note=note, num_outliers=num_outliers, task=task,
    )  # fmt: skip
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = report_html(ex, store.summary(), render, title, queries_note, tokenizer=tokenizer)
    out.write_text(page, encoding="utf-8")
    return out


def report_html(
    ex: Explanation,
    summary: str,
    render: Renderer | None = None,
    title: str | None = None,
    queries_note: str = "",
    *,
    tokenizer: Any = None,
) -> str:
    """The report page of an explanation of a dense result (``ex.scores [Q, N]``) as one string;
    ``summary`` is the store's :meth:`~AttributionStore.summary`. Examples are drawn with ``render``,
    else through ``ex.task`` and ``tokenizer`` (:func:`task_renderer`)."""
    render = render or task_renderer(ex.task, tokenizer)
    cache: dict[int, str] = {}

    def cell(row: RankedExample) -> str:
        if row.example_id not in cache:
            cache[row.example_id] = (
                ""
                if row.example is None
                else _render_html(render(row.example), f"example {row.example_id}")
            )
        return cache[row.example_id]

    name = html.escape(ex.method)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title or f'lightning-tda report: {ex.method}')}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title or 'Training-data attribution report')}</h1>",
        f'<p>method <strong class="method">{name}</strong> over checkpoints {html.escape(str(ex.checkpoints))};'
        f" {len(ex.queries)} queries, top {ex.top_k} of {ex.num_examples} training examples each. "
        "Score &gt; 0: training on the example lowered the query's loss (proponent); "
        "&lt; 0: raised it (opponent).</p>",
    ]
    if queries_note:
        parts.append(f'<p class="note">{html.escape(queries_note)}</p>')
    parts.append(f'<h2>Run</h2><pre class="summary">{html.escape(summary)}</pre>')
    parts.append("<h2>Queries</h2>")
    for qe in ex.queries:
        parts += _query_html(ex, qe, render, cell)
    if ex.self_influence is not None:
        parts.append(_self_influence_html(ex.self_influence, cell))
    parts.append("</body></html>")
    return "\n".join(parts)


def _query_html(
    ex: Explanation,
    qe: QueryExplanation,
    render: Renderer,
    cell: Callable[[RankedExample], str],
) -> list[str]:
    """One query's section: the query, its score histogram, its proponents and opponents."""
    qid = qe.query_id
    label = f"query {qe.position + 1}" + ("" if qid is None else f" (example #{qid})")
    row = ex.scores[qe.position].numpy()
    hist = _histogram_png(
        row,
        [(qe.proponents[-1].score, "#1a7f37"), (qe.opponents[-1].score, "#c0392b")],
        f"{ex.method} scores of all {row.size} training examples",
        "score (dashed: top-k cut-offs)",
    )
    return [
        f'<section class="query" data-query-index="{qe.position}" data-query-id="{"" if qid is None else qid}">',
        f"<h3>{html.escape(label)}</h3>",
        '<div class="tables"><div>',
        _render_html(render(qe.query), label),
        f'<div><img class="hist" src="{_png_uri(hist)}" alt="score histogram"></div></div>',
        _rows_html("proponents", qe.proponents, cell),
        _rows_html("opponents", qe.opponents, cell),
        "</div></section>",
    ]


def _rows_html(kind: str, rows: list[RankedExample], cell: Callable[[RankedExample], str]) -> str:
    cls = "pos" if kind == "proponents" else "neg"
    trs = [
        f'<tr data-example-id="{r.example_id}" data-score="{r.score!r}"><td>{r.rank}</td>'
        f'<td>#{r.example_id}</td><td class="{cls}">{r.score:+.4g}</td><td>{cell(r)}</td></tr>'
        for r in rows
    ]
    head = "<tr><th>rank</th><th>example</th><th>score</th><th></th></tr>"
    return f'<table class="{kind}"><caption>{kind}</caption>{head}{"".join(trs)}</table>'


def _self_influence_html(si: SelfInfluenceOutliers, cell: Callable[[RankedExample], str]) -> str:
    hist = _histogram_png(
        si.scores.double().numpy(),
        [(si.outliers[-1].score, "#c0392b")],
        f"{si.method} self-influence of {si.scores.numel()} training examples",
        "self-influence (dashed: outlier cut-off)",
    )
    rows = [
        f'<tr data-example-id="{r.example_id}" data-score="{r.score!r}"><td>{r.rank}</td>'
        f"<td>#{r.example_id}</td><td>{r.score:.4g}</td><td>{cell(r)}</td></tr>"
        for r in si.outliers
    ]
    return (
        '<section class="self-influence-section"><h2>Self-influence outliers</h2>'
        f"<p>Training examples with the highest {html.escape(si.method)} self-influence: the ones "
        "the model finds hardest or most inconsistent with the rest, e.g. mislabel candidates.</p>"
        + (f'<p class="note">{html.escape(si.note)}</p>' if si.note else "")
        + f'<div class="tables"><img class="hist" src="{_png_uri(hist)}" alt="self-influence histogram">'
        '<table class="self-influence"><tr><th>rank</th><th>example</th><th>self-influence</th>'
        f"<th></th></tr>{''.join(rows)}</table></div></section>"
    )


_MOVED_TO_CLI = ("add_report_parser", "main_report")
"""The report's command line moved to :mod:`lightning_tda.cli.report` (a higher layer)."""
__getattr__ = moved(__name__, "lightning_tda.cli.report", _MOVED_TO_CLI)
