"""Names and version of the HDF5 layout (documented in docs/store.md)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

FORMAT = "lightning_tda"
SCHEMA_VERSION = 1  # stores written by a sweep (every checkpoint holds every example's row)
# in-flight stores (GradientLogger(mode="in_flight")) hold batch checkpoints that older readers would
# misread, so they are written as version 2; this reader reads both (docs/store.md)
IN_FLIGHT_SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)

CHECKPOINTS = "checkpoints"
BASES = (
    "projection_basis"  # group: <layer>/out [O, k_out], <layer>/in [I(+1), k_in] (PCA basis only)
)
EXAMPLE_IDS = "examples/ids"
QUERY_IDS = "queries/ids"

TRAIN = "train"  # [N, D] projected gradients
TRAIN_PRECOND = "train_precond"  # [N, D] projected optimizer-preconditioned gradients
# storage="lorif": rank-c factors of each layer's block instead of the dense rows (docs/store.md)
TRAIN_FACTORS = "train_factors"  # [N, W] factor rows standing for `train`
TRAIN_PRECOND_FACTORS = "train_precond_factors"  # [N, W] factor rows standing for `train_precond`
FACTORED = {TRAIN: TRAIN_FACTORS, TRAIN_PRECOND: TRAIN_PRECOND_FACTORS}  # dense name -> factored
STORAGE_KINDS = ("dense", "lorif")
TRAIN_LOSS = "loss"  # [N] per-example loss
ROW_IDS = "ids"  # [N] example id of each row
QUERY = "query"  # [Q, D]
QUERY_LOSS = "query_loss"  # [Q]
OPTIMIZER = "optimizer"  # group: factored second moments per layer
KFAC = "kfac"  # group: <layer>/A [k_in, k_in], <layer>/S [k_out, k_out] projected K-FAC factors
STATE = "state"  # group: trainable parameters and buffers at this checkpoint
STATE_PACKED = "state_packed"  # in-flight steps: the same tensors as one uint8 dataset of raw bytes
STATE_INDEX = "state_index"  # group attribute: JSON [name, dtype, shape, offset, nbytes] per tensor
STATE_STEP = (
    "state_step"  # attr of an in-flight step: the step whose saved state stands for its θ_t
)

# in-flight logging (docs/store.md "In-flight stores")
LOGGING_MODE = "logging_mode"  # root attr: "sweep" (absent = sweep) or "in_flight"
ROWS_KIND = "rows"  # checkpoint attr: "batch" = only the rows of that optimizer step's batch
BATCH_ROWS = "batch"
STEP_META = "step_meta"  # in-flight step attr: JSON of its other attributes (lr_sum, epoch, ...)
BATCH_VIEW = "@batch"  # "train@batch": a batch checkpoint's rows seen as a sparse [N, D] matrix


def group_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint group's attributes, an in-flight step's ``step_meta`` JSON unpacked into them."""
    out = {k: attrs[k] for k in attrs if k != STEP_META}
    if STEP_META in attrs:
        out.update(json.loads(attrs[STEP_META]))
    return out


def meta_json(values: Mapping[str, Any]) -> str:
    """``values`` as the JSON of a ``step_meta`` attribute (numpy scalars as Python numbers)."""
    return json.dumps(dict(values), default=_plain)


def batch_view(name: str, steps: Sequence[int] | None = None) -> str:
    """Reader alias of batch checkpoints' row dataset ``name`` as one sparse ``[N, D]`` view.

    ``"train@batch"``: the rows of the checkpoint it is read at; ``"train@batch:0,1,2"``: the rows of
    the batch checkpoints at steps 0, 1, 2 (read at the first), kept apart per step (``RowBlock``)."""
    return name + BATCH_VIEW + ("" if steps is None else ":" + ",".join(str(int(s)) for s in steps))


def batch_base(name: str) -> str | None:
    """``"train"`` for ``"train@batch"`` or ``"train@batch:0,1"``; ``None`` for a plain dataset name."""
    i = name.find(BATCH_VIEW)
    return name[:i] if i >= 0 else None


def batch_steps(name: str) -> list[int] | None:
    """The steps listed by a ``batch_view(name, steps)`` alias (``None`` when it lists none)."""
    i = name.find(BATCH_VIEW + ":")
    if i < 0:
        return None
    return [int(s) for s in name[i + len(BATCH_VIEW) + 1 :].split(",") if s]


STORAGE_DTYPES = ("float16", "bfloat16", "float32")
FP16_MAX = 65504.0


def checkpoint_name(global_step: int) -> str:
    return f"{CHECKPOINTS}/{int(global_step):010d}"


def to_json(obj: Any) -> str:
    return json.dumps(obj, default=_json_default, sort_keys=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    return repr(o)


def h5_dtype(storage: str) -> np.dtype:
    """HDF5 on-disk dtype; bfloat16 is stored as its uint16 bit pattern."""
    return {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float32": np.dtype("<f4")}[
        storage
    ]


def precond_encoding(storage: str) -> str:
    """Encoding of optimizer-preconditioned rows: bfloat16 where the rows are float16 (same bytes,
    float32's exponent range)."""
    return "bfloat16" if storage == "float16" else storage


def dataset_encoding(ds: Any, default: str) -> str:
    """Encoding of a row dataset: its ``encoding`` attribute, else the store's storage dtype."""
    enc = ds.attrs.get("encoding")
    return str(enc) if enc is not None else default


def pack_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, str]:
    """Tensors as one ``uint8`` array of their raw bytes, and the JSON index that unpacks them."""
    index, parts, offset = [], [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
        dtype = str(t.dtype).removeprefix("torch.")
        index.append([name, dtype, list(t.shape), offset, int(raw.size)])
        parts.append(raw)
        offset += raw.size
    packed = np.concatenate(parts) if parts else np.empty(0, np.uint8)
    return packed, json.dumps(index)


def has_state(g: Any) -> bool:
    """Whether a checkpoint group saved the trainable state (as a group or packed)."""
    return STATE in g or STATE_PACKED in g


def unpack_tensors(packed: np.ndarray, index: str) -> dict[str, torch.Tensor]:
    """The tensors of :func:`pack_tensors` (copies, in their own dtypes and shapes)."""
    out = {}
    for name, dtype, shape, offset, nbytes in json.loads(index):
        raw = torch.from_numpy(np.array(packed[offset : offset + nbytes], dtype=np.uint8))
        out[name] = raw.view(getattr(torch, dtype)).reshape(shape)
    return out


def storage_itemsize(storage: str) -> int:
    """Bytes per stored value of the storage dtype."""
    return 4 if storage == "float32" else 2


def encode_rows(rows: torch.Tensor, storage: str) -> np.ndarray:
    """fp32 tensor -> numpy array in the storage encoding (on the CPU)."""
    if storage == "bfloat16":
        return rows.to(torch.bfloat16).view(torch.int16).cpu().numpy().view("<u2")
    if storage == "float16":
        return rows.to(torch.float16).cpu().numpy()
    return rows.float().cpu().numpy()


def decode_rows(arr: np.ndarray, storage: str) -> torch.Tensor:
    """Stored block -> fp32 tensor (float32 rows: ``arr``'s own memory when it is writable and
    contiguous, no copy; float16 / bfloat16: one conversion pass, no intermediate copy)."""
    if not arr.flags.writeable:  # (torch.from_numpy warns on read-only memory)
        arr = arr.copy()
    arr = np.ascontiguousarray(arr)
    if storage == "bfloat16":
        return torch.from_numpy(arr.view("<i2")).view(torch.bfloat16).float()
    return torch.from_numpy(arr).float()


# -- integrity (docs/store.md "Integrity") ---------------------------------------------------------
# A complete checkpoint is sealed in the same atomic commit that marks it complete: every dataset in
# it gets a CRC attribute (raw bytes, then its other attributes) and the group an INTEGRITY attribute
# (JSON: CRC of its attributes, names of its datasets). The root attributes are sealed likewise at
# every commit, with the list of sealed checkpoints. Readers verify what they read; a damaged file is
# a StoreError, never a silently different score. Stores without these attributes are not verified.
INTEGRITY = "integrity"
CRC = "crc32"
_CRC_BLOCK = 1 << 26  # bytes read per block when checksumming a dataset


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()] if v.dtype.kind in "SO" else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode("utf-8", "backslashreplace")
    return v


def attrs_crc(attrs: Mapping[str, Any], keys: Iterable[str]) -> int:
    """CRC-32 of the attributes ``keys`` (canonical JSON of their values as read back from HDF5)."""
    canon = json.dumps(
        {k: _plain(attrs[k]) for k in keys}, sort_keys=True, default=repr, allow_nan=True
    )
    return zlib.crc32(canon.encode())


def crc_update(crc: int, arr: np.ndarray) -> int:
    """Continue ``crc`` over the raw bytes of ``arr``."""
    return zlib.crc32(np.ascontiguousarray(arr).view(np.uint8), crc)


def dataset_crc(
    ds: Any, data_crc: int | None = None, attrs: Mapping[str, Any] | None = None
) -> int:
    """CRC-32 of a dataset's raw bytes (``data_crc`` when already computed), then its dtype, shape
    and attributes (``attrs``: its attributes as just written, so they are not read back)."""
    if data_crc is None:
        data_crc = 0
        if ds.ndim == 0:
            data_crc = crc_update(0, np.asarray(ds[()]))
        elif ds.size:
            row = max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:])))
            step = max(1, _CRC_BLOCK // row)
            for start in range(0, ds.shape[0], step):
                data_crc = crc_update(data_crc, ds[start : start + step])
    attrs = ds.attrs if attrs is None else attrs
    keys = sorted(k for k in attrs if k != CRC)
    layout = f"{ds.dtype.str} {tuple(ds.shape)} {attrs_crc(attrs, keys)}"
    return zlib.crc32(layout.encode(), data_crc)
