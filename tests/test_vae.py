"""Tests of the NVAE backbone (docs/algorithm.md §1): cells, flows, decoder distributions, regularisation, the full model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli, Normal

from lsgm.vae import NVAE
from lsgm.vae import distributions as dist
from lsgm.vae.cells import (BNSwishConv, FactorizedReduce, InvertedResidual, ResidualCell, SqueezeExcitation,
                            make_cell)
from lsgm.vae.conv import Conv2D
from lsgm.vae.flows import ARCell, MaskedConv2D, PairedCellAR, autoregressive_mask
from lsgm.vae.regularization import (SpectralRegularizer, bn_loss, kl_balance_alpha, kl_balancer, kl_coeff)

torch.set_num_threads(1)

CONFIG_A = dict(in_channels=1, image_size=32, arch_instance="res_mbconv", num_channels_enc=32, num_channels_dec=32,
                num_preprocess_blocks=1, num_preprocess_cells=2, num_postprocess_blocks=1, num_postprocess_cells=2,
                num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, num_latent_scales=1, num_groups_per_scale=2,
                num_latent_per_group=8, channel_mult=(1, 2), num_nf=0, use_se=True, decoder_dist="bin",
                crop_output=28)
DIGITS = dict(in_channels=1, image_size=8, arch_instance="res_mbconv", num_channels_enc=8, num_channels_dec=8,
              num_preprocess_blocks=1, num_preprocess_cells=1, num_postprocess_blocks=1, num_postprocess_cells=1,
              num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, num_latent_scales=1, num_groups_per_scale=2,
              num_latent_per_group=4, channel_mult=(1, 2), num_nf=0, decoder_dist="bin")


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------ faithfulness
def test_parameter_count_configuration_a():
    """Configuration A has exactly 435,682 parameters, as the official implementation.

    Decomposition (Conv2D = weight + bias + one log-norm g per output channel; BN = 2·C; SE(C) hidden 4):
      stem        352 = 1→32 3×3 (288 + 32 + 32)
      pre      77,480 = normal cell 32 (2 res_bnswish 9,344 each + SE 292 = 18,980)
                        + down cell 32→64 (factorised reduce 4×544 + res_bnswish 18,624 + 37,120 + SE 580 = 58,500)
      enc     149,640 = 2 groups × normal_enc cell 64 (2 × 37,120 + SE 580 = 74,820)
      enc_comb  4,224 = 1 encoder combiner 1×1 64→64 (4,096 + 64 + 64)
      posterior 18,496 = 2 × (ELU + 3×3 64→16: 9,216 + 16 + 16)
      inject    1,184 = 2 × 3×3 conv 8→8 on z (576 + 8 + 8)
      dec_comb  9,472 = 2 × 1×1 (64+8)→64 (4,608 + 64 + 64)
      dec     122,248 = 2 groups × mconv_e6 cell 64 (BN 128 + 1×1 24,576 + BN 768 + dw5×5 9,600 + BN 768
                        + 1×1 24,576 + BN 128 = 60,544; + SE 580 = 61,124)
      post     35,912 = up cell 64→32 (bilinear skip 1×1 no bias 2,080 + mconv_e3 24,192 + SE 292 = 26,564)
                        + normal cell 32 (mconv_e3 9,056 + SE 292 = 9,348)
      head        290 = ELU + 3×3 32→1 (288 + 1 + 1)
      h0       16,384 = 64 × 16 × 16
    """
    torch.manual_seed(0)
    model = NVAE(**CONFIG_A)
    parts = {"stem": 352, "pre_process": 77_480, "enc_cells": 149_640, "enc_combiners": 4_224,
             "posteriors": 18_496, "z_injectors": 1_184, "dec_combiners": 9_472, "dec_cells": 122_248,
             "post_process": 35_912, "head": 290}
    for name, expected in parts.items():
        assert count(getattr(model, name)) == expected, name
    assert model.h0.numel() == 16_384
    assert count(model) == 435_682
    assert model.latent_shape == (16, 16, 16)


@pytest.mark.parametrize("changes, shape", [
    (dict(num_channels_enc=64, num_channels_dec=64, num_preprocess_blocks=2, num_postprocess_blocks=2,
          num_preprocess_cells=3, num_postprocess_cells=3, num_latent_per_group=20, channel_mult=(1, 2, 2)),
     (40, 8, 8)),                                                                      # MNIST, docs/algorithm.md §1.2
    (dict(num_channels_enc=64, num_channels_dec=64, num_cell_per_cond_enc=3, num_cell_per_cond_dec=3,
          num_groups_per_scale=3, num_latent_per_group=20), (60, 16, 16)),              # OMNIGLOT
])
def test_latent_shapes_of_spec_table(changes, shape):
    model = NVAE(**dict(CONFIG_A, **changes))
    assert model.latent_shape == shape
    with torch.no_grad():
        assert model.decode(torch.zeros(1, *shape)).shape == (1, 1, 32, 32)


# ------------------------------------------------------------------------------------------------ cells
def test_weight_normalised_conv():
    torch.manual_seed(0)
    conv = Conv2D(3, 5, 3, padding=1).double()
    v_norm = conv.weight.flatten(1).norm(dim=1)
    assert torch.allclose(conv.log_weight_norm, torch.log(v_norm + 1e-2))
    w = conv.normalized_weight()
    assert torch.allclose(w.flatten(1).norm(dim=1), torch.exp(conv.log_weight_norm) * v_norm / (v_norm + 1e-5))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert torch.allclose(conv(x), F.conv2d(x, w, conv.bias, padding=1))
    plain = Conv2D(3, 5, 1, bias=False, weight_norm=False)
    assert plain.log_weight_norm is None and plain.normalized_weight() is plain.weight


@pytest.mark.parametrize("op, stride, out_hw", [
    (lambda: BNSwishConv(8, 8, 1), 1, 8), (lambda: BNSwishConv(8, 16, 2), 2, 4),
    (lambda: BNSwishConv(8, 4, -1), -1, 16),
    (lambda: InvertedResidual(8, 8, 1, expansion=6), 1, 8), (lambda: InvertedResidual(8, 4, -1, expansion=6), -1, 16),
    (lambda: InvertedResidual(8, 8, 1, expansion=3), 1, 8), (lambda: InvertedResidual(8, 4, -1, expansion=3), -1, 16),
])
def test_op_shapes_and_finiteness(op, stride, out_hw):
    torch.manual_seed(0)
    layer = op()
    y = layer(torch.randn(3, 8, 8, 8))
    assert y.shape[-2:] == (out_hw, out_hw) and torch.isfinite(y).all()


@pytest.mark.parametrize("arch", ["res_bnswish", "res_mbconv"])
@pytest.mark.parametrize("role, c_out, hw", [("normal_pre", 8, 8), ("down_pre", 16, 4), ("normal_enc", 8, 8),
                                             ("down_enc", 16, 4), ("normal_dec", 8, 8), ("up_dec", 4, 16),
                                             ("normal_post", 8, 8), ("up_post", 4, 16)])
def test_cell_shapes_and_residual_form(arch, role, c_out, hw):
    torch.manual_seed(0)
    cell = make_cell(arch, role, 8, c_out)
    x = torch.randn(2, 8, 8, 8)
    y = cell(x)
    assert y.shape == (2, c_out, hw, hw) and torch.isfinite(y).all()
    branch = x
    for op in cell.ops:
        branch = op(branch)
    assert torch.allclose(y, cell.skip(x) + 0.1 * cell.se(branch), atol=1e-6)


def test_factorized_reduce_uses_four_phases():
    torch.manual_seed(0)
    fr = FactorizedReduce(3, 10).double()
    assert [c.out_channels for c in fr.convs] == [2, 2, 2, 4]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    s = F.silu(x)
    phases = [s[:, :, 0::2, 0::2], s[:, :, 1::2, 1::2], s[:, :, 0::2, 1::2], s[:, :, 1::2, 0::2]]
    expected = torch.cat([F.conv2d(p, c.normalized_weight(), c.bias) for p, c in zip(phases, fr.convs)], dim=1)
    assert torch.allclose(fr(x), expected)


def test_squeeze_excitation_closed_form():
    torch.manual_seed(0)
    se = SqueezeExcitation(32).double()
    assert se.fc1.out_features == 4 and SqueezeExcitation(128).fc1.out_features == 8
    x = torch.randn(2, 32, 5, 5, dtype=torch.float64)
    gate = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean(dim=(2, 3))))))
    assert torch.allclose(se(x), x * gate[:, :, None, None])


def test_residual_cell_rejects_bad_arguments():
    with pytest.raises(ValueError, match="stride"):
        ResidualCell(4, 4, ("res_bnswish",), stride=3)
    with pytest.raises(ValueError, match="arch_instance"):
        make_cell("res_foo", "normal_pre", 4, 4)


# ------------------------------------------------------------------------------------------------ flows
def _raster_order(h: int, w: int, c: int, mirror: bool) -> torch.Tensor:
    rows = torch.arange(h).view(1, h, 1).expand(c, h, w)
    cols = torch.arange(w).view(1, 1, w).expand(c, h, w)
    chans = torch.arange(c).view(c, 1, 1).expand(c, h, w)
    if mirror:
        rows, cols = h - 1 - rows, w - 1 - cols
    return ((rows * w + cols) * c + chans).flatten()


@pytest.mark.parametrize("mirror", [False, True])
def test_flow_cell_is_autoregressive(mirror):
    torch.manual_seed(0)
    num_latent, h, w = 2, 3, 4
    cell = ARCell(num_latent, mirror=mirror).double()
    z = torch.randn(1, num_latent, h, w, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: cell.shift(t).flatten(), z).reshape(z.numel(), z.numel())
    order = _raster_order(h, w, num_latent, mirror)
    later_or_same = order[None, :] >= order[:, None]            # input index i not strictly before output o
    assert jac[later_or_same].abs().max() == 0
    assert (jac[~later_or_same].abs() > 1e-8).float().mean() > 0.3   # the shift really uses the past
    full = torch.autograd.functional.jacobian(lambda t: cell(t)[0].flatten(), z).reshape(z.numel(), z.numel())
    assert torch.allclose(torch.diagonal(full), torch.ones(z.numel(), dtype=torch.float64))


def test_paired_flow_has_unit_determinant():
    torch.manual_seed(0)
    flow = PairedCellAR(2).double()
    z = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    out, log_det = flow(z)
    assert out.shape == z.shape and torch.count_nonzero(log_det) == 0
    jac = torch.autograd.functional.jacobian(lambda t: flow(t)[0].flatten(), z).reshape(18, 18)
    assert torch.linalg.slogdet(jac).logabsdet.abs() < 1e-10


def test_masks_and_masked_conv():
    mask = autoregressive_mask(2, 4, 3, 2, depthwise=False, zero_diag=True, mirror=False)
    assert mask[:, :, 0].sum() == 4 * 2 * 3 and mask[:, :, 2].sum() == 0 and mask[:, :, 1, 2].sum() == 0
    assert mask[:, :, 1, 1].tolist() == [[0, 0], [0, 0], [1, 0], [1, 0]]
    assert torch.equal(autoregressive_mask(2, 4, 3, 2, depthwise=False, zero_diag=True, mirror=True),
                       mask.flip(2, 3))
    conv = MaskedConv2D(2, 4, 3, 2, zero_diag=True, mirror=False)
    assert torch.equal(conv.normalized_weight() == 0, (mask == 0) | (conv.weight == 0))
    with pytest.raises(ValueError, match="multiple"):
        autoregressive_mask(3, 4, 3, 2, depthwise=False, zero_diag=True, mirror=False)


# ------------------------------------------------------------------------------------------------ distributions
def test_bernoulli_and_normal_match_torch_distributions():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    x = torch.randint(0, 2, (2, 1, 6, 6)).double() * 2 - 1
    ref = Bernoulli(logits=logits).log_prob((x + 1) / 2)
    assert torch.allclose(dist.bernoulli_log_prob(logits, x), ref)
    assert torch.allclose(dist.decoder_log_prob("bin", logits, x, crop=4), ref[..., 1:5, 1:5].sum(dim=(1, 2, 3)))
    assert torch.allclose(dist.decoder_mean("bin", logits, num_channels=1), 2 * torch.sigmoid(logits) - 1)

    params = 3 * torch.randn(2, 6, 5, 5, dtype=torch.float64)
    y = torch.rand(2, 3, 5, 5, dtype=torch.float64) * 2 - 1
    mu, log_sigma = (5 * torch.tanh(params / 5)).chunk(2, dim=1)
    ref = Normal(mu, log_sigma.exp()).log_prob(y)
    assert torch.allclose(dist.normal_decoder_log_prob(params, y), ref)
    assert torch.allclose(dist.decoder_log_prob("normal", params, y), ref.sum(dim=(1, 2, 3)))
    assert torch.allclose(dist.normal_log_prob(y, mu, log_sigma), ref)
    assert torch.allclose(dist.standard_normal_log_prob(y), Normal(0.0, 1.0).log_prob(y))


def _dml_params(num_channels: int, num_mix: int, zero_coeffs: bool = False) -> torch.Tensor:
    torch.manual_seed(1)
    n = dist.num_decoder_channels("dml", num_channels, num_mix)
    params = torch.randn(1, n, 1, 1, dtype=torch.float64)
    params[:, num_mix + num_channels * num_mix:num_mix + 2 * num_channels * num_mix] -= 1.0   # scales ~ 0.4
    if zero_coeffs:
        params[:, num_mix * (1 + 2 * num_channels):] = 0.0
    return params


def _levels(bits: int) -> torch.Tensor:
    k = 2 ** bits - 1
    return torch.arange(k + 1, dtype=torch.float64) / k * 2 - 1


def test_dml_sums_to_one_over_all_5bit_rgb_values():
    """Σ exp(log p) over the full 32³ grid of one RGB pixel = 1 (mixture + channel coefficients).

    Exact up to the density fallback of docs/algorithm.md §1.6 in bins of mass < 1e-5 (a deviation of ~5e-7 here).
    """
    num_mix = 3
    params = _dml_params(3, num_mix)
    v = _levels(5)
    grid = torch.stack(torch.meshgrid(v, v, v, indexing="ij"), dim=0).reshape(3, -1).T.reshape(-1, 3, 1, 1)
    log_p = dist.dml_log_prob(params.expand(grid.shape[0], -1, -1, -1), grid, num_bits=5, num_mix=num_mix)
    assert dist.num_decoder_channels("dml", 3, 10) == 100
    assert math.isclose(log_p.exp().sum().item(), 1.0, abs_tol=2e-6)


@pytest.mark.parametrize("bits", [8, 5])
def test_dml_sums_to_one_per_channel(bits):
    """8-bit (and 5-bit): a 1-channel mixture and each RGB channel with zero coefficients sum to 1."""
    v = _levels(bits).view(-1, 1, 1, 1)
    params = _dml_params(1, 4)
    log_p = dist.dml_log_prob(params.expand(v.shape[0], -1, -1, -1), v, num_bits=bits, num_mix=4)
    assert math.isclose(log_p.exp().sum().item(), 1.0, abs_tol=1e-6)
    params = _dml_params(3, 2, zero_coeffs=True)
    _, means, log_scales, coeffs = dist.dml_split(params, 3, 2)
    assert torch.count_nonzero(coeffs) == 0
    for c in range(3):
        mass = dist.discretized_logistic_log_prob(v.view(-1, 1), means[0, c, :, 0, 0], log_scales[0, c, :, 0, 0],
                                                  bits).exp().sum(dim=0)
        assert torch.allclose(mass, torch.ones(2, dtype=torch.float64), atol=1e-6)


def test_dml_mean_applies_coefficients_to_clamped_channels():
    params = torch.zeros(1, 10, 1, 1, dtype=torch.float64)   # M = 1, RGB
    params[0, 1:4, 0, 0] = torch.tensor([1.7, 0.2, -0.1])    # means R, G, B (R clamps to 1)
    params[0, 7:10, 0, 0] = torch.atanh(torch.tensor([0.5, -0.4, 0.3], dtype=torch.float64))
    mean = dist.decoder_mean("dml", params, num_channels=3, num_mix=1)[0, :, 0, 0]
    r = 1.0
    g = 0.2 + 0.5 * r
    b = -0.1 - 0.4 * r + 0.3 * g
    assert torch.allclose(mean, torch.tensor([r, g, b], dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ regularisation
class _Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Conv2D(4, 8, 3, padding=1)
        self.b = Conv2D(4, 8, 3, padding=1)          # same shape as a: batched together
        self.c = Conv2D(8, 3, 1)
        self.ar = MaskedConv2D(2, 12, 3, 2, zero_diag=True, mirror=False)
        self.plain = nn.Conv2d(3, 5, 3)
        self.bn = nn.BatchNorm2d(3)
        self.gn = nn.GroupNorm(2, 4)


def test_spectral_regularizer_matches_matrix_norm():
    torch.manual_seed(0)
    net = _Convs().double()
    assert SpectralRegularizer(net).num_layers == 4
    sr = SpectralRegularizer(net, include_plain_conv2d=True, generator=torch.Generator().manual_seed(0)).double()
    assert sr.num_layers == 5 and len(sr._groups) == 4
    for _ in range(10):
        loss = sr.loss()
    weights = [net.a.normalized_weight(), net.b.normalized_weight(), net.c.normalized_weight(),
               net.ar.normalized_weight(), net.plain.weight]
    exact = [torch.linalg.matrix_norm(w.flatten(1), 2) for w in weights]
    assert torch.allclose(loss, torch.stack(exact).sum(), rtol=1e-6)
    assert torch.allclose(sr.sigmas().sort().values, torch.stack(exact).detach().sort().values, rtol=1e-6)
    # dσ/dW = u vᵀ (top singular vectors) for a plain conv
    loss.backward()
    svd = torch.linalg.svd(net.plain.weight.detach().flatten(1))
    top = torch.outer(svd.U[:, 0], svd.Vh[0])
    assert torch.allclose(net.plain.weight.grad.flatten(1).abs(), top.abs(), atol=1e-5)
    # persistent state: a copy loaded from the state dict continues identically
    clone = SpectralRegularizer(net, include_plain_conv2d=True).double()
    clone.load_state_dict(sr.state_dict())
    assert int(clone.num_calls) == 10 and torch.equal(clone.loss(), sr.loss())


def test_spectral_regularizer_runs_40_then_4_iterations():
    torch.manual_seed(0)
    w = torch.randn(1, 1, 30, 30, dtype=torch.float64)
    conv = nn.Conv2d(1, 30, (30, 1), bias=False).double()
    conv.weight.data = w.reshape(30, 1, 30, 1)
    sr = SpectralRegularizer(nn.Sequential(conv), include_plain_conv2d=True).double()
    u0, v0 = sr.u_0.clone(), sr.v_0.clone()
    sr.loss()
    mat = conv.weight.detach().reshape(30, 30)
    u, v = u0, v0
    for _ in range(40):
        v = F.normalize(u @ mat, dim=1, eps=1e-3)
        u = F.normalize(v @ mat.T, dim=1, eps=1e-3)
    assert torch.allclose(sr.u_0, u) and torch.allclose(sr.v_0, v)
    for _ in range(4):
        v = F.normalize(u @ mat, dim=1, eps=1e-3)
        u = F.normalize(v @ mat.T, dim=1, eps=1e-3)
    sr.loss()
    assert torch.allclose(sr.u_0, u) and torch.allclose(sr.v_0, v)


def test_bn_loss_is_sum_of_max_abs_gamma():
    net = _Convs()
    with torch.no_grad():
        net.bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
        net.gn.weight.copy_(torch.tensor([0.1, 0.3, -0.7, 0.2]))
    assert torch.isclose(bn_loss(net), torch.tensor(2.7))


def test_kl_coeff_schedule():
    kw = dict(total_steps=1000, anneal_portion=0.5, const_portion=0.1, min_coeff=1e-4, max_coeff=0.7)
    assert kl_coeff(0, **kw) == 1e-4 and kl_coeff(100, **kw) == 1e-4
    assert math.isclose(kl_coeff(350, **kw), 1e-4 + (0.7 - 1e-4) * 250 / 500)
    assert kl_coeff(600, **kw) == 0.7 and kl_coeff(10_000, **kw) == 0.7
    with pytest.raises(ValueError, match="anneal_portion"):
        kl_coeff(0, 10, 0.0, 0.0, 1e-4, 1.0)


def test_kl_balancer_properties():
    torch.manual_seed(0)
    kl = (torch.rand(16, 4, dtype=torch.float64) * torch.tensor([1.0, 5.0, 20.0, 2.0])).requires_grad_()
    out, kappa, vals = kl_balancer(kl, 0.5, [4])
    a = kl.detach().abs().mean(0) + 0.01
    assert torch.isclose(kappa.mean(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(kappa, a / a.mean())                       # one scale: κ ∝ a_l
    assert torch.allclose(vals, kl.detach().mean(0))
    out.sum().backward()
    assert torch.allclose(kl.grad, 0.5 * kappa.expand(16, 4))         # κ are constants
    off, kappa_off, _ = kl_balancer(list(kl.detach().unbind(1)), 1.0, [4])
    assert torch.equal(kappa_off, torch.ones(4, dtype=torch.float64))
    assert torch.allclose(off, kl.detach().sum(1))
    assert kl_balance_alpha([8, 8, 8]).tolist() == [1.0] * 8 + [4.0] * 8 + [16.0] * 8
    _, kappa2, _ = kl_balancer(kl.detach(), 0.5, [2, 2])
    alpha = torch.tensor([1.0, 1.0, 4.0, 4.0], dtype=torch.float64)
    assert torch.allclose(kappa2, (a / alpha) / (a / alpha).mean())


# ------------------------------------------------------------------------------------------------ full model
def _binary(shape):
    return torch.randint(0, 2, shape).float() * 2 - 1


def test_tiny_nvae_forward_backward():
    torch.manual_seed(0)
    model = NVAE(**DIGITS)
    x = _binary((4, 1, 8, 8))
    out = model(x)
    assert out.decoder_params.shape == (4, 1, 8, 8) and out.z0_top.shape == (4, *model.latent_shape) == (4, 8, 4, 4)
    assert out.top_group_count == 2 and len(out.log_q) == len(out.kl_per_group) == 2
    for q, p, k, z in zip(out.log_q, out.log_p_normal, out.kl_per_group, out.z_groups):
        assert q.shape == p.shape == (4, 4, 4, 4) and k.shape == (4,)
        assert torch.allclose(k, (q - p).sum(dim=(1, 2, 3)))
        assert torch.allclose(p, Normal(0.0, 1.0).log_prob(z))
    assert torch.equal(out.z0_top, torch.cat(out.z_groups, dim=1))
    recon = model.decoder_log_prob(out.decoder_params, x)
    loss = (-recon + sum(out.kl_per_group)).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # stage 2 back-propagates a prior term on z0_top into the encoder only through z0_top
    model.zero_grad()
    out = model(x)
    out.z0_top.pow(2).sum().backward()
    assert model.stem.weight.grad.abs().sum() > 0 and model.posteriors[1][1].weight.grad.abs().sum() > 0
    assert model.head[1].weight.grad is None
    # one latent scale: decoding the posterior sample reproduces the forward pass (eval-mode BN)
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert torch.allclose(model.decode(out.z0_top), out.decoder_params, atol=1e-5)
        image = model.decoder_mean(out.decoder_params)
    assert image.shape == x.shape and image.abs().max() <= 1


def test_nvae_res_bnswish_dml_flows_input_skip():
    torch.manual_seed(0)
    cfg = dict(DIGITS, in_channels=3, arch_instance="res_bnswish", num_latent_scales=2, channel_mult=(1, 2, 2),
               num_nf=1, decoder_dist="dml", num_mix_output=3, progressive_input="input_skip", num_x_bits=5)
    model = NVAE(**cfg)
    x = (torch.randint(0, 32, (3, 3, 8, 8)) / 31.0) * 2 - 1
    out = model(x)
    assert out.decoder_params.shape == (3, 30, 8, 8) and out.top_group_count == 2
    assert out.z0_top.shape == (3, 8, 2, 2) and [z.shape[-1] for z in out.z_groups] == [2, 2, 4, 4]
    recon = model.decoder_log_prob(out.decoder_params, x)
    assert recon.shape == (3,) and (recon < 0).all()
    (-recon + sum(out.kl_per_group)).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.eval()
    with torch.no_grad():
        z = torch.randn(2, *model.latent_shape)
        a = model.decode(z, temperature_rest=0.8, generator=torch.Generator().manual_seed(3))
        b = model.decode(z, temperature_rest=0.8, generator=torch.Generator().manual_seed(3))
        c = model.decode(z, temperature_rest=0.8, generator=torch.Generator().manual_seed(4))
        image = model.decoder_mean(a)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert image.shape == (2, 3, 8, 8) and image.abs().max() <= 1


@pytest.mark.parametrize("change, match", [
    (dict(channel_mult=(1, 2, 2)), "channel_mult"), (dict(arch_instance="res_elu"), "arch_instance"),
    (dict(decoder_dist="gauss"), "decoder_dist"), (dict(image_size=7), "image_size"),
    (dict(num_postprocess_blocks=2), "num_postprocess_blocks"), (dict(progressive_input="skip"), "progressive_input"),
    (dict(crop_output=9), "crop_output"), (dict(num_latent_per_group=0), "num_latent_per_group"),
])
def test_nvae_rejects_bad_configuration(change, match):
    with pytest.raises(ValueError, match=match):
        NVAE(**dict(DIGITS, **change))


def test_nvae_rejects_bad_input_shapes():
    model = NVAE(**DIGITS)
    with pytest.raises(ValueError, match="x has shape"):
        model(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="z_top has shape"):
        model.decode(torch.zeros(2, 4, 4, 4))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_nvae_on_device_under_bf16_autocast(device):
    torch.manual_seed(0)
    model = NVAE(**dict(DIGITS, num_nf=1))
    regularizer = SpectralRegularizer(model)           # built on CPU, used after the model moved
    model.to(device)
    x = _binary((2, 1, 8, 8)).to(device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = model(x)
        recon = model.decoder_log_prob(out.decoder_params.float(), x)
    loss = (-recon + sum(out.kl_per_group)).mean() + 1e-2 * (regularizer.loss() + bn_loss(model))
    loss.backward()
    assert torch.isfinite(loss) and out.z0_top.device.type == device
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
