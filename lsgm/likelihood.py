"""Negative log-likelihood of latents under the SGM prior by the probability-flow ODE (docs/algorithm.md §7.1).

Instantaneous change of variables along ``dz/dt = F(z, t) = f(t) z + ½ g²(t) ε_pred(z, t)/σ_t``,
integrated **forward** from ``t = ode_eps`` (initial state: the latent ``z0`` itself, not noised) to
``t = 1``: ``d/dt [z, Δ] = [F(z, t), −tr(∂F/∂z)]`` and ``log p(z0) = log N(z(1); 0, I) − Δ(1)``.

Trace of the Jacobian (docs/algorithm.md §12 item 7):

* ``trace="hutchinson"``: ``tr(J) ≈ (1/K) Σ_k v_kᵀ J v_k`` with Gaussian (official) or Rademacher probes;
  ``probe_mode="fresh"`` draws new probes at every drift evaluation (official, docs/algorithm.md §11 item 9),
  ``"fixed"`` draws them once per solve (a deterministic ODE for the adaptive solver).
* ``trace="exact"``: D backward passes per evaluation; for small latent dimensions (tests, toy data).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from lsgm.choices import PROBE_MODES, PROBES, TRACES, check_choice
from lsgm.sampling import odeint_options, probability_flow_drift, solve_ode
from lsgm.score import EpsFn
from lsgm.sde import SDE

__all__ = [
    "NLLResult",
    "PROBES",
    "PROBE_MODES",
    "TRACES",
    "draw_probes",
    "exact_jacobian_trace",
    "hutchinson_trace",
    "ode_nll",
    "standard_normal_logp",
]



class NLLResult(NamedTuple):
    """``nll_nats``: ``(B,)`` −log p(z0) in nats per sample; ``nfe``: drift evaluations; ``settings`` (docs/algorithm.md §7.1)."""

    nll_nats: Tensor
    nfe: int
    settings: dict


def standard_normal_logp(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed over all but the batch dimension (prior at t = 1, docs/algorithm.md §7.1).

    Args:
        z: ``(B, ...)``.

    Returns:
        ``(B,)`` in nats.
    """
    flat = z.flatten(1)
    return -0.5 * flat.square().sum(1) - 0.5 * flat.shape[1] * math.log(2.0 * math.pi)


def draw_probes(
    probe: str, num_probes: int, like: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Hutchinson probes ``v`` with ``E[v vᵀ] = I`` (docs/algorithm.md §7.1).

    Args:
        probe: ``"gaussian"`` (``v ~ N(0, I)``) or ``"rademacher"`` (``v ∈ {−1, +1}`` uniformly).
        num_probes: K.
        like: tensor giving shape ``(B, ...)``, dtype and device.
        generator: RNG (drawn on its device, then moved).

    Returns:
        ``(K, B, ...)``.
    """
    shape = (num_probes, *like.shape)
    device = generator.device if generator is not None else like.device
    if probe == "gaussian":
        v = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    elif probe == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator, device=device).to(like.dtype) * 2 - 1
    else:
        raise ValueError(f"probe={probe!r} is not allowed; choose one of {list(PROBES)}")
    return v.to(like.device)


def hutchinson_trace(fz: Tensor, z: Tensor, probes: Tensor) -> Tensor:
    """Hutchinson estimate ``(1/K) Σ_k v_kᵀ (∂F/∂z) v_k`` per sample (docs/algorithm.md §7.1).

    Args:
        fz: ``F(z)``, ``(B, ...)``, computed from ``z`` with autograd enabled.
        z: ``(B, ...)`` with ``requires_grad``.
        probes: ``(K, B, ...)``.

    Returns:
        ``(B,)``.
    """
    total = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for v in probes:
        (vjp,) = torch.autograd.grad(fz, z, grad_outputs=v, retain_graph=True)
        total = total + (vjp * v).flatten(1).sum(1)
    return total / probes.shape[0]


def exact_jacobian_trace(fz: Tensor, z: Tensor) -> Tensor:
    """Exact ``tr(∂F/∂z)`` per sample by D backward passes (docs/algorithm.md §7.1); samples must be independent.

    Args:
        fz: ``F(z)``, ``(B, ...)``, computed from ``z`` with autograd enabled.
        z: ``(B, ...)`` with ``requires_grad``.

    Returns:
        ``(B,)``.
    """
    f_flat = fz.flatten(1)
    trace = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for i in range(f_flat.shape[1]):
        (grad,) = torch.autograd.grad(f_flat[:, i].sum(), z, retain_graph=True)
        trace = trace + grad.flatten(1)[:, i]
    return trace


class _AugmentedDrift:
    """``d/dt [z, Δ] = [F(z, t), −tr ∂F/∂z]`` (docs/algorithm.md §7.1 step 2)."""

    def __init__(self, eps_fn, sde, trace, probe, num_probes, fixed_probes, generator):
        self.eps_fn, self.sde, self.trace = eps_fn, sde, trace
        self.probe, self.num_probes, self.fixed_probes = probe, num_probes, fixed_probes
        self.generator = generator

    def __call__(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            z = state[0].detach().requires_grad_(True)
            fz = probability_flow_drift(self.eps_fn, self.sde, z, t)
            if self.trace == "exact":
                tr = exact_jacobian_trace(fz, z)
            else:
                probes = self.fixed_probes
                if probes is None:
                    probes = draw_probes(self.probe, self.num_probes, z, self.generator)
                tr = hutchinson_trace(fz, z, probes)
        return fz.detach(), -tr.detach()


def _joint_rms_norm(tensors: tuple[Tensor, ...]) -> Tensor:
    # One RMS norm over the concatenated state [z, Δ], as SciPy's RK45 applies to the flattened state
    # (official parity). torchdiffeq's default for tuples (max of per-part norms) lets the noise of
    # fresh Hutchinson probes in the B entries of Δ dominate step-size control.
    total = sum(x.square().sum() for x in tensors)
    return (total / sum(x.numel() for x in tensors)).sqrt()


@torch.no_grad()
def ode_nll(
    eps_fn: EpsFn,
    sde: SDE,
    z0: Tensor,
    *,
    ode_eps: float,
    tol: float,
    trace: str = "hutchinson",
    probe: str = "gaussian",
    num_probes: int = 1,
    probe_mode: str = "fresh",
    method: str = "dopri5",
    generator: torch.Generator | None = None,
) -> NLLResult:
    """``−log p(z0)`` of latents under the SGM prior by the probability-flow ODE (docs/algorithm.md §7.1, §11 item 9).

    Integrates ``[z, Δ]`` forward from ``t = ode_eps`` with ``z(ode_eps) = z0`` to ``t = 1`` with the
    same adaptive RK5(4) as sampling (``atol = rtol = tol``), then
    ``−log p(z0) = −log N(z(1); 0, I) + Δ(1)``, ``Δ(1) = −∫ tr(∂F/∂z) dt``.

    Args:
        eps_fn: mixed ε-prediction ``eps_fn(z (B,C,H,W), t (B,))``; samples must not interact.
        sde: forward SDE.
        z0: latents ``(B, C, H, W)`` (the encoder sample, not noised).
        ode_eps: lower integration limit (1e-6 CIFAR-10, 1e-5 others).
        tol: solver tolerance.
        trace: ``"hutchinson"`` or ``"exact"``.
        probe: ``"gaussian"`` (official) or ``"rademacher"``.
        num_probes: K probes averaged per evaluation.
        probe_mode: ``"fresh"`` (new probes at every evaluation, official) or ``"fixed"`` (once per solve).
        method: ``"dopri5"`` or ``"scipy_solver"`` (SciPy RK45).
        generator: RNG for the probes.

    Returns:
        :class:`NLLResult` ``(nll_nats (B,), nfe, settings)``.
    """
    check_choice("trace", trace, TRACES)
    check_choice("probe", probe, PROBES)
    check_choice("probe_mode", probe_mode, PROBE_MODES)
    odeint_options(method, torch.tensor(1.0))  # validates method
    if not 0.0 < ode_eps < 1.0:
        raise ValueError(f"ode_eps must satisfy 0 < ode_eps < 1, got {ode_eps!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if int(num_probes) < 1:
        raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}")
    num_probes = int(num_probes)
    settings = dict(
        ode_eps=ode_eps, tol=tol, trace=trace, probe=probe, num_probes=num_probes, probe_mode=probe_mode,
        method=method,
    )
    fixed = None
    if trace == "hutchinson" and probe_mode == "fixed":
        fixed = draw_probes(probe, num_probes, z0, generator)
    drift = _AugmentedDrift(eps_fn, sde, trace, probe, num_probes, fixed, generator)
    delta0 = torch.zeros(z0.shape[0], dtype=z0.dtype, device=z0.device)
    (z1, delta1), nfe = solve_ode(
        drift, (z0.detach(), delta0), ode_eps, 1.0, tol=tol, method=method, norm=_joint_rms_norm
    )
    nll = -standard_normal_logp(z1) + delta1
    return NLLResult(nll, nfe, settings)
