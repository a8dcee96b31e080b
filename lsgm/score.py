"""Mixed score parameterisation of the SGM prior (docs/algorithm.md §3).

The prior predicts the diffusion noise (ε-prediction). Its prediction blends the analytic
ε-prediction of a diffused standard Normal, ``σ_t z_t``, with a neural correction ``ε'_θ``:

``ε_pred(z_t, t) = (1 − α) ⊙ σ_t z_t + α ⊙ ε'_θ(z_t, t)``, ``α = sigmoid(ℓ)``,

one logit ``ℓ`` per latent channel (shape ``(1, C, 1, 1)``; docs/algorithm.md §3.2, docs/algorithm.md §12 item 3).
The score is ``∇ log p_t(z_t) = −ε_pred / σ_t``.

Convention used by every sampler, loss and likelihood in this package:
``eps_fn(z_t: (B, C, H, W), t: (B,)) -> ε_pred: (B, C, H, W)``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from lsgm.sde import SDE

__all__ = [
    "EpsFn",
    "INACTIVE_LOGIT",
    "MixedScore",
    "broadcast_per_sample",
    "gaussian_eps_fn",
    "mixed_eps_prediction",
    "score_from_eps",
]

EpsFn = Callable[[Tensor, Tensor], Tensor]
"""``eps_fn(z_t: (B, C, H, W), t: (B,)) -> ε_pred: (B, C, H, W)``."""

INACTIVE_LOGIT = -15.0
"""Mixing logit ℓ given to inactive (posterior-collapsed) channels (docs/algorithm.md §3.3): α ≈ 3e-7."""


def broadcast_per_sample(x: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample tensor ``x: (B,)`` (e.g. σ_t², w(t)) to ``(B, 1, ..., 1)`` to broadcast against ``like``.

    Per-sample convention of docs/algorithm.md §4.4: one t (and weight) per latent sample.

    Tensors that already have ``like``'s number of dimensions (or are scalars) are returned unchanged.

    Args:
        x: per-sample values, shape ``(B,)``, or already broadcastable.
        like: the tensor to broadcast against, shape ``(B, ...)``.
    """
    if x.dim() == 1 and like.dim() > 1:
        return x.reshape(-1, *([1] * (like.dim() - 1)))
    return x


def mixed_eps_prediction(z_t: Tensor, var_t: Tensor, net_out: Tensor, mixing_logit: Tensor) -> Tensor:
    """Mixed ε-prediction ``(1 − α) σ_t z_t + α ε'_θ`` with ``α = sigmoid(ℓ)`` (docs/algorithm.md §3.1, Eq. "mixed score").

    Args:
        z_t: diffused latents, shape ``(B, C, H, W)``.
        var_t: kernel variance ``σ_t²``, shape ``(B,)`` (or broadcastable to ``z_t``).
        net_out: the network's ε-prediction ``ε'_θ(z_t, t)``, shape ``(B, C, H, W)``.
        mixing_logit: ``ℓ``, shape ``(1, C, 1, 1)`` (one logit per latent channel, docs/algorithm.md §3.2).

    Returns:
        ``ε_pred``, shape ``(B, C, H, W)``.
    """
    alpha = torch.sigmoid(mixing_logit)
    sigma_t = broadcast_per_sample(var_t, z_t).sqrt()
    return (1.0 - alpha) * sigma_t * z_t + alpha * net_out


def score_from_eps(eps_pred: Tensor, var_t: Tensor) -> Tensor:
    """Score ``∇_z log p_t(z) = −ε_pred / σ_t`` (docs/algorithm.md §3.1).

    Args:
        eps_pred: ε-prediction, shape ``(B, C, H, W)``.
        var_t: ``σ_t²``, shape ``(B,)`` or broadcastable.

    Returns:
        The score, shape of ``eps_pred``.
    """
    return -eps_pred / broadcast_per_sample(var_t, eps_pred).sqrt()


class MixedScore(nn.Module):
    """SGM prior ε-prediction with the mixed score (docs/algorithm.md §3) around a backbone (e.g. NCSN++, docs/algorithm.md §5).

    ``forward(z_t, t) = (1 − α) σ_t z_t + α backbone(z_t ⊙ mask, t)``, ``α = sigmoid(ℓ)``.

    State (all saved in ``state_dict``):
        * ``mixing_logit`` (parameter, ``(1, C, 1, 1)``): ℓ, trained with the SGM (docs/algorithm.md §3.2).
        * ``inactive_mask`` (persistent buffer, ``(1, C, 1, 1)``): 0/1 channel mask multiplied into the
          backbone input (docs/algorithm.md §3.3). Unlike the official code, the mask is persisted so a resumed or
          evaluated model behaves exactly as the trained one (docs/algorithm.md §12 item 5).

    Args:
        backbone: callable module ``backbone(x: (B, C, H, W), t: (B,)) -> (B, C, H, W)`` with ``t`` the
            continuous diffusion time in [0, 1].
        sde: forward SDE giving ``σ_t²`` (docs/algorithm.md §2).
        num_channels: number of latent channels C.
        mixing_logit_init: initial ℓ (−3 CIFAR-10, −6 MNIST/OMNIGLOT/CelebA; docs/algorithm.md §3.2).
        mixed: False: no mixing, ``forward = backbone(z_t ⊙ mask, t)`` (ℓ is kept but unused).
    """

    def __init__(self, backbone: nn.Module, sde: SDE, num_channels: int, mixing_logit_init: float = -3.0,
                 mixed: bool = True):
        super().__init__()
        if int(num_channels) < 1:
            raise ValueError(f"num_channels must be a positive integer, got {num_channels!r}")
        self.backbone = backbone
        self.sde = sde
        self.num_channels = int(num_channels)
        self.mixed = bool(mixed)
        self.mixing_logit = nn.Parameter(torch.full((1, self.num_channels, 1, 1), float(mixing_logit_init)))
        self.register_buffer("inactive_mask", torch.ones(1, self.num_channels, 1, 1), persistent=True)

    def forward(self, z_t: Tensor, t: Tensor) -> Tensor:
        """Mixed ε-prediction ``ε_pred(z_t, t)`` (docs/algorithm.md §3.1, §3.3).

        Args:
            z_t: diffused latents, shape ``(B, C, H, W)``.
            t: continuous times in [0, 1], shape ``(B,)``.

        Returns:
            ``ε_pred``, shape ``(B, C, H, W)``.
        """
        if z_t.shape[1] != self.num_channels:
            raise ValueError(f"z_t has {z_t.shape[1]} channels, expected num_channels={self.num_channels}")
        net_out = self.backbone(z_t * self.inactive_mask.to(z_t.dtype), t)
        if not self.mixed:  # the network predicts ε alone (the paper's ablation of Sec. 5.2; data-space models)
            return net_out
        return mixed_eps_prediction(z_t, self.sde.var(t), net_out, self.mixing_logit)

    def score(self, z_t: Tensor, t: Tensor) -> Tensor:
        """Score ``∇ log p_t(z_t) = −ε_pred/σ_t`` (docs/algorithm.md §3.1).

        Args:
            z_t: ``(B, C, H, W)``.
            t: ``(B,)``.
        """
        return score_from_eps(self(z_t, t), self.sde.var(t))

    @torch.no_grad()
    def set_inactive_channels(self, inactive: Tensor) -> None:
        """Mark posterior-collapsed channels inactive (``--drop_inactive_var``, docs/algorithm.md §3.3).

        Sets ``ℓ_c = −15`` and zeroes the input mask for every inactive channel c; active channels
        keep their logit and get mask 1.

        Args:
            inactive: boolean tensor of shape ``(C,)``, True for inactive channels.
        """
        inactive = torch.as_tensor(inactive)
        if inactive.dtype != torch.bool or inactive.shape != (self.num_channels,):
            raise ValueError(
                f"inactive must be a bool tensor of shape ({self.num_channels},), "
                f"got dtype={inactive.dtype}, shape={tuple(inactive.shape)}"
            )
        inactive = inactive.to(self.mixing_logit.device).view(1, -1, 1, 1)
        self.mixing_logit.masked_fill_(inactive, INACTIVE_LOGIT)
        self.inactive_mask.copy_((~inactive).to(self.inactive_mask.dtype))


def gaussian_eps_fn(sde: SDE, mean: float | Tensor, cov: float | Tensor) -> EpsFn:
    """Exact ε-prediction of latents with data distribution ``z0 ~ N(μ, Σ)`` (docs/algorithm.md §3.1 closed form).

    The diffused marginal is ``N(m_t μ, m_t² Σ + σ_t² I)``, so ``ε*(z_t, t) = σ_t (m_t² Σ + σ_t² I)⁻¹ (z_t − m_t μ)``
    (score ``−ε*/σ_t``). With ``μ = 0``, ``Σ = I`` and ``σ0² = 0`` this is the Normal part ``σ_t z_t`` of the
    mixed score. Used as the analytic reference in tests and sanity checks.

    Args:
        sde: forward SDE.
        mean: μ, a float (isotropic) or a tensor broadcastable to one sample ``(C, H, W)``
            (or of shape ``(D,)`` when ``cov`` is a matrix).
        cov: Σ, a float ``s²`` (Σ = s² I) or a ``(D, D)`` matrix over the flattened ``D = C·H·W``.

    Returns:
        ``eps_fn(z_t (B, C, H, W), t (B,)) -> (B, C, H, W)``.
    """
    full = torch.is_tensor(cov) and cov.dim() == 2

    def eps_fn(z_t: Tensor, t: Tensor) -> Tensor:
        m = broadcast_per_sample(sde.mean_coef(t), z_t)
        var = broadcast_per_sample(sde.var(t), z_t)
        mu = torch.as_tensor(mean, dtype=z_t.dtype, device=z_t.device)
        if not full:
            return var.sqrt() * (z_t - m * mu) / (m.square() * cov + var)
        flat = z_t.flatten(1)
        m2, v2 = m.flatten(1), var.flatten(1)  # (B, 1)
        sigma = cov.to(dtype=z_t.dtype, device=z_t.device)
        eye = torch.eye(flat.shape[1], dtype=z_t.dtype, device=z_t.device)
        marg_cov = m2[:, :, None] ** 2 * sigma + v2[:, :, None] * eye  # (B, D, D)
        resid = (flat - m2 * mu.reshape(1, -1))[..., None]
        return (v2.sqrt() * torch.linalg.solve(marg_cov, resid)[..., 0]).view_as(z_t)

    return eps_fn
