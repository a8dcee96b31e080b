"""Forward SDEs of LSGM's latent diffusion (docs/algorithm.md §2).

Both SDEs are variance-preserving: ``dz = f(t) z dt + g(t) dW`` on ``t ∈ [0, 1]`` with
``f(t) = −β(t)/2`` and ``g²(t) = β(t)``. The perturbation kernel is
``q(z_t | z0) = N(m_t z0, σ_t² I)`` with ``σ_t² = 1 − (1 − σ0²) m_t²``, where ``σ0²``
(``sigma2_0``) is the kernel variance already present at ``t = 0`` (docs/algorithm.md §2, §2.5).

Paper symbols and method names:

* ``f(t)``          drift coefficient ``f(t) = −β(t)/2``;
* ``g2(t)``         squared diffusion ``g²(t) = β(t)``;
* ``mean_coef(t)``  kernel mean coefficient ``m_t`` (the official code's ``e2int_f``);
* ``var(t)``        kernel variance ``σ_t²``;
* ``inv_var(v)``    the time ``t`` at which ``σ_t² = v``.

All methods are pure functions of a tensor argument of any shape, dtype and device; the
parameters are stored as Python floats so nothing is ever placed on a fixed device.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from lsgm.choices import SDE_PARAMS

__all__ = ["SDE", "VPSDE", "GeometricVPSDE", "make_sde", "SDE_KINDS"]


class SDE(ABC):
    """Base class of a VP-type forward SDE ``dz = f(t) z dt + g(t) dW`` (docs/algorithm.md §2).

    Subclasses define ``g2`` (= β(t)), ``var`` (σ_t²), ``mean_coef`` (m_t) and ``inv_var``;
    ``f`` and ``std`` follow from them.

    Attributes:
        sigma2_0: kernel variance σ0² at ``t = 0``.
    """

    sigma2_0: float
    kind: str = ""  # name in lsgm.choices.SDE_PARAMS / the config's sde.kind

    @abstractmethod
    def g2(self, t: Tensor) -> Tensor:
        """Squared diffusion coefficient ``g²(t) = β(t)`` (docs/algorithm.md §2.5)."""

    @abstractmethod
    def var(self, t: Tensor) -> Tensor:
        """Kernel variance ``σ_t²`` of ``q(z_t | z0)`` (docs/algorithm.md §2.5)."""

    @abstractmethod
    def mean_coef(self, t: Tensor) -> Tensor:
        """Kernel mean coefficient ``m_t`` of ``q(z_t | z0) = N(m_t z0, σ_t² I)`` (docs/algorithm.md §2.5)."""

    @abstractmethod
    def inv_var(self, var: Tensor) -> Tensor:
        """Inverse of ``var``: the time ``t(σ²)`` with ``σ_t² = var`` (docs/algorithm.md §2.5, last row)."""

    def f(self, t: Tensor) -> Tensor:
        """Drift coefficient ``f(t) = −g²(t)/2`` (docs/algorithm.md §2.5).

        Args:
            t: times in [0, 1], any shape.

        Returns:
            ``f(t)`` with the shape, dtype and device of ``t``.
        """
        return -0.5 * self.g2(t)

    def std(self, t: Tensor) -> Tensor:
        """Kernel standard deviation ``σ_t = sqrt(σ_t²)`` (docs/algorithm.md §2, §3.1)."""
        return self.var(t).sqrt()


def _check_sigma2_0(sigma2_0: float) -> None:
    if not 0.0 <= sigma2_0 < 1.0:
        raise ValueError(f"sigma2_0 must satisfy 0 <= sigma2_0 < 1, got {sigma2_0!r}")


class VPSDE(SDE):
    """VPSDE with linear β(t) (docs/algorithm.md §2.1): ``β(t) = β0 + (β1 − β0) t``.

    ``σ_t² = 1 − (1 − σ0²) exp(−β0 t − ½(β1 − β0) t²)``,
    ``m_t = exp(−½ β0 t − ¼ (β1 − β0) t²)``.

    Args:
        beta_min: β0 ≥ 0 (README 0.1).
        beta_max: β1 > β0 (README 20).
        sigma2_0: σ0² in [0, 1) (README 0).
    """

    kind = "vpsde"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, sigma2_0: float = 0.0):
        beta_min, beta_max, sigma2_0 = float(beta_min), float(beta_max), float(sigma2_0)
        if not 0.0 <= beta_min < beta_max:
            raise ValueError(
                f"beta_min/beta_max must satisfy 0 <= beta_min < beta_max, got {beta_min!r}, {beta_max!r}"
            )
        _check_sigma2_0(sigma2_0)
        self.beta_min, self.beta_max, self.sigma2_0 = beta_min, beta_max, sigma2_0

    def __repr__(self) -> str:
        return f"VPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, sigma2_0={self.sigma2_0})"

    def _int_beta(self, t: Tensor) -> Tensor:
        # ∫_0^t β(s) ds = β0 t + ½ (β1 − β0) t²  (docs/algorithm.md §2.1)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def g2(self, t: Tensor) -> Tensor:
        """``g²(t) = β(t) = β0 + (β1 − β0) t`` (docs/algorithm.md §2.1).

        Args:
            t: times, any shape/dtype/device.
        """
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def var(self, t: Tensor) -> Tensor:
        """``σ_t² = σ0² + (1 − σ0²)(1 − e^{−∫β})`` (docs/algorithm.md §2.1), written with expm1 for small t.

        Args:
            t: times, any shape/dtype/device.
        """
        return self.sigma2_0 - (1.0 - self.sigma2_0) * torch.expm1(-self._int_beta(t))

    def mean_coef(self, t: Tensor) -> Tensor:
        """``m_t = exp(−½ ∫_0^t β)`` (docs/algorithm.md §2.1).

        Args:
            t: times, any shape/dtype/device.
        """
        return torch.exp(-0.5 * self._int_beta(t))

    def inv_var(self, var: Tensor) -> Tensor:
        """``t(σ²) = (−β0 + sqrt(β0² − 2ac))/a`` with ``a = β1 − β0``, ``c = log((1−σ²)/(1−σ0²))``.

        Evaluated in the algebraically equal form ``−2c / (β0 + sqrt(β0² − 2ac))``, which has
        no cancellation at small t (docs/algorithm.md §2.1).

        Args:
            var: kernel variances in [σ0², 1), any shape/dtype/device.
        """
        a = self.beta_max - self.beta_min
        c = torch.log1p(-var) - math.log1p(-self.sigma2_0)
        if self.beta_min == 0.0:  # the general form is 0/0 at t = 0
            return torch.sqrt(-2.0 * c / a)
        return -2.0 * c / (self.beta_min + torch.sqrt(self.beta_min**2 - 2.0 * a * c))


class GeometricVPSDE(SDE):
    """The paper's geometric VPSDE (docs/algorithm.md §2.2): ``log σ_t²`` (almost) linear in t.

    With ``r = σ²_max/σ²_min`` and ``s(t) = σ²_min r^t``:
    ``σ_t² = s(t) − σ²_min + σ0²``, ``g²(t) = β(t) = s(t) log r / (1 − σ_t²)``,
    ``m_t = sqrt((1 − σ_t²)/(1 − σ0²))``.

    Args:
        sigma2_min: σ²_min > 0 (README 3e-5).
        sigma2_max: σ²_max > σ²_min (README 0.999); ``σ²(1) = σ²_max − σ²_min + σ0²`` must be < 1.
        sigma2_0: σ0² in [0, 1) (README 3e-5 = σ²_min).
    """

    kind = "geometric"

    def __init__(self, sigma2_min: float = 3e-5, sigma2_max: float = 0.999, sigma2_0: float = 3e-5):
        sigma2_min, sigma2_max, sigma2_0 = float(sigma2_min), float(sigma2_max), float(sigma2_0)
        if not 0.0 < sigma2_min < sigma2_max:
            raise ValueError(
                "sigma2_min/sigma2_max must satisfy 0 < sigma2_min < sigma2_max, "
                f"got {sigma2_min!r}, {sigma2_max!r}"
            )
        _check_sigma2_0(sigma2_0)
        if sigma2_max - sigma2_min + sigma2_0 >= 1.0:
            raise ValueError(
                "need sigma2(1) = sigma2_max - sigma2_min + sigma2_0 < 1, got "
                f"{sigma2_max - sigma2_min + sigma2_0!r} (sigma2_max={sigma2_max!r})"
            )
        self.sigma2_min, self.sigma2_max, self.sigma2_0 = sigma2_min, sigma2_max, sigma2_0
        self.log_r = math.log(sigma2_max / sigma2_min)

    def __repr__(self) -> str:
        return (
            f"GeometricVPSDE(sigma2_min={self.sigma2_min}, sigma2_max={self.sigma2_max}, "
            f"sigma2_0={self.sigma2_0})"
        )

    def var(self, t: Tensor) -> Tensor:
        """``σ_t² = σ0² + σ²_min (r^t − 1)`` (docs/algorithm.md §2.2).

        Args:
            t: times, any shape/dtype/device.
        """
        return self.sigma2_0 + self.sigma2_min * torch.expm1(self.log_r * t)

    def one_minus_var(self, t: Tensor) -> Tensor:
        """``1 − σ_t² = (1 − σ²_max + σ²_min − σ0²) + σ²_max (1 − r^{t−1})`` (docs/algorithm.md §2.2).

        A sum of two non-negative terms with the constant taken in float64: exact to a few ulp in float32 for every
        t in [0, 1]. ``1 − var(t)`` would cancel ~3 digits at t = 1, where 1 − σ²(1) ≈ 1e-3 (2e-4 relative error
        in float32).

        Args:
            t: times, any shape/dtype/device.
        """
        gap_1 = (1.0 - self.sigma2_max) + (self.sigma2_min - self.sigma2_0)  # 1 − σ²(1), float64
        return gap_1 - self.sigma2_max * torch.expm1(self.log_r * (t - 1.0))

    def g2(self, t: Tensor) -> Tensor:
        """``g²(t) = σ²_min r^t log r / (1 − σ_t²)`` (docs/algorithm.md §2.2).

        Args:
            t: times, any shape/dtype/device.
        """
        s = self.sigma2_min * torch.exp(self.log_r * t)
        return s * self.log_r / self.one_minus_var(t)

    def mean_coef(self, t: Tensor) -> Tensor:
        """``m_t = sqrt((1 − σ_t²)/(1 − σ0²))`` (docs/algorithm.md §2.2).

        Args:
            t: times, any shape/dtype/device.
        """
        return torch.sqrt(self.one_minus_var(t) / (1.0 - self.sigma2_0))

    def inv_var(self, var: Tensor) -> Tensor:
        """``t(σ²) = log((σ² + σ²_min − σ0²)/σ²_min) / log r`` (docs/algorithm.md §2.2).

        Args:
            var: kernel variances in [σ0², σ²(1)], any shape/dtype/device.
        """
        return torch.log1p((var - self.sigma2_0) / self.sigma2_min) / self.log_r


SDE_KINDS: dict[str, type[SDE]] = {cls.kind: cls for cls in (VPSDE, GeometricVPSDE)}


def make_sde(kind: str, **params: Any) -> SDE:
    """Build the forward SDE named by ``kind`` (docs/algorithm.md §2.1, §2.2, §2.5).

    Args:
        kind: ``"vpsde"`` (params ``beta_min``, ``beta_max``, ``sigma2_0``: β0, β1, σ0²) or
            ``"geometric"`` (params ``sigma2_min``, ``sigma2_max``, ``sigma2_0``: σ²_min, σ²_max, σ0²).
        **params: the SDE's parameters; omitted ones take the README values.

    Returns:
        The SDE object.

    Raises:
        ValueError: unknown ``kind``, unknown parameter name, or an invalid parameter value.
    """
    if kind not in SDE_KINDS:
        raise ValueError(f"unknown SDE kind {kind!r}; allowed: {sorted(SDE_KINDS)}")
    unknown = sorted(set(params) - set(SDE_PARAMS[kind]))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for SDE kind {kind!r}; allowed: {list(SDE_PARAMS[kind])}"
        )
    return SDE_KINDS[kind](**params)
