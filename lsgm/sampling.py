"""Sampling the SGM prior: probability-flow ODE and the ancestral sampler (docs/algorithm.md §3.4, §6).

One signature for every sampler (k-diffusion style):
``sample_*(eps_fn, sde, shape, *, ..., temperature=1.0, generator=None, device=None, dtype=torch.float32)``
returning :class:`SampleResult` ``(z, nfe, seconds)``. ``eps_fn(z_t: (B,C,H,W), t: (B,))`` is the mixed
ε-prediction of :mod:`lsgm.score`.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor
from torchdiffeq import odeint

from lsgm.score import EpsFn, broadcast_per_sample
from lsgm.sde import SDE

__all__ = [
    "ODE_METHODS",
    "SampleResult",
    "odeint_options",
    "probability_flow_drift",
    "sample_ancestral",
    "sample_ode",
    "solve_ode",
]

ODE_METHODS = ("dopri5", "scipy_solver")
"""``dopri5``: torchdiffeq's on-device Dormand–Prince; ``scipy_solver``: SciPy ``RK45`` on float64
CPU state, the official-parity option (docs/algorithm.md §6.1, docs/algorithm.md §12 item 6)."""


class SampleResult(NamedTuple):
    """Samples ``z`` (of ``shape``), ε-network evaluations ``nfe`` and wall time ``seconds`` (docs/algorithm.md §6.1, §7.3)."""

    z: Tensor
    nfe: int
    seconds: float


def probability_flow_drift(eps_fn: EpsFn, sde: SDE, z: Tensor, t: Tensor) -> Tensor:
    """Probability-flow ODE drift ``dz/dt = f(t) z + ½ g²(t) ε_pred(z, t)/σ_t`` (docs/algorithm.md §3.4, §6.1).

    Args:
        eps_fn: mixed ε-prediction ``eps_fn(z (B,C,H,W), t (B,))``.
        sde: forward SDE.
        z: state ``(B, C, H, W)``.
        t: scalar time (0-dim tensor) or per-sample times ``(B,)``.

    Returns:
        ``dz/dt``, shape of ``z``.
    """
    t_b = t.expand(z.shape[0]) if t.dim() == 0 else t
    f = broadcast_per_sample(sde.f(t_b), z)
    g2 = broadcast_per_sample(sde.g2(t_b), z)
    sigma = broadcast_per_sample(sde.var(t_b), z).sqrt()
    return f * z + 0.5 * g2 * eps_fn(z, t_b) / sigma


def odeint_options(method: str, t_end: Tensor, norm: Callable | None = None) -> dict:
    """torchdiffeq ``options`` for ``method`` (docs/algorithm.md §6.1, docs/algorithm.md §12 item 6).

    ``scipy_solver`` → SciPy ``RK45``. For ``dopri5``, ``step_t = [t_end]`` makes the last step stop
    exactly at the end point: torchdiffeq otherwise steps past it and interpolates, which would query the
    drift outside [0, 1] (where the geometric SDE has σ_t² ≥ 1 and the VPSDE σ_t² < 0).

    Args:
        method: one of :data:`ODE_METHODS`.
        t_end: final integration time (0-dim tensor).
        norm: optional error norm for the adaptive step control (dopri5 only).

    Raises:
        ValueError: unknown method.
    """
    if method not in ODE_METHODS:
        raise ValueError(f"method={method!r} is not allowed; choose one of {list(ODE_METHODS)}")
    if method == "scipy_solver":
        return {"solver": "RK45"}
    options: dict = {"step_t": t_end.reshape(1)}
    if norm is not None:
        options["norm"] = norm
    return options


class _CountedDrift:
    """ODE right-hand side that counts its evaluations (NFE, docs/algorithm.md §6.1 item 3) and keeps the time
    inside the integration interval (solver initial-step probes may look beyond it)."""

    def __init__(self, fn: Callable, t_lo: float, t_hi: float):
        self.fn, self.nfe, self.t_lo, self.t_hi = fn, 0, t_lo, t_hi

    def __call__(self, t: Tensor, y):
        self.nfe += 1
        return self.fn(t.clamp(self.t_lo, self.t_hi), y)


def solve_ode(
    drift_fn: Callable,
    y0,
    t_start: float,
    t_end: float,
    *,
    tol: float,
    method: str = "dopri5",
    norm: Callable | None = None,
) -> tuple:
    """Integrate ``dy/dt = drift_fn(t, y)`` from ``t_start`` to ``t_end`` with an adaptive RK5(4) (docs/algorithm.md §6.1, §7.1).

    ``atol = rtol = tol``; ``y0`` is a tensor or a tuple of tensors.

    Args:
        drift_fn: ``(t: 0-dim tensor, y) -> dy/dt`` of the same structure as ``y``.
        y0: initial state.
        t_start: initial time.
        t_end: final time (smaller than ``t_start`` for sampling).
        tol: solver tolerance.
        method: ``"dopri5"`` or ``"scipy_solver"``.
        norm: optional dopri5 error norm.

    Returns:
        ``(y(t_end), nfe)`` with ``nfe`` the number of drift evaluations (incl. initial-step probes and
        rejected steps).
    """
    first = y0[0] if isinstance(y0, tuple) else y0
    times = torch.tensor([t_start, t_end], dtype=first.dtype, device=first.device)
    options = odeint_options(method, times[1], norm)
    drift = _CountedDrift(drift_fn, min(t_start, t_end), max(t_start, t_end))
    with warnings.catch_warnings():
        # torchdiffeq always forwards min_step to solve_ivp, which RK45 ignores with a warning.
        warnings.filterwarnings("ignore", message=".*no effect for a chosen solver.*min_step")
        out = odeint(drift, y0, times, rtol=tol, atol=tol, method=method, options=options)
    y_end = tuple(x[-1] for x in out) if isinstance(y0, tuple) else out[-1]
    return y_end, drift.nfe


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _synchronize(device: torch.device) -> None:
    # Accurate wall time on asynchronous accelerators.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resolve_device(device: torch.device | str | None, generator: torch.Generator | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def _initial_noise(
    shape: tuple[int, ...], temperature: float, generator: torch.Generator | None, device, dtype
) -> Tensor:
    gen_device = generator.device if generator is not None else device
    n = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
    return temperature * n.to(device)


@torch.no_grad()
def sample_ode(
    eps_fn: EpsFn,
    sde: SDE,
    shape: tuple[int, ...],
    *,
    ode_eps: float,
    tol: float,
    temperature: float = 1.0,
    method: str = "dopri5",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> SampleResult:
    """Sample by integrating the probability-flow ODE from t = 1 to ``ode_eps`` (docs/algorithm.md §6.1).

    ``z_1 = temperature · n``, ``n ~ N(0, I)``; adaptive RK5(4) with ``atol = rtol = tol``.

    Args:
        eps_fn: mixed ε-prediction ``eps_fn(z (B,C,H,W), t (B,))``.
        sde: forward SDE.
        shape: latent shape ``(B, C, H, W)``.
        ode_eps: final time (1e-6 CIFAR-10, 1e-5 others).
        tol: solver tolerance ``atol = rtol`` (1e-5; 1e-2 CelebA FID).
        temperature: scale of the initial noise (``--temp``).
        method: ``"dopri5"`` (on device) or ``"scipy_solver"`` (SciPy RK45, official parity).
        generator: RNG of the initial noise.
        device: device of the samples (default: the generator's device, else CPU).
        dtype: dtype of the state.

    Returns:
        :class:`SampleResult` ``(z: shape, nfe: drift evaluations incl. rejected steps, seconds)``.
    """
    odeint_options(method, torch.tensor(ode_eps))  # validates method
    _check_positive("ode_eps", ode_eps)
    _check_positive("tol", tol)
    if not ode_eps < 1.0:
        raise ValueError(f"ode_eps must be < 1, got {ode_eps!r}")
    device = _resolve_device(device, generator)
    z1 = _initial_noise(tuple(shape), temperature, generator, device, dtype)
    _synchronize(device)
    start = time.perf_counter()
    z, nfe = solve_ode(
        lambda t, z: probability_flow_drift(eps_fn, sde, z, t), z1, 1.0, ode_eps, tol=tol, method=method
    )
    _synchronize(device)
    return SampleResult(z, nfe, time.perf_counter() - start)


@torch.no_grad()
def sample_ancestral(
    eps_fn: EpsFn,
    sde: SDE,
    shape: tuple[int, ...],
    *,
    steps: int = 1000,
    temperature: float = 1.0,
    clamp: float | None = 3.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    callback: Callable[[int], Any] | None = None,
) -> SampleResult:
    """Discretised ancestral (DDPM-style) sampler derived from the continuous variance (docs/algorithm.md §6.3).

    ``ᾱ_k = 1 − σ²(k/N)``, ``β_1 = 1 − ᾱ_1``, ``β_k = 1 − ᾱ_k/ᾱ_{k−1}``; the network is queried at
    ``t = k/N``, where the mixed prediction's Normal part ``σ_t z_k`` equals ``sqrt(1 − ᾱ_k) z_k``;
    ``z_{k−1} = (z_k − β_k ε_pred/sqrt(1 − ᾱ_k))/sqrt(1 − β_k) + sqrt(β_k)·temperature·n``; the last step
    returns the mean ``(z_1 − sqrt(1 − ᾱ_1) ε_pred)/sqrt(ᾱ_1)``. The chain starts from
    ``z_N = temperature · n`` and the returned latents are clamped to ``[−clamp, clamp]``.

    Args:
        eps_fn: mixed ε-prediction ``eps_fn(z (B,C,H,W), t (B,))``.
        sde: forward SDE.
        shape: latent shape ``(B, C, H, W)``.
        steps: number of steps N (1000 in the reference).
        temperature: scale of the initial and per-step noise.
        clamp: bound of the final clamp (3 in the reference); None disables it.
        generator: RNG of all noise.
        device: device of the samples (default: the generator's device, else CPU).
        dtype: dtype of the state.
        callback: called with 1 after every step (progress of a long chain).

    Returns:
        :class:`SampleResult` ``(z, nfe = steps, seconds)``.
    """
    if int(steps) < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    steps = int(steps)
    device = _resolve_device(device, generator)
    _synchronize(device)
    start = time.perf_counter()
    times = torch.arange(steps + 1, dtype=torch.float64) / steps
    alpha_bar = 1.0 - sde.var(times)  # ᾱ_k, k = 0..N (index 0 unused)
    betas = 1.0 - alpha_bar[1:] / torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[1:-1]])
    z = _initial_noise(tuple(shape), temperature, generator, device, dtype)
    for k in range(steps, 0, -1):
        t = torch.full((shape[0],), k / steps, dtype=dtype, device=device)
        eps_pred = eps_fn(z, t)
        ab, beta = float(alpha_bar[k]), float(betas[k - 1])
        if k > 1:
            noise = _initial_noise(tuple(shape), temperature, generator, device, dtype)
            z = (z - beta * eps_pred / (1.0 - ab) ** 0.5) / (1.0 - beta) ** 0.5 + beta**0.5 * noise
        else:
            z = (z - (1.0 - ab) ** 0.5 * eps_pred) / ab**0.5
        if callback is not None:
            callback(1)
    if clamp is not None:
        z = z.clamp(-clamp, clamp)
    _synchronize(device)
    return SampleResult(z, steps, time.perf_counter() - start)
