"""Host numbers (counts, rates, learning rates) logged without a host-to-device copy per step.

``LightningModule.log`` turns a Python number into a new tensor on the module's device on every
call; on a GPU that is a copy from pageable host memory, which makes the host wait. Here each key
keeps one 0-d tensor on the device, refilled in place with ``fill_`` (the number travels as a
kernel argument; nothing waits). Lightning reads a step's logged values at the end of that step,
before the next refill.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DeviceScalars"]


class DeviceScalars:
    """``scalars({"train/x": 3.0}, device)`` -> ``{"train/x": tensor(3.0, device=device)}``, one tensor per key, reused."""

    def __init__(self) -> None:
        self._tensors: dict[str, Tensor] = {}

    def __call__(self, values: dict[str, float], device: torch.device) -> dict[str, Tensor]:
        out = {}
        for key, value in values.items():
            tensor = self._tensors.get(key)
            if tensor is None or tensor.device != device:
                tensor = self._tensors[key] = torch.zeros((), dtype=torch.float32, device=device)
            out[key] = tensor.fill_(value)
        return out
