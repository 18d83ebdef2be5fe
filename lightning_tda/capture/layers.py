"""Which modules are captured, and the layout of their projected gradients in a store row."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import nn

from lightning_tda.capture.projection import ProjectionConfig
from lightning_tda.errors import ProjectionMismatchError  # noqa: F401 (re-exported)

LINEAR = "linear"  # y = x W^T + b, W: [O, I]
CONV1D = "conv1d"  # transformers' GPT-2 Conv1D: y = x W + b, W: [I, O]
DENSE = "dense"  # every other trainable parameter, flattened and projected with torch.func


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def layer_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return LINEAR
    if _is_hf_conv1d(module):
        return CONV1D
    return None


@dataclass(frozen=True)
class LayerSpec:
    """One captured block of a store row.

    The block is the (projected) gradient of the augmented weight ``[W | b]`` in ``[O, I+1]``
    orientation (``[O, I]`` without bias), flattened row-major into ``k_out * k_in`` columns starting
    at ``offset``. A ``dense`` block holds ``k_in`` projected values of several parameters.
    """

    name: str
    kind: str
    out_features: int
    in_features: int  # including the bias column when has_bias
    has_bias: bool
    k_out: int
    k_in: int
    offset: int
    params: tuple[str, ...]  # parameter names covered, weight first

    @property
    def size(self) -> int:
        return self.k_out * self.k_in

    @property
    def exact_out(self) -> bool:
        return self.k_out == self.out_features

    @property
    def exact_in(self) -> bool:
        return self.k_in == self.in_features

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params"] = list(self.params)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LayerSpec:
        d = dict(d)
        d["params"] = tuple(d["params"])
        return cls(**d)


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return patterns is not None and any(re.fullmatch(p, name) or p == name for p in patterns)


def discover_layers(
    model: nn.Module,
    config: ProjectionConfig,
    modules: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> tuple[list[LayerSpec], list[str]]:
    """Find the capturable layers of ``model`` and lay out their blocks.

    A layer is captured when it is an ``nn.Linear`` or a GPT-2 ``Conv1D`` whose weight is trainable and
    not shared with another module (tied weights get their gradient from several places, so they
    fall to the dense path). PEFT LoRA layers are captured through their ``lora_A``/``lora_B`` linears;
    the frozen base layer is skipped.

    Args:
        model: the model (a LightningModule or any ``nn.Module``).
        config: projection configuration.
        modules: optional names or regexes of modules to capture (default: all eligible).
        exclude: optional names or regexes of modules to skip.

    Returns:
        ``(layers, other_params)``: layer specs in module order, and names of trainable parameters
        not covered by any layer.
    """
    owners: dict[int, int] = {}
    for _, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}

    layers: list[LayerSpec] = []
    covered: set[int] = set()
    offset = 0
    for name, mod in model.named_modules():
        kind = layer_kind(mod)
        if kind is None or not mod.weight.requires_grad:
            continue
        if modules is not None and not _matches(name, modules):
            continue
        if _matches(name, exclude):
            continue
        if owners.get(id(mod.weight), 0) > 1:
            continue  # tied weight
        bias = getattr(mod, "bias", None)
        has_bias = bias is not None and bias.requires_grad
        w = mod.weight
        out_f, in_f = (w.shape[0], w.shape[1]) if kind == LINEAR else (w.shape[1], w.shape[0])
        in_aug = in_f + int(has_bias)
        k_out = config.side_dim(name, "out", out_f)
        k_in = config.side_dim(name, "in", in_aug)
        params = (param_names[id(w)],) + ((param_names[id(bias)],) if has_bias else ())
        layers.append(LayerSpec(name, kind, out_f, in_aug, has_bias, k_out, k_in, offset, params))
        offset += k_out * k_in
        covered.add(id(w))
        if has_bias:
            covered.add(id(bias))

    other = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if config.dense_dim > 0 and other:
        n_other = sum(dict(model.named_parameters())[n].numel() for n in other)
        k = min(config.dense_dim, n_other) if config.kind == "kronecker" else n_other
        layers.append(LayerSpec("<dense>", DENSE, 1, n_other, False, 1, k, offset, tuple(other)))
        other = []
    return layers, other


WRAPPER_ATTRS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")
"""Attributes under which FSDP1's ``FullyShardedDataParallel`` and activation checkpointing's
``CheckpointWrapper`` hold the module they wrap."""


def unwrapped_module_names(model: nn.Module) -> dict[str, nn.Module]:
    """``model``'s modules by the names they have without FSDP1 / activation-checkpointing wrappers
    (``net.0._fsdp_wrapped_module`` -> ``net.0``; the innermost module wins, so a layer's name maps
    to the layer itself, not to a wrapper around it).

    >>> m = nn.Sequential(nn.Linear(2, 2))
    >>> sorted(unwrapped_module_names(m)) == sorted(n for n, _ in m.named_modules())
    True
    """
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        parts = [p for p in name.split(".") if p not in WRAPPER_ATTRS] if name else []
        out[".".join(parts)] = module  # named_modules yields a wrapper before what it wraps
    return out


def row_width(layers: Sequence[LayerSpec]) -> int:
    return sum(s.size for s in layers)


def check_layers_match(stored: Sequence[LayerSpec], found: Sequence[LayerSpec]) -> None:
    """Raise a clear error when a model's layers do not reproduce the store's projection."""
    if [s.to_dict() for s in stored] == [s.to_dict() for s in found]:
        return
    stored_names = {s.name: s for s in stored}
    found_names = {s.name: s for s in found}
    missing = sorted(set(stored_names) - set(found_names))
    extra = sorted(set(found_names) - set(stored_names))
    differ = [
        f"{n}: store {stored_names[n].out_features}x{stored_names[n].in_features}->"
        f"{stored_names[n].k_out}x{stored_names[n].k_in}, model {found_names[n].out_features}x"
        f"{found_names[n].in_features}->{found_names[n].k_out}x{found_names[n].k_in}"
        for n in sorted(set(stored_names) & set(found_names))
        if stored_names[n].to_dict() != found_names[n].to_dict()
    ]
    raise ProjectionMismatchError(
        "The query model does not reproduce the store's projection, so query and train vectors would "
        "not live in the same space. "
        + (f"Layers missing from the model: {missing[:5]}. " if missing else "")
        + (f"Layers not in the store: {extra[:5]}. " if extra else "")
        + (f"Shape/dims differ: {differ[:5]}. " if differ else "")
        + "Pass a model of the same architecture with the same trainable parameters "
        "(and the same modules=/exclude= selection) as the logged run."
    )
