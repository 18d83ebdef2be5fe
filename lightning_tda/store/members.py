"""Extra row datasets added to a complete checkpoint after training (e.g. dropout-ensemble members).

A dataset is written under ``<checkpoint>/partial/`` and moved next to ``train`` only once every row
is in place, so a crash never leaves a half-written member visible to readers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from lightning_tda.errors import StoreError
from lightning_tda.store import schema
from lightning_tda.store.extension import PARTIAL, ExtensionGroup  # noqa: F401 (PARTIAL re-exported)
from lightning_tda.store.writer import _attr


def member_dataset(member: int) -> str:
    """Name of dropout-ensemble member ``member``'s train rows."""
    return f"train_dropout{int(member)}"


def member_loss_dataset(member: int) -> str:
    """Name of dropout-ensemble member ``member``'s per-example losses."""
    return f"loss_dropout{int(member)}"


def write_checkpoint_rows(
    path: str | os.PathLike,
    step: int,
    name: str,
    rows: torch.Tensor,
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Store ``rows`` (``[N, D]`` fp32 rows or ``[N]`` values, store row order) as dataset ``name``."""
    gname = schema.checkpoint_name(step)
    with ExtensionGroup(path, gname, create=False) as ext:
        g = ext.group
        if g is None or not g.attrs.get("complete", False):
            raise StoreError(f"checkpoint {step} is not a complete checkpoint of {path}")
        n, d = g[schema.TRAIN].shape if schema.TRAIN in g else (None, None)
        if n is not None and rows.dim() == 2 and tuple(rows.shape) != (n, d):
            raise StoreError(
                f"rows of shape {tuple(rows.shape)} do not match the store's [{n}, {d}]"
            )
        if name in g:
            if not overwrite:
                raise StoreError(
                    f"checkpoint {step} already has {name!r}; pass overwrite=True to replace it"
                )
            del g[name]
        part = ext.partial(name)
        storage = str(ext.file.attrs["storage_dtype"]) if rows.dim() == 2 else "float32"
        data = schema.encode_rows(rows, storage)
        if storage == "float16" and rows.numel() and float(rows.abs().max()) > schema.FP16_MAX:
            raise StoreError(
                f"a value of {name!r} overflows float16; re-log the run with dtype='bfloat16' or 'float32'"
            )
        ds = part.create_dataset(name, data=data, track_times=False)
        ds.attrs["encoding"] = storage
        for k, v in (attrs or {}).items():
            ds.attrs[k] = _attr(v)
        ext.publish(name)


def order_rows(
    rows: torch.Tensor, ids: torch.Tensor | None, store_ids: torch.Tensor
) -> torch.Tensor:
    """Reorder ``rows`` (data order, ids ``ids``) into the store's row order; every id exactly once."""
    if ids is None:
        raise StoreError("the attribution data carries no example ids; wrap it in IndexedDataset")
    pos = {int(i): r for r, i in enumerate(ids.tolist())}
    if len(pos) != len(ids):
        raise StoreError("example ids in the data are not unique")
    missing = [int(i) for i in store_ids.tolist() if int(i) not in pos]
    if missing or len(ids) != len(store_ids):
        raise StoreError(
            f"the data must hold exactly the store's {len(store_ids)} examples (missing ids "
            f"{missing[:5]}, {len(ids)} given); pass the attribution data that was logged"
        )
    order = torch.tensor(np.array([pos[int(i)] for i in store_ids.tolist()]), dtype=torch.long)
    return rows.index_select(0, order.to(rows.device))
