"""Importance sampling of t, SGM objective and score-matching cross-entropy (docs/algorithm.md §4.2–§4.5)."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from lsgm.objectives import (
    IW_MODES,
    LSGMObjective,
    ROUTE_Q,
    ROUTE_SPLIT,
    cross_entropy_const,
    drop_all_iw_normalizer,
    sample_t,
)
from lsgm.score import gaussian_eps_fn
from lsgm.sde import make_sde

torch.set_num_threads(1)
F64 = torch.float64

SDES = {
    "vpsde": make_sde("vpsde", beta_min=0.1, beta_max=20.0, sigma2_0=0.0),
    "vpsde_s0": make_sde("vpsde", beta_min=0.1, beta_max=20.0, sigma2_0=1e-3),
    "geometric": make_sde("geometric", sigma2_min=3e-5, sigma2_max=0.999, sigma2_0=3e-5),
}
# (sde, time_eps) pairs of the README runs plus variants with a positive/zero cut-off
CASES = [("vpsde", 0.01), ("vpsde_s0", 0.0), ("geometric", 0.0), ("geometric", 0.01)]
UNIFORM_MODES = ("ll_uniform", "drop_all_uniform", "drop_sigma2t_uniform", "rescale_iw")


def applicable(sde_name, mode):
    return mode != "drop_all_iw" or sde_name.startswith("vpsde")


MODE_CASES = [(s, e, m) for s, e in CASES for m in IW_MODES if applicable(s, m)]


def _scalar(sde_fn, t):
    return float(sde_fn(torch.tensor(t, dtype=F64)))


def stated_density(sde, mode, time_eps):
    """Sampling density r(t) on [time_eps, 1] as stated in docs/algorithm.md §4.3, vectorised over a float64 tensor."""
    ve, v1 = _scalar(sde.var, time_eps), _scalar(sde.var, 1.0)
    if mode in UNIFORM_MODES:
        return lambda t: torch.full_like(t, 1.0 / (1.0 - time_eps))

    def dvar_dt(t):
        t = t.detach().clone().requires_grad_(True)
        var = sde.var(t)
        (d,) = torch.autograd.grad(var.sum(), t)
        return d, var.detach()

    if mode == "ll_iw":  # log-uniform in σ²: r ∝ d log σ²/dt
        return lambda t: (lambda d, v: d / v)(*dvar_dt(t)) / (math.log(v1) - math.log(ve))
    if mode == "drop_sigma2t_iw":  # uniform in σ²: r ∝ dσ²/dt
        return lambda t: dvar_dt(t)[0] / (v1 - ve)
    if mode == "drop_all_iw":  # r ∝ 1 − σ_t²
        z, _ = integrate.quad(lambda s: 1.0 - _scalar(sde.var, s), time_eps, 1.0, epsabs=0, epsrel=1e-12)
        return lambda t: (1.0 - sde.var(t)) / z
    raise AssertionError(mode)


def cdf_on_grid(density, time_eps, n=200_001):
    grid = torch.linspace(time_eps, 1.0, n, dtype=F64)
    cdf = integrate.cumulative_trapezoid(density(grid).numpy(), grid.numpy(), initial=0.0)
    return grid.numpy(), cdf


@pytest.mark.parametrize("sde_name, time_eps, mode", MODE_CASES)
def test_t_in_range_and_inverse_cdf(sde_name, time_eps, mode):
    """t ∈ [time_eps, 1]; t(ρ) is the inverse CDF of the stated density (quadrature + KS test)."""
    sde = SDES[sde_name]
    density = stated_density(sde, mode, time_eps)
    # pointwise: ∫_{time_eps}^{t(ρ)} r = ρ
    rho = torch.tensor([0.0, 1e-6, 0.05, 0.3, 0.5, 0.77, 0.95, 1 - 1e-6], dtype=F64)
    ts = sample_t(sde, mode, rho, time_eps)
    assert bool(((ts.t >= time_eps) & (ts.t <= 1.0)).all())
    for r, t in zip(rho.tolist(), ts.t.tolist()):
        mass, _ = integrate.quad(lambda s: float(density(torch.tensor([s], dtype=F64))[0]), time_eps, t,
                                 epsabs=1e-12, epsrel=1e-10, limit=200)
        assert mass == pytest.approx(r, abs=1e-7)
    # KS test of seeded samples against the CDF from quadrature on a fine grid
    grid, cdf = cdf_on_grid(density, time_eps)
    assert cdf[-1] == pytest.approx(1.0, abs=1e-6)
    gen = torch.Generator().manual_seed(1234)
    t = sample_t(sde, mode, torch.rand(3000, generator=gen, dtype=F64), time_eps).t.numpy()
    assert stats.kstest(t, lambda x: np.interp(x, grid, cdf)).pvalue > 1e-3


def test_ks_test_has_power():
    """Negative control: log-uniform-σ² times are not uniform on [time_eps, 1]."""
    sde, time_eps = SDES["vpsde"], 0.01
    gen = torch.Generator().manual_seed(1234)
    t = sample_t(sde, "ll_iw", torch.rand(3000, generator=gen, dtype=F64), time_eps).t.numpy()
    assert stats.kstest(t, stats.uniform(loc=time_eps, scale=1 - time_eps).cdf).pvalue < 1e-10


def h_test(t):
    return 1.0 + 0.5 * np.sin(7.0 * t) + t**2


def sampler_expectation(sde, mode, time_eps, compat, field):
    """E_ρ[w(t(ρ)) h(t(ρ))] for ρ ~ U[0, 1), by adaptive quadrature over ρ through sample_t itself."""

    def integrand(r):
        ts = sample_t(sde, mode, torch.tensor([r], dtype=F64), time_eps, compat)
        return float(getattr(ts, field)[0]) * h_test(float(ts.t[0]))

    value, _ = integrate.quad(integrand, 0.0, 1.0, epsabs=0, epsrel=1e-10, limit=500, points=[0.999, 0.99999])
    return value


def official_factor(sde, mode, time_eps):
    """Known bias of the reference code's w_ll (docs/algorithm.md §4.2, §4.3)."""
    if mode in UNIFORM_MODES:
        return 1.0 / (1.0 - time_eps)
    if mode == "drop_all_iw":
        return drop_all_iw_normalizer(sde, time_eps, "official") / drop_all_iw_normalizer(sde, time_eps, "exact")
    return 1.0


@pytest.mark.parametrize("sde_name, time_eps, mode", MODE_CASES)
@pytest.mark.parametrize("compat", ["exact", "official"])
def test_weight_ll_is_unbiased(sde_name, time_eps, mode, compat):
    """E_t[w_ll(t) h(t)] = ∫ g²/(2σ²) h dt (exact); official = that × its documented bias factor."""
    sde = SDES[sde_name]

    def integrand(s):
        t = torch.tensor(s, dtype=F64)
        return float(0.5 * sde.g2(t) / sde.var(t)) * h_test(s)

    target, _ = integrate.quad(integrand, time_eps, 1.0, epsabs=0, epsrel=1e-11, limit=400)
    target *= 1.0 if compat == "exact" else official_factor(sde, mode, time_eps)
    # the expectation over the sampler, ∫_0^1 w_ll(t(ρ)) h(t(ρ)) dρ, by adaptive quadrature in ρ
    # (deterministic; ll_iw on the VPSDE has a near-singular weight ∝ 1/(1 − σ²) as ρ → 1)
    assert sampler_expectation(sde, mode, time_eps, compat, "weight_ll") == pytest.approx(target, rel=1e-7)
    # plain Monte Carlo over random ρ, within 5 standard errors
    gen = torch.Generator().manual_seed(7)
    ts = sample_t(sde, mode, torch.rand(20_000, generator=gen, dtype=F64), time_eps, compat)
    vals = ts.weight_ll * torch.from_numpy(h_test(ts.t.numpy()))
    assert abs(float(vals.mean()) - target) < 5 * float(vals.std()) / math.sqrt(vals.numel())


P_WEIGHT = {  # paper weighting w(t) in the p objective: E_t[w_p(t) l(t)] = ∫ w(t) l(t) dt (exact mode)
    "ll_iw": lambda sde, t, e: 0.5 * sde.g2(t) / sde.var(t),
    "ll_uniform": lambda sde, t, e: 0.5 * sde.g2(t) / sde.var(t),
    "drop_all_iw": lambda sde, t, e: torch.ones_like(t),
    "drop_sigma2t_iw": lambda sde, t, e: 0.5 * sde.g2(t),
    "drop_all_uniform": lambda sde, t, e: torch.ones_like(t) / (1 - e),
    "drop_sigma2t_uniform": lambda sde, t, e: 0.5 * sde.g2(t) / (1 - e),
    "rescale_iw": lambda sde, t, e: 0.5 / (1 - sde.var(t)) / (1 - e),
}


@pytest.mark.parametrize("sde_name, time_eps, mode", MODE_CASES)
def test_weight_p_matches_its_weighting(sde_name, time_eps, mode):
    """The p weights realise the paper's weighting w(t) (w_ll, w_un = 1, w_re = g²) under the proposal."""
    sde = SDES[sde_name]
    target, _ = integrate.quad(
        lambda s: float(P_WEIGHT[mode](sde, torch.tensor(s, dtype=F64), time_eps)) * h_test(s),
        time_eps, 1.0, epsabs=0, epsrel=1e-11, limit=400,
    )
    assert sampler_expectation(sde, mode, time_eps, "exact", "weight_p") == pytest.approx(target, rel=1e-7)
    ts = sample_t(sde, mode, torch.linspace(0, 0.999, 51, dtype=F64), time_eps)
    if mode.startswith("ll_"):
        torch.testing.assert_close(ts.weight_p, ts.weight_ll)


@pytest.mark.parametrize("compat", ["exact", "official"])
def test_geometric_ll_uniform_equals_ll_iw(compat):
    """Geometric SDE with σ0² = σ²_min and time_eps = 0: ll_iw is exactly uniform in t (docs/algorithm.md §4.3)."""
    sde = SDES["geometric"]
    rho = torch.linspace(0.0, 0.999, 97, dtype=F64)
    a, b = sample_t(sde, "ll_uniform", rho, 0.0, compat), sample_t(sde, "ll_iw", rho, 0.0, compat)
    for field in a._fields:
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-9, atol=1e-12)


def test_drop_all_iw_official_normaliser_bias():
    """The coded normaliser is 1.00226× the exact one for β0 = 0.1, β1 = 20 (docs/algorithm.md §4.3)."""
    sde = SDES["vpsde"]
    exact_z, _ = integrate.quad(lambda s: 1.0 - _scalar(sde.var, s), 0.01, 1.0, epsabs=0, epsrel=1e-12)
    assert drop_all_iw_normalizer(sde, 0.01, "exact") == pytest.approx(exact_z, rel=1e-10)
    ratio = drop_all_iw_normalizer(sde, 0.01, "official") / exact_z
    assert ratio == pytest.approx(math.exp((0.1 - 0.01) / (2 * 19.9)), rel=1e-10)
    assert round(ratio, 5) == 1.00226


def test_sample_t_fields_consistent_and_float32_finite():
    sde = SDES["vpsde"]
    rho = torch.tensor([0.0, 0.25, 0.5, 0.999999], dtype=torch.float32)
    for mode in IW_MODES:
        ts = sample_t(sde, mode, rho, 0.01)
        for field in ts:
            assert field.dtype == torch.float32 and bool(torch.isfinite(field).all()), mode
        torch.testing.assert_close(ts.mean_coef_t, sde.mean_coef(ts.t), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ts.g2_t, sde.g2(ts.t))


def test_sample_t_rejects_bad_input():
    rho = torch.rand(4, dtype=F64)
    with pytest.raises(ValueError, match="drop_all_iw"):
        sample_t(SDES["geometric"], "drop_all_iw", rho, 0.0)
    with pytest.raises(ValueError, match="mode"):
        sample_t(SDES["vpsde"], "ll_whatever", rho, 0.01)
    with pytest.raises(ValueError, match="compat"):
        sample_t(SDES["vpsde"], "ll_iw", rho, 0.01, compat="approx")
    with pytest.raises(ValueError, match="time_eps"):
        sample_t(SDES["vpsde"], "ll_iw", rho, 0.0)  # σ²(0) = 0: log-uniform proposal undefined
    with pytest.raises(ValueError, match="time_eps"):
        sample_t(SDES["vpsde"], "ll_uniform", rho, 1.5)


def test_cross_entropy_const():
    """½(1 + log 2πσ²(time_eps)) = ½ log(2πe σ²(ε_t)); = paper's ½ log(2πe σ0²) when time_eps = 0 (docs/algorithm.md §4.2)."""
    sde = SDES["vpsde"]
    var_e = _scalar(sde.var, 0.01)
    for compat in ("exact", "official"):
        assert cross_entropy_const(sde, 0.01, compat) == pytest.approx(0.5 * math.log(2 * math.pi * math.e * var_e))
    assert cross_entropy_const(SDES["geometric"], 0.0) == pytest.approx(0.5 * math.log(2 * math.pi * math.e * 3e-5))
    with pytest.raises(ValueError, match="time_eps"):
        cross_entropy_const(sde, 0.0)


# ---------------------------------------------------------------------------------------------------
# Loss objects with Gaussian latents: closed forms
# ---------------------------------------------------------------------------------------------------

MU_Q, S_Q = 0.4, 0.5  # "encoder" distribution of each latent element, q(z0) = N(μ_q, s_q²)
MU_P, S_P = -0.2, 1.2  # data distribution whose exact ε-prediction defines the SGM prior p
SHAPE = (2, 2, 2)


def gauss_ce(a, va, b, vb):
    """CE(N(a, va) ‖ N(b, vb)) per element."""
    return 0.5 * math.log(2 * math.pi * vb) + (va + (a - b) ** 2) / (2 * vb)


def expected_ce_per_element(sde, time_eps, mu_q, s_q, mu_p, s_p):
    """E[ce_elem] = CE(q_ε‖p_ε) − [CE(q_1‖p_1) − ½ log(2πe σ1²)] (Theorem 1 with cut-off; the bracket is
    the ignored prior mismatch at t = 1, "kl_T = 0", docs/algorithm.md §4.2). q_t, p_t: Gaussians diffused by the SDE."""

    def marg(t, mu, s):
        m, v = _scalar(sde.mean_coef, t), _scalar(sde.var, t)
        return m * mu, m * m * s * s + v

    qe, pe = marg(time_eps, mu_q, s_q), marg(time_eps, mu_p, s_p)
    q1, p1 = marg(1.0, mu_q, s_q), marg(1.0, mu_p, s_p)
    kl_t = gauss_ce(*q1, *p1) - 0.5 * math.log(2 * math.pi * math.e * _scalar(sde.var, 1.0))
    return gauss_ce(*qe, *pe) - kl_t


def gaussian_batch(n, seed, mu=MU_Q, s=S_Q):
    gen = torch.Generator().manual_seed(seed)
    return mu + s * torch.randn(n, *SHAPE, generator=gen, dtype=F64), gen


def within_standard_errors(per_sample, target, k=5.0):
    se = float(per_sample.std()) / math.sqrt(per_sample.numel())
    return abs(float(per_sample.mean()) - target) < k * se, se


# q reusing drop_sigma2t_iw's samples weights by 1/σ_t² under a proposal uniform in σ²: its variance grows like
# 1/σ²(time_eps), far too large to test by Monte Carlo for the geometric SDE (σ²(0) = 3e-5); left out there.
CE_CASES = [
    (s, e, p, "reweight_p_samples") for s, e, p in MODE_CASES
    if not (s == "geometric" and p == "drop_sigma2t_iw")
] + [
    ("vpsde", 0.01, "drop_all_iw", "ll_iw"),
    ("vpsde", 0.01, "drop_sigma2t_iw", "ll_uniform"),
    ("geometric", 0.0, "drop_sigma2t_iw", "ll_iw"),
]


@pytest.mark.parametrize("sde_name, time_eps, p_mode, q_mode", CE_CASES)
def test_cross_entropy_estimate_matches_gaussian_closed_form(sde_name, time_eps, p_mode, q_mode):
    """With the analytic ε-prediction of a Gaussian prior, Σ ce_elem averages to the closed-form CE (docs/algorithm.md §4.2)."""
    sde = SDES[sde_name]
    target = expected_ce_per_element(sde, time_eps, MU_Q, S_Q, MU_P, S_P) * math.prod(SHAPE)
    z0, gen = gaussian_batch(32768, seed=11)
    obj = LSGMObjective(sde, p_mode, q_mode, time_eps)
    ce = obj.joint(gaussian_eps_fn(sde, MU_P, S_P**2), z0, gen).ce_elem
    assert ce.shape == z0.shape
    ok, se = within_standard_errors(ce.flatten(1).sum(1), target)
    assert ok, (float(ce.flatten(1).sum(1).mean()), target, se)
    # the test must be sharp enough to catch a wrong constant or weight; reweighting drop_sigma2t_iw's
    # samples for q has weights ∝ 1/σ_t² under a proposal uniform in σ² (a documented high-variance combination)
    high_variance = p_mode == "drop_sigma2t_iw" and q_mode == "reweight_p_samples"
    assert se < (0.3 if high_variance else 0.05) * abs(target), se


@pytest.mark.parametrize("q_mode", ["ll_uniform", "ll_iw"])
def test_disjoint_q_only_matches_closed_form(q_mode):
    sde, time_eps = SDES["vpsde"], 0.01
    target = expected_ce_per_element(sde, time_eps, MU_Q, S_Q, MU_P, S_P) * math.prod(SHAPE)
    z0, gen = gaussian_batch(8192, seed=12)
    ce = LSGMObjective(sde, "drop_sigma2t_iw", q_mode, time_eps).q_only(gaussian_eps_fn(sde, MU_P, S_P**2), z0, gen)
    assert within_standard_errors(ce.flatten(1).sum(1), target)[0]


def expected_sq_error(sde, t, mu_q, s_q, mu_p, s_p):
    """E||ε − ε*_p(z_t)||² per element for z0 ~ N(μ_q, s_q²), ε*_p the exact prediction for N(μ_p, s_p²)."""
    m, v = sde.mean_coef(t), sde.var(t)
    vp = m * m * s_p**2 + v
    return (1 - v / vp) ** 2 + v * m * m * (s_q**2 + (mu_q - mu_p) ** 2) / vp**2


@pytest.mark.parametrize("sde_name, time_eps, mode", MODE_CASES)
@pytest.mark.parametrize("matched", [True, False])
def test_sgm_objective_matches_closed_form(sde_name, time_eps, mode, matched):
    """E[p_obj] = D ∫ w(t) E||ε − ε*||² dt; matched q = p gives the DSM minimum D ∫ w (1 − σ²/v_t) dt."""
    sde = SDES[sde_name]
    mu_q, s_q = (MU_P, S_P) if matched else (MU_Q, S_Q)
    target, _ = integrate.quad(
        lambda s: float(P_WEIGHT[mode](sde, torch.tensor(s, dtype=F64), time_eps)
                        * expected_sq_error(sde, torch.tensor(s, dtype=F64), mu_q, s_q, MU_P, S_P)),
        time_eps, 1.0, epsabs=0, epsrel=1e-10, limit=400,
    )
    target *= math.prod(SHAPE)
    z0, gen = gaussian_batch(8192, seed=13, mu=mu_q, s=s_q)
    p_obj = LSGMObjective(sde, mode, "reweight_p_samples", time_eps).p_only(gaussian_eps_fn(sde, MU_P, S_P**2), z0, gen)
    assert p_obj.shape == (8192,)
    ok, se = within_standard_errors(p_obj, target)
    assert ok, (float(p_obj.mean()), target, se)


# ---------------------------------------------------------------------------------------------------
# Plumbing of the loss object: one evaluation, gradient routing, reproducibility
# ---------------------------------------------------------------------------------------------------


class SpyEps:
    """Analytic ε-prediction that records its inputs, scaled by a learnable parameter."""

    def __init__(self, sde):
        self.inner = gaussian_eps_fn(sde, MU_P, S_P**2)
        self.scale = torch.ones((), dtype=F64, requires_grad=True)
        self.calls = []

    def __call__(self, z_t, t):
        self.calls.append((z_t.detach().clone(), t.detach().clone()))
        return self.scale * self.inner(z_t, t)


def leaf_z0(n=16, seed=3):
    z0, gen = gaussian_batch(n, seed)
    return z0.requires_grad_(True), gen


def grads(out, *inputs):
    return torch.autograd.grad(out.sum(), inputs, allow_unused=True, retain_graph=True)


def test_joint_same_objective_single_pass():
    sde = SDES["vpsde"]
    obj = LSGMObjective(sde, "ll_iw", "reweight_p_samples", 0.01)
    assert obj.same_objective
    spy, (z0, gen) = SpyEps(sde), leaf_z0()
    out = obj.joint(spy, z0, gen)
    assert out.route == ROUTE_Q and len(spy.calls) == 1 and spy.calls[0][0].shape[0] == 16
    torch.testing.assert_close(out.p_obj, (out.ce_elem - obj.ce_const).flatten(1).sum(1))
    g_z0, g_scale = grads(out.ce_elem, z0, spy.scale)
    assert g_z0 is not None and g_scale is not None


@pytest.mark.parametrize("q_mode", ["reweight_p_samples", "ll_uniform", "ll_iw"])
@pytest.mark.parametrize("concat", [True, False])
def test_joint_different_objectives_detach_p_and_one_concatenated_call(q_mode, concat):
    """§4.5 joint + §11 item 13: p's half sees a detached z0; one SGM call on the 2B batch; one shared ε."""
    sde = SDES["vpsde"]
    obj = LSGMObjective(sde, "drop_all_iw", q_mode, 0.01, concat_forward=concat)
    assert not obj.same_objective
    spy, (z0, gen) = SpyEps(sde), leaf_z0()
    out = obj.joint(spy, z0, gen)
    assert out.route == ROUTE_SPLIT and len(spy.calls) == (1 if concat else 2)
    z_t, t = (torch.cat(x) for x in zip(*spy.calls))
    assert z_t.shape[0] == 32 and t.shape == (32,)
    g_z0, g_scale = grads(out.p_obj, z0, spy.scale)
    assert g_scale is not None and float(g_scale.abs()) > 0
    if concat:  # shared graph: the encoder is reached, with an exactly zero gradient
        assert float(g_z0.abs().max()) == 0.0
    else:
        assert g_z0 is None  # p trains only the SGM
    g_z0, _ = grads(out.ce_elem, z0, spy.scale)
    assert g_z0 is not None and float(g_z0.abs().sum()) > 0
    # the same ε in both halves: recover ε = (z_t − m_t z0)/σ_t
    z0d = z0.detach()
    m = sde.mean_coef(t).view(-1, 1, 1, 1)
    s = sde.var(t).sqrt().view(-1, 1, 1, 1)
    eps = (z_t - m * torch.cat([z0d, z0d])) / s
    torch.testing.assert_close(eps[:16], eps[16:])
    if q_mode == "reweight_p_samples":
        torch.testing.assert_close(t[:16], t[16:])
    else:
        assert not torch.allclose(t[:16], t[16:])


def test_p_only_is_detached_and_reproducible():
    sde = SDES["geometric"]
    obj = LSGMObjective(sde, "drop_sigma2t_iw", "ll_iw", 0.0)
    spy, (z0, _) = SpyEps(sde), leaf_z0()
    a = obj.p_only(spy, z0, torch.Generator().manual_seed(5))
    b = obj.p_only(spy, z0, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    g_z0, g_scale = grads(a, z0, spy.scale)
    assert g_z0 is None and g_scale is not None
    c = obj.joint(spy, z0, torch.Generator().manual_seed(5))
    d = obj.joint(spy, z0, torch.Generator().manual_seed(5))
    torch.testing.assert_close(c.ce_elem, d.ce_elem, rtol=0, atol=0)


def test_objective_rejects_bad_configuration():
    with pytest.raises(ValueError, match="drop_all_iw"):
        LSGMObjective(SDES["geometric"], "drop_all_iw", "reweight_p_samples", 0.0)
    with pytest.raises(ValueError, match="iw_sample_q"):
        LSGMObjective(SDES["vpsde"], "ll_iw", "drop_all_iw", 0.01)
    with pytest.raises(ValueError, match="iw_sample_p"):
        LSGMObjective(SDES["vpsde"], "uniform", "ll_iw", 0.01)
    obj = LSGMObjective(SDES["vpsde"], "drop_all_iw", "reweight_p_samples", 0.01)
    with pytest.raises(ValueError, match="iw_sample_q"):
        obj.q_only(SpyEps(SDES["vpsde"]), leaf_z0()[0])


def test_half_precision_latents_get_float32_times_and_noise():
    """z0 out of fp16 autocast: t, weights and ε are drawn/computed in float32 (no half-precision erfinv/log)."""
    sde = SDES["vpsde"]
    seen = []

    def eps_fn(z_t, t):
        seen.append((z_t.dtype, t.dtype))
        return torch.zeros_like(z_t)

    obj = LSGMObjective(sde, "drop_all_iw", "ll_iw", 0.01)
    out = obj.joint(eps_fn, torch.zeros(4, 2, 2, 2, dtype=torch.float16), torch.Generator().manual_seed(0))
    assert seen == [(torch.float32, torch.float32)]
    assert out.p_obj.dtype == torch.float32 and bool(torch.isfinite(out.ce_elem).all())


@pytest.mark.parametrize("mode", ["ll_uniform", "drop_all_uniform", "drop_all_iw"])
def test_zero_variance_cut_off_is_rejected(mode):
    """VPSDE with σ0² = 0 and time_eps = 0: g²/(2σ²) is not integrable at t = 0 (the CE would be infinite)."""
    with pytest.raises(ValueError, match="time_eps"):
        sample_t(SDES["vpsde"], mode, torch.rand(4, dtype=F64), 0.0)
