"""Copies of device tensors into host memory that do not block the training thread.

On CUDA the copy is queued on the current stream into pinned memory (``non_blocking=True``) and an
event marks its end; whoever reads the copy (the background writer) waits for that event, so the
training thread never synchronises with the device. Queued before ``optimizer.step()``, the copy is a
snapshot of the weights the step started from, even though the step then changes them in place.
On the CPU (and other devices) the copy is an ordinary one, made at once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class HostCopy:
    """Host copies of ``tensors`` (a name -> tensor mapping), ready after :meth:`wait`.

    Args:
        tensors: the tensors to copy (detached first).
        snapshot: copy CPU tensors too (they may change in place later, e.g. parameters); without it
            a CPU tensor is kept as it is (fresh tensors nobody else writes to, e.g. a step's rows).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], snapshot: bool = False) -> None:
        self._event = None
        self._tensors: dict[str, torch.Tensor] = {}
        cuda = False
        for name, t in tensors.items():
            t = t.detach()
            if t.device.type == "cpu":
                self._tensors[name] = t.clone() if snapshot else t
            elif t.is_cuda:
                dst = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                dst.copy_(t, non_blocking=True)
                self._tensors[name] = dst
                cuda = True
            else:  # mps, xpu, ...: a plain copy
                self._tensors[name] = t.to("cpu", copy=True)
        if cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def wait(self) -> dict[str, torch.Tensor]:
        """The host tensors, once their copies are done (blocks the calling thread only)."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._tensors
