"""NCSN++ score network as used by LSGM (docs/algorithm.md §5), written here from docs/algorithm.md §5 and Song et al. 2021 (NCSN++).

The network maps a noisy latent ``z_t`` and continuous time ``t ∈ [0, 1]`` to the raw prediction ``ε'_θ(z_t, t)``;
the mixed score of docs/algorithm.md §3 (``α = sigmoid(ℓ)``, one logit per latent channel) lives in :mod:`lsgm.score`.

Layout (docs/algorithm.md §5), with ``L = num_scales`` resolutions ``R_i = image_size / 2^i``:

* time: ``temb = Dense(SiLU(Dense(sinusoid(embedding_scale · t))))``, widths ``D → 4D → 4D`` with
  ``D = embedding_dim = 128`` (so 512, as in docs/algorithm.md §5 for every nf), computed in fp32 with autocast off;
* input 3×3 conv ``C → nf``;
* down path: per level ``num_res_blocks`` BigGAN blocks (each followed by attention if ``R_i`` is in
  ``attn_resolutions``), then a down-sampling block (except on the last level); every output is kept as a skip;
* middle: block, attention, block;
* up path (coarsest first): per level ``num_res_blocks + 1`` blocks, each consuming one skip by channel
  concatenation, one attention if ``R_i`` is in ``attn_resolutions``, then an up-sampling block (except level 0);
* output GroupNorm → SiLU → 3×3 conv ``nf → C`` (initialised ~0).

What the spectral regulariser (docs/algorithm.md §1.7) finds here: the ``nn.Conv2d`` layers (input/output convs, the two 3×3
convs and the optional 1×1 shortcut of every block) and the ``nn.GroupNorm`` layers; the attention's NIN layers
and the parameter-free resamplers are not ``nn.Conv2d``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lsgm.nets.layers import NIN, make_conv, make_dense, make_group_norm, timestep_embedding
from lsgm.nets.upfirdn import (
    DEFAULT_FIR_KERNEL,
    fir_downsample_2d,
    fir_upsample_2d,
    naive_downsample_2d,
    naive_upsample_2d,
)

__all__ = ["AttnBlock", "NCSNpp", "ResBlockBigGAN"]

Resample = Optional[Literal["up", "down"]]


class ResBlockBigGAN(nn.Module):
    """BigGAN-style residual block with time conditioning (docs/algorithm.md §5).

    ``h = Conv_1(Dropout(SiLU(GN_1(Conv_0(resample(SiLU(GN_0(x)))) + Dense(SiLU(temb))))))``,
    output ``(shortcut(resample(x)) + h) / √2``; the shortcut is a 1×1 conv when the width changes or the
    block resamples, identity otherwise. ``Conv_1`` is initialised ~0, so at init the block is ``x / √2``-like.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        temb_dim: width of the time embedding ``temb``.
        dropout: dropout probability before ``Conv_1``.
        resample: None, "up" (×2) or "down" (/2).
        fir: FIR [1,3,3,1] resampling if True, nearest / average pooling otherwise.
        fir_taps: 1-D FIR taps.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        temb_dim: int,
        dropout: float,
        resample: Resample = None,
        fir: bool = False,
        fir_taps: Sequence[int] = DEFAULT_FIR_KERNEL,
    ) -> None:
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.resample = resample
        self.fir = fir
        self.fir_taps = tuple(fir_taps)
        self.act = nn.SiLU()
        self.norm_0 = make_group_norm(in_ch)
        self.conv_0 = make_conv(in_ch, out_ch, 3)
        self.dense_temb = make_dense(temb_dim, out_ch)
        self.norm_1 = make_group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv_1 = make_conv(out_ch, out_ch, 3, init_scale=0.0)
        self.shortcut = make_conv(in_ch, out_ch, 1) if (in_ch != out_ch or resample is not None) else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return fir_upsample_2d(x, self.fir_taps) if self.fir else naive_upsample_2d(x)
        if self.resample == "down":
            return fir_downsample_2d(x, self.fir_taps) if self.fir else naive_downsample_2d(x)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x: (B, in_ch, H, W), temb: (B, temb_dim) -> (B, out_ch, H', W') with H' = 2H, H/2 or H."""
        h = self._resample(self.act(self.norm_0(x)))
        x = self._resample(x)
        h = self.conv_0(h)
        h = h + self.dense_temb(self.act(temb))[:, :, None, None]
        h = self.conv_1(self.dropout(self.act(self.norm_1(h))))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return (x + h) / math.sqrt(2.0)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (docs/algorithm.md §5): q/k/v/out are NIN layers, out initialised ~0.

    ``h = GN(x)``, ``w = softmax_{(i,j)}(q(h)_{:,hw} · k(h)_{:,ij} / √C)``, ``o = out(Σ_{ij} w v(h)_{:,ij})``,
    output ``(x + o) / √2``.

    Args:
        channels: number of channels C.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = make_group_norm(channels)
        self.q = NIN(channels, channels)
        self.k = NIN(channels, channels)
        self.v = NIN(channels, channels)
        self.out = NIN(channels, channels, init_scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        b, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (f(h).reshape(b, c, height * width).transpose(1, 2) for f in (self.q, self.k, self.v))
        # torch's fused attention kernel: softmax(q kᵀ / √C) v, the formula above
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, height, width)
        return (x + self.out(o)) / math.sqrt(2.0)


def _check_int(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def _check_config(
    in_channels: object,
    image_size: object,
    nf: object,
    num_scales: object,
    num_res_blocks: object,
    channel_mult: object,
    dropout: object,
    fir: object,
    embedding_scale: object,
    embedding_dim: object,
    attn_resolutions: object,
) -> None:
    """Validate the NCSNpp constructor arguments, raising ValueError naming the bad one."""
    _check_int("in_channels", in_channels, 1)
    _check_int("image_size", image_size, 1)
    _check_int("nf", nf, 1)
    _check_int("num_scales", num_scales, 1)
    _check_int("num_res_blocks", num_res_blocks, 1)
    if not isinstance(channel_mult, (tuple, list)) or len(channel_mult) != num_scales:
        raise ValueError(
            f"channel_mult must be a tuple with num_scales={num_scales} entries, got {channel_mult!r}"
        )
    for m in channel_mult:
        _check_int("channel_mult entries", m, 1)
    coarsest_factor = 2 ** (_check_int("num_scales", num_scales, 1) - 1)
    if _check_int("image_size", image_size, 1) % coarsest_factor:
        raise ValueError(f"image_size={image_size} must be divisible by 2^(num_scales-1) = {coarsest_factor}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    if not isinstance(fir, bool):
        raise ValueError(f"fir must be a bool, got {fir!r}")
    if isinstance(embedding_scale, bool) or not isinstance(embedding_scale, (int, float)) or not embedding_scale > 0:
        raise ValueError(f"embedding_scale must be a float > 0, got {embedding_scale!r}")
    if _check_int("embedding_dim", embedding_dim, 4) % 2:
        raise ValueError(f"embedding_dim must be an even integer >= 4, got {embedding_dim!r}")
    if not isinstance(attn_resolutions, (tuple, list)):
        raise ValueError(f"attn_resolutions must be a tuple of ints, got {attn_resolutions!r}")
    for r in attn_resolutions:
        _check_int("attn_resolutions entries", r, 1)


class _DownLevel(nn.Module):
    """One down-path level: res blocks (+ attention each) and an optional down-sampling block."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], downsample: Optional[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)
        self.downsample = downsample


class _UpLevel(nn.Module):
    """One up-path level: res blocks on concatenated skips, optional attention, optional up-sampling block."""

    def __init__(self, blocks: list[nn.Module], attn: Optional[nn.Module], upsample: Optional[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = attn
        self.upsample = upsample


class NCSNpp(nn.Module):
    """NCSN++ U-Net of the LSGM prior (docs/algorithm.md §5); outputs the raw ``ε'_θ(z_t, t)``.

    Args:
        in_channels: latent channels C (input and output).
        image_size: latent spatial size S (input is S × S); divisible by ``2^(num_scales − 1)``.
        nf: base width (``num_channels_dae``).
        num_scales: number of resolutions L (``num_scales_dae``).
        num_res_blocks: res blocks per level on the down path (``num_cell_per_scale_dae``).
        channel_mult: L width multipliers, level i has ``nf · channel_mult[i]`` channels.
        dropout: dropout probability inside every res block.
        fir: FIR [1,3,3,1] resampling (``--fir``) instead of nearest / average pooling.
        embedding_scale: t is multiplied by this before the sinusoidal embedding (1000).
        embedding_dim: sinusoidal embedding width D (128); the time MLP is ``D → 4D → 4D``.
        attn_resolutions: feature resolutions that get self-attention (``(16,)``).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        nf: int,
        num_scales: int,
        num_res_blocks: int,
        channel_mult: Sequence[int],
        dropout: float,
        fir: bool,
        embedding_scale: float = 1000.0,
        embedding_dim: int = 128,
        attn_resolutions: Sequence[int] = (16,),
    ) -> None:
        super().__init__()
        _check_config(in_channels, image_size, nf, num_scales, num_res_blocks, channel_mult, dropout, fir,
                      embedding_scale, embedding_dim, attn_resolutions)
        self.in_channels, self.image_size = in_channels, image_size
        self.embedding_scale, self.embedding_dim = float(embedding_scale), embedding_dim
        self.resolutions = [image_size // 2**i for i in range(num_scales)]
        self.attn_resolutions = tuple(attn_resolutions)
        temb_dim = 4 * embedding_dim
        self.act = nn.SiLU()
        self.temb_dense_0 = make_dense(embedding_dim, temb_dim)
        self.temb_dense_1 = make_dense(temb_dim, temb_dim)

        def block(i: int, o: int, resample: Resample = None) -> ResBlockBigGAN:
            return ResBlockBigGAN(i, o, temb_dim, float(dropout), resample, fir)

        self.conv_in = make_conv(in_channels, nf, 3)
        skips, ch = [nf], nf
        down = []
        for i, mult in enumerate(channel_mult):
            has_attn = self.resolutions[i] in self.attn_resolutions
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(block(ch, nf * mult))
                ch = nf * mult
                if has_attn:
                    attns.append(AttnBlock(ch))
                skips.append(ch)
            downsample = block(ch, ch, "down") if i != num_scales - 1 else None
            if downsample is not None:
                skips.append(ch)
            down.append(_DownLevel(blocks, attns, downsample))
        self.down = nn.ModuleList(down)

        self.mid_block_0, self.mid_attn, self.mid_block_1 = block(ch, ch), AttnBlock(ch), block(ch, ch)

        up = []
        for i in reversed(range(num_scales)):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(block(ch + skips.pop(), nf * channel_mult[i]))
                ch = nf * channel_mult[i]
            attn = AttnBlock(ch) if self.resolutions[i] in self.attn_resolutions else None
            upsample = block(ch, ch, "up") if i != 0 else None
            up.append(_UpLevel(blocks, attn, upsample))
        self.up = nn.ModuleList(up)
        assert not skips, "every skip connection must be consumed"

        self.norm_out = make_group_norm(ch)
        self.conv_out = make_conv(ch, in_channels, 3, init_scale=0.0)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """``temb = Dense_1(SiLU(Dense_0(sinusoid(embedding_scale · t))))`` in the MLP's dtype, autocast off.

        Args:
            t: (B,) continuous time.

        Returns:
            (B, 4 · embedding_dim) time embedding.
        """
        dtype = self.temb_dense_0.weight.dtype
        with torch.autocast(device_type=t.device.type, enabled=False):
            emb = timestep_embedding(t.to(dtype), self.embedding_dim, self.embedding_scale)
            return self.temb_dense_1(self.act(self.temb_dense_0(emb)))

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) (one time per example), got {tuple(t.shape)}")
        return t

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Raw network output ``ε'_θ(z_t, t)``.

        Args:
            x: (B, C, S, S) noisy latent z_t.
            t: (B,) continuous diffusion time in [0, 1] (a 0-d tensor is broadcast over the batch).

        Returns:
            (B, C, S, S) prediction.
        """
        t = self._check_inputs(x, t)
        temb = self.time_embedding(t)
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for j, blk in enumerate(level.blocks):
                h = blk(h, temb)
                if len(level.attns):
                    h = level.attns[j](h)
                skips.append(h)
            if level.downsample is not None:
                h = level.downsample(h, temb)
                skips.append(h)
        h = self.mid_block_1(self.mid_attn(self.mid_block_0(h, temb)), temb)
        for level in self.up:
            for blk in level.blocks:
                h = blk(torch.cat([h, skips.pop()], dim=1), temb)
            if level.attn is not None:
                h = level.attn(h)
            if level.upsample is not None:
                h = level.upsample(h, temb)
        return self.conv_out(self.act(self.norm_out(h)))
