"""Up/down-sampling used inside the NCSN++ residual blocks (docs/algorithm.md §5), pure PyTorch (no CUDA extension).

``upfirdn2d`` = upsample by zero insertion, pad, FIR-filter (true convolution), downsample by striding — the
same operation on every channel. The FIR resamplers use the separable, normalised kernel ``k ⊗ k / Σ(k ⊗ k)``
with ``k = [1, 3, 3, 1]``:

* ``fir_upsample_2d``: zero insertion ×2, filter with gain ``factor² = 4`` (so a constant image stays constant),
  padding ``(2, 1)`` for a 4-tap kernel; output ``2H × 2W``.
* ``fir_downsample_2d``: filter, then stride 2, padding ``(1, 1)``; output ``H/2 × W/2``.

Without ``--fir`` the blocks use the naive variants: nearest-neighbour repeat and ``factor × factor`` average
pooling. None of these functions holds parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_FIR_KERNEL",
    "fir_downsample_2d",
    "fir_kernel",
    "fir_upsample_2d",
    "naive_downsample_2d",
    "naive_upsample_2d",
    "upfirdn2d",
]

#: 1-D taps of the FIR resampling filter of NCSN++ (docs/algorithm.md §5).
DEFAULT_FIR_KERNEL: tuple[int, ...] = (1, 3, 3, 1)


def _check_image(x: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")


def _check_factor(factor: int) -> None:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1, got {factor!r}")


def fir_kernel(
    taps: Sequence[float] = DEFAULT_FIR_KERNEL,
    gain: float = 1.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Separable 2-D FIR kernel ``gain · (k ⊗ k) / Σ(k ⊗ k)``.

    Args:
        taps: 1-D taps k (non-empty, non-zero sum).
        gain: total sum of the returned kernel.
        dtype: kernel dtype.
        device: kernel device.

    Returns:
        (K, K) kernel with K = len(taps), summing to ``gain``.
    """
    k = torch.as_tensor(list(taps), dtype=dtype, device=device)
    if k.dim() != 1 or k.numel() == 0:
        raise ValueError(f"taps must be a non-empty 1-D sequence, got {taps!r}")
    if float(k.sum()) == 0.0:
        raise ValueError(f"taps must not sum to zero, got {taps!r}")
    k2 = torch.outer(k, k)
    return k2 * (gain / k2.sum())


def upfirdn2d(
    x: torch.Tensor, kernel: torch.Tensor, *, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Upsample by zero insertion, pad, convolve with ``kernel``, downsample by striding; per channel.

    Output size per spatial axis: ``(n · up + pad[0] + pad[1] − K) // down + 1``. Negative pads crop.

    Args:
        x: (B, C, H, W).
        kernel: (K, K) filter, applied as a true convolution (flipped) on every channel.
        up: zero-insertion factor (``up − 1`` zeros after every sample).
        down: stride of the final subsampling.
        pad: (before, after) padding, the same on both spatial axes.

    Returns:
        (B, C, H', W') filtered tensor.
    """
    _check_image(x)
    _check_factor(up)
    _check_factor(down)
    if kernel.dim() != 2:
        raise ValueError(f"kernel must be 2-D (K, K), got shape {tuple(kernel.shape)}")
    b, c, h, w = x.shape
    if up > 1:
        zeros = x.new_zeros(b, c, h * up, w * up)
        zeros[:, :, ::up, ::up] = x
        x = zeros
    p0, p1 = pad
    x = F.pad(x, (p0, p1, p0, p1))
    weight = kernel.flip(0, 1).to(dtype=x.dtype, device=x.device)
    weight = weight[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, stride=down, groups=c)


def fir_upsample_2d(
    x: torch.Tensor, taps: Sequence[float] = DEFAULT_FIR_KERNEL, factor: int = 2, gain: float = 1.0
) -> torch.Tensor:
    """FIR upsampling (docs/algorithm.md §5): zero insertion ×factor, filter with gain ``gain · factor²``.

    Padding ``((p + 1) // 2 + factor − 1, p // 2)`` with ``p = K − factor``, i.e. (2, 1) for [1,3,3,1], ×2.

    Args:
        x: (B, C, H, W).
        taps: 1-D FIR taps.
        factor: integer upsampling factor.
        gain: overall gain (1 keeps a constant image constant).

    Returns:
        (B, C, factor·H, factor·W).
    """
    _check_factor(factor)
    kernel = fir_kernel(taps, gain * factor**2, dtype=x.dtype, device=x.device)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def fir_downsample_2d(
    x: torch.Tensor, taps: Sequence[float] = DEFAULT_FIR_KERNEL, factor: int = 2, gain: float = 1.0
) -> torch.Tensor:
    """FIR downsampling (docs/algorithm.md §5): filter, then stride ``factor``.

    Padding ``((p + 1) // 2, p // 2)`` with ``p = K − factor``, i.e. (1, 1) for [1,3,3,1], ×2.

    Args:
        x: (B, C, H, W) with H, W divisible by ``factor``.
        taps: 1-D FIR taps.
        factor: integer downsampling factor.
        gain: overall gain.

    Returns:
        (B, C, H/factor, W/factor).
    """
    _check_factor(factor)
    _check_image(x)
    if x.shape[-1] % factor or x.shape[-2] % factor:
        raise ValueError(f"x spatial size {tuple(x.shape[-2:])} must be divisible by factor={factor}")
    kernel = fir_kernel(taps, gain, dtype=x.dtype, device=x.device)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def naive_upsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Nearest-neighbour upsampling: every pixel repeated into a ``factor × factor`` block.

    Args:
        x: (B, C, H, W).
        factor: integer factor.

    Returns:
        (B, C, factor·H, factor·W).
    """
    _check_image(x)
    _check_factor(factor)
    return x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def naive_downsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Average pooling over non-overlapping ``factor × factor`` blocks.

    Args:
        x: (B, C, H, W) with H, W divisible by ``factor``.
        factor: integer factor.

    Returns:
        (B, C, H/factor, W/factor).
    """
    _check_image(x)
    _check_factor(factor)
    b, c, h, w = x.shape
    if h % factor or w % factor:
        raise ValueError(f"x spatial size {(h, w)} must be divisible by factor={factor}")
    return x.reshape(b, c, h // factor, factor, w // factor, factor).mean(dim=(3, 5))
