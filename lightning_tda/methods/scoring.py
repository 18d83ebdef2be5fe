"""Streaming scorer: bounded-memory dot products of query vectors against every stored row.

A score is a sum of terms, one per (checkpoint, dataset): ``s[q, i] = Σ_t <u_t[q], x_t[i]>``
(optionally with ``x_t[i]`` unit-normalised). Rows are read in blocks; only the running top-k
proponents/opponents (or the dense ``[Q, N]`` matrix on request) are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from lightning_tda.progress import Bar, progress_bar
from lightning_tda.store.reader import StoreReader


@dataclass
class ScoreTerm:
    """``<query[q], train_row[i]>`` for one checkpoint dataset.

    Attributes:
        step: checkpoint global step.
        dataset: ``"train"`` or ``"train_precond"``.
        query: ``[Q, D]`` fp32 query vectors with any per-column weights already applied.
        normalize_train: divide each train row by its L2 norm first (cosine).
        row_weight: optional ``[N]`` factor per train row (store order), e.g. TRAK's ``1 - p_i`` or a
            stage-membership mask.
        score_fn: optional ``score_fn(query, block) -> [Q, B]`` replacing the dense ``query @ block.T``
            for datasets whose rows are not plain vectors (e.g. LoRIF's rank-c factors).
    """

    step: int
    dataset: str
    query: torch.Tensor
    normalize_train: bool = False
    row_weight: torch.Tensor | None = None
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


@dataclass
class SelfTerm:
    """``row_weight_i * <apply(a_i) * weight, b_i>`` between two row datasets.

    Attributes:
        step: checkpoint of ``dataset_a`` (and of ``dataset_b`` unless ``step_b`` is given).
        weight: ``[D]`` per-column factor.
        apply: optional map of a block of rows ``[B, D] -> [B, D]`` (e.g. a preconditioner).
        row_weight: optional ``[N]`` factor per row.
        pair_fn: optional ``pair_fn(a, b) -> [B]`` replacing ``<apply(a) * weight, b>`` (for rows that
            are not plain vectors, e.g. LoRIF's factors).
    """

    step: int
    dataset_a: str
    dataset_b: str
    weight: torch.Tensor
    apply: Callable[[torch.Tensor], torch.Tensor] | None = None
    row_weight: torch.Tensor | None = None
    step_b: int | None = None
    pair_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


@dataclass
class TopK:
    values: torch.Tensor  # [Q, k] descending
    rows: torch.Tensor  # [Q, k] row positions
    low_values: torch.Tensor  # [Q, k] ascending
    low_rows: torch.Tensor  # [Q, k]


def default_block_rows(
    width: int, terms: int, queries: int = 0, budget_bytes: int = 256 * 2**20
) -> int:
    """Rows per block so that a block's decoded fp32 rows of all terms plus its ``[Q, B]`` fp32
    scores (two of them while a term is added) fit in ``budget_bytes``.

    >>> default_block_rows(1024, 1), default_block_rows(1024, 1, queries=10_000)
    (65536, 3192)
    """
    per_row = 4 * (width * max(1, terms) + 2 * max(0, queries))
    return max(64, budget_bytes // per_row)


def stream_scores(
    store: StoreReader,
    terms: list[ScoreTerm],
    top_k: int | None,
    block_rows: int | None = None,
    *,
    description: str = "scoring",
    rows: tuple[int, int] | None = None,
) -> torch.Tensor | TopK | None:
    """Score every stored row (or rows ``lo:hi`` of ``rows``) against every query.

    ``description`` labels the progress bar (one step per block; see :mod:`lightning_tda.progress`).
    ``block_rows`` defaults to :func:`default_block_rows` for the terms and queries.

    Returns:
        ``[Q, N]`` (``[Q, hi - lo]``) dense scores when ``top_k is None``, else a :class:`TopK` over
        row positions (``None`` for an empty ``rows`` range).
    """
    if not terms:
        raise ValueError("no checkpoints to score: the method selected none")
    device = terms[0].query.device
    q = terms[0].query.shape[0]
    lo, hi = (0, store.num_examples) if rows is None else rows
    block = block_rows or default_block_rows(store.width, len(terms), q)
    keys = [(t.step, t.dataset) for t in terms]
    dense = None if top_k is not None else torch.empty(q, hi - lo, dtype=torch.float32)
    k = None if top_k is None else min(int(top_k), store.num_examples)
    best_v = best_r = low_v = low_r = None
    label = f"{description}: {_checkpoints(terms)}"
    with progress_bar(label, hi - lo, unit="rows") as bar:
        for start, stop, blocks in _counted(store.iter_blocks(keys, block, rows), bar):
            s = None
            for t, x in zip(terms, blocks, strict=True):
                s = _add_term(s, t, x.to(device, non_blocking=True), start, stop)
            del blocks, x  # free this block before the next is read: one block in memory, not two
            if dense is not None:
                dense[:, start - lo : stop - lo] = s.cpu()
                continue
            best_v, best_r, low_v, low_r = _merge(best_v, best_r, low_v, low_r, s, start, k)
    if dense is not None:
        return dense
    if best_v is None:
        return None
    return TopK(best_v.cpu(), best_r.cpu(), low_v.cpu(), low_r.cpu())


def _add_term(
    s: torch.Tensor | None, t: ScoreTerm, x: torch.Tensor, start: int, stop: int
) -> torch.Tensor:
    """``s`` ``[Q, B]`` fp32 plus term ``t``'s scores of the block ``x`` ``[B, D]`` (rows
    ``start:stop``); the first term (``s is None``) is written straight into a new ``s``."""
    if t.normalize_train:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
    if t.score_fn is None and t.row_weight is None:
        if s is None:
            return torch.mm(t.query, x.T).float()
        return s.addmm_(t.query, x.T)
    ts = t.score_fn(t.query, x) if t.score_fn is not None else t.query @ x.T
    if t.row_weight is not None:
        ts = ts * t.row_weight[start:stop].to(x.device)
    if s is None:
        return ts.to(torch.float32, copy=True)
    return s.add_(ts)


def _counted(blocks: Iterator[tuple[int, int, list[torch.Tensor]]], bar: Bar):
    """``blocks`` unchanged; advances ``bar`` by a block's rows once the caller is done with it."""
    for start, stop, b in blocks:
        yield start, stop, b
        del b  # not held while the next block is read
        bar.advance(stop - start)


def _checkpoints(terms: list) -> str:
    steps = len({t.step for t in terms})
    return f"{steps} checkpoint{'s' if steps != 1 else ''}"


def _merge(best_v, best_r, low_v, low_r, s, start, k):
    """Running top-k proponents and opponents: the block's own (``s`` ``[Q, B]``, rows from ``start``,
    :func:`block_top_k`) merged with the ``[Q, k]`` kept so far."""
    (hv, hr), (lv, lr) = block_top_k(s, k)
    hr, lr = hr + start, lr + start
    if best_v is None:
        return hv, hr, lv, lr
    hv, hr = _merge_sorted(best_v, best_r, hv, hr, k, largest=True)
    lv, lr = _merge_sorted(low_v, low_r, lv, lr, k, largest=False)
    return hv, hr, lv, lr


def _merge_sorted(v, r, bv, br, k, largest):
    return merge_top_k(torch.cat([v, bv], dim=1), torch.cat([r, br], dim=1), k, largest)


def merge_top_k(
    values: torch.Tensor, rows: torch.Tensor, k: int, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest (smallest) of candidate ``values`` ``[Q, C]`` and their ``rows``, sorted."""
    vals, idx = torch.topk(values, min(k, values.shape[1]), dim=1, largest=largest, sorted=True)
    return vals, torch.gather(rows, 1, idx)


_GROUP = 32  # block_top_k: columns per group (column c is in group c % (B // 32))


def block_top_k(
    s: torch.Tensor, k: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((values, columns), (low_values, low_columns))``: the ``k`` largest and ``k`` smallest
    entries of each row of ``s`` ``[Q, B]`` (each ``[Q, min(k, B)]``, sorted), as ``torch.topk`` gives.

    On a wide block on the CPU the columns are split into ``B // 32`` interleaved groups of 32; one
    pass takes each group's max and min, and only the ``k`` groups with the largest max (smallest min)
    can hold a top (bottom) entry, so ``torch.topk`` runs on ``32 k`` candidates per row instead of
    ``B``. A GPU's ``topk`` is fast as it is; a block with a NaN score (it comes out on top: ``topk``
    ranks NaN highest) takes plain ``topk``, whose NaN order a group's NaN min would not keep."""
    q, b = s.shape
    k = min(k, b)
    groups = b // _GROUP
    if q and s.device.type == "cpu" and s.is_floating_point() and groups >= 4 * k:
        hi, lo = _grouped_top_k(s, k, groups)
        if not bool(torch.isnan(hi[0][:, 0]).any()):  # (a CPU tensor: no device sync)
            return hi, lo
    top = torch.topk(s, k, dim=1, largest=True, sorted=True)
    low = torch.topk(s, k, dim=1, largest=False, sorted=True)
    return (top.values, top.indices), (low.values, low.indices)


def _grouped_top_k(s: torch.Tensor, k: int, groups: int):
    """:func:`block_top_k` through the ``groups`` interleaved column groups (see there)."""
    q, b = s.shape
    v = s[:, : groups * _GROUP].view(q, _GROUP, groups)
    mx, mn = v.amax(dim=1), v.amin(dim=1)  # [Q, G] each (torch.aminmax is many times slower here)
    offsets = torch.arange(_GROUP, device=s.device).mul_(groups)  # group g: columns g + offsets
    tail = torch.arange(groups * _GROUP, b, device=s.device).expand(q, -1)  # in no group
    out = []
    for ext, largest in ((mx, True), (mn, False)):
        g = torch.topk(ext, k, dim=1, largest=largest, sorted=False).indices  # [Q, k]
        cols = torch.cat([(g[:, :, None] + offsets).reshape(q, -1), tail], dim=1)
        vals, i = torch.topk(s.gather(1, cols), k, dim=1, largest=largest, sorted=True)
        out.append((vals, cols.gather(1, i)))
    return out[0], out[1]


def stream_self_influence(
    store: StoreReader,
    terms: list[SelfTerm],
    block_rows: int | None = None,
    *,
    description: str = "self-influence",
) -> torch.Tensor:
    """``[N]``: ``Σ_t <weight ⊙ a_i, b_i>`` for every stored row (``description`` labels the progress bar)."""
    pairs: list[tuple[tuple[int, str], tuple[int, str]]] = [
        ((t.step, t.dataset_a), (t.step if t.step_b is None else t.step_b, t.dataset_b))
        for t in terms
    ]
    keys = list(dict.fromkeys(k for pair in pairs for k in pair))  # each dataset read once
    # one more [B, D] fp32 term: the product a_i * b_i formed below
    block = block_rows or default_block_rows(store.width, len(keys) + 1)
    out = torch.zeros(store.num_examples, dtype=torch.float64)
    label = f"{description}: {_checkpoints(terms)}"
    with progress_bar(label, store.num_examples, unit="rows") as bar:
        for start, stop, blocks in _counted(store.iter_blocks(keys, block), bar):
            acc = torch.zeros(stop - start, dtype=torch.float64)
            for (ka, kb), t in zip(pairs, terms, strict=True):
                a, b = blocks[keys.index(ka)], blocks[keys.index(kb)]
                if t.pair_fn is not None:
                    term = t.pair_fn(a, b).double()
                else:
                    if t.apply is not None:
                        a = t.apply(a)
                    term = torch.mv(a * b, t.weight.to(a.dtype)).double()  # one [B, D] temporary
                if t.row_weight is not None:
                    term = term * t.row_weight[start:stop].double()
                acc += term
            blocks = a = b = None  # free this block before the next is read
            out[start:stop] = acc
    return out.float()
