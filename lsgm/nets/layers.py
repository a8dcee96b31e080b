"""Small building blocks of the NCSN++ score network (docs/algorithm.md §5), written from the description there and the papers (Song et al. 2021, NCSN++).

* :func:`variance_scaling_` — DDPM "fan_avg, uniform" variance-scaling initialiser.
* :func:`make_conv` — an ``nn.Conv2d`` with that initialiser and zero bias (scale 0 means ~0, i.e. 1e-10).
* :func:`make_dense` — the same for ``nn.Linear`` (time-embedding MLP, per-block time projection).
* :class:`NIN` — "network in network" 1×1 dense layer over the channel axis (attention q/k/v/out).
* :func:`make_group_norm` — GroupNorm with ``min(C // 4, 32)`` groups and eps 1e-6.
* :func:`timestep_embedding` — sinusoidal embedding of ``embedding_scale · t``.

What the spectral regulariser (docs/algorithm.md §1.7) sees: every 3×3 and shortcut 1×1 convolution is an ``nn.Conv2d``
and every normalisation is an ``nn.GroupNorm`` (its ``max|γ|`` is penalised). :class:`NIN` is deliberately
*not* an ``nn.Conv2d`` (as in the official network, its weights are never spectrally regularised), and the
up/down-sampling of :mod:`lsgm.nets.upfirdn` holds no parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NIN",
    "fan_in_fan_out",
    "group_norm_groups",
    "make_conv",
    "make_dense",
    "make_group_norm",
    "timestep_embedding",
    "variance_scaling_",
]

#: Stand-in for an init scale of exactly 0: weights ~0 but not identically zero, so gradients still flow.
ZERO_INIT_SCALE = 1e-10


def fan_in_fan_out(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """Fan-in and fan-out of a weight of shape ``(out, in, *kernel)``.

    Args:
        shape: weight shape; at least 2-D, output units first, input units second.

    Returns:
        ``(in · prod(kernel), out · prod(kernel))``.
    """
    if len(shape) < 2:
        raise ValueError(f"shape must have at least 2 dims (out, in, *kernel), got {tuple(shape)}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


@torch.no_grad()
def variance_scaling_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """DDPM initialiser: uniform with variance ``scale / fan_avg``, ``fan_avg = (fan_in + fan_out) / 2`` (docs/algorithm.md §5).

    A ``scale`` of 0 is replaced by :data:`ZERO_INIT_SCALE` (1e-10), the "initialised ~0" of docs/algorithm.md §5.

    Args:
        weight: tensor of shape ``(out, in, *kernel)``, filled in place.
        scale: variance multiplier, >= 0.

    Returns:
        ``weight`` (for chaining).
    """
    if not scale >= 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    scale = ZERO_INIT_SCALE if scale == 0 else scale
    fan_in, fan_out = fan_in_fan_out(weight.shape)
    variance = scale / ((fan_in + fan_out) / 2.0)
    bound = math.sqrt(3.0 * variance)  # Var(U[-b, b]) = b^2 / 3
    return weight.uniform_(-bound, bound)


def make_conv(in_ch: int, out_ch: int, kernel_size: int = 3, init_scale: float = 1.0) -> nn.Conv2d:
    """``nn.Conv2d`` with stride 1, "same" padding, DDPM variance-scaling weights and zero bias.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        kernel_size: 1 or 3 (odd sizes keep the resolution).
        init_scale: variance-scaling multiplier; 0 means ~0 (1e-10).

    Returns:
        The initialised convolution.
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd to keep the resolution, got {kernel_size}")
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
    variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def make_dense(in_features: int, out_features: int, init_scale: float = 1.0) -> nn.Linear:
    """``nn.Linear`` with DDPM variance-scaling weights and zero bias.

    Args:
        in_features: input width.
        out_features: output width.
        init_scale: variance-scaling multiplier; 0 means ~0 (1e-10).

    Returns:
        The initialised linear layer.
    """
    dense = nn.Linear(in_features, out_features)
    variance_scaling_(dense.weight, init_scale)
    nn.init.zeros_(dense.bias)
    return dense


class NIN(nn.Module):
    """1×1 dense map over the channel axis: ``y[b, o, h, w] = Σ_i W[o, i] x[b, i, h, w] + b[o]``.

    Not an ``nn.Conv2d`` on purpose (see module docstring, docs/algorithm.md §1.7).

    Args:
        in_ch: input channels.
        out_ch: output channels.
        init_scale: variance-scaling multiplier; 0 means ~0 (1e-10).
    """

    def __init__(self, in_ch: int, out_ch: int, init_scale: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        variance_scaling_(self.weight, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_ch, H, W) -> (B, out_ch, H, W)."""
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)  # the same map as a 1x1 kernel (fast path)


def group_norm_groups(channels: int) -> int:
    """Number of GroupNorm groups used by NCSN++: ``min(C // 4, 32)`` (at least 1), docs/algorithm.md §5."""
    return max(1, min(channels // 4, 32))


def make_group_norm(channels: int) -> nn.GroupNorm:
    """``nn.GroupNorm(min(C // 4, 32), C, eps=1e-6)`` with affine scale 1 and shift 0 (docs/algorithm.md §5).

    Args:
        channels: number of channels C.

    Returns:
        The GroupNorm layer.

    Raises:
        ValueError: if C is not divisible by the number of groups.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    groups = group_norm_groups(channels)
    if channels % groups != 0:
        raise ValueError(
            f"GroupNorm needs channels divisible by min(channels // 4, 32) = {groups}, got channels={channels}; "
            "choose nf and channel_mult so that every width is a multiple of 4 (or of 32 above 128)"
        )
    return nn.GroupNorm(groups, channels, eps=1e-6)


def timestep_embedding(t: torch.Tensor, embedding_dim: int = 128, embedding_scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal time embedding (docs/algorithm.md §5).

    With ``half = embedding_dim / 2`` and frequencies ``f_k = exp(-k · ln(10000) / (half - 1))``, k = 0…half-1,
    returns ``[sin(s · t · f_k) for k] ++ [cos(s · t · f_k) for k]`` with ``s = embedding_scale`` (sin block first).

    Args:
        t: (B,) continuous diffusion time in [0, 1].
        embedding_dim: even output width D >= 4.
        embedding_scale: s, multiplies t before the sinusoids (1000 in all LSGM runs).

    Returns:
        (B, D) embedding, in the dtype of ``t`` (float32 if ``t`` is not floating point).
    """
    if t.dim() != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    if embedding_dim < 4 or embedding_dim % 2:
        raise ValueError(f"embedding_dim must be an even integer >= 4, got {embedding_dim}")
    if not t.is_floating_point():
        t = t.float()
    half = embedding_dim // 2
    k = torch.arange(half, device=t.device, dtype=t.dtype)
    freqs = torch.exp(-k * (math.log(10000.0) / (half - 1)))
    args = (embedding_scale * t)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)
