"""The NVAE-style hierarchical VAE of LSGM: encoder q(z0|x), decoder p(x|z0) (docs/algorithm.md §1).

Structure (docs/algorithm.md §1.1): stem → pre-processing blocks (last cell of each block down-samples) → encoder tower
(finest latent scale first; down cells between scales) → decoder tower (top-down from a learned constant ``h0``;
per latent group: posterior, sample, flows, inject, cells; up cells between scales) → post-processing blocks (first
cell of each block up-samples) → ELU + 3×3 conv head.

Every latent group has an independent N(0, I) prior (docs/algorithm.md §1.3); the hierarchy lives in the deterministic decoder.
Groups are indexed top-down (coarsest scale first); the first ``top_group_count`` groups form the top scale whose
concatenation ``z0_top`` gets the SGM prior in stage 2 (docs/algorithm.md §1.2, §4.1).

Channel width at ``channel_mult`` index ``k`` is ``num_channels · channel_mult[k]``; index 0 is the input
resolution, index ``num_preprocess_blocks + s`` the encoder latent scale ``s`` (finest first).

Decisions where docs/algorithm.md §1.1 is silent:

* ``progressive_input="input_skip"``: the input pyramid starts as the feature entering the encoder tower (after
  pre-processing); at every encoder down cell it is projected by a stride-2 BN-Swish-3×3-conv to the next width,
  added to the down cell's output and kept as the new pyramid.
* ``num_postprocess_blocks`` must equal ``num_preprocess_blocks`` so that the output has the input resolution; the
  stem and the head use width ``num_channels · channel_mult[0]``.
* Each group's posterior noise is drawn with ``generator`` (or the global RNG) in top-down order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lsgm.vae import distributions as dist
from lsgm.vae.cells import ARCH_INSTANCES, BNSwishConv, make_cell
from lsgm.vae.conv import Conv2D
from lsgm.vae.flows import PairedCellAR

PROGRESSIVE_INPUTS = ("none", "input_skip")


@dataclass
class NVAEOutput:
    """Result of ``NVAE.forward``; per-group lists are in top-down order (top scale first).

    Attributes:
        decoder_params: (B, n_out, H, W) parameters of p(x|z) (logits for ``bin``).
        z0_top: (B, G_top·Z, S, S) concatenated top-scale samples (after flows); differentiable w.r.t. the encoder.
        z_groups: per group (B, Z, s, s) samples fed to the decoder (after flows).
        log_q: per group (B, Z, s, s) per-element ``log q`` at the sample, flow log-dets subtracted.
        log_p_normal: per group (B, Z, s, s) per-element ``log N(z; 0, I)``.
        kl_per_group: per group (B,) ``Σ (log q − log N(z;0,I))`` (Monte-Carlo KL, docs/algorithm.md §1.3).
        top_group_count: how many leading groups are top-scale (SGM prior in stage 2).
    """

    decoder_params: torch.Tensor
    z0_top: torch.Tensor
    z_groups: list[torch.Tensor]
    log_q: list[torch.Tensor]
    log_p_normal: list[torch.Tensor]
    kl_per_group: list[torch.Tensor]
    top_group_count: int


def _choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {list(allowed)}")


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: an integer >= {minimum}")


class NVAE(nn.Module):
    """Hierarchical VAE backbone of LSGM (docs/algorithm.md §1). All arguments are keyword-only plain values.

    Args:
        in_channels: image channels C (1 for MNIST/OMNIGLOT/digits, 3 otherwise).
        image_size: H = W of the (padded) input.
        arch_instance: ``"res_bnswish"`` or ``"res_mbconv"`` (docs/algorithm.md §1.4).
        num_channels_enc: encoder base width.
        num_channels_dec: decoder base width.
        num_preprocess_blocks: pre-processing blocks (each down-samples once).
        num_preprocess_cells: cells per pre-processing block.
        num_postprocess_blocks: post-processing blocks (each up-samples once); must equal the pre-processing count.
        num_postprocess_cells: cells per post-processing block.
        num_cell_per_cond_enc: encoder cells per latent group.
        num_cell_per_cond_dec: decoder cells per latent group.
        num_latent_scales: latent scales L.
        num_groups_per_scale: groups per scale.
        num_latent_per_group: latent channels Z per group.
        channel_mult: width multipliers, ``num_preprocess_blocks + num_latent_scales`` entries.
        num_nf: paired autoregressive flow cells per group.
        use_se: squeeze-excitation in every cell.
        decoder_dist: ``"bin"``, ``"dml"`` or ``"normal"`` (docs/algorithm.md §1.6).
        num_mix_output: DML components M.
        num_x_bits: bits per channel for DML (8 or 5).
        progressive_input: ``"none"`` or ``"input_skip"``.
        log_sig_q_scale: soft-clamp scale of the posterior μ and log σ.
        crop_output: central crop applied before summing the log-likelihood (28 for padded 28×28 data); ``None``
            = no crop.
    """

    def __init__(self, *, in_channels: int, image_size: int, arch_instance: str, num_channels_enc: int,
                 num_channels_dec: int, num_preprocess_blocks: int, num_preprocess_cells: int,
                 num_postprocess_blocks: int, num_postprocess_cells: int, num_cell_per_cond_enc: int,
                 num_cell_per_cond_dec: int, num_latent_scales: int, num_groups_per_scale: int,
                 num_latent_per_group: int, channel_mult: tuple[int, ...], num_nf: int, use_se: bool = True,
                 decoder_dist: str = "dml", num_mix_output: int = 10, num_x_bits: int = 8,
                 progressive_input: str = "none", log_sig_q_scale: float = 5.0,
                 crop_output: int | None = None) -> None:
        super().__init__()
        self._validate(locals())
        self.in_channels, self.image_size = in_channels, image_size
        self.arch_instance, self.use_se = arch_instance, use_se
        self.num_channels_enc, self.num_channels_dec = num_channels_enc, num_channels_dec
        self.num_preprocess_blocks, self.num_latent_scales = num_preprocess_blocks, num_latent_scales
        self.num_groups_per_scale, self.num_latent_per_group = num_groups_per_scale, num_latent_per_group
        self.channel_mult = tuple(channel_mult)
        self.num_nf, self.decoder_dist, self.num_mix_output = num_nf, decoder_dist, num_mix_output
        self.num_x_bits, self.progressive_input = num_x_bits, progressive_input
        self.log_sig_q_scale, self.crop_output = float(log_sig_q_scale), crop_output
        self.num_groups = num_latent_scales * num_groups_per_scale
        self.top_size = image_size // 2 ** (num_preprocess_blocks + num_latent_scales - 1)

        enc, dec = self._enc_width, self._dec_width
        self.stem = Conv2D(in_channels, enc(0), 3, padding=1, bias=True)
        self.pre_process = nn.ModuleList(
            make_cell(arch_instance, "down_pre", enc(b), enc(b + 1), use_se) if c == num_preprocess_cells - 1
            else make_cell(arch_instance, "normal_pre", enc(b), enc(b), use_se)
            for b in range(num_preprocess_blocks) for c in range(num_preprocess_cells))
        self._build_encoder(num_cell_per_cond_enc)
        self._build_latent_path(num_cell_per_cond_dec)
        p = num_preprocess_blocks
        self.post_process = nn.ModuleList(
            make_cell(arch_instance, "up_post", dec(p - b), dec(p - b - 1), use_se) if c == 0
            else make_cell(arch_instance, "normal_post", dec(p - b - 1), dec(p - b - 1), use_se)
            for b in range(num_postprocess_blocks) for c in range(num_postprocess_cells))
        n_out = dist.num_decoder_channels(decoder_dist, in_channels, num_mix_output)
        self.head = nn.Sequential(nn.ELU(), Conv2D(dec(0), n_out, 3, padding=1, bias=True))
        # Learned constant decoder input h0, uniform[0, 1) (docs/algorithm.md §1.1 step 4).
        self.h0 = nn.Parameter(torch.rand(dec(p + num_latent_scales - 1), self.top_size, self.top_size))

    # ------------------------------------------------------------------------------------------- construction
    @staticmethod
    def _validate(a: dict) -> None:
        for name in ("in_channels", "image_size", "num_channels_enc", "num_channels_dec", "num_preprocess_cells",
                     "num_postprocess_cells", "num_cell_per_cond_enc", "num_cell_per_cond_dec", "num_latent_scales",
                     "num_groups_per_scale", "num_latent_per_group", "num_mix_output", "num_x_bits"):
            _positive(name, a[name])
        for name in ("num_preprocess_blocks", "num_postprocess_blocks", "num_nf"):
            _positive(name, a[name], minimum=0)
        _choice("arch_instance", a["arch_instance"], tuple(ARCH_INSTANCES))
        _choice("decoder_dist", a["decoder_dist"], dist.DECODER_DISTS)
        _choice("progressive_input", a["progressive_input"], PROGRESSIVE_INPUTS)
        if a["num_postprocess_blocks"] != a["num_preprocess_blocks"]:
            raise ValueError(f"num_postprocess_blocks={a['num_postprocess_blocks']} is not allowed; allowed: equal "
                             f"to num_preprocess_blocks={a['num_preprocess_blocks']} (output must match input size)")
        mult, need = tuple(a["channel_mult"]), a["num_preprocess_blocks"] + a["num_latent_scales"]
        if len(mult) != need or not all(isinstance(m, int) and m >= 1 for m in mult):
            raise ValueError(f"channel_mult={mult!r} is not allowed; allowed: {need} positive integers "
                             f"(num_preprocess_blocks + num_latent_scales)")
        down = 2 ** (need - 1)
        if a["image_size"] % down:
            raise ValueError(f"image_size={a['image_size']} is not allowed; allowed: a multiple of {down} "
                             f"(2^(num_preprocess_blocks + num_latent_scales - 1))")
        crop = a["crop_output"]
        if crop is not None and (not isinstance(crop, int) or not 0 < crop <= a["image_size"]):
            raise ValueError(f"crop_output={crop!r} is not allowed; allowed: None or 1..{a['image_size']}")
        if a["decoder_dist"] == "dml" and a["num_x_bits"] > 8:
            raise ValueError(f"num_x_bits={a['num_x_bits']} is not allowed; allowed: 1..8")
        if not a["log_sig_q_scale"] > 0:
            raise ValueError(f"log_sig_q_scale={a['log_sig_q_scale']!r} is not allowed; allowed: > 0")

    def _enc_width(self, k: int) -> int:
        return self.num_channels_enc * self.channel_mult[k]

    def _dec_width(self, k: int) -> int:
        return self.num_channels_dec * self.channel_mult[k]

    def _group_mult_index(self, group: int) -> int:
        """``channel_mult`` index of top-down group ``group``."""
        scale_from_top = group // self.num_groups_per_scale
        return self.num_preprocess_blocks + self.num_latent_scales - 1 - scale_from_top

    def _build_encoder(self, cells_per_group: int) -> None:
        """Encoder tower, finest scale first: ``enc_cells[scale][group]`` and ``enc_down[scale]``."""
        enc, arch, p = self._enc_width, self.arch_instance, self.num_preprocess_blocks
        self.enc_cells = nn.ModuleList(
            nn.ModuleList(nn.ModuleList(make_cell(arch, "normal_enc", enc(p + s), enc(p + s), self.use_se)
                                        for _ in range(cells_per_group))
                          for _ in range(self.num_groups_per_scale))
            for s in range(self.num_latent_scales))
        scales = range(self.num_latent_scales - 1)
        self.enc_down = nn.ModuleList(make_cell(arch, "down_enc", enc(p + s), enc(p + s + 1), self.use_se)
                                      for s in scales)
        if self.progressive_input == "input_skip":
            self.enc_input_skip = nn.ModuleList(BNSwishConv(enc(p + s), enc(p + s + 1), stride=2) for s in scales)

    def _build_latent_path(self, cells_per_group: int) -> None:
        """Per top-down group: encoder combiner, posterior head, flows, z injector, decoder combiner, cells."""
        enc, dec, z = self._enc_width, self._dec_width, self.num_latent_per_group
        idx = [self._group_mult_index(g) for g in range(self.num_groups)]
        self.enc_combiners = nn.ModuleList(Conv2D(dec(k), enc(k), 1, bias=True) for k in idx[1:])
        self.posteriors = nn.ModuleList(nn.Sequential(nn.ELU(), Conv2D(enc(k), 2 * z, 3, padding=1, bias=True))
                                        for k in idx)
        self.flows = nn.ModuleList(nn.ModuleList(PairedCellAR(z) for _ in range(self.num_nf)) for _ in idx)
        self.z_injectors = nn.ModuleList(Conv2D(z, z, 3, padding=1, bias=True) for _ in idx)
        self.dec_combiners = nn.ModuleList(Conv2D(dec(k) + z, dec(k), 1, bias=True) for k in idx)
        self.dec_cells = nn.ModuleList(
            nn.ModuleList(make_cell(self.arch_instance, "normal_dec", dec(k), dec(k), self.use_se)
                          for _ in range(cells_per_group)) for k in idx)
        top = self.num_preprocess_blocks + self.num_latent_scales - 1
        self.dec_up = nn.ModuleList(make_cell(self.arch_instance, "up_dec", dec(top - t), dec(top - t - 1),
                                              self.use_se) for t in range(self.num_latent_scales - 1))

    # ------------------------------------------------------------------------------------------- properties
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, S, S) of ``z0_top``: ``(num_groups_per_scale · num_latent_per_group, S, S)`` (docs/algorithm.md §1.2)."""
        return (self.num_groups_per_scale * self.num_latent_per_group, self.top_size, self.top_size)

    @property
    def top_group_count(self) -> int:
        """Number of top-scale groups (the leading entries of the per-group lists)."""
        return self.num_groups_per_scale

    @property
    def groups_per_scale(self) -> list[int]:
        """Group counts per latent scale in top-down order (for ``kl_balancer``)."""
        return [self.num_groups_per_scale] * self.num_latent_scales

    def group_shape(self, group: int) -> tuple[int, int, int]:
        """(Z, s, s) of top-down group ``group``."""
        size = self.top_size * 2 ** (group // self.num_groups_per_scale)
        return (self.num_latent_per_group, size, size)

    # ------------------------------------------------------------------------------------------- networks
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run stem, pre-processing and encoder tower.

        Args:
            x: (B, C, H, W) image in [-1, 1].

        Returns:
            The final (coarsest) encoder feature and the stored combiner features in top-down order (one per group
            after the first).
        """
        s = self.stem(x)
        for cell in self.pre_process:
            s = cell(s)
        pyramid = s  # input_skip: the pyramid starts at the encoder-tower input (module docstring)
        stored: list[torch.Tensor] = []
        last_scale = self.num_latent_scales - 1
        for scale, groups in enumerate(self.enc_cells):
            for g, cells in enumerate(groups):
                for cell in cells:
                    s = cell(s)
                if not (scale == last_scale and g == self.num_groups_per_scale - 1):
                    stored.append(s)
            if scale < last_scale:
                s = self.enc_down[scale](s)
                if self.progressive_input == "input_skip":
                    pyramid = self.enc_input_skip[scale](pyramid)
                    s = s + pyramid
        return s, stored[::-1]

    def _run_decoder(self, batch: int, latent_fn: Callable[[int, torch.Tensor], torch.Tensor]
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Top-down decoder from ``h0``; ``latent_fn(group, state)`` supplies each group's z0 (B, Z, s, s)."""
        state = self.h0.unsqueeze(0).expand(batch, -1, -1, -1)
        z_groups = []
        for g in range(self.num_groups):
            z = latent_fn(g, state)
            z_groups.append(z)
            state = self.dec_combiners[g](torch.cat([state, self.z_injectors[g](z)], dim=1))
            for cell in self.dec_cells[g]:
                state = cell(state)
            if (g + 1) % self.num_groups_per_scale == 0 and g + 1 < self.num_groups:
                state = self.dec_up[g // self.num_groups_per_scale](state)
        for cell in self.post_process:
            state = cell(state)
        return self.head(state), z_groups

    def forward(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> NVAEOutput:
        """Encode ``x``, sample every group from q (reparameterised), decode (docs/algorithm.md §1.1).

        Args:
            x: (B, C, H, W) image in [-1, 1].
            generator: optional RNG for the posterior noise.
        """
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, {', '.join(map(str, expected))})")
        final, stored = self.encode(x)
        log_q, log_p = [], []

        def posterior_sample(g: int, state: torch.Tensor) -> torch.Tensor:
            feature = final if g == 0 else stored[g - 1] + self.enc_combiners[g - 1](state)
            mu_raw, log_sigma_raw = self.posteriors[g](feature).chunk(2, dim=1)
            mu = dist.soft_clamp(mu_raw, self.log_sig_q_scale)
            log_sigma = dist.soft_clamp(log_sigma_raw, self.log_sig_q_scale)
            z = dist.sample_normal(mu, log_sigma, generator)
            log_q_g = dist.normal_log_prob(z, mu, log_sigma)
            for flow in self.flows[g]:
                z, log_det = flow(z)
                log_q_g = log_q_g - log_det
            log_q.append(log_q_g)
            log_p.append(dist.standard_normal_log_prob(z))
            return z

        params, z_groups = self._run_decoder(x.shape[0], posterior_sample)
        kl = [(q - p).flatten(1).sum(dim=1) for q, p in zip(log_q, log_p)]
        z0_top = torch.cat(z_groups[:self.top_group_count], dim=1)
        return NVAEOutput(params, z0_top, z_groups, log_q, log_p, kl, self.top_group_count)

    def decode(self, z_top: torch.Tensor, *, temperature_rest: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Decoder parameters for a top-scale latent (sampling, docs/algorithm.md §6.1 step 4).

        Args:
            z_top: (B, *latent_shape), split along channels into the top-scale groups.
            temperature_rest: finer-scale groups are drawn from N(0, temperature_rest² I) (``vae_temp``).
            generator: optional RNG for the finer-scale latents.
        """
        if z_top.dim() != 4 or tuple(z_top.shape[1:]) != self.latent_shape:
            raise ValueError(f"z_top has shape {tuple(z_top.shape)}; expected (B, {self.latent_shape})")
        top_groups = z_top.split(self.num_latent_per_group, dim=1)

        def prior_sample(g: int, state: torch.Tensor) -> torch.Tensor:
            if g < self.top_group_count:
                return top_groups[g]
            noise = torch.randn((z_top.shape[0], *self.group_shape(g)), generator=generator, device=z_top.device,
                                dtype=z_top.dtype)
            return temperature_rest * noise

        return self._run_decoder(z_top.shape[0], prior_sample)[0]

    # ------------------------------------------------------------------------------------------- likelihood
    def decoder_log_prob(self, decoder_params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B,) ``log p(x|z)`` in nats over the (cropped) image (docs/algorithm.md §1.6)."""
        return dist.decoder_log_prob(self.decoder_dist, decoder_params, x, num_bits=self.num_x_bits,
                                     num_mix=self.num_mix_output, crop=self.crop_output)

    def decoder_mean(self, decoder_params: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image in [-1, 1] produced at sampling time (distribution mean, docs/algorithm.md §1.6)."""
        return dist.decoder_mean(self.decoder_dist, decoder_params, num_channels=self.in_channels,
                                 num_mix=self.num_mix_output)
