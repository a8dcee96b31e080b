"""Mixed score parameterisation (docs/algorithm.md §3)."""

import math

import pytest
import torch
from torch import nn

from lsgm.score import INACTIVE_LOGIT, MixedScore, gaussian_eps_fn, mixed_eps_prediction, score_from_eps
from lsgm.sde import make_sde

torch.set_num_threads(1)
F64 = torch.float64

SDES_SIGMA0_ZERO = {
    "vpsde": make_sde("vpsde", beta_min=0.1, beta_max=20.0, sigma2_0=0.0),
    "geometric": make_sde("geometric", sigma2_min=3e-5, sigma2_max=0.999, sigma2_0=0.0),
}


def batch(seed=0, shape=(6, 3, 4, 4)):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, generator=gen, dtype=F64)
    t = torch.rand(shape[0], generator=gen, dtype=F64) * 0.99 + 0.01
    return z, t, gen


def test_mixed_prediction_blends_per_channel():
    z, t, gen = batch()
    sde = SDES_SIGMA0_ZERO["vpsde"]
    net_out = torch.randn(z.shape, generator=gen, dtype=F64)
    logit = torch.tensor([-2.0, 0.0, 3.0], dtype=F64).view(1, 3, 1, 1)
    out = mixed_eps_prediction(z, sde.var(t), net_out, logit)
    alpha = torch.sigmoid(logit)
    sigma = sde.var(t).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(out, (1 - alpha) * sigma * z + alpha * net_out)
    # channel 1 has α = ½ exactly
    torch.testing.assert_close(out[:, 1], 0.5 * (sigma[:, 0] * z[:, 1] + net_out[:, 1]))


def test_very_negative_logit_returns_normal_part_whatever_net_out():
    z, t, gen = batch()
    sde = SDES_SIGMA0_ZERO["vpsde"]
    var = sde.var(t)
    logit = torch.full((1, 3, 1, 1), -60.0, dtype=F64)
    normal = var.sqrt().view(-1, 1, 1, 1) * z
    for scale in (0.0, 1.0, 1e6):
        net_out = scale * torch.randn(z.shape, generator=gen, dtype=F64)
        torch.testing.assert_close(mixed_eps_prediction(z, var, net_out, logit), normal, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", SDES_SIGMA0_ZERO)
def test_normal_part_is_exact_score_of_diffused_standard_normal(name):
    """z0 ~ N(0, I), σ0² = 0 ⇒ z_t ~ N(0, I) and −(σ_t z_t)/σ_t = −z_t = ∇ log N(z_t; 0, I) (docs/algorithm.md §3.1)."""
    sde = SDES_SIGMA0_ZERO[name]
    z, t, _ = batch()
    var = sde.var(t)
    m = sde.mean_coef(t).view(-1, 1, 1, 1)
    marginal_var = m**2 * 1.0 + var.view(-1, 1, 1, 1)  # Var(m_t z0 + σ_t ε) for z0 ~ N(0, I)
    torch.testing.assert_close(marginal_var, torch.ones_like(marginal_var), rtol=0, atol=1e-12)
    zr = z.clone().requires_grad_(True)
    log_p = (-0.5 * zr**2 / marginal_var - 0.5 * torch.log(2 * math.pi * marginal_var)).sum()
    (true_score,) = torch.autograd.grad(log_p, zr)
    normal_eps = mixed_eps_prediction(z, var, torch.zeros_like(z), torch.full((1, 3, 1, 1), -60.0, dtype=F64))
    torch.testing.assert_close(score_from_eps(normal_eps, var), true_score, rtol=1e-12, atol=1e-12)
    # and it is the exact ε-prediction of N(0, I) data
    torch.testing.assert_close(normal_eps, gaussian_eps_fn(sde, 0.0, 1.0)(z, t), rtol=1e-12, atol=1e-12)


def test_normal_part_not_exact_when_sigma0_positive():
    """With σ0² > 0 the diffused N(0, I) has variance 1 + σ0² m_t² ≠ 1: the Normal part is only approximate."""
    sde = make_sde("vpsde", sigma2_0=0.05)
    z, t, _ = batch()
    exact = gaussian_eps_fn(sde, 0.0, 1.0)(z, t)
    normal = sde.var(t).sqrt().view(-1, 1, 1, 1) * z
    assert not torch.allclose(exact, normal, rtol=1e-3)


def test_gaussian_eps_fn_full_covariance_is_the_score():
    """ε*(z_t) = −σ_t ∇ log N(z_t; m_t μ, m_t² Σ + σ_t² I) for a full Σ (autograd of the Gaussian log-density)."""
    sde = make_sde("vpsde")
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(4, 4, generator=gen, dtype=F64)
    cov, mu = a @ a.T + 0.1 * torch.eye(4, dtype=F64), torch.randn(4, generator=gen, dtype=F64)
    z = torch.randn(5, 1, 2, 2, generator=gen, dtype=F64)
    t = torch.tensor([0.01, 0.1, 0.3, 0.6, 1.0], dtype=F64)
    eps = gaussian_eps_fn(sde, mu, cov)(z, t)
    for i in range(5):
        m, v = sde.mean_coef(t[i]), sde.var(t[i])
        dist = torch.distributions.MultivariateNormal(m * mu, m**2 * cov + v * torch.eye(4, dtype=F64))
        zi = z[i].flatten().clone().requires_grad_(True)
        (score,) = torch.autograd.grad(dist.log_prob(zi), zi)
        torch.testing.assert_close(eps[i].flatten(), -v.sqrt() * score, rtol=1e-10, atol=1e-12)


class SpyBackbone(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels, dtype=F64).view(1, -1, 1, 1))
        self.seen = []

    def forward(self, x, t):
        self.seen.append((x.detach().clone(), t.detach().clone()))
        return self.weight * x + t.view(-1, 1, 1, 1)


def test_mixed_score_module_forward_and_score():
    sde = make_sde("geometric")
    model = MixedScore(SpyBackbone(3), sde, num_channels=3, mixing_logit_init=-3.0).double()
    z, t, _ = batch()
    assert model.mixing_logit.shape == (1, 3, 1, 1)
    torch.testing.assert_close(model.mixing_logit.detach(), torch.full((1, 3, 1, 1), -3.0, dtype=F64))
    out = model(z, t)
    x_seen, t_seen = model.backbone.seen[-1]
    torch.testing.assert_close(x_seen, z)  # mask of ones by default
    torch.testing.assert_close(t_seen, t)  # continuous t in [0, 1], shape (B,)
    expected = mixed_eps_prediction(z, sde.var(t), model.backbone.weight * z + t.view(-1, 1, 1, 1),
                                    model.mixing_logit)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(model.score(z, t), -out / sde.var(t).sqrt().view(-1, 1, 1, 1))
    # the logit is learnable
    (g,) = torch.autograd.grad(out.sum(), model.mixing_logit)
    assert g.shape == (1, 3, 1, 1) and float(g.abs().sum()) > 0


def test_inactive_channels_mask_logit_and_state_dict_round_trip():
    """§3.3: inactive channels get ℓ = −15 and are zeroed at the backbone input; the mask is persisted."""
    sde = make_sde("vpsde")
    model = MixedScore(SpyBackbone(3), sde, num_channels=3, mixing_logit_init=-6.0).double()
    model.set_inactive_channels(torch.tensor([False, True, False]))
    torch.testing.assert_close(model.mixing_logit.detach().flatten(), torch.tensor([-6.0, INACTIVE_LOGIT, -6.0],
                                                                                    dtype=F64))
    z, t, _ = batch()
    model(z, t)
    x_seen, _ = model.backbone.seen[-1]
    assert float(x_seen[:, 1].abs().max()) == 0.0
    torch.testing.assert_close(x_seen[:, [0, 2]], z[:, [0, 2]])
    state = model.state_dict()
    assert "inactive_mask" in state and "mixing_logit" in state
    fresh = MixedScore(SpyBackbone(3), sde, num_channels=3, mixing_logit_init=-6.0).double()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.inactive_mask, torch.tensor([1.0, 0.0, 1.0], dtype=F64).view(1, 3, 1, 1))
    torch.testing.assert_close(fresh(z, t), model(z, t))


def test_mixed_score_rejects_bad_input():
    model = MixedScore(SpyBackbone(3), make_sde("vpsde"), num_channels=3)
    with pytest.raises(ValueError, match="inactive"):
        model.set_inactive_channels(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="inactive"):
        model.set_inactive_channels(torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="num_channels"):
        model(torch.zeros(2, 4, 2, 2), torch.ones(2))
    with pytest.raises(ValueError, match="num_channels"):
        MixedScore(SpyBackbone(3), make_sde("vpsde"), num_channels=0)


class _TimeConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, z, t):
        return self.conv(z) + t.view(-1, 1, 1, 1)


def test_unmixed_score_is_the_network_alone():
    """mixed=False (the paper's ablation without the mixed score): the prediction is the backbone's output, whatever
    the mixing logit."""
    torch.manual_seed(0)
    sde = make_sde("vpsde", beta_min=0.1, beta_max=20.0)
    backbone = _TimeConv()
    mixed = MixedScore(backbone, sde, 3, -2.0)
    plain = MixedScore(backbone, sde, 3, -2.0, mixed=False)
    z, t = torch.randn(4, 3, 2, 2), torch.rand(4)
    torch.testing.assert_close(plain(z, t), backbone(z, t))
    assert not torch.allclose(mixed(z, t), backbone(z, t))
