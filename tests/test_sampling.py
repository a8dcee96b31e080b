"""Probability-flow ODE and ancestral sampling with the analytic score of Gaussian data (docs/algorithm.md §6)."""

import math

import pytest
import torch
from scipy import stats

from lsgm.sampling import probability_flow_drift, sample_ancestral, sample_ode
from lsgm.score import gaussian_eps_fn
from lsgm.sde import make_sde

torch.set_num_threads(1)
F64 = torch.float64
MU, S = 0.3, 0.7  # data: every latent element ~ N(μ, s²)

SDES = {
    "vpsde": make_sde("vpsde", beta_min=0.1, beta_max=20.0, sigma2_0=0.0),
    "geometric": make_sde("geometric", sigma2_min=3e-5, sigma2_max=0.999, sigma2_0=3e-5),
}


class CountingEps:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, z, t):
        self.calls += 1
        return self.fn(z, t)


def marginal(sde, t):
    """Mean coefficient and variance of the diffused data: z_t ~ N(m_t μ, v_t), v_t = m_t² s² + σ_t²."""
    t = torch.tensor(t, dtype=F64)
    m = float(sde.mean_coef(t))
    return m, m * m * S * S + float(sde.var(t))


def exact_flow(sde, z1, t_end):
    """The probability-flow ODE of Gaussian data is linear: (z_t − m_t μ)/sqrt(v_t) is constant in t."""
    m1, v1 = marginal(sde, 1.0)
    me, ve = marginal(sde, t_end)
    return me * MU + math.sqrt(ve / v1) * (z1 - m1 * MU)


def initial_noise(seed, shape, temperature=1.0, dtype=F64):
    return temperature * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).double()


@pytest.mark.parametrize("name", SDES)
def test_ode_sampling_recovers_gaussian_data(name):
    sde, shape, ode_eps = SDES[name], (400, 2, 2, 2), 1e-5
    eps_fn = CountingEps(gaussian_eps_fn(sde, MU, S * S))
    res = sample_ode(eps_fn, sde, shape, ode_eps=ode_eps, tol=1e-6,
                     generator=torch.Generator().manual_seed(0), dtype=F64)
    assert res.z.shape == shape and res.z.dtype == F64
    assert res.nfe == eps_fn.calls and 10 < res.nfe < 2000 and res.seconds > 0
    # pointwise: the solver follows the exact flow of its own initial noise
    expected = exact_flow(sde, initial_noise(0, shape), ode_eps)
    torch.testing.assert_close(res.z, expected, rtol=0, atol=2e-4)
    # distribution: the data's N(μ, s²) (KS) and its mean and variance within sampling error
    x = res.z.flatten().numpy()
    assert stats.kstest(x, stats.norm(MU, S).cdf).pvalue > 1e-3
    n = x.size
    assert abs(x.mean() - MU) < 4 * S / math.sqrt(n)
    assert abs(x.var() - S * S) < 4 * S * S * math.sqrt(2 / n)


def test_ode_sampling_temperature_and_scipy_solver():
    sde, shape = SDES["vpsde"], (16, 1, 2, 2)
    eps_fn = CountingEps(gaussian_eps_fn(sde, MU, S * S))
    res = sample_ode(eps_fn, sde, shape, ode_eps=1e-3, tol=1e-6, temperature=0.5, method="scipy_solver",
                     generator=torch.Generator().manual_seed(4), dtype=F64)
    assert res.nfe == eps_fn.calls > 0
    torch.testing.assert_close(res.z, exact_flow(sde, initial_noise(4, shape, 0.5), 1e-3), rtol=0, atol=2e-4)
    # reproducible given the generator seed
    again = sample_ode(eps_fn, sde, shape, ode_eps=1e-3, tol=1e-6, temperature=0.5, method="scipy_solver",
                       generator=torch.Generator().manual_seed(4), dtype=F64)
    torch.testing.assert_close(again.z, res.z, rtol=0, atol=0)


def test_ode_sampling_float32_default_dtype():
    sde = SDES["vpsde"]
    res = sample_ode(gaussian_eps_fn(sde, MU, S * S), sde, (8, 1, 2, 2), ode_eps=1e-5, tol=1e-4,
                     generator=torch.Generator().manual_seed(0))
    assert res.z.dtype == torch.float32
    expected = exact_flow(sde, initial_noise(0, (8, 1, 2, 2), dtype=torch.float32), 1e-5)
    torch.testing.assert_close(res.z.double(), expected, rtol=0, atol=5e-3)


@pytest.mark.parametrize("name", SDES)
def test_probability_flow_drift_of_standard_normal_is_zero(name):
    """σ0² = 0 and ε_pred = σ_t z (exact for N(0, I) data): dz/dt = (f + ½ g²) z = 0 (docs/algorithm.md §3.4)."""
    sde = make_sde("vpsde") if name == "vpsde" else make_sde("geometric", sigma2_0=0.0)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(5, 2, 3, 3, generator=gen, dtype=F64)
    for t in (torch.tensor(0.3, dtype=F64), torch.rand(5, generator=gen, dtype=F64)):
        drift = probability_flow_drift(lambda z, t: sde.var(t).sqrt().view(-1, 1, 1, 1) * z, sde, z, t)
        torch.testing.assert_close(drift, torch.zeros_like(z), rtol=0, atol=1e-9)


def ancestral_moments(sde, steps, temperature):
    """Exact mean/variance after the linear-Gaussian ancestral chain of docs/algorithm.md §6.3 with the analytic ε."""
    times = torch.arange(steps + 1, dtype=F64) / steps
    alpha_bar = 1.0 - sde.var(times)
    mean, var = 0.0, temperature**2
    for k in range(steps, 0, -1):
        m, vk = marginal(sde, k / steps)
        s2 = 1.0 - float(alpha_bar[k])  # σ_t² at t = k/N
        if k > 1:
            beta = 1.0 - float(alpha_bar[k] / alpha_bar[k - 1])
            a = (1.0 - beta / vk) / math.sqrt(1.0 - beta)
            b = beta * m * MU / vk / math.sqrt(1.0 - beta)
            mean, var = a * mean + b, a * a * var + beta * temperature**2
        else:
            a = (1.0 - s2 / vk) / math.sqrt(1.0 - s2)
            mean, var = a * mean + s2 * m * MU / vk / math.sqrt(1.0 - s2), a * a * var
    return mean, var


@pytest.mark.parametrize("name", SDES)
def test_ancestral_sampler_matches_exact_chain_and_data(name):
    sde, shape, steps = SDES[name], (400, 2, 2, 2), 1000
    eps_fn = CountingEps(gaussian_eps_fn(sde, MU, S * S))
    res = sample_ancestral(eps_fn, sde, shape, steps=steps, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert res.nfe == steps == eps_fn.calls and res.z.shape == shape
    mean, var = ancestral_moments(sde, steps, 1.0)
    assert abs(mean - MU) < 0.02 and abs(var - S * S) < 0.02  # the 1000-step chain is close to the data
    x = res.z.flatten().numpy()
    assert stats.kstest(x, stats.norm(mean, math.sqrt(var)).cdf).pvalue > 1e-3


def test_ancestral_clamp_and_bad_arguments():
    sde = SDES["vpsde"]
    eps_fn = gaussian_eps_fn(sde, MU, S * S)
    done = []
    res = sample_ancestral(eps_fn, sde, (64, 1, 2, 2), steps=20, temperature=50.0,
                           generator=torch.Generator().manual_seed(0), dtype=F64, callback=done.append)
    assert float(res.z.abs().max()) <= 3.0
    assert done == [1] * 20  # one progress unit per step
    same = sample_ancestral(eps_fn, sde, (64, 1, 2, 2), steps=20, temperature=50.0,
                            generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.equal(same.z, res.z)
    with pytest.raises(ValueError, match="steps"):
        sample_ancestral(eps_fn, sde, (2, 1, 2, 2), steps=0)
    with pytest.raises(ValueError, match="method"):
        sample_ode(eps_fn, sde, (2, 1, 2, 2), ode_eps=1e-5, tol=1e-5, method="euler")
    with pytest.raises(ValueError, match="ode_eps"):
        sample_ode(eps_fn, sde, (2, 1, 2, 2), ode_eps=0.0, tol=1e-5)
    with pytest.raises(ValueError, match="tol"):
        sample_ode(eps_fn, sde, (2, 1, 2, 2), ode_eps=1e-5, tol=-1.0)
