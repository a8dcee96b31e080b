"""Spectral regularisation, norm-layer scale penalty, KL annealing and KL balancing (docs/algorithm.md §1.7, §1.8).

Loss term (docs/algorithm.md §1.7): ``λ · (Σ_convs σ_max(W) + Σ_norm-layers max|γ|)``, i.e. ``λ · (SpectralRegularizer.loss() +
bn_loss(model))``. When λ = 0 the caller skips both entirely (no power iterations are run).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lsgm.vae.conv import Conv2D

POWER_ITERS_FIRST = 40
POWER_ITERS = 4
POWER_EPS = 1e-3
KL_BALANCE_EPS = 0.01


def find_spectral_layers(module: nn.Module, include_plain_conv2d: bool = False
                         ) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    """Convs whose kernels are spectrally regularised, with a function returning the kernel in use.

    ``Conv2D`` (weight-normalised, plain MBConv ones included) and masked AR convs always; other ``nn.Conv2d``
    layers only with ``include_plain_conv2d`` (the SGM without ``custom_conv_dae``, docs/algorithm.md §1.7).
    """
    found: list[tuple[str, Callable[[], torch.Tensor]]] = []
    for name, layer in module.named_modules():
        if isinstance(layer, Conv2D):
            found.append((name, layer.normalized_weight))
        elif include_plain_conv2d and isinstance(layer, nn.Conv2d):
            found.append((name, (lambda m: lambda: m.weight)(layer)))
    return found


def _stack_weights(fns: list[Callable[[], torch.Tensor]], rows: int, cols: int) -> torch.Tensor:
    """(n, rows, cols) stack of the kernels, in at least float32."""
    weights = torch.stack([fn().reshape(rows, cols) for fn in fns])
    return weights.to(torch.promote_types(weights.dtype, torch.float32))


class SpectralRegularizer(nn.Module):
    """Σ σ_max(W) over the convs of a module by batched power iteration (docs/algorithm.md §1.7).

    Each kernel is reshaped to (C_out, C_in·k·k); layers with equal reshaped shape are stacked and iterated
    together. The singular vectors ``u, v`` persist in buffers (random Normal init, normalised with eps 1e-3);
    the first call runs 40 iterations, later calls 4. ``σ = uᵀ W v`` carries gradient only through W.
    The buffers (and the call counter) are in ``state_dict()`` so a resumed run continues identically.

    Args:
        module: the network to regularise (the bare module, not a DDP wrapper).
        include_plain_conv2d: also regularise plain ``nn.Conv2d`` layers.
        generator: RNG for the initial ``u, v``.
    """

    def __init__(self, module: nn.Module, *, include_plain_conv2d: bool = False,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        groups: dict[tuple[int, int], list[Callable[[], torch.Tensor]]] = {}
        self.layer_names: list[str] = []
        for name, weight_fn in find_spectral_layers(module, include_plain_conv2d):
            w = weight_fn()
            groups.setdefault((w.shape[0], w[0].numel()), []).append(weight_fn)
            self.layer_names.append(name)
        self._groups = list(groups.items())
        for i, ((rows, cols), fns) in enumerate(self._groups):
            u = torch.randn(len(fns), rows, generator=generator)
            v = torch.randn(len(fns), cols, generator=generator)
            self.register_buffer(f"u_{i}", F.normalize(u, dim=1, eps=POWER_EPS))
            self.register_buffer(f"v_{i}", F.normalize(v, dim=1, eps=POWER_EPS))
        self.register_buffer("num_calls", torch.zeros((), dtype=torch.long))

    @property
    def num_layers(self) -> int:
        """Number of regularised conv layers."""
        return len(self.layer_names)

    def loss(self) -> torch.Tensor:
        """Σ over layers of the power-iteration estimate of σ_max(W) (scalar, differentiable w.r.t. W)."""
        iters = POWER_ITERS_FIRST if int(self.num_calls) == 0 else POWER_ITERS
        total = None
        for i, ((rows, cols), fns) in enumerate(self._groups):
            weights = _stack_weights(fns, rows, cols)
            u, v = getattr(self, f"u_{i}").to(weights), getattr(self, f"v_{i}").to(weights)
            with torch.no_grad():
                w = weights.detach()
                for _ in range(iters):
                    v = F.normalize(torch.bmm(u.unsqueeze(1), w).squeeze(1), dim=1, eps=POWER_EPS)
                    u = F.normalize(torch.bmm(w, v.unsqueeze(2)).squeeze(2), dim=1, eps=POWER_EPS)
            setattr(self, f"u_{i}", u)
            setattr(self, f"v_{i}", v)
            sigma = torch.einsum("nr,nrc,nc->n", u, weights, v).sum()
            total = sigma if total is None else total + sigma
        self.num_calls += 1
        if total is None:
            return torch.zeros(())
        return total

    def sigmas(self) -> torch.Tensor:
        """Current σ estimates ``uᵀWv`` per layer (grouped order), without iterating."""
        out = []
        for i, ((rows, cols), fns) in enumerate(self._groups):
            with torch.no_grad():
                weights = _stack_weights(fns, rows, cols)
                u, v = getattr(self, f"u_{i}").to(weights), getattr(self, f"v_{i}").to(weights)
                out.append(torch.einsum("nr,nrc,nc->n", u, weights, v))
        return torch.cat(out) if out else torch.zeros(0)


def bn_loss(module: nn.Module) -> torch.Tensor:
    """Σ max|γ| over every BatchNorm / SyncBatchNorm and GroupNorm layer with an affine scale (docs/algorithm.md §1.7)."""
    terms = [layer.weight.abs().max() for layer in module.modules()
             if isinstance(layer, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and layer.weight is not None]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def kl_coeff(step: int, total_steps: int, anneal_portion: float, const_portion: float, min_coeff: float,
             max_coeff: float) -> float:
    """KL annealing coefficient β_KL (docs/algorithm.md §1.8).

    ``β = clamp(β_min + (β_max − β_min)·(step − n_const)/n_anneal, β_min, β_max)`` with
    ``n_const = const_portion · total_steps`` and ``n_anneal = anneal_portion · total_steps``.

    Args:
        step: current iteration (0-based).
        total_steps: N_total = iterations per epoch × epochs.
        anneal_portion: fraction of N_total over which β rises (``kl_anneal_portion``).
        const_portion: fraction of N_total held at β_min first (``kl_const_portion``).
        min_coeff: β_min (``kl_const_coeff``).
        max_coeff: β_max (``kl_max_coeff``).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} is not allowed; allowed: > 0")
    if not anneal_portion > 0:
        raise ValueError(f"anneal_portion={anneal_portion} is not allowed; allowed: > 0")
    if not 0 <= const_portion <= 1:
        raise ValueError(f"const_portion={const_portion} is not allowed; allowed: 0..1")
    if not 0 <= min_coeff <= max_coeff:
        raise ValueError(f"min_coeff={min_coeff}, max_coeff={max_coeff} are not allowed; "
                         "allowed: 0 <= min_coeff <= max_coeff")
    n_const, n_anneal = const_portion * total_steps, anneal_portion * total_steps
    beta = min_coeff + (max_coeff - min_coeff) * (step - n_const) / n_anneal
    return float(min(max(beta, min_coeff), max_coeff))


def kl_balance_alpha(groups_per_scale: Sequence[int]) -> torch.Tensor:
    """Prior weights α_l of the 'square' rule (docs/algorithm.md §1.8), groups in top-down order.

    For the scale ``i`` levels finer than the top scale ``α = 4^i / groups_in_scale``, normalised so min α = 1.

    Args:
        groups_per_scale: group counts per scale, top (coarsest) scale first.

    Returns:
        (G,) float64 weights.
    """
    if not groups_per_scale or any(int(n) < 1 for n in groups_per_scale):
        raise ValueError(f"groups_per_scale={list(groups_per_scale)} is not allowed; allowed: positive counts")
    alpha = torch.cat([torch.full((int(n),), 4.0 ** i / int(n), dtype=torch.float64)
                       for i, n in enumerate(groups_per_scale)])
    return alpha / alpha.min()


def kl_balancer(kl_all: Sequence[torch.Tensor] | torch.Tensor, kl_coeff: float, groups_per_scale: Sequence[int],
                *, balance: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL balancing of stage 1 (docs/algorithm.md §1.8), active only while ``balance`` and ``kl_coeff < 1``.

    ``a_l = mean_batch |KL_l| + 0.01``; ``κ_l ∝ a_l / α_l`` renormalised to mean 1 over groups, treated as constants.

    Args:
        kl_all: per group (B,) KLs in top-down order, or a (B, G) tensor.
        kl_coeff: β_KL.
        groups_per_scale: group counts per scale, top scale first.
        balance: enable balancing (else κ = 1).

    Returns:
        ``kl`` (B,) = β_KL · Σ_l κ_l KL_l, ``kappa`` (G,) the coefficients, ``kl_vals`` (G,) batch-mean KL per group.
    """
    kl = torch.stack(list(kl_all), dim=1) if not isinstance(kl_all, torch.Tensor) else kl_all
    if kl.dim() != 2 or kl.shape[1] != sum(int(n) for n in groups_per_scale):
        raise ValueError(f"kl_all has shape {tuple(kl.shape)}; expected (B, {sum(groups_per_scale)}) for "
                         f"groups_per_scale={list(groups_per_scale)}")
    kl_vals = kl.mean(dim=0)
    if balance and kl_coeff < 1.0:
        a = kl.detach().abs().mean(dim=0) + KL_BALANCE_EPS
        kappa = a / kl_balance_alpha(groups_per_scale).to(a)
        kappa = kappa / kappa.mean()
    else:
        kappa = torch.ones_like(kl_vals)
    return kl_coeff * (kl * kappa.detach()).sum(dim=1), kappa.detach(), kl_vals
