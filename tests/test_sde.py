"""Closed-form identities of the forward SDEs (docs/algorithm.md §2)."""

import math

import pytest
import torch

from lsgm.sde import GeometricVPSDE, VPSDE, make_sde

torch.set_num_threads(1)

SDES = {
    "vpsde": dict(kind="vpsde", beta_min=0.1, beta_max=20.0, sigma2_0=0.0),
    "vpsde_s0": dict(kind="vpsde", beta_min=0.1, beta_max=20.0, sigma2_0=1e-3),
    "vpsde_b0": dict(kind="vpsde", beta_min=0.0, beta_max=5.0, sigma2_0=0.0),
    "geometric": dict(kind="geometric", sigma2_min=3e-5, sigma2_max=0.999, sigma2_0=3e-5),
    "geometric_s0": dict(kind="geometric", sigma2_min=1e-3, sigma2_max=0.99, sigma2_0=2e-3),
    "geometric_0": dict(kind="geometric", sigma2_min=1e-4, sigma2_max=0.9, sigma2_0=0.0),
}


def build(name):
    params = dict(SDES[name])
    return make_sde(params.pop("kind"), **params)


@pytest.mark.parametrize("name", SDES)
def test_variance_ode_identity(name):
    """dσ²/dt = 2 f σ² + g² (docs/algorithm.md §2: kernel variance of dz = f z dt + g dW)."""
    sde = build(name)
    t = torch.linspace(0.0, 1.0, 201, dtype=torch.float64, requires_grad=True)
    var = sde.var(t)
    (dvar,) = torch.autograd.grad(var.sum(), t)
    rhs = 2 * sde.f(t) * var + sde.g2(t)
    torch.testing.assert_close(dvar, rhs.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", SDES)
def test_mean_coef_ode_and_f(name):
    """dm/dt = f m and f = −g²/2 (docs/algorithm.md §2, §2.5)."""
    sde = build(name)
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64, requires_grad=True)
    m = sde.mean_coef(t)
    (dm,) = torch.autograd.grad(m.sum(), t)
    torch.testing.assert_close(dm, (sde.f(t) * m).detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sde.f(t), -0.5 * sde.g2(t))


@pytest.mark.parametrize("name", SDES)
def test_inverse_variance_round_trip(name):
    sde = build(name)
    t = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    torch.testing.assert_close(sde.inv_var(sde.var(t)), t, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", SDES)
def test_variance_preserving_and_initial_variance(name):
    """(1 − σ0²) m_t² = 1 − σ_t², var(0) = σ0², m_0 = 1 (docs/algorithm.md §2)."""
    sde = build(name)
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    torch.testing.assert_close((1 - sde.sigma2_0) * sde.mean_coef(t) ** 2, 1 - sde.var(t), rtol=1e-12, atol=1e-14)
    zero = torch.zeros(1, dtype=torch.float64)
    torch.testing.assert_close(sde.var(zero), torch.full_like(zero, sde.sigma2_0), rtol=0, atol=1e-15)
    torch.testing.assert_close(sde.mean_coef(zero), torch.ones_like(zero))
    assert bool((sde.var(t[1:]) > sde.var(t[:-1])).all()), "σ_t² must increase"


def test_geometric_log_variance_is_linear():
    """σ0² = σ²_min ⇒ σ_t² = σ²_min r^t, log σ_t² linear with slope log r (docs/algorithm.md §2.2)."""
    sde = build("geometric")
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    log_var = torch.log(sde.var(t))
    expected = math.log(3e-5) + t * math.log(0.999 / 3e-5)
    torch.testing.assert_close(log_var, expected, rtol=0, atol=1e-12)
    # β(1) ≈ 1.04e4 (docs/algorithm.md §2.2): log r σ1²/(1 − σ1²)
    beta1 = float(sde.g2(torch.tensor(1.0, dtype=torch.float64)))
    assert beta1 == pytest.approx(math.log(0.999 / 3e-5) * 0.999 / 0.001, rel=1e-10)
    assert 1.03e4 < beta1 < 1.05e4


def test_vpsde_closed_form_values():
    """σ²(1) ≈ 0.9999568 for the README VPSDE (docs/algorithm.md §2.1); inverse formula of §2.1 at a random v."""
    sde = build("vpsde")
    one = torch.tensor(1.0, dtype=torch.float64)
    assert float(sde.var(one)) == pytest.approx(1 - math.exp(-10.05), abs=1e-15)
    assert abs(float(sde.var(one)) - 0.9999568) < 1e-7
    v = torch.tensor(0.37, dtype=torch.float64)
    a, c = 19.9, math.log(1 - 0.37)
    assert float(sde.inv_var(v)) == pytest.approx((-0.1 + math.sqrt(0.01 - 2 * a * c)) / a, rel=1e-12)


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_shape_and_device_preserved(name, dtype):
    sde = build(name)
    t = torch.rand(3, 4, dtype=dtype)
    for fn in (sde.var, sde.mean_coef, sde.g2, sde.f, sde.std):
        out = fn(t)
        assert out.shape == t.shape and out.dtype == dtype and out.device == t.device
    assert sde.inv_var(sde.var(t)).dtype == dtype


def test_make_sde_kinds_and_defaults():
    assert isinstance(make_sde("vpsde"), VPSDE)
    assert isinstance(make_sde("geometric"), GeometricVPSDE)
    assert make_sde("vpsde", beta_max=10.0).beta_max == 10.0


@pytest.mark.parametrize(
    "kind, params, match",
    [
        ("subvp", {}, "subvp"),
        ("vpsde", {"sigma2_min": 1e-3}, "sigma2_min"),
        ("geometric", {"beta_min": 0.1}, "beta_min"),
        ("vpsde", {"beta_min": 5.0, "beta_max": 1.0}, "beta_min"),
        ("vpsde", {"sigma2_0": 1.0}, "sigma2_0"),
        ("geometric", {"sigma2_min": 0.0}, "sigma2_min"),
        ("geometric", {"sigma2_max": 0.999, "sigma2_0": 0.5}, "sigma2"),
    ],
)
def test_make_sde_rejects_bad_input(kind, params, match):
    with pytest.raises(ValueError, match=match):
        make_sde(kind, **params)


@pytest.mark.parametrize("name", ["geometric", "geometric_s0", "geometric_0"])
@pytest.mark.parametrize("t_value", [0.0, 0.3, 0.9, 0.99, 1.0])
def test_geometric_sde_in_float32_matches_float64(name, t_value):
    """Near t = 1, 1 − σ_t² ≈ 1e-3: computed as 1 − var(t) it lost 2e-4 relative in float32 (g², m_t, the ODE
    drift); computed directly (docs/algorithm.md §2.2) every quantity is within 1e-5 of float64 at the same t."""
    from lsgm.sampling import probability_flow_drift

    sde = build(name)
    t32 = torch.full((4,), t_value, dtype=torch.float32)
    t64 = t32.double()  # the same time values, so only the arithmetic differs
    for method in ("var", "one_minus_var", "g2", "mean_coef", "f"):
        a, b = getattr(sde, method)(t32), getattr(sde, method)(t64)
        assert a.dtype == torch.float32
        rel = float(((a.double() - b).abs() / b.abs().clamp_min(1e-30)).max())
        assert rel <= 1e-5, f"{method}({t_value}) float32 relative error {rel:.2e}"
    if float(sde.var(t64[:1])) == 0.0:
        return  # σ_t = 0 (t = 0 with σ0² = 0): the drift is singular in any precision; the ODE stops at ode_eps > 0
    gen = torch.Generator().manual_seed(0)
    z, eps = (torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=gen) for _ in range(2))
    eps_fn = lambda z_t, t: eps.to(z_t.dtype)  # noqa: E731 - a network's output: the same in both precisions
    d32 = probability_flow_drift(eps_fn, sde, z.float(), t32)
    d64 = probability_flow_drift(eps_fn, sde, z, t64)
    rel = float((d32.double() - d64).abs().max() / d64.abs().max())
    assert rel <= 1e-5, f"drift({t_value}) float32 relative error {rel:.2e}"


def test_geometric_one_minus_var_is_one_minus_var():
    sde = build("geometric")
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    torch.testing.assert_close(sde.one_minus_var(t), 1.0 - sde.var(t), rtol=1e-12, atol=1e-15)
