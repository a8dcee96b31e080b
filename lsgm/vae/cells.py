"""Residual cells of the NVAE backbone (docs/algorithm.md §1.4).

A cell computes ``out = skip(x) + 0.1 · SE(branch(x))`` where the branch is a chain of ops:

* ``res_bnswish``: BN → Swish → [nearest ×2 if up] → 3×3 weight-normalised conv (bias), strided if down;
* ``mconv_e{6,3}k5g0`` (MBConv): [nearest ×2 if up] → BN → 1×1 conv (ex·C) → BN → Swish → 5×5 depthwise conv
  → BN → Swish → 1×1 conv → BN, without weight norm and without bias.

Skips: identity (normal), factorised reduce (down, stride 2), bilinear ×2 (align-corners) + 1×1 conv (up).
Strides follow the reference convention: 1 = normal, 2 = down, -1 = up.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lsgm.vae.conv import Conv2D

BN_EPS = 1e-5
BN_MOMENTUM = 0.05
RESIDUAL_SCALE = 0.1
"""The branch of every VAE residual cell is multiplied by 0.1 (docs/algorithm.md §1.4)."""

CellRole = Literal["normal_pre", "down_pre", "normal_enc", "down_enc", "normal_dec", "up_dec", "normal_post",
                   "up_post"]
ARCH_INSTANCES: dict[str, dict[str, tuple[str, ...]]] = {
    "res_bnswish": {role: ("res_bnswish", "res_bnswish") for role in
                    ("normal_pre", "down_pre", "normal_enc", "down_enc", "normal_dec", "up_dec", "normal_post",
                     "up_post")},
    "res_mbconv": {
        "normal_pre": ("res_bnswish", "res_bnswish"), "down_pre": ("res_bnswish", "res_bnswish"),
        "normal_enc": ("res_bnswish", "res_bnswish"), "down_enc": ("res_bnswish", "res_bnswish"),
        "normal_dec": ("mconv_e6k5g0",), "up_dec": ("mconv_e6k5g0",),
        "normal_post": ("mconv_e3k5g0",), "up_post": ("mconv_e3k5g0",),
    },
}
"""Ops of each cell role per ``arch_instance`` (docs/algorithm.md §1.4)."""
ROLE_STRIDE = {"normal": 1, "down": 2, "up": -1}


def make_batchnorm(num_channels: int) -> nn.BatchNorm2d:
    """BatchNorm with the backbone's eps 1e-5 and momentum 0.05 (docs/algorithm.md §1.4)."""
    return nn.BatchNorm2d(num_channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def swish(x: torch.Tensor) -> torch.Tensor:
    """Swish / SiLU ``x · sigmoid(x)``."""
    return F.silu(x)


def _check_stride(stride: int) -> int:
    if stride not in (1, 2, -1):
        raise ValueError(f"stride={stride!r} is not allowed; allowed: 1 (normal), 2 (down), -1 (up)")
    return stride


class SqueezeExcitation(nn.Module):
    """SE: global average pool → Linear(C, max(C/16, 4)) → ReLU → Linear → sigmoid → rescale (docs/algorithm.md §1.4).

    Computed in float32 even under autocast.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // 16, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rescale the channels of ``x`` (B, C, H, W)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            pooled = x.to(torch.promote_types(x.dtype, torch.float32)).mean(dim=(2, 3))
            gate = torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))
        return x * gate.to(x.dtype)[:, :, None, None]


class BNSwishConv(nn.Module):
    """The ``res_bnswish`` op: BN → Swish → [nearest ×2 if up] → 3×3 weight-normalised conv with bias."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.upsample = _check_stride(stride) == -1
        self.bn = make_batchnorm(in_channels)
        self.conv = Conv2D(in_channels, out_channels, 3, stride=abs(stride), padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) → (B, C_out, H', W') with H' = H, H/2 or 2H."""
        out = swish(self.bn(x))
        if self.upsample:
            out = F.interpolate(out, scale_factor=2, mode="nearest")
        return self.conv(out)


class InvertedResidual(nn.Module):
    """The ``mconv_e{ex}k{k}g0`` op (MBConv, docs/algorithm.md §1.4); plain (not weight-normalised) convs without bias."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *, expansion: int = 6,
                 kernel_size: int = 5) -> None:
        super().__init__()
        self.upsample = _check_stride(stride) == -1
        hidden = int(round(in_channels * expansion))
        self.bn_in = make_batchnorm(in_channels)
        self.conv_expand = Conv2D(in_channels, hidden, 1, bias=False, weight_norm=False)
        self.bn_expand = make_batchnorm(hidden)
        self.conv_depthwise = Conv2D(hidden, hidden, kernel_size, stride=abs(stride), padding=kernel_size // 2,
                                     groups=hidden, bias=False, weight_norm=False)
        self.bn_depthwise = make_batchnorm(hidden)
        self.conv_project = Conv2D(hidden, out_channels, 1, bias=False, weight_norm=False)
        self.bn_out = make_batchnorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) → (B, C_out, H', W')."""
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        out = swish(self.bn_expand(self.conv_expand(self.bn_in(x))))
        out = swish(self.bn_depthwise(self.conv_depthwise(out)))
        return self.bn_out(self.conv_project(out))


class FactorizedReduce(nn.Module):
    """Down-sampling skip: Swish, then four stride-2 1×1 convs on the four 2×2 phase shifts, concatenated.

    The first three convs have ``C_out // 4`` outputs, the last the remainder (docs/algorithm.md §1.4).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if out_channels < 4:
            raise ValueError(f"FactorizedReduce needs out_channels >= 4, got {out_channels}")
        quarter = out_channels // 4
        sizes = (quarter, quarter, quarter, out_channels - 3 * quarter)
        self.convs = nn.ModuleList(Conv2D(in_channels, c, 1, stride=2, bias=True) for c in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) → (B, C_out, ceil(H/2), ceil(W/2)); H, W must be even."""
        out = swish(x)
        phases = (out, out[:, :, 1:, 1:], out[:, :, :, 1:], out[:, :, 1:, :])
        return torch.cat([conv(p) for conv, p in zip(self.convs, phases)], dim=1)


class UpsampleSkip(nn.Module):
    """Up-sampling skip: bilinear ×2 (align-corners) then a weight-normalised 1×1 conv without bias."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = Conv2D(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) → (B, C_out, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


def make_op(name: str, in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Build one branch op by its reference name (docs/algorithm.md §1.4)."""
    if name == "res_bnswish":
        return BNSwishConv(in_channels, out_channels, stride)
    if name == "mconv_e6k5g0":
        return InvertedResidual(in_channels, out_channels, stride, expansion=6, kernel_size=5)
    if name == "mconv_e3k5g0":
        return InvertedResidual(in_channels, out_channels, stride, expansion=3, kernel_size=5)
    raise ValueError(f"op={name!r} is not allowed; allowed: 'res_bnswish', 'mconv_e6k5g0', 'mconv_e3k5g0'")


def make_skip(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity (normal), factorised reduce (down) or bilinear-up + 1×1 conv (up)."""
    if _check_stride(stride) == 1:
        if in_channels != out_channels:
            raise ValueError(f"a normal cell needs in_channels == out_channels, got {in_channels}, {out_channels}")
        return nn.Identity()
    if stride == 2:
        return FactorizedReduce(in_channels, out_channels)
    return UpsampleSkip(in_channels, out_channels)


class ResidualCell(nn.Module):
    """``out = skip(x) + 0.1 · SE(ops(x))`` (docs/algorithm.md §1.4).

    Args:
        in_channels: C_in.
        out_channels: C_out.
        ops: op names; the first carries the stride and maps C_in → C_out, the rest C_out → C_out.
        stride: 1 (normal), 2 (down) or -1 (up).
        use_se: apply squeeze-excitation to the branch.
    """

    def __init__(self, in_channels: int, out_channels: int, ops: tuple[str, ...], stride: int = 1,
                 use_se: bool = True) -> None:
        super().__init__()
        if not ops:
            raise ValueError("ops must name at least one op")
        self.skip = make_skip(in_channels, out_channels, stride)
        self.ops = nn.ModuleList(
            make_op(name, in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1)
            for i, name in enumerate(ops))
        self.se = SqueezeExcitation(out_channels) if use_se else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) → (B, C_out, H', W')."""
        branch = x
        for op in self.ops:
            branch = op(branch)
        return self.skip(x) + RESIDUAL_SCALE * self.se(branch)


def make_cell(arch_instance: str, role: CellRole, in_channels: int, out_channels: int,
              use_se: bool = True) -> ResidualCell:
    """Build the residual cell of a given role (e.g. ``"down_pre"``) for an ``arch_instance`` (docs/algorithm.md §1.4)."""
    if arch_instance not in ARCH_INSTANCES:
        raise ValueError(f"arch_instance={arch_instance!r} is not allowed; allowed: {sorted(ARCH_INSTANCES)}")
    ops = ARCH_INSTANCES[arch_instance].get(role)
    if ops is None:
        raise ValueError(f"role={role!r} is not allowed; allowed: {sorted(ARCH_INSTANCES[arch_instance])}")
    stride = ROLE_STRIDE[role.split("_")[0]]
    return ResidualCell(in_channels, out_channels, ops, stride, use_se)
