"""Weight-normalised 2-D convolution, the "Conv2D" of the NVAE backbone (docs/algorithm.md §1.5).

For every output channel o the effective kernel is

    w_o = exp(g_o) · v_o / (‖v_o‖ + 1e-5),

where ``v`` is the raw (PyTorch-default initialised) weight, ‖·‖ runs over in-channels × kernel, and the learnable
log-scale ``g`` is initialised to ``log(‖v_o‖ + 1e-2)`` (no data-dependent initialisation).

The MBConv ops of §1.4 use the same class with ``weight_norm=False`` (plain kernel, no ``g``): they are still
``Conv2D`` instances, so the spectral regulariser of §1.7 finds them, as it does in the reference design.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WN_EPS = 1e-5
"""Added to ‖v‖ in the denominator of the normalised kernel (docs/algorithm.md §1.5)."""
WN_INIT_EPS = 1e-2
"""Added to ‖v_init‖ inside the log of the initial g (docs/algorithm.md §1.5)."""


def kernel_norm(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel Euclidean norm of a conv kernel.

    Args:
        weight: (C_out, C_in/groups, k, k).

    Returns:
        (C_out,) norms over in-channels × kernel.
    """
    return weight.flatten(1).norm(dim=1)


def weight_normalize(v: torch.Tensor, log_g: torch.Tensor) -> torch.Tensor:
    """``exp(g) · v / (‖v‖ + 1e-5)`` per output channel (docs/algorithm.md §1.5).

    Args:
        v: raw kernel (C_out, C_in/groups, k, k).
        log_g: (C_out,) log-scales g.

    Returns:
        The normalised kernel, same shape as ``v``.
    """
    scale = torch.exp(log_g) / (kernel_norm(v) + WN_EPS)
    return v * scale.view(-1, 1, 1, 1)


class Conv2D(nn.Conv2d):
    """Weight-normalised ``nn.Conv2d`` (docs/algorithm.md §1.5).

    Parameters: ``weight`` (= v), ``bias`` (optional) and, with ``weight_norm=True``, ``log_weight_norm``
    (= g, shape (C_out,)).

    Args:
        in_channels: C_in.
        out_channels: C_out.
        kernel_size: square kernel size k.
        stride: convolution stride.
        padding: zero padding.
        groups: convolution groups (``C_in`` for depthwise).
        bias: learn an additive bias.
        weight_norm: use the normalised kernel; ``False`` gives a plain conv (MBConv ops, docs/algorithm.md §1.4).
        init_scale: multiplies the initial ‖v‖ inside g (0.1 for the last conv of a flow cell, docs/algorithm.md §1.4).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, groups: int = 1, bias: bool = True, weight_norm: bool = True,
                 init_scale: float = 1.0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups,
                         bias=bias)
        self.weight_norm = weight_norm
        if weight_norm:
            self.log_weight_norm = nn.Parameter(torch.empty(out_channels))
            self.init_weight_norm(init_scale)
        else:
            self.register_parameter("log_weight_norm", None)

    @torch.no_grad()
    def init_weight_norm(self, init_scale: float = 1.0) -> None:
        """Set ``g = log(init_scale · ‖v‖ + 1e-2)`` from the current (masked) raw kernel (docs/algorithm.md §1.5)."""
        if self.log_weight_norm is not None:
            self.log_weight_norm.copy_(torch.log(init_scale * kernel_norm(self.effective_raw_weight())
                                                 + WN_INIT_EPS))

    def effective_raw_weight(self) -> torch.Tensor:
        """The raw kernel v before normalisation (subclasses apply masks here)."""
        return self.weight

    def normalized_weight(self) -> torch.Tensor:
        """The kernel actually used by the convolution: w (docs/algorithm.md §1.5), or v without weight norm."""
        v = self.effective_raw_weight()
        if self.log_weight_norm is None:
            return v
        return weight_normalize(v, self.log_weight_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` (B, C_in, H, W) with the normalised kernel."""
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)
