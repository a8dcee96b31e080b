"""The one device rule, applied the same way by every stage (training, sampling, NLL, FID).

``engine.device``:

* ``auto``: the process's accelerator (``cuda:LOCAL_RANK`` on a CUDA machine) when one is available, else the CPU;
* ``cuda``: the process's CUDA device; without CUDA every stage stops at start with :class:`DeviceError`
  (never late inside torch, never silently on the CPU);
* ``cpu``: the CPU, even where CUDA is available.
"""

from __future__ import annotations

import torch

from lsgm.choices import DEVICES
from lsgm.errors import LsgmError

__all__ = ["DEVICES", "DeviceError", "resolve_device"]


class DeviceError(LsgmError, ValueError):
    """``engine.device`` asks for a device this machine does not have."""


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """The torch device for ``engine.device`` (see the module docstring).

    Args:
        device: ``auto`` | ``cpu`` | ``cuda``.
        local_rank: this process's rank on its node (torchrun's ``LOCAL_RANK``): the CUDA device index.

    Raises:
        DeviceError: ``cuda`` without an available CUDA device, or an unknown value.
    """
    if device not in DEVICES:
        raise DeviceError(f"engine.device = {device!r} is not allowed; allowed: {', '.join(DEVICES)}")
    if device == "cpu":
        return torch.device("cpu")
    if device == "auto":
        if not torch.accelerator.is_available():
            return torch.device("cpu")
        return torch.device(torch.accelerator.current_accelerator().type, local_rank)
    if not torch.cuda.is_available():
        raise DeviceError(f"engine.device = {device!r} but no CUDA device is available here; "
                          "use engine.device: auto (CUDA when present, else CPU) or cpu")
    return torch.device(device, local_rank)
