"""Exponential moving average of the SGM prior's weights (docs/algorithm.md §4.6), as a module separate from the optimiser.

(The official code wraps the optimiser, which breaks on recent PyTorch: docs/algorithm.md §11 item 4.)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn


class EMA:
    """Shadow copy ``θ̄ ← d·θ̄ + (1 − d)·θ`` of a module's floating-point parameters; buffers are copied.

    The shadow starts as a copy of the weights at the first :meth:`update` (i.e. after the first optimiser
    step), like the official implementation. Updates use fused ``torch._foreach_*`` kernels.

    Args:
        decay: d in [0, 1].
    """

    def __init__(self, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay={decay} is not allowed; allowed: 0 <= decay <= 1")
        self.decay = float(decay)
        self.shadow: Optional[dict[str, torch.Tensor]] = None

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold the module's current parameters into the average."""
        state = module.state_dict()
        if self.shadow is None:
            self.shadow = {k: v.detach().clone() for k, v in state.items()}
            return
        names = [n for n, p in module.named_parameters() if p.dtype.is_floating_point]
        params = dict(module.named_parameters())
        shadow_p = [self.shadow[n] for n in names]
        torch._foreach_lerp_(shadow_p, [params[n].detach() for n in names], 1.0 - self.decay)
        param_names = set(names)
        for k, v in state.items():  # buffers (e.g. the inactive-channel mask) follow the live model
            if k not in param_names:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.shadow = None if state["shadow"] is None else {k: v.clone() for k, v in state["shadow"].items()}

    def averaged_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The EMA weights in ``module.state_dict()`` layout (the live weights before the first update)."""
        return {k: v.clone() for k, v in (self.shadow or module.state_dict()).items()}

    @contextmanager
    def swapped(self, module: nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into ``module`` (``--update_q_ema``, evaluation), then restore."""
        if self.shadow is None:
            yield
            return
        live = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.shadow)
        try:
            yield
        finally:
            module.load_state_dict(live)
