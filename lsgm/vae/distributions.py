"""Posterior helpers and decoder distributions p(x|z) of the NVAE backbone (docs/algorithm.md §1.1, §1.3, §1.6).

All log-probabilities are per element unless stated and in nats. Images are in [-1, 1].

Decoder parameter layouts (channels of the output head, ``C`` = image channels):

* ``bin``: ``C`` Bernoulli logits.
* ``dml`` with ``M`` components: ``[M mixture logits | C·M means | C·M log-scales | P·M coefficients]`` with
  ``P = C(C−1)/2`` coefficient sets for the pairs (1,0), (2,0), (2,1) (for RGB: ``μ_G += c_0·x_R``,
  ``μ_B += c_1·x_R + c_2·x_G``), i.e. ``10·M`` channels for RGB as in docs/algorithm.md §1.6.
* ``normal``: ``[C means | C log-stds]``, both soft-clamped by ``5·tanh(·/5)``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

DecoderDist = Literal["bin", "dml", "normal"]
DECODER_DISTS = ("bin", "dml", "normal")
LOG_2PI = math.log(2.0 * math.pi)
DML_MIN_LOG_SCALE = -7.0
DML_EDGE = 0.999
DML_MIN_MASS = 1e-5
NORMAL_DECODER_CLAMP = 5.0


def soft_clamp(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · tanh(x / scale)``: smooth clamp to (−scale, scale) (docs/algorithm.md §1.1, ``log_sig_q_scale``)."""
    return scale * torch.tanh(x / scale)


def normal_log_prob(z: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Per-element ``log N(z; μ, σ²)``."""
    return -0.5 * ((z - mu) * torch.exp(-log_sigma)) ** 2 - log_sigma - 0.5 * LOG_2PI


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """Per-element ``log N(z; 0, 1)`` (the VAE prior of every group, docs/algorithm.md §1.3)."""
    return -0.5 * z ** 2 - 0.5 * LOG_2PI


def sample_normal(mu: torch.Tensor, log_sigma: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Reparameterised sample ``μ + σ·n``, ``n ~ N(0, I)``."""
    noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(log_sigma) * noise


def central_crop(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Central ``size × size`` crop of (B, C, H, W) (``[2:30, 2:30]`` for 28 of 32); ``None`` = no crop."""
    if size is None:
        return x
    h, w = x.shape[-2:]
    if not 0 < size <= min(h, w):
        raise ValueError(f"crop size={size} is not allowed for a {h}x{w} image; allowed: 1..{min(h, w)}")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def num_decoder_channels(decoder_dist: str, image_channels: int, num_mix: int = 10) -> int:
    """Channels of the output head for a decoder distribution (see the module docstring)."""
    if decoder_dist == "bin":
        return image_channels
    if decoder_dist == "dml":
        num_pairs = image_channels * (image_channels - 1) // 2
        return num_mix * (1 + 2 * image_channels + num_pairs)
    if decoder_dist == "normal":
        return 2 * image_channels
    raise ValueError(f"decoder_dist={decoder_dist!r} is not allowed; allowed: {DECODER_DISTS}")


# ----------------------------------------------------------------------------------------------- Bernoulli
def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-element Bernoulli log-likelihood; ``x`` in {−1, +1} is mapped to {0, 1} (docs/algorithm.md §1.6).

    Args:
        logits: (B, C, H, W).
        x: (B, C, H, W) in [-1, 1].
    """
    target = 0.5 * (x + 1.0)
    return -F.binary_cross_entropy_with_logits(logits, target, reduction="none")


def bernoulli_mean(logits: torch.Tensor) -> torch.Tensor:
    """Image at sampling time: ``2p − 1`` (docs/algorithm.md §1.6)."""
    return 2.0 * torch.sigmoid(logits) - 1.0


# ----------------------------------------------------------------------------------------------- Normal
def normal_decoder_split(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-clamped ``(mean, log_std)`` of the ``normal`` decoder, each (B, C, H, W)."""
    mu, log_sigma = soft_clamp(params, NORMAL_DECODER_CLAMP).chunk(2, dim=1)
    return mu, log_sigma


def normal_decoder_log_prob(params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-element ``log N(x; μ, σ²)`` of the ``normal`` decoder (density, not discretised)."""
    mu, log_sigma = normal_decoder_split(params)
    return normal_log_prob(x, mu, log_sigma)


def normal_decoder_mean(params: torch.Tensor) -> torch.Tensor:
    """Image at sampling time: the mean, clamped to [-1, 1]."""
    return normal_decoder_split(params)[0].clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------------------------- DML
def _coefficient_pairs(num_channels: int) -> list[tuple[int, int]]:
    """(target channel, source channel) pairs, in the order (1,0), (2,0), (2,1), ..."""
    return [(c, j) for c in range(num_channels) for j in range(c)]


def dml_split(params: torch.Tensor, num_channels: int, num_mix: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split DML parameters into mixture logits and per-channel component parameters.

    Args:
        params: (B, M·(1 + 2C + P), H, W).
        num_channels: image channels C.
        num_mix: components M.

    Returns:
        ``logit_probs`` (B, M, H, W), ``means`` (B, C, M, H, W), ``log_scales`` (B, C, M, H, W) clamped ≥ −7,
        ``coeffs`` (B, P, M, H, W) tanh-squashed.
    """
    expected = num_decoder_channels("dml", num_channels, num_mix)
    if params.shape[1] != expected:
        raise ValueError(f"DML params have {params.shape[1]} channels; expected {expected} for C={num_channels}, "
                         f"M={num_mix}")
    b, _, h, w = params.shape
    m, c = num_mix, num_channels
    logit_probs = params[:, :m]
    means = params[:, m:m + c * m].reshape(b, c, m, h, w)
    log_scales = params[:, m + c * m:m + 2 * c * m].reshape(b, c, m, h, w).clamp(min=DML_MIN_LOG_SCALE)
    coeffs = torch.tanh(params[:, m + 2 * c * m:].reshape(b, c * (c - 1) // 2, m, h, w))
    return logit_probs, means, log_scales, coeffs


def _dml_conditional_means(means: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Add the within-pixel autoregressive terms ``Σ_j c_(c,j) x_j`` to the channel means (docs/algorithm.md §1.6)."""
    extra = [torch.zeros_like(means[:, 0]) for _ in range(means.shape[1])]
    for p, (c, j) in enumerate(_coefficient_pairs(means.shape[1])):
        extra[c] = extra[c] + coeffs[:, p] * x[:, j].unsqueeze(1)
    return means + torch.stack(extra, dim=1)


def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                  num_bits: int) -> torch.Tensor:
    """Log-mass of the bin of ``x`` under a logistic discretised to ``2^num_bits`` levels in [-1, 1] (docs/algorithm.md §1.6).

    With ``K = 2^b − 1`` the bin half-width is ``1/K``; the edge bins take the whole tails; if the interior mass is
    below 1e-5 the density approximation ``log pdf(x) − log(K/2)`` is used.
    """
    k = 2.0 ** num_bits - 1.0
    centered = x - mean
    inv_scale = torch.exp(-log_scale)
    plus_in = inv_scale * (centered + 1.0 / k)
    min_in = inv_scale * (centered - 1.0 / k)
    log_cdf_plus = plus_in - F.softplus(plus_in)          # log σ(plus_in), left tail
    log_one_minus_cdf_min = -F.softplus(min_in)          # log(1 − σ(min_in)), right tail
    mass = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_scale * centered
    log_pdf_mid = mid_in - log_scale - 2.0 * F.softplus(mid_in)
    interior = torch.where(mass > DML_MIN_MASS, torch.log(mass.clamp(min=1e-12)), log_pdf_mid - math.log(k / 2.0))
    return torch.where(x < -DML_EDGE, log_cdf_plus, torch.where(x > DML_EDGE, log_one_minus_cdf_min, interior))


def dml_log_prob(params: torch.Tensor, x: torch.Tensor, *, num_bits: int, num_mix: int) -> torch.Tensor:
    """Per-pixel log-likelihood (B, H, W) of the discretised mixture of logistics (docs/algorithm.md §1.6).

    Args:
        params: (B, M·(1 + 2C + P), H, W) decoder output.
        x: (B, C, H, W) quantised image in [-1, 1].
        num_bits: bits per channel (8 or 5).
        num_mix: mixture components M.
    """
    logit_probs, means, log_scales, coeffs = dml_split(params, x.shape[1], num_mix)
    means = _dml_conditional_means(means, coeffs, x)
    log_probs = discretized_logistic_log_prob(x.unsqueeze(2), means, log_scales, num_bits).sum(dim=1)
    return torch.logsumexp(log_probs + F.log_softmax(logit_probs, dim=1), dim=1)


def dml_mean(params: torch.Tensor, *, num_channels: int, num_mix: int) -> torch.Tensor:
    """Image at sampling time: softmax-weighted means, channel coefficients applied to the clamped previous
    channels, clamped to [-1, 1] (docs/algorithm.md §1.6). Returns (B, C, H, W)."""
    logit_probs, means, _, coeffs = dml_split(params, num_channels, num_mix)
    weights = torch.softmax(logit_probs, dim=1).unsqueeze(1)
    mean = (means * weights).sum(dim=2)
    coeff = (coeffs * weights).sum(dim=2)
    pairs = _coefficient_pairs(num_channels)
    out: list[torch.Tensor] = []
    for c in range(num_channels):
        value = mean[:, c]
        for p, (target, source) in enumerate(pairs):
            if target == c:
                value = value + coeff[:, p] * out[source]
        out.append(value.clamp(-1.0, 1.0))
    return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------------------------- dispatch
def decoder_log_prob(decoder_dist: str, params: torch.Tensor, x: torch.Tensor, *, num_bits: int = 8,
                     num_mix: int = 10, crop: int | None = None) -> torch.Tensor:
    """Per-image ``log p(x|z)`` in nats, (B,), summed over the (optionally centrally cropped) image."""
    if decoder_dist == "bin":
        elem = bernoulli_log_prob(params, x)
    elif decoder_dist == "dml":
        elem = dml_log_prob(params, x, num_bits=num_bits, num_mix=num_mix).unsqueeze(1)
    elif decoder_dist == "normal":
        elem = normal_decoder_log_prob(params, x)
    else:
        raise ValueError(f"decoder_dist={decoder_dist!r} is not allowed; allowed: {DECODER_DISTS}")
    return central_crop(elem, crop).flatten(1).sum(dim=1)


def decoder_mean(decoder_dist: str, params: torch.Tensor, *, num_channels: int, num_mix: int = 10
                 ) -> torch.Tensor:
    """Image produced at sampling time (the distribution mean) in [-1, 1] (docs/algorithm.md §1.6)."""
    if decoder_dist == "bin":
        return bernoulli_mean(params)
    if decoder_dist == "dml":
        return dml_mean(params, num_channels=num_channels, num_mix=num_mix)
    if decoder_dist == "normal":
        return normal_decoder_mean(params)
    raise ValueError(f"decoder_dist={decoder_dist!r} is not allowed; allowed: {DECODER_DISTS}")
