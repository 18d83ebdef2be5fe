"""``Targets``: what a model's outputs are scored against, with their alignment said explicitly.

It lives in the data layer so that model wrappers (``integrations.transformers``) can declare their
label convention (``targets(batch) -> Targets``) without importing the capture layer above them;
:mod:`lightning_tda.capture.task` re-exports it.

>>> import torch
>>> t = Targets(torch.tensor([[5, 6, 7]]), shift=True)
>>> t.values.shape, t.shift
(torch.Size([1, 3]), True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Targets:
    """What a model's outputs are scored against (STRIDE's per-token measurements).

    Attributes:
        values: ``[B]`` class ids, or ``[B, T]`` token ids with ``-100`` on unsupervised positions.
        shift: ``True``: the output at position ``t`` predicts ``values[:, t + 1]`` (Hugging Face
            labels); ``False``: outputs and values are aligned position by position.
    """

    values: torch.Tensor
    shift: bool


__all__ = ["Targets"]
