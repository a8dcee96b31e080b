"""LSGM training objectives: importance-sampled t, the SGM objective and the score-matching
cross-entropy (docs/algorithm.md §4.2–§4.5, docs/algorithm.md §12 item 2).

Paper symbols: ``ε`` diffusion noise, ``ε_pred`` mixed ε-prediction, ``w_p`` weight of ``(ε_pred − ε)²``
in the SGM (p) objective, ``w_ll = g²/(2σ²) / r(t)`` the likelihood weight divided by the sampling
density ``r(t)`` of ``t``; ``σ1² = σ²(1)``, ``σe² = σ²(time_eps)``.

``compat``:
    * ``"exact"`` (default): unbiased likelihood weights. Uniform-t modes carry the interval length
      ``(1 − time_eps)`` and ``drop_all_iw`` uses the exact normaliser
      ``Z = ∫_{time_eps}^1 (1 − σ_t²) dt``.
    * ``"official"``: reproduces the reference code (docs/algorithm.md §4.2, §4.3, §11 item 8): uniform weights
      without ``(1 − time_eps)`` (over-weighting by ``1/(1 − time_eps)``) and the coded
      ``drop_all_iw`` normaliser with ``e^{b/2}`` (1.00226× the exact one for β0 = 0.1, β1 = 20).
    * The cut-off constant ``½(1 + log 2πσ²(time_eps))`` is the same in both (see
      :func:`cross_entropy_const`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from lsgm.choices import COMPAT_MODES, IW_MODES, IW_Q_MODES, LIKELIHOOD_MODES, check_choice, check_mode_sde
from lsgm.score import EpsFn, broadcast_per_sample
from lsgm.sde import SDE, VPSDE

__all__ = [
    "COMPAT_MODES",
    "IW_MODES",
    "IW_Q_MODES",
    "Backward",
    "JointLoss",
    "LSGMObjective",
    "ROUTE_Q",
    "ROUTE_SPLIT",
    "ROUTE_SUM",
    "TimeSample",
    "cross_entropy_const",
    "cross_entropy_elem",
    "diffuse",
    "drop_all_iw_normalizer",
    "sample_t",
    "scale_grad",
    "sgm_objective",
]



class TimeSample(NamedTuple):
    """A batch of diffusion times with their kernel quantities and weights (docs/algorithm.md §4.3); all ``(B,)``."""

    t: Tensor
    var_t: Tensor
    mean_coef_t: Tensor
    weight_p: Tensor
    weight_ll: Tensor
    g2_t: Tensor


def _check_time_eps(time_eps: float) -> None:
    if not 0.0 <= time_eps < 1.0:
        raise ValueError(f"time_eps must satisfy 0 <= time_eps < 1, got {time_eps!r}")


def _var_at(sde: SDE, t: float) -> float:
    return float(sde.var(torch.tensor(t, dtype=torch.float64)))


def drop_all_iw_normalizer(sde: VPSDE, time_eps: float, compat: str = "exact") -> float:
    """Normaliser ``Z`` of the ``drop_all_iw`` proposal ``r(t) = (1 − σ_t²)/Z`` (docs/algorithm.md §4.3).

    With ``δ = (β1 − β0)/2``, ``b = β0/(β1 − β0)``, ``E1 = erf(√δ (time_eps + b))``,
    ``E2 = erf(√δ (1 + b)) − E1``: exact ``Z = (1 − σ0²) e^{β0²/(2(β1−β0))} sqrt(π/(4δ)) E2``;
    ``compat="official"`` uses ``e^{b/2}`` in place of ``e^{β0²/(2(β1−β0))}`` as the reference code does.

    Args:
        sde: a :class:`~lsgm.sde.VPSDE`.
        time_eps: lower cut-off ε_t of t.
        compat: ``"exact"`` or ``"official"``.
    """
    check_choice("compat", compat, COMPAT_MODES)
    delta = 0.5 * (sde.beta_max - sde.beta_min)
    b = sde.beta_min / (sde.beta_max - sde.beta_min)
    e1 = math.erf(math.sqrt(delta) * (time_eps + b))
    e2 = math.erf(math.sqrt(delta) * (1.0 + b)) - e1
    log_pref = 0.5 * b if compat == "official" else sde.beta_min**2 / (2.0 * (sde.beta_max - sde.beta_min))
    return (1.0 - sde.sigma2_0) * math.exp(log_pref) * math.sqrt(math.pi / (4.0 * delta)) * e2


def _drop_all_iw_t(sde: VPSDE, rho: Tensor, time_eps: float) -> Tensor:
    # Inverse CDF of r(t) ∝ exp(−δ (t + b)²) on [time_eps, 1]: t = erfinv(ρ E2 + E1)/√δ − b (docs/algorithm.md §4.3).
    delta = 0.5 * (sde.beta_max - sde.beta_min)
    b = sde.beta_min / (sde.beta_max - sde.beta_min)
    e1 = math.erf(math.sqrt(delta) * (time_eps + b))
    e2 = math.erf(math.sqrt(delta) * (1.0 + b)) - e1
    # clamp guards float32 rounding past erf(√δ(1+b)) < 1, where erfinv would return inf/nan
    return torch.erfinv((rho * e2 + e1).clamp(max=e1 + e2)) / math.sqrt(delta) - b


def sample_t(sde: SDE, mode: str, rho: Tensor, time_eps: float, compat: str = "exact") -> TimeSample:
    """Map uniforms ``ρ ~ U[0,1)`` to diffusion times and weights for one weighting mode (docs/algorithm.md §4.3 table).

    Draws no randomness itself. Proposals ``r(t) ∝ w(t)(1 − σ_t²)`` (docs/algorithm.md §4.3):

    * ``ll_uniform``: ``t = ε_t + (1 − ε_t)ρ``; ``w_p = w_ll = g²/(2σ²)·(1 − ε_t)`` (exact) or
      ``g²/(2σ²)`` (official).
    * ``ll_iw``: ``σ_t²`` log-uniform in ``[σe², σ1²]``; ``w_p = w_ll = ½ log(σ1²/σe²)/(1 − σ_t²)``.
    * ``drop_all_uniform``: uniform t; ``w_p = 1``; ``w_ll`` as ``ll_uniform``.
    * ``drop_all_iw`` (VPSDE only): ``r ∝ 1 − σ_t²``; ``w_p = Z/(1 − σ_t²)``; ``w_ll = w_p g²/(2σ²)``.
    * ``drop_sigma2t_iw``: ``σ_t²`` uniform in ``[σe², σ1²]``; ``w_p = ½(σ1² − σe²)/(1 − σ_t²)``;
      ``w_ll = w_p/σ_t²``.
    * ``drop_sigma2t_uniform``: uniform t; ``w_p = g²/2``; ``w_ll`` as ``ll_uniform``.
    * ``rescale_iw``: uniform t (despite the name); ``w_p = ½/(1 − σ_t²)``; ``w_ll`` as ``ll_uniform``.

    ``w_p`` is defined up to a global constant (only the likelihood modes need ``w_p = w_ll``), so it
    follows the table in both compat modes; ``w_ll`` is unbiased in ``"exact"`` mode:
    ``E[w_ll(t) h(t)] = ∫_{ε_t}^1 g²/(2σ²) h dt``.

    Args:
        sde: forward SDE.
        mode: one of :data:`IW_MODES`.
        rho: uniforms in [0, 1), shape ``(B,)`` (dtype/device of the result).
        time_eps: cut-off ε_t (0.01 VPSDE runs, 0 geometric runs).
        compat: ``"exact"`` or ``"official"`` (see module docstring).

    Returns:
        :class:`TimeSample` with fields ``t, var_t, mean_coef_t, weight_p, weight_ll, g2_t``, each ``(B,)``.
    """
    check_choice("mode", mode, IW_MODES)
    check_choice("compat", compat, COMPAT_MODES)
    _check_time_eps(time_eps)
    # σe², σ1² as Python floats from float64 CPU arithmetic: exact, and no device synchronisation
    var_e, var_1 = _var_at(sde, time_eps), _var_at(sde, 1.0)
    if var_e <= 0.0:
        raise ValueError(
            f"the likelihood weight g^2/(2 sigma^2) needs sigma^2(time_eps) > 0; got time_eps={time_eps!r} with "
            f"sigma2_0={sde.sigma2_0!r} (use time_eps > 0 or sigma2_0 > 0)"
        )
    uniform_scale = 1.0 if compat == "official" else 1.0 - time_eps

    if mode == "ll_iw":
        log_var_e, log_var_1 = math.log(var_e), math.log(var_1)
        var_t = torch.exp(rho * log_var_1 + (1.0 - rho) * log_var_e)
        t = sde.inv_var(var_t)
    elif mode == "drop_sigma2t_iw":
        var_t = rho * var_1 + (1.0 - rho) * var_e
        t = sde.inv_var(var_t)
    elif mode == "drop_all_iw":
        check_mode_sde(mode, sde.kind, "mode")
        t = _drop_all_iw_t(sde, rho, time_eps)
        var_t = None
    else:  # uniform-t modes
        t = time_eps + (1.0 - time_eps) * rho
        var_t = None

    t = t.clamp(time_eps, 1.0)
    if var_t is None:
        var_t = sde.var(t)
    else:  # keep the sampled variance within its interval after the round trip through t
        var_t = var_t.clamp(var_e, var_1)
    g2_t = sde.g2(t)
    mean_coef_t = sde.mean_coef(t)
    ll_density_weight = 0.5 * g2_t / var_t  # g²/(2σ²), the likelihood weighting (docs/algorithm.md §4.2)

    if mode == "ll_iw":
        weight_p = 0.5 * (log_var_1 - log_var_e) / (1.0 - var_t)
        weight_ll = weight_p
    elif mode == "drop_sigma2t_iw":
        weight_p = 0.5 * (var_1 - var_e) / (1.0 - var_t)
        weight_ll = weight_p / var_t
    elif mode == "drop_all_iw":
        weight_p = drop_all_iw_normalizer(sde, time_eps, compat) / (1.0 - var_t)
        weight_ll = weight_p * ll_density_weight
    else:
        weight_ll = ll_density_weight * uniform_scale
        weight_p = {
            "ll_uniform": weight_ll,
            "drop_all_uniform": torch.ones_like(t),
            "drop_sigma2t_uniform": 0.5 * g2_t,
            "rescale_iw": 0.5 / (1.0 - var_t),
        }[mode]
    return TimeSample(t, var_t, mean_coef_t, weight_p, weight_ll, g2_t)


def cross_entropy_const(sde: SDE, time_eps: float, compat: str = "exact") -> float:
    """Per-element constant ``½(1 + log(2π σ²(ε_t)))`` of the cross-entropy (docs/algorithm.md §4.2).

    Multiply by D for the per-sample constant ``(D/2) log(2πe σ²(ε_t))``. The paper writes
    ``(D/2) log(2πe σ0²)``, which is the ``time_eps = 0`` case. With the integral starting at
    ``ε_t``, ``σ²(ε_t)`` is the exact constant for the cross-entropy of the latent at the cut-off
    (it is the entropy of the kernel ``q(z_ε|z0)``, which the denoising identity leaves behind);
    ``σ0²`` with a positive cut-off is inconsistent (and −∞ for σ0² = 0). Both ``compat`` modes
    therefore use ``σ²(ε_t)``, which is also what the reference code does.

    Args:
        sde: forward SDE.
        time_eps: cut-off ε_t.
        compat: ``"exact"`` or ``"official"`` (identical here; accepted for a uniform interface).

    Raises:
        ValueError: if ``σ²(time_eps) = 0`` (e.g. VPSDE with σ0² = 0 and time_eps = 0).
    """
    check_choice("compat", compat, COMPAT_MODES)
    _check_time_eps(time_eps)
    var_e = _var_at(sde, time_eps)
    if var_e <= 0.0:
        raise ValueError(
            f"cross-entropy constant needs sigma^2(time_eps) > 0; got time_eps={time_eps!r}, "
            f"sigma2_0={sde.sigma2_0!r}"
        )
    return 0.5 * (1.0 + math.log(2.0 * math.pi * var_e))


def diffuse(z0: Tensor, eps: Tensor, ts: TimeSample) -> Tensor:
    """Sample the kernel: ``z_t = m_t z0 + σ_t ε`` (docs/algorithm.md §2, §4.5 step 2).

    Args:
        z0: latents ``(B, C, H, W)``; eps: noise ``(B, C, H, W)``; ts: per-sample times ``(B,)``.
    """
    m = broadcast_per_sample(ts.mean_coef_t, z0)
    s = broadcast_per_sample(ts.var_t, z0).sqrt()
    return m * z0 + s * eps


def sgm_objective(eps_pred: Tensor, eps: Tensor, weight_p: Tensor) -> Tensor:
    """Per-sample SGM objective ``p_obj = Σ_{C,H,W} w_p (ε_pred − ε)²`` (docs/algorithm.md §4.4).

    Args:
        eps_pred: ``(B, C, H, W)``; eps: ``(B, C, H, W)``; weight_p: ``(B,)``.

    Returns:
        ``(B,)``.
    """
    l2 = (eps_pred - eps).square()
    return (broadcast_per_sample(weight_p, l2) * l2).flatten(1).sum(1)


def cross_entropy_elem(eps_pred: Tensor, eps: Tensor, weight_ll: Tensor, const: float) -> Tensor:
    """Per-element cross-entropy estimate ``ce_elem = w_ll (ε_pred − ε)² + ½(1 + log 2πσ²(ε_t))`` (docs/algorithm.md §4.2).

    Summing over (C, H, W) estimates ``CE(q(z0|x) ‖ p_SGM(z0))`` in nats (Theorem 1, "kl_T = 0").

    Args:
        eps_pred: ``(B, C, H, W)``; eps: ``(B, C, H, W)``; weight_ll: ``(B,)``;
        const: :func:`cross_entropy_const`.

    Returns:
        ``(B, C, H, W)``.
    """
    l2 = (eps_pred - eps).square()
    return broadcast_per_sample(weight_ll, l2) * l2 + const


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by a per-sample factor in the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return grad * broadcast_per_sample(scale.to(grad.dtype), grad), None


def scale_grad(x: Tensor, scale: Tensor) -> Tensor:
    """``x`` unchanged, but the gradient flowing back through it is multiplied by ``scale`` per sample.

    Args:
        x: ``(B, ...)``; scale: ``(B,)`` (no gradient flows into it).
    """
    return _ScaleGrad.apply(x, scale.detach())


def _draw(kind: str, shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    # Draw on the generator's device (a CPU generator works for any model device), then move. At least
    # float32: t, σ_t² and the weights must not be computed in half precision when z0 comes out of autocast.
    device = generator.device if generator is not None else like.device
    dtype = torch.promote_types(like.dtype, torch.float32)
    fn = torch.randn if kind == "randn" else torch.rand
    return fn(shape, generator=generator, device=device, dtype=dtype).to(like.device)


class Backward(NamedTuple):
    """One backward pass of a training step: differentiate ``loss`` into ``inputs`` (None: every leaf that needs a
    gradient), keeping the graph if ``retain_graph`` (a later pass of the same step reuses it)."""

    loss: Tensor
    inputs: Optional[Sequence[Tensor]] = None
    retain_graph: bool = False


# How a joint step's two losses reach the parameters (see JointLoss.backward_terms)
ROUTE_Q = "q"  # p and q share one objective: the q loss trains encoder, decoder and SGM
ROUTE_SUM = "sum"  # one-backward fast path: q's cross-entropy gradient rides on p's graph (scale_grad)
ROUTE_SPLIT = "split"  # q loss into the VAE parameters, p loss into the SGM parameters


class JointLoss(NamedTuple):
    """Result of :meth:`LSGMObjective.joint` (docs/algorithm.md §4.5 joint).

    Attributes:
        p_obj: ``(B,)`` SGM objective.
        ce_elem: ``(B, C, H, W)`` per-element cross-entropy incl. the constant; its gradient reaches the encoder.
        route: how the two losses are back-propagated (:data:`ROUTE_Q`, :data:`ROUTE_SUM`, :data:`ROUTE_SPLIT`);
            the training loop never reads it: it runs :meth:`backward_terms`.

    Gradient routing with different p and q objectives (:data:`ROUTE_SPLIT`): p's inputs come from ``z0.detach()``
    (or, with ``single_pass``, from the attached ``z_t``), so the q loss must reach only the VAE parameters and the
    p loss only the SGM parameters; both gradients are taken before any optimiser step, never after the VAE
    parameters were updated in place (docs/algorithm.md §11 item 13).
    """

    p_obj: Tensor
    ce_elem: Tensor
    route: str

    def backward_terms(self, q_loss: Tensor, p_loss: Tensor, q_params: Sequence[Tensor],
                       p_params: Sequence[Tensor]) -> list[Backward]:
        """The backward passes that give each network exactly its objective's gradient.

        Args:
            q_loss: the encoder/decoder loss built from ``ce_elem`` (NELBO with the cross-entropy term).
            p_loss: the SGM loss built from ``p_obj`` (same batch normalisation as ``q_loss``).
            q_params: the VAE's trainable parameters.
            p_params: the SGM prior's trainable parameters.
        """
        if self.route == ROUTE_Q:
            return [Backward(q_loss)]
        if self.route == ROUTE_SUM:  # ce is a detached value here; its encoder gradient comes through p_obj
            return [Backward(q_loss + p_loss)]
        return [Backward(q_loss, list(q_params), True), Backward(p_loss, list(p_params))]


class LSGMObjective:
    """Loss object for the SGM prior and its cross-entropy term (docs/algorithm.md §4.3–§4.5), EDM style.

    Every method returns per-sample tensors; all randomness (ρ for t, ε) comes from the generator.

    Args:
        sde: forward SDE.
        iw_sample_p: weighting/IS mode of the SGM objective, one of :data:`IW_MODES`.
        iw_sample_q: ``reweight_p_samples`` (reuse p's t and ε, weight by p's ``w_ll``), ``ll_uniform`` or
            ``ll_iw`` (own t batch).
        time_eps: cut-off ε_t.
        compat: ``"exact"`` or ``"official"`` (see module docstring).
        concat_forward: joint training with different p/q objectives evaluates the SGM once on the
            concatenated 2B batch (docs/algorithm.md §4.5 step 3); False uses two calls with separate graphs.
    """

    def __init__(
        self,
        sde: SDE,
        iw_sample_p: str,
        iw_sample_q: str = "reweight_p_samples",
        time_eps: float = 0.01,
        compat: str = "exact",
        concat_forward: bool = True,
    ):
        check_choice("iw_sample_p", iw_sample_p, IW_MODES)
        check_choice("iw_sample_q", iw_sample_q, IW_Q_MODES)
        check_choice("compat", compat, COMPAT_MODES)
        _check_time_eps(time_eps)
        check_mode_sde(iw_sample_p, sde.kind)
        self.sde, self.iw_sample_p, self.iw_sample_q = sde, iw_sample_p, iw_sample_q
        self.time_eps, self.compat, self.concat_forward = float(time_eps), compat, bool(concat_forward)
        self.ce_const = cross_entropy_const(sde, self.time_eps, compat)

    @property
    def same_objective(self) -> bool:
        """True iff p and q optimise the same (likelihood) objective (docs/algorithm.md §4.3, last bullet)."""
        return self.iw_sample_p in LIKELIHOOD_MODES and self.iw_sample_q == "reweight_p_samples"

    def sample_t(self, mode: str, batch: int, like: Tensor, generator: torch.Generator | None) -> TimeSample:
        """Draw ``ρ ~ U[0,1)`` of shape ``(batch,)`` from ``generator`` and apply :func:`sample_t` (docs/algorithm.md §4.3)."""
        rho = _draw("rand", (batch,), like, generator)
        return sample_t(self.sde, mode, rho, self.time_eps, self.compat)

    def joint(self, eps_fn: EpsFn, z0: Tensor, generator: torch.Generator | None = None, *,
              single_pass: bool = False, ce_coeff: float | None = None) -> JointLoss:
        """Joint-training losses (docs/algorithm.md §4.5 joint, with the §11 item 13 clean detach).

        One ε for p and q. If q has its own mode, p's and q's t batches are concatenated and the SGM
        is evaluated once on ``[z_t^p(z0.detach()), z_t^q(z0)]``. With ``reweight_p_samples`` and
        different objectives, p and q share t and ε, and the batch ``[z_t(z0.detach()), z_t(z0)]`` is
        evaluated once (identical inputs; only the gradient routes differ). With the same objective
        one evaluation of size B serves both. :meth:`JointLoss.backward_terms` says how to back-propagate.

        ``single_pass=True`` (fast path, ``reweight_p_samples`` only): the 2B batch's two halves have identical
        values, so one SGM call of size B on the attached ``z_t`` gives both losses. The gradients are exactly
        those of the 2B path because :meth:`JointLoss.backward_terms` back-propagates the q loss into the VAE
        parameters only and the p loss into the SGM parameters only: ∂p_obj/∂θ_SGM does not depend on
        whether ``z_t`` is detached, and ∂ce/∂θ_VAE is the q half's. Besides halving the SGM's forward and
        backward, the p backward no longer traverses the encoder. With dropout in the SGM, p and q share one
        dropout mask instead of two independent ones (each term's gradient has the same distribution; the
        global RNG advances differently), so a run is not bit-identical to one with the 2B path.

        ``ce_coeff=β`` with ``single_pass=True`` (fast path, one backward): the caller's losses are
        ``q_loss = mean(... + β Σ ce_elem)`` and ``p_loss = mean(p_obj)`` (same batch normalisation). Both are
        ``w (ε_pred − ε)²`` per sample, so ∂(β Σce_i)/∂z_t,i = r_i ∂p_obj,i/∂z_t,i with ``r_i = β w_ll,i / w_p,i``
        — *provided the SGM treats samples independently* (no BatchNorm; GroupNorm and dropout are fine). The SGM
        therefore sees ``scale_grad(z_t, r)``: the backward of ``p_loss`` gives the SGM parameters p's gradient
        and, scaled by r at ``z_t``, the encoder q's cross-entropy gradient. ``ce_elem`` is returned detached and
        the route is :data:`ROUTE_SUM`: ONE unrestricted backward of ``q_loss + p_loss`` replaces the restricted
        pair and the SGM backward runs once instead of twice. Every mode's weights are positive for t > 0 (σ_t² < 1 by
        construction); where ``w_p = 0`` (``g² = 0``) ``w_ll`` is 0 as well, and the ratio is set to 0.

        Args:
            eps_fn: mixed ε-prediction ``eps_fn(z_t (B,C,H,W), t (B,)) -> (B,C,H,W)``.
            z0: encoder latents ``(B, C, H, W)`` (carrying the encoder's graph).
            generator: source of ρ and ε (None: torch's global RNG).
            single_pass: one B-sized SGM evaluation for ``reweight_p_samples`` with different objectives
                (ignored when p and q share the objective, which is always one pass).
            ce_coeff: β of the caller's q loss; enables the one-backward form (needs ``single_pass``).

        Raises:
            ValueError: ``single_pass=True`` with ``iw_sample_q`` other than ``reweight_p_samples``, or ``ce_coeff``
                without ``single_pass``.
        """
        if ce_coeff is not None and not single_pass:
            raise ValueError("ce_coeff (one-backward joint step) needs single_pass=True")
        if single_pass and self.iw_sample_q != "reweight_p_samples":
            raise ValueError(f"single_pass=True needs iw_sample_q='reweight_p_samples' (p and q share t and eps), "
                             f"got iw_sample_q={self.iw_sample_q!r}")
        b = z0.shape[0]
        eps = _draw("randn", tuple(z0.shape), z0, generator)
        ts_p = self.sample_t(self.iw_sample_p, b, z0, generator)
        if self.same_objective:
            eps_pred = eps_fn(diffuse(z0, eps, ts_p), ts_p.t)
            p_obj = sgm_objective(eps_pred, eps, ts_p.weight_p)
            ce = cross_entropy_elem(eps_pred, eps, ts_p.weight_ll, self.ce_const)
            return JointLoss(p_obj, ce, ROUTE_Q)
        if single_pass and ce_coeff is not None:
            # w_p = 0 happens only where g² = 0 (ll_uniform / drop_sigma2t_uniform at t = 0 with β_min = 0), and
            # there w_ll = 0 too: ratio 0 is exact, and torch.where keeps it free of a host-device sync
            w_p, w_ll = ts_p.weight_p, ts_p.weight_ll
            ratio = torch.where(w_p > 0, float(ce_coeff) * w_ll / torch.where(w_p > 0, w_p, 1.0), 0.0)
            eps_pred = eps_fn(scale_grad(diffuse(z0, eps, ts_p), ratio), ts_p.t)
            p_obj = sgm_objective(eps_pred, eps, w_p)
            ce = cross_entropy_elem(eps_pred.detach(), eps, w_ll, self.ce_const)
            return JointLoss(p_obj, ce, ROUTE_SUM)
        if single_pass:
            eps_pred = eps_fn(diffuse(z0, eps, ts_p), ts_p.t)
            p_obj = sgm_objective(eps_pred, eps, ts_p.weight_p)
            return JointLoss(p_obj, cross_entropy_elem(eps_pred, eps, ts_p.weight_ll, self.ce_const), ROUTE_SPLIT)
        ts_q = ts_p if self.iw_sample_q == "reweight_p_samples" else self.sample_t(self.iw_sample_q, b, z0, generator)
        z_t_p, z_t_q = diffuse(z0.detach(), eps, ts_p), diffuse(z0, eps, ts_q)
        if self.concat_forward:
            eps_pred_p, eps_pred_q = eps_fn(torch.cat([z_t_p, z_t_q]), torch.cat([ts_p.t, ts_q.t])).split(b)
        else:
            eps_pred_p, eps_pred_q = eps_fn(z_t_p, ts_p.t), eps_fn(z_t_q, ts_q.t)
        p_obj = sgm_objective(eps_pred_p, eps, ts_p.weight_p)
        ce = cross_entropy_elem(eps_pred_q, eps, ts_q.weight_ll, self.ce_const)
        return JointLoss(p_obj, ce, ROUTE_SPLIT)

    def q_only(self, eps_fn: EpsFn, z0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Disjoint training, VAE step: ``ce_elem`` from q's own t batch and fresh ε (docs/algorithm.md §4.5 disjoint 2).

        Args:
            eps_fn: mixed ε-prediction; z0: encoder latents ``(B, C, H, W)``; generator: RNG.

        Returns:
            ``ce_elem``, ``(B, C, H, W)``, with gradients into the encoder (and the SGM).

        Raises:
            ValueError: if ``iw_sample_q`` is ``reweight_p_samples`` (disjoint training needs its own q mode).
        """
        if self.iw_sample_q not in LIKELIHOOD_MODES:
            raise ValueError(
                f"disjoint training requires iw_sample_q in {list(LIKELIHOOD_MODES)}, got {self.iw_sample_q!r}"
            )
        eps = _draw("randn", tuple(z0.shape), z0, generator)
        ts = self.sample_t(self.iw_sample_q, z0.shape[0], z0, generator)
        return cross_entropy_elem(eps_fn(diffuse(z0, eps, ts), ts.t), eps, ts.weight_ll, self.ce_const)

    def p_only(self, eps_fn: EpsFn, z0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """SGM objective from a detached z0 with fresh ε and p's t batch (docs/algorithm.md §4.5 disjoint 3, frozen VAE).

        Args:
            eps_fn: mixed ε-prediction; z0: latents ``(B, C, H, W)`` (detached here); generator: RNG.

        Returns:
            ``p_obj``, ``(B,)``.
        """
        z0 = z0.detach()
        eps = _draw("randn", tuple(z0.shape), z0, generator)
        ts = self.sample_t(self.iw_sample_p, z0.shape[0], z0, generator)
        return sgm_objective(eps_fn(diffuse(z0, eps, ts), ts.t), eps, ts.weight_p)
