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


def default_block_rows(width: int, terms: int, budget_bytes: int = 256 * 2**20) -> int:
    """Rows per block so that decoded fp32 blocks of all terms fit in ``budget_bytes``."""
    return max(64, budget_bytes // max(1, 4 * width * max(1, terms)))


def stream_scores(
    store: StoreReader,
    terms: list[ScoreTerm],
    top_k: int | None,
    block_rows: int | None = None,
    *,
    description: str = "scoring",
) -> torch.Tensor | TopK:
    """Score every stored row against every query.

    ``description`` labels the progress bar (one step per block; see :mod:`lightning_tda.progress`).

    Returns:
        ``[Q, N]`` dense scores when ``top_k is None``, else a :class:`TopK` over row positions.
    """
    if not terms:
        raise ValueError("no checkpoints to score: the method selected none")
    device = terms[0].query.device
    q = terms[0].query.shape[0]
    n = store.num_examples
    block = block_rows or default_block_rows(store.width, len(terms))
    keys = [(t.step, t.dataset) for t in terms]
    dense = None if top_k is not None else torch.empty(q, n, dtype=torch.float32)
    k = None if top_k is None else min(int(top_k), n)
    best_v = best_r = low_v = low_r = None
    label = f"{description}: {_checkpoints(terms)}"
    with progress_bar(label, n, unit="rows") as bar:
        for start, stop, blocks in _counted(store.iter_blocks(keys, block), bar):
            s = torch.zeros(q, stop - start, dtype=torch.float32, device=device)
            for t, x in zip(terms, blocks, strict=True):
                x = x.to(device, non_blocking=True)
                if t.normalize_train:
                    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
                if t.score_fn is not None:
                    ts = t.score_fn(t.query, x)
                    s += ts if t.row_weight is None else ts * t.row_weight[start:stop].to(device)
                elif t.row_weight is None:
                    s.addmm_(t.query, x.T)
                else:
                    s += (t.query @ x.T) * t.row_weight[start:stop].to(device)
            del blocks, x  # free this block before the next is read: one block in memory, not two
            if dense is not None:
                dense[:, start:stop] = s.cpu()
                continue
            best_v, best_r = _merge(best_v, best_r, s, start, k, largest=True)
            low_v, low_r = _merge(low_v, low_r, s, start, k, largest=False)
    if dense is not None:
        return dense
    return TopK(best_v.cpu(), best_r.cpu(), low_v.cpu(), low_r.cpu())


def _counted(blocks: Iterator[tuple[int, int, list[torch.Tensor]]], bar: Bar):
    """``blocks`` unchanged; advances ``bar`` by a block's rows once the caller is done with it."""
    for start, stop, b in blocks:
        yield start, stop, b
        del b  # not held while the next block is read
        bar.advance(stop - start)


def _checkpoints(terms: list) -> str:
    steps = len({t.step for t in terms})
    return f"{steps} checkpoint{'s' if steps != 1 else ''}"


def _merge(v, r, s, start, k, largest):
    """Running top-k: the block's own top-k (``s`` ``[Q, B]``, rows from ``start``) merged with the
    ``[Q, k]`` kept so far; nothing of size ``[Q, B]`` besides ``s`` is formed."""
    vals, idx = torch.topk(s, min(k, s.shape[1]), dim=1, largest=largest, sorted=True)
    rows = idx + start
    if v is None:
        return vals, rows
    vals, rows = torch.cat([v, vals], dim=1), torch.cat([r, rows], dim=1)
    vals, idx = torch.topk(vals, min(k, vals.shape[1]), dim=1, largest=largest, sorted=True)
    return vals, torch.gather(rows, 1, idx)


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
