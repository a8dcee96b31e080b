"""ODE likelihood of latents by the instantaneous change of variables (docs/algorithm.md §7.1)."""

import math

import pytest
import torch

from lsgm.likelihood import draw_probes, exact_jacobian_trace, hutchinson_trace, ode_nll, standard_normal_logp
from lsgm.score import gaussian_eps_fn
from lsgm.sde import make_sde

torch.set_num_threads(1)
F64 = torch.float64
ODE_EPS = 1e-5

SDES = {
    "vpsde": make_sde("vpsde", beta_min=0.1, beta_max=20.0, sigma2_0=0.0),
    "geometric": make_sde("geometric", sigma2_min=3e-5, sigma2_max=0.999, sigma2_0=3e-5),
}


def scalar(fn, t):
    return float(fn(torch.tensor(t, dtype=F64)))


def gaussian_logpdf(x, mean, cov):
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(x)


def expected_ode_nll(sde, z0, mu, cov, ode_eps=ODE_EPS):
    """What the ODE computes for data N(μ, Σ) with its exact score, in closed form.

    The flow is linear and maps z0 to z1 = m1 μ + Σ1^{1/2} Σe^{-1/2} (z0 − me μ) (Σ_t = m_t² Σ + σ_t² I share
    Σ's eigenvectors), and the ODE gives −log N(z1; 0, I) + log p_1(z1) − log p_e(z0): the density of the data
    diffused to ode_eps, up to the prior mismatch at t = 1 between p_1 = N(m1 μ, Σ1) and N(0, I).
    """
    d = cov.shape[0]
    eye = torch.eye(d, dtype=F64)
    me, ve, m1, v1 = scalar(sde.mean_coef, ode_eps), scalar(sde.var, ode_eps), scalar(sde.mean_coef, 1.0), scalar(
        sde.var, 1.0)
    lam, u = torch.linalg.eigh(cov)
    scale = torch.sqrt((m1**2 * lam + v1) / (me**2 * lam + ve))
    x = z0.flatten(1)
    z1 = m1 * mu + ((x - me * mu) @ u) * scale @ u.T
    cov_e, cov_1 = me**2 * cov + ve * eye, m1**2 * cov + v1 * eye
    return (-gaussian_logpdf(z1, torch.zeros(d, dtype=F64), eye) + gaussian_logpdf(z1, m1 * mu, cov_1)
            - gaussian_logpdf(x, me * mu, cov_e))


def isotropic_batch(n, shape, mu, s, seed):
    gen = torch.Generator().manual_seed(seed)
    return mu + s * torch.randn(n, *shape, generator=gen, dtype=F64)


@pytest.mark.parametrize("name", SDES)
def test_exact_trace_nll_of_isotropic_gaussian(name):
    """z0 ~ N(μ, s²I) with the analytic score: ODE NLL = closed form; ≈ −log N(z0; μ, s²) within 1e-3 rel."""
    sde, mu, s, shape = SDES[name], 0.1, 0.7, (1, 2, 2)
    z0 = isotropic_batch(64, shape, mu, s, seed=0)
    res = ode_nll(gaussian_eps_fn(sde, mu, s * s), sde, z0, ode_eps=ODE_EPS, tol=1e-6, trace="exact")
    assert res.nll_nats.shape == (64,) and res.nfe > 0
    d = math.prod(shape)
    expected = expected_ode_nll(sde, z0, torch.full((d,), mu, dtype=F64), s * s * torch.eye(d, dtype=F64))
    torch.testing.assert_close(res.nll_nats, expected, rtol=2e-5, atol=0)
    if name == "vpsde":  # prior mismatch at t = 1 is ~ m_1 μ z_1 with m_1 = 6.6e-3 (it is 0.03 for geometric)
        data_nll = -torch.distributions.Normal(mu, s).log_prob(z0).flatten(1).sum(1)
        torch.testing.assert_close(res.nll_nats, data_nll, rtol=1e-3, atol=0)


def test_exact_trace_nll_of_correlated_gaussian_and_scipy_solver():
    """Non-diagonal Jacobian: full-covariance data; dopri5 and SciPy RK45 agree with the closed form."""
    sde = SDES["vpsde"]
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(4, 4, generator=gen, dtype=F64)
    cov = 0.3 * a @ a.T + 0.2 * torch.eye(4, dtype=F64)
    mu = 0.1 * torch.randn(4, generator=gen, dtype=F64)
    z0 = (mu + torch.randn(32, 4, generator=gen, dtype=F64) @ torch.linalg.cholesky(cov).T).view(32, 1, 2, 2)
    eps_fn = gaussian_eps_fn(sde, mu, cov)
    expected = expected_ode_nll(sde, z0, mu, cov)
    for method in ("dopri5", "scipy_solver"):
        res = ode_nll(eps_fn, sde, z0, ode_eps=ODE_EPS, tol=1e-6, trace="exact", method=method)
        torch.testing.assert_close(res.nll_nats, expected, rtol=2e-5, atol=0)
        assert res.settings["method"] == method
    data_nll = -gaussian_logpdf(z0.flatten(1), mu, cov)
    torch.testing.assert_close(res.nll_nats, data_nll, rtol=1e-3, atol=0)


@pytest.mark.parametrize("probe_mode", ["fixed", "fresh"])
def test_rademacher_hutchinson_is_exact_for_isotropic_jacobian(probe_mode):
    """∂F/∂z = a(t) I for isotropic Gaussian data, so vᵀ(∂F/∂z)v = a(t)·D exactly for v ∈ {±1}^D."""
    sde, mu, s = SDES["vpsde"], 0.2, 0.8
    z0 = isotropic_batch(16, (2, 2, 2), mu, s, seed=1)
    eps_fn = gaussian_eps_fn(sde, mu, s * s)
    exact = ode_nll(eps_fn, sde, z0, ode_eps=ODE_EPS, tol=1e-6, trace="exact").nll_nats
    res = ode_nll(eps_fn, sde, z0, ode_eps=ODE_EPS, tol=1e-6, trace="hutchinson", probe="rademacher",
                  probe_mode=probe_mode, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(res.nll_nats, exact, rtol=1e-6, atol=0)


def test_gaussian_hutchinson_fixed_probes_unbiased_within_standard_error():
    sde, mu, s, shape = SDES["vpsde"], 0.1, 0.7, (1, 2, 2)
    z0 = isotropic_batch(256, shape, mu, s, seed=3)
    eps_fn = gaussian_eps_fn(sde, mu, s * s)
    exact = ode_nll(eps_fn, sde, z0, ode_eps=ODE_EPS, tol=1e-6, trace="exact").nll_nats
    spreads = {}
    for k in (1, 16):
        res = ode_nll(eps_fn, sde, z0, ode_eps=ODE_EPS, tol=1e-6, trace="hutchinson", probe="gaussian",
                      num_probes=k, probe_mode="fixed", generator=torch.Generator().manual_seed(4))
        diff = res.nll_nats - exact
        se = float(diff.std()) / math.sqrt(diff.numel())
        assert abs(float(diff.mean())) < 4 * se, (k, float(diff.mean()), se)
        spreads[k] = float(diff.std())
        assert res.settings == dict(ode_eps=ODE_EPS, tol=1e-6, trace="hutchinson", probe="gaussian",
                                    num_probes=k, probe_mode="fixed", method="dopri5")
    assert spreads[1] > 0.1  # a single Gaussian probe is genuinely noisy …
    assert 0.15 < spreads[16] / spreads[1] < 0.4  # … and K probes shrink the spread by ~1/sqrt(K)


def test_gaussian_hutchinson_fresh_probes_official_mode():
    """Official setting (fresh Gaussian probe at every evaluation): average error within its standard error."""
    sde, mu, s = SDES["vpsde"], 0.1, 0.7
    z0 = isotropic_batch(32, (4, 4, 4), mu, s, seed=6)
    d = 64
    expected = expected_ode_nll(sde, z0, torch.full((d,), mu, dtype=F64), s * s * torch.eye(d, dtype=F64))
    res = ode_nll(gaussian_eps_fn(sde, mu, s * s), sde, z0, ode_eps=ODE_EPS, tol=1e-4,
                  generator=torch.Generator().manual_seed(7))
    assert res.settings["probe_mode"] == "fresh" and res.settings["probe"] == "gaussian"
    diff = res.nll_nats - expected
    se = float(diff.std()) / math.sqrt(diff.numel())
    assert abs(float(diff.mean())) < 4 * se and se < 0.01 * float(expected.abs().mean())


def test_trace_estimators_on_a_linear_map():
    """tr(A) exactly by D backward passes; Hutchinson mean over K probes within 5 closed-form standard errors
    (Var vᵀAv = 2‖A_sym‖_F² for Gaussian probes, 2(‖A_sym‖_F² − Σ A_ii²) for Rademacher)."""
    gen = torch.Generator().manual_seed(8)
    a = torch.randn(6, 6, generator=gen, dtype=F64)
    z = torch.randn(3, 6, generator=gen, dtype=F64, requires_grad=True)
    fz = z @ a.T
    torch.testing.assert_close(exact_jacobian_trace(fz, z), torch.full((3,), float(a.trace()), dtype=F64))
    a_sym = 0.5 * (a + a.T)
    var = {"gaussian": 2 * float((a_sym**2).sum()),
           "rademacher": 2 * float((a_sym**2).sum() - (a.diagonal() ** 2).sum())}
    k = 4000
    for probe, v in var.items():
        probes = draw_probes(probe, k, z, gen)
        assert probes.shape == (k, 3, 6)
        est = hutchinson_trace(fz, z, probes)
        assert bool((est - a.trace()).abs().max() < 5 * math.sqrt(v / k))
    rad = draw_probes("rademacher", 100, z, gen)
    assert set(rad.unique().tolist()) == {-1.0, 1.0}


def test_standard_normal_logp():
    z = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=F64)
    torch.testing.assert_close(standard_normal_logp(z), torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1))


def test_ode_nll_rejects_bad_options():
    sde = SDES["vpsde"]
    eps_fn, z0 = gaussian_eps_fn(sde, 0.0, 1.0), torch.zeros(2, 1, 2, 2, dtype=F64)
    for kwargs, match in [
        (dict(trace="approx"), "trace"),
        (dict(probe="sphere"), "probe"),
        (dict(probe_mode="sometimes"), "probe_mode"),
        (dict(method="rk4"), "method"),
        (dict(num_probes=0), "num_probes"),
        (dict(ode_eps=0.0), "ode_eps"),
        (dict(tol=0.0), "tol"),
    ]:
        args = dict(ode_eps=ODE_EPS, tol=1e-5) | kwargs
        with pytest.raises(ValueError, match=match):
            ode_nll(eps_fn, sde, z0, **args)
