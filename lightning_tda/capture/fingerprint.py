"""Fingerprints of a model: checksums of its frozen weights and of its captured architecture.

A store's rows are gradients at the logged weights. The trainable ones are saved per checkpoint and
loaded back when query gradients are recomputed; the frozen ones (a LoRA fine-tune's base: the bulk
of the model) are not, so a query model with another frozen base would give other query gradients
silently. The logger records two fingerprints in the store's root attributes (docs/store.md "Model
fingerprints") and ``AttributionStore.attribute`` compares them with the query model's.

Both are JSON objects with ``version``, ``hash`` (``"blake2b-64"``: a 64-bit BLAKE2b digest, hex) and
``digest`` (one digest over all ``entries``), and ``entries``: per entry name its digest, at the
``granularity`` recorded (``"tensor"``/``"layer"``, or ``"block"`` when per-entry names would
not fit in an HDF5 attribute: entries grouped up to their first numeric path component, e.g.
``model.layers.12``).

* :func:`frozen_fingerprint`: every parameter with ``requires_grad=False``, by name, digest of its
  dtype, shape and raw bytes (copied to the CPU one tensor at a time). Cost: one pass over the
  frozen bytes at BLAKE2b speed (about 1 GB/s on one CPU core), so about 0.5 s for a 135M-parameter
  fp32 model, plus the device-to-host copy; peak extra memory is the largest frozen tensor.
* :func:`architecture_fingerprint`: every captured layer, digest of its kind, shapes, bias flag,
  parameter names and shapes, and the class names of the modules on its path below the root (the
  root LightningModule's own class is left out: a wrapper redefined in another script or notebook
  is the same network).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_tda.capture.layers import LayerSpec

FROZEN_FINGERPRINT = "frozen_fingerprint"
"""Root attribute of the frozen-weight fingerprint."""
ARCHITECTURE_FINGERPRINT = "architecture_fingerprint"
"""Root attribute of the captured-architecture fingerprint."""

VERSION = 1
HASH = "blake2b-64"
MAX_ENTRIES_CHARS = 32_000
"""Above this many characters of per-entry JSON the entries are grouped into blocks (an HDF5
attribute holds at most 64 KiB)."""


def _digest(chunks: Iterable[Any]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """Digest of a tensor's dtype, shape and raw bytes (on the CPU; a meta tensor: dtype and shape;
    a sharded ``DTensor``: its full tensor, a collective every rank must join)."""
    head = f"{t.dtype}|{tuple(t.shape)}|".encode()
    if t.is_meta:
        return _digest([head, b"meta"])
    if isinstance(t, DTensor):
        t = t.full_tensor()
    # a copy: numpy() of a view would pin its storage, which FSDP frees (resizes) after gathering
    flat = t.detach().reshape(-1).to("cpu", copy=True)
    return _digest([head, flat.view(torch.uint8).numpy()])


def block_of(name: str) -> str:
    """The block an entry is grouped into: its name up to the first all-digit component
    (``model.layers.12.mlp.up_proj.weight`` -> ``model.layers.12``), else its first component."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


@dataclass(frozen=True)
class Fingerprint:
    """Digests of named entries (parameters or layers) at one granularity.

    Attributes:
        entries: ``{name: digest}`` in model order (block names at ``granularity="block"``).
        granularity: ``"tensor"``, ``"layer"`` or ``"block"``.
        info: extra JSON-able facts shown in error messages (e.g. ``dtypes``).
    """

    entries: dict[str, str]
    granularity: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return _digest(f"{k}={v};".encode() for k, v in self.entries.items())

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": VERSION,
                "hash": HASH,
                "digest": self.digest,
                "granularity": self.granularity,
                "entries": self.entries,
                **self.info,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Fingerprint:
        d = json.loads(text)
        if d.get("version") != VERSION or d.get("hash") != HASH:
            raise ValueError(f"unknown fingerprint format {d.get('version')!r}/{d.get('hash')!r}")
        info = {k: v for k, v in d.items() if k not in {"version", "hash", "digest", "entries"}}
        info.pop("granularity", None)
        return cls(dict(d["entries"]), d["granularity"], info)

    def grouped(self) -> Fingerprint:
        """The same fingerprint with entries grouped by :func:`block_of`."""
        blocks: dict[str, list[str]] = {}
        for k, v in self.entries.items():
            blocks.setdefault(block_of(k), []).append(f"{k}={v};")
        entries = {b: _digest(s.encode() for s in items) for b, items in blocks.items()}
        return Fingerprint(entries, "block", self.info)

    def at(self, granularity: str) -> Fingerprint:
        """This fingerprint at a stored ``granularity`` (``"block"`` groups; else as is)."""
        return self.grouped() if granularity == "block" and self.granularity != "block" else self

    def compact(self) -> Fingerprint:
        """Grouped into blocks when the per-entry JSON would not fit an HDF5 attribute."""
        return self.grouped() if len(json.dumps(self.entries)) > MAX_ENTRIES_CHARS else self


def frozen_fingerprint(model: nn.Module, names: Sequence[str] | None = None) -> Fingerprint:
    """Fingerprint of the frozen parameters (``requires_grad=False``), name-ordered as in the model.

    ``names``: digest these parameters instead (any ``requires_grad``; a name the model lacks is
    left out), e.g. the store's frozen names when checking a query model."""
    params = dict(model.named_parameters())
    chosen = (
        [n for n, p in params.items() if not p.requires_grad]
        if names is None
        else [n for n in names if n in params]
    )
    dtypes: dict[str, int] = {}
    for n in chosen:
        key = str(params[n].dtype).removeprefix("torch.")
        dtypes[key] = dtypes.get(key, 0) + 1
    entries = {n: tensor_digest(params[n]) for n in chosen}
    numel = sum(params[n].numel() for n in chosen)
    return Fingerprint(entries, "tensor", {"numel": numel, "dtypes": dtypes})


def _class_path(model: nn.Module, module_name: str) -> list[str]:
    """Class names of the modules from the root's child down to ``module_name`` (root excluded)."""
    out, mod = [], model
    for part in module_name.split(".") if module_name else []:
        mod = mod.get_submodule(part)
        out.append(module_class(mod).__qualname__)
    return out


def module_class(module: nn.Module) -> type:
    """``module``'s own class: the one FSDP2's ``fully_shard`` derived ``FSDP<Class>`` from."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        return type(module)
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def architecture_fingerprint(model: nn.Module, layers: Sequence[LayerSpec]) -> Fingerprint:
    """Fingerprint of the captured layers of ``model`` (``layers``: as discovered on it)."""
    params = dict(model.named_parameters())
    entries = {}
    for s in layers:
        owners = [s.name] if s.kind != "dense" else [p.rpartition(".")[0] for p in s.params]
        described = {
            "kind": s.kind,
            "shape": [s.out_features, s.in_features],
            "bias": s.has_bias,
            "params": [[p, list(params[p].shape) if p in params else None] for p in s.params],
            "classes": [_class_path(model, o) for o in owners],
        }
        entries[s.name] = _digest([json.dumps(described, sort_keys=True).encode()])
    return Fingerprint(entries, "layer")


def mismatches(stored: Fingerprint, current: Fingerprint) -> list[str]:
    """Entry names that differ, in stored order, then entries only in ``current``: each as
    ``"name"``, ``"name (missing from the model)"`` or ``"name (not in the store)"``."""
    current = current.at(stored.granularity)
    out = []
    for k, v in stored.entries.items():
        if k not in current.entries:
            out.append(f"{k} (missing from the model)")
        elif current.entries[k] != v:
            out.append(k)
    out.extend(f"{k} (not in the store)" for k in current.entries if k not in stored.entries)
    return out


def frozen_mismatches(stored: Fingerprint, model: nn.Module) -> list[str]:
    """The frozen entries of ``stored`` whose weights differ in ``model`` (or that it lacks), then
    parameters frozen in ``model`` but not in the store.

    The store's frozen parameters are compared whatever their ``requires_grad`` in ``model`` (their
    values are never loaded from a checkpoint, so they must match); a block-level fingerprint is
    compared with the blocks of the parameters frozen in ``model``."""
    if stored.granularity == "block":
        return mismatches(stored, frozen_fingerprint(model).grouped())
    extra = [
        n for n, p in model.named_parameters() if not p.requires_grad and n not in stored.entries
    ]
    return mismatches(stored, frozen_fingerprint(model, [*stored.entries, *extra]))


def dtype_note(stored: Fingerprint, model: nn.Module, names: Iterable[str]) -> str:
    """A hint when the differing frozen parameters only differ in dtype from the store's."""
    stored_dtypes = set(stored.info.get("dtypes", {}))
    params = dict(model.named_parameters())
    model_dtypes = {str(params[n].dtype).removeprefix("torch.") for n in names if n in params}
    if stored_dtypes and model_dtypes and not model_dtypes & stored_dtypes:
        return (
            f" (the store's frozen weights are {'/'.join(sorted(stored_dtypes))}, the model's "
            f"{'/'.join(sorted(model_dtypes))}: cast the model to the logged dtype)"
        )
    return ""


def fingerprint_attrs(model: nn.Module, layers: Sequence[LayerSpec]) -> dict[str, str]:
    """The two root attributes a store records for ``model`` (``layers``: its captured layers)."""
    return {
        FROZEN_FINGERPRINT: frozen_fingerprint(model).compact().to_json(),
        ARCHITECTURE_FINGERPRINT: architecture_fingerprint(model, layers).compact().to_json(),
    }


def parse(attrs: Mapping[str, Any], key: str) -> Fingerprint | None:
    """The fingerprint stored under root attribute ``key``, or ``None`` (an older store)."""
    text = attrs.get(key)
    return None if text is None else Fingerprint.from_json(str(text))
