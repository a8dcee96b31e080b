"""Tests of the NCSN++ score network (docs/algorithm.md §5), its layers and the pure-PyTorch upfirdn2d."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lsgm.nets import AttnBlock, NCSNpp, ResBlockBigGAN
from lsgm.nets.layers import NIN, make_conv, make_group_norm, timestep_embedding, variance_scaling_
from lsgm.nets.upfirdn import (
    fir_downsample_2d,
    fir_kernel,
    fir_upsample_2d,
    naive_downsample_2d,
    naive_upsample_2d,
    upfirdn2d,
)

torch.set_num_threads(1)

CONFIG_A = dict(in_channels=16, image_size=16, nf=64, num_scales=2, num_res_blocks=2, channel_mult=(1, 1),
                dropout=0.2, fir=False)


def _small(**overrides) -> NCSNpp:
    cfg = dict(in_channels=4, image_size=16, nf=16, num_scales=2, num_res_blocks=1, channel_mult=(1, 2),
               dropout=0.1, fir=False)
    cfg.update(overrides)
    return NCSNpp(**cfg)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Faithfulness: parameter count at configuration A
# ----------------------------------------------------------------------------------------------------------------


def test_parameter_count_configuration_a():
    """Configuration A (issue 4): NCSN++ nf 64, 2 resolutions (16, 8), 2 res blocks, channel_mult (1, 1),
    dropout 0.2, no FIR, 16 latent channels of 16×16. Official total: 2,191,456 = 2,191,440 (NCSN++) + 16 (the
    mixing logits ℓ, shape (1, 16, 1, 1), docs/algorithm.md §3.2, held here by ``MixedScore``).

    Decomposition (temb width T = 4 · 128 = 512 — the fixed 512 of docs/algorithm.md §5, not 4 · nf; C = 64):
      time MLP   Linear(128→512) + Linear(512→512)          = 66,048 + 262,656           = 328,704
      conv_in    3×3, 16→64                                                              =   9,280
      ResBlock 64→64   GN 128 + conv 36,928 + Dense(512→64) 32,832 + GN 128 + conv 36,928 = 106,944
      ResBlock 64→64 up/down: + 1×1 shortcut 4,160                                       = 111,104
      ResBlock 128→64 (skip concat): GN 256 + conv 73,792 + 32,832 + GN 128 + 36,928
                                     + 1×1 shortcut 8,256                                = 152,192
      Attention 64: GN 128 + 4 NIN × 4,160                                               =  16,768
      down level 16×16: 2 × (106,944 + 16,768) + down block 111,104                      = 358,528
      down level 8×8:   2 × 106,944                                                      = 213,888
      middle: 2 × 106,944 + 16,768                                                       = 230,656
      up level 8×8:     3 × 152,192 + up block 111,104                                   = 567,680
      up level 16×16:   3 × 152,192 + attention 16,768                                   = 473,344
      output: GN 128 + 3×3 conv 64→16 9,232                                              =   9,360
      total NCSN++                                                                       = 2,191,440
    """
    from lsgm.score import MixedScore
    from lsgm.sde import VPSDE

    net = NCSNpp(**CONFIG_A)
    parts = {
        "time": _numel(net.temb_dense_0) + _numel(net.temb_dense_1),
        "conv_in": _numel(net.conv_in),
        "down16": _numel(net.down[0]),
        "down8": _numel(net.down[1]),
        "middle": _numel(net.mid_block_0) + _numel(net.mid_attn) + _numel(net.mid_block_1),
        "up8": _numel(net.up[0]),
        "up16": _numel(net.up[1]),
        "out": _numel(net.norm_out) + _numel(net.conv_out),
    }
    assert parts == {"time": 328_704, "conv_in": 9_280, "down16": 358_528, "down8": 213_888, "middle": 230_656,
                     "up8": 567_680, "up16": 473_344, "out": 9_360}
    assert _numel(net) == sum(parts.values()) == 2_191_440
    assert _numel(MixedScore(net, VPSDE(), num_channels=16)) == 2_191_456


def test_regulariser_view_configuration_a():
    """docs/algorithm.md §1.7: the spectral term finds exactly the nn.Conv2d layers; NIN/resamplers are not convs; every
    normalisation is a GroupNorm (max|γ| term). Config A: 14 res blocks × 2 convs + 8 shortcuts + in/out = 38 convs;
    14 × 2 + 4 attention + 1 output = 33 GroupNorms; 4 attention blocks × 4 NIN."""
    net = NCSNpp(**CONFIG_A)
    modules = list(net.modules())
    assert sum(isinstance(m, ResBlockBigGAN) for m in modules) == 14
    assert sum(isinstance(m, AttnBlock) for m in modules) == 4
    assert sum(isinstance(m, nn.Conv2d) for m in modules) == 38
    assert sum(isinstance(m, nn.GroupNorm) for m in modules) == 33
    nins = [m for m in modules if isinstance(m, NIN)]
    assert len(nins) == 16 and not any(isinstance(m, nn.Conv2d) for m in nins)
    assert all(m.eps == 1e-6 and m.num_groups == 16 for m in modules if isinstance(m, nn.GroupNorm)
               and m.num_channels == 64)
    # every parameter belongs to a Conv2d, GroupNorm, Linear or NIN
    owned = sum(_numel(m) for m in modules if isinstance(m, (nn.Conv2d, nn.GroupNorm, nn.Linear, NIN)))
    assert owned == _numel(net)


# ----------------------------------------------------------------------------------------------------------------
# Forward pass
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, n_attn",
    [
        (dict(image_size=8, num_scales=2, channel_mult=(1, 1)), 1),  # MNIST-like: middle attention only
        (dict(image_size=16, num_scales=2, channel_mult=(1, 1), num_res_blocks=2), 4),  # 2 down + mid + 1 up
        (dict(image_size=16, num_scales=2, channel_mult=(1, 2), fir=True), 3),
        (dict(image_size=16, num_scales=3, channel_mult=(1, 1, 1), fir=True), 3),
        (dict(image_size=32, num_scales=4, channel_mult=(1, 2, 2, 2), fir=False), 3),  # attention on level 1
        (dict(image_size=32, num_scales=4, channel_mult=(1, 2, 2, 2), fir=True, attn_resolutions=()), 1),
    ],
)
def test_forward_shape_and_finiteness(cfg, n_attn):
    torch.manual_seed(0)
    net = _small(**cfg)
    assert sum(isinstance(m, AttnBlock) for m in net.modules()) == n_attn
    s = cfg["image_size"]
    x, t = torch.randn(3, 4, s, s), torch.rand(3)
    out = net(x, t)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()


def test_output_near_zero_at_init_and_gradients_reach_every_parameter():
    torch.manual_seed(1)
    net = _small(fir=True, num_res_blocks=2).double()
    x, t = torch.randn(2, 4, 16, 16, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    out = net(x, t)
    assert out.abs().max() < 1e-3  # output conv initialised with scale 1e-10
    (out * torch.randn_like(out)).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_zero_initialised_layers():
    """docs/algorithm.md §5: Conv_1 of each block, the output conv and attention out are ~0 (variance 1e-10 / fan_avg)."""
    net = NCSNpp(**CONFIG_A)
    for m in net.modules():
        if isinstance(m, ResBlockBigGAN):
            fan_avg = 64 * 9
            assert m.conv_1.weight.abs().max() <= math.sqrt(3e-10 / fan_avg)
            assert m.conv_0.weight.abs().max() > 1e-3
        if isinstance(m, AttnBlock):
            assert m.out.weight.abs().max() <= math.sqrt(3e-10 / 64)
    assert net.conv_out.weight.abs().max() <= math.sqrt(3e-10 / ((64 + 16) * 9 / 2))
    biases = [m.bias for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear, NIN))]
    assert all(torch.equal(b, torch.zeros_like(b)) for b in biases)


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout():
    torch.manual_seed(2)
    net = _small(dropout=0.5).double()
    x, t = torch.randn(2, 4, 16, 16, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    net.eval()
    assert torch.equal(net(x, t), net(x, t))
    net.train()
    assert not torch.equal(net(x, t), net(x, t))


def test_float64_and_batch_independence():
    """Works in float64 on CPU; in eval mode each example's output depends only on its own (x, t)."""
    torch.manual_seed(3)
    net = _small(fir=True).double().eval()
    x, t = torch.randn(3, 4, 16, 16, dtype=torch.float64), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    out = net(x, t)
    assert out.dtype == torch.float64
    assert torch.allclose(out[1:2], net(x[1:2], t[1:2]), rtol=0, atol=1e-15)
    assert torch.allclose(net(x, torch.tensor(0.5, dtype=torch.float64)), net(x, t.fill_(0.5)), atol=0)


def test_time_embedding_matches_closed_form_and_runs_in_fp32_under_autocast():
    t = torch.tensor([0.0, 0.01, 0.37, 1.0], dtype=torch.float64)
    emb = timestep_embedding(t, 128, 1000.0)
    assert emb.shape == (4, 128)
    for i, ti in enumerate(t.tolist()):
        for k in (0, 1, 17, 63):
            f_k = math.exp(-k * math.log(10000.0) / 63)
            assert emb[i, k].item() == pytest.approx(math.sin(1000.0 * ti * f_k), abs=1e-12)
            assert emb[i, 64 + k].item() == pytest.approx(math.cos(1000.0 * ti * f_k), abs=1e-12)
    net = _small().double()
    expected = net.temb_dense_1(F.silu(net.temb_dense_0(emb)))
    assert torch.allclose(net.time_embedding(t), expected, atol=0)
    net32 = _small()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        temb = net32.time_embedding(t.float())
        out = net32(torch.randn(4, 4, 16, 16), t.float())
    assert temb.dtype == torch.float32 and temb.shape == (4, 512)
    assert torch.isfinite(out.float()).all()


def test_attention_matches_scaled_dot_product_attention():
    torch.manual_seed(4)
    block = AttnBlock(8).double()
    with torch.no_grad():
        block.out.weight.copy_(torch.eye(8, dtype=torch.float64))
        block.q.bias.normal_()
        block.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    h = block.norm(x)

    def seq(nin: NIN) -> torch.Tensor:  # (B, 1, HW, C): one head, HW tokens
        return nin(h).flatten(2).transpose(1, 2)[:, None]

    o = F.scaled_dot_product_attention(seq(block.q), seq(block.k), seq(block.v))[:, 0].transpose(1, 2)
    expected = (x + o.reshape(2, 8, 4, 4) + block.out.bias[None, :, None, None]) / math.sqrt(2)
    assert torch.allclose(block(x), expected, atol=1e-12)


@pytest.mark.parametrize("resample, in_ch, out_ch, has_shortcut, size", [
    (None, 8, 8, False, 8), (None, 8, 16, True, 8), ("up", 8, 8, True, 16), ("down", 8, 8, True, 4),
])
def test_resblock_shortcut_and_resampling(resample, in_ch, out_ch, has_shortcut, size):
    for fir in (False, True):
        blk = ResBlockBigGAN(in_ch, out_ch, temb_dim=12, dropout=0.0, resample=resample, fir=fir).double()
        assert (blk.shortcut is not None) == has_shortcut
        x = torch.randn(2, in_ch, 8, 8, dtype=torch.float64)
        out = blk(x, torch.randn(2, 12, dtype=torch.float64))
        assert out.shape == (2, out_ch, size, size)
        if not has_shortcut:  # Conv_1 ~0 at init: the block is x / √2 up to ~1e-5
            assert torch.allclose(out, x / math.sqrt(2), atol=1e-3)


@pytest.mark.parametrize("kwargs, name", [
    (dict(in_channels=0), "in_channels"),
    (dict(nf=2.5), "nf"),
    (dict(num_scales=0), "num_scales"),
    (dict(channel_mult=(1,)), "channel_mult"),
    (dict(channel_mult=(1, 0)), "channel_mult"),
    (dict(image_size=10, num_scales=3, channel_mult=(1, 1, 1)), "image_size"),
    (dict(dropout=1.0), "dropout"),
    (dict(fir=1), "fir"),
    (dict(embedding_scale=0.0), "embedding_scale"),
    (dict(embedding_dim=127), "embedding_dim"),
    (dict(num_res_blocks=True), "num_res_blocks"),
    (dict(attn_resolutions=16), "attn_resolutions"),
])
def test_bad_config_raises_clear_value_error(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _small(**kwargs)


def test_bad_inputs_raise():
    net = _small()
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(2, 3, 16, 16), torch.rand(2))
    with pytest.raises(ValueError, match="t must have shape"):
        net(torch.randn(2, 4, 16, 16), torch.rand(3))


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------


def test_variance_scaling_fan_avg_uniform():
    torch.manual_seed(5)
    w = variance_scaling_(torch.empty(64, 32, 3, 3, dtype=torch.float64), scale=2.0)
    fan_avg = (32 * 9 + 64 * 9) / 2
    bound = math.sqrt(3 * 2.0 / fan_avg)
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    assert w.var().item() == pytest.approx(2.0 / fan_avg, rel=0.05)  # 18k samples: s.e. of var ≈ 0.6 %
    conv = make_conv(3, 5, 1)
    assert torch.equal(conv.bias, torch.zeros(5)) and conv.padding == (0, 0)
    with pytest.raises(ValueError, match="scale"):
        variance_scaling_(torch.empty(2, 2), -1.0)


def test_group_norm_helper():
    for c, groups in [(4, 1), (16, 4), (64, 16), (128, 32), (512, 32)]:
        gn = make_group_norm(c)
        assert gn.num_groups == groups and gn.eps == 1e-6
    with pytest.raises(ValueError, match="channels"):
        make_group_norm(13)  # 13 // 4 = 3 groups do not divide 13


# ----------------------------------------------------------------------------------------------------------------
# upfirdn2d
# ----------------------------------------------------------------------------------------------------------------


def test_fir_kernel_is_normalised_outer_product():
    k = fir_kernel(dtype=torch.float64)
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)
    assert torch.allclose(k, torch.outer(taps, taps) / 64, atol=0)
    assert k.sum().item() == pytest.approx(1.0, abs=1e-15)
    assert fir_kernel(gain=4.0, dtype=torch.float64).sum().item() == pytest.approx(4.0, abs=1e-14)


def test_upfirdn2d_is_a_true_convolution():
    """A unit impulse through a full convolution returns the (unflipped) kernel."""
    kernel = torch.tensor([[1.0, 2.0, 5.0], [3.0, 7.0, 11.0], [13.0, 17.0, 19.0]], dtype=torch.float64)
    delta = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    out = upfirdn2d(delta, kernel, pad=(2, 2))
    assert torch.equal(out[0, 0], kernel)


def test_fir_resampling_of_constant_is_constant_away_from_borders():
    x = torch.full((1, 2, 16, 16), 3.5, dtype=torch.float64)
    down, up = fir_downsample_2d(x), fir_upsample_2d(x)
    assert down.shape == (1, 2, 8, 8) and up.shape == (1, 2, 32, 32)
    assert torch.allclose(down[..., 1:-1, 1:-1], x[..., :6, :6], atol=1e-13)
    assert torch.allclose(up[..., 2:-2, 2:-2], torch.full_like(up[..., 2:-2, 2:-2], 3.5), atol=1e-13)


def test_fir_resampling_of_a_cosine_matches_its_frequency_response():
    """1-D response of [1,3,3,1]/8 is cos³(ω/2). Downsampling cos(ωn+φ) gives cos³(ω/2)·cos(ω(2m+½)+φ);
    up then down gives (cos⁶(ω/4) + sin⁶(ω/4))·cos(ωn+φ) (baseband plus the aliased image), exactly."""
    n, omega, phi = 32, 2 * math.pi / 16, 0.3
    idx = torch.arange(n, dtype=torch.float64)
    x = torch.cos(omega * idx + phi).expand(1, 1, n, n).contiguous()
    down = fir_downsample_2d(x)
    m = torch.arange(n // 2, dtype=torch.float64)
    expected = math.cos(omega / 2) ** 3 * torch.cos(omega * (2 * m + 0.5) + phi)
    assert torch.allclose(down[..., 2:-2, 2:-2], expected[2:-2].expand(12, 12), atol=1e-12)
    roundtrip = fir_downsample_2d(fir_upsample_2d(x))
    gain = math.cos(omega / 4) ** 6 + math.sin(omega / 4) ** 6
    assert torch.allclose(roundtrip[..., 4:-4, 4:-4], gain * x[..., 4:-4, 4:-4], atol=1e-12)
    assert (roundtrip - x)[..., 4:-4, 4:-4].abs().max() < 0.03  # low-frequency content preserved


def test_naive_resampling_matches_torch():
    torch.manual_seed(6)
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64)
    assert torch.equal(naive_upsample_2d(x), F.interpolate(x, scale_factor=2, mode="nearest"))
    assert torch.allclose(naive_downsample_2d(x), F.avg_pool2d(x, 2), atol=1e-15)
    with pytest.raises(ValueError, match="divisible"):
        naive_downsample_2d(torch.randn(1, 1, 5, 4))
    with pytest.raises(ValueError, match="factor"):
        naive_upsample_2d(x, factor=0)


def test_attention_block_and_nin_equal_the_explicit_formulas():
    """AttnBlock (fused scaled_dot_product_attention) and NIN (1x1 conv) compute docs/algorithm.md §5's formulas (float64)."""
    torch.manual_seed(0)
    blk = AttnBlock(8).double()
    for m in (blk.q, blk.k, blk.v, blk.out):  # non-trivial weights (out is ~0 at init)
        torch.nn.init.normal_(m.weight, std=0.3)
        torch.nn.init.normal_(m.bias, std=0.1)
    x = torch.randn(3, 8, 5, 4, dtype=torch.float64)

    def nin(m, t):
        return torch.einsum("oi,bihw->bohw", m.weight, t) + m.bias[None, :, None, None]

    h = blk.norm(x)
    q, k, v = (nin(m, h).reshape(3, 8, 20) for m in (blk.q, blk.k, blk.v))
    w = torch.softmax(torch.einsum("bcq,bck->bqk", q, k) / math.sqrt(8), dim=-1)
    o = torch.einsum("bqk,bck->bcq", w, v).reshape(3, 8, 5, 4)
    expected = (x + nin(blk.out, o)) / math.sqrt(2.0)
    torch.testing.assert_close(blk(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blk.q(x), nin(blk.q, x), rtol=1e-12, atol=1e-12)
