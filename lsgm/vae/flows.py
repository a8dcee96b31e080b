"""Autoregressive normalising-flow cells on the posterior samples (``num_nf``, docs/algorithm.md §1.4).

Each ``ARCell`` maps ``z ← z − m(z)`` where ``m`` is autoregressive over the order (row, column, channel) of the
latent group: ``m`` at (i, j, c) depends only on ``z`` at earlier pixels (raster order) and on earlier channels of
the same pixel. The shift-only map has log-determinant 0. ``PairedCellAR`` chains two cells with opposite raster
orders (the second cell's masks are spatially mirrored).

Masks: a layer's channel ``c`` of width ``C`` is tied to latent channel ``c // (C / num_latent)``. At the kernel
centre a connection in → out is allowed if ``lat(in) < lat(out)`` (``zero_diag``, first layer) or
``lat(in) ≤ lat(out)`` (later layers); kernel taps on earlier pixels are fully open, later ones closed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lsgm.vae.conv import Conv2D

HIDDEN_EXPANSION = 6
"""Hidden width of a flow cell is 6 × latent channels (docs/algorithm.md §1.4)."""


def autoregressive_mask(in_channels: int, out_channels: int, kernel_size: int, num_latent: int, *,
                        depthwise: bool, zero_diag: bool, mirror: bool) -> torch.Tensor:
    """Binary kernel mask enforcing the (row, column, channel) autoregressive order.

    Args:
        in_channels: C_in of the conv (a multiple of ``num_latent``).
        out_channels: C_out of the conv (a multiple of ``num_latent``).
        kernel_size: odd square kernel size k.
        num_latent: channels of the latent group the flow acts on.
        depthwise: conv with ``groups = C_in = C_out``.
        zero_diag: exclude the same latent channel at the centre tap (strict order; first layer).
        mirror: reverse the raster order (flip the mask in both spatial axes).

    Returns:
        (C_out, C_in or 1 if depthwise, k, k) float mask.
    """
    for name, c in (("in_channels", in_channels), ("out_channels", out_channels)):
        if c % num_latent:
            raise ValueError(f"{name}={c} must be a multiple of num_latent={num_latent}")
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size={kernel_size} must be odd")
    centre = kernel_size // 2
    spatial = torch.zeros(kernel_size, kernel_size)
    spatial[:centre, :] = 1.0
    spatial[centre, :centre] = 1.0
    if depthwise:
        if in_channels != out_channels:
            raise ValueError(f"depthwise mask needs in_channels == out_channels, got {in_channels}, {out_channels}")
        mask = spatial.expand(out_channels, 1, kernel_size, kernel_size).clone()
        mask[:, :, centre, centre] = 0.0 if zero_diag else 1.0
    else:
        lat_in = torch.arange(in_channels) // (in_channels // num_latent)
        lat_out = torch.arange(out_channels) // (out_channels // num_latent)
        allowed = lat_in[None, :] < lat_out[:, None] if zero_diag else lat_in[None, :] <= lat_out[:, None]
        mask = spatial.expand(out_channels, in_channels, kernel_size, kernel_size).clone()
        mask[:, :, centre, centre] = allowed.float()
    return torch.flip(mask, dims=(2, 3)) if mirror else mask


class MaskedConv2D(Conv2D):
    """Weight-normalised conv whose raw kernel is multiplied by an autoregressive mask before normalisation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_latent: int, *,
                 depthwise: bool = False, zero_diag: bool, mirror: bool, init_scale: float = 1.0,
                 bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                         groups=in_channels if depthwise else 1, bias=bias, weight_norm=True)
        self.register_buffer("mask", autoregressive_mask(in_channels, out_channels, kernel_size, num_latent,
                                                         depthwise=depthwise, zero_diag=zero_diag, mirror=mirror))
        self.init_weight_norm(init_scale)

    def effective_raw_weight(self) -> torch.Tensor:
        """``v ⊙ mask`` (before the mask buffer exists, during construction: ``v``)."""
        mask = self._buffers.get("mask")
        return self.weight if mask is None else self.weight * mask


class ARCell(nn.Module):
    """One shift-only autoregressive flow cell: ``z ← z − m(z)``, log-det 0 (docs/algorithm.md §1.4).

    ``m`` = masked 3×3 conv (z → 6z, strict) → ELU → masked 5×5 depthwise conv → ELU → masked 1×1 conv (6z → z,
    weight-norm scale initialised ×0.1).
    """

    def __init__(self, num_latent: int, mirror: bool) -> None:
        super().__init__()
        hidden = HIDDEN_EXPANSION * num_latent
        self.conv_in = MaskedConv2D(num_latent, hidden, 3, num_latent, zero_diag=True, mirror=mirror)
        self.conv_depthwise = MaskedConv2D(hidden, hidden, 5, num_latent, depthwise=True, zero_diag=False,
                                           mirror=mirror)
        self.conv_out = MaskedConv2D(hidden, num_latent, 1, num_latent, zero_diag=False, mirror=mirror,
                                     init_scale=0.1)

    def shift(self, z: torch.Tensor) -> torch.Tensor:
        """The autoregressive shift m(z), same shape as ``z`` (B, c, s, s)."""
        h = F.elu(self.conv_in(z))
        h = F.elu(self.conv_depthwise(h))
        return self.conv_out(h)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(z − m(z), log_det)`` with per-element log-det zeros."""
        return z - self.shift(z), torch.zeros_like(z)


class PairedCellAR(nn.Module):
    """Two ``ARCell``s with opposite raster orders (docs/algorithm.md §1.4, "PairedCellAR")."""

    def __init__(self, num_latent: int) -> None:
        super().__init__()
        self.cell1 = ARCell(num_latent, mirror=False)
        self.cell2 = ARCell(num_latent, mirror=True)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the transformed ``z`` and the per-element log-det (B, c, s, s) of the pair."""
        z, log_det1 = self.cell1(z)
        z, log_det2 = self.cell2(z)
        return z, log_det1 + log_det2
