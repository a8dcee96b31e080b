"""Fast paths of issue 7 that claim to be exact: same losses and gradients with and without them.

* ``LSGMObjective.joint(..., single_pass=True)``: one B-sized SGM evaluation on the attached ``z_t`` instead of the
  2B concatenated batch ``[z_t(z0.detach()), z_t(z0)]``, with the q loss back-propagated into the VAE parameters
  only and the p loss into the SGM parameters only (the loss object's ``backward_terms``, which the engine runs).
* ``joint(..., single_pass=True, ce_coeff=β)``: ONE unrestricted backward, q's cross-entropy gradient reaching
  the encoder through p's graph rescaled per sample at ``z_t`` (``single_backward_joint``).
* ``foreach=True`` for the Adam/Adamax optimisers of ``lsgm.train``; fused Adam (``engine.fused_optimizer``).
* The routing itself: :meth:`lsgm.objectives.JointLoss.backward_terms` (the loss object owns its backward).
* The engine's per-step timing hook (``TrainLoop.step_seconds`` → ``metrics.json`` ``step_seconds``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lsgm.objectives import LSGMObjective
from lsgm.sde import VPSDE
from lsgm.engine import step_time_stats

torch.set_num_threads(1)


class TinyEncoder(nn.Module):
    """x (B,1,8,8) -> z0 (B,2,4,4): a stand-in for the VAE's encoder path to z0 (float64)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, stride=2, padding=1, dtype=torch.float64)

    def forward(self, x):
        return torch.tanh(self.conv(x))


class TinyEps(nn.Module):
    """eps_fn(z_t, t): per-sample conv net with a time embedding; no batch interaction, no dropout."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1, dtype=torch.float64)
        self.emb = nn.Linear(1, 6, dtype=torch.float64)
        self.c2 = nn.Conv2d(6, 2, 3, padding=1, dtype=torch.float64)

    def forward(self, z, t):
        h = torch.nn.functional.silu(self.c1(z) + self.emb(t[:, None].to(z.dtype))[:, :, None, None])
        return self.c2(h)


def _grads_of_joint_step(objective: LSGMObjective, single_pass: bool, seed: int = 3, one_backward: bool = False,
                         beta: float = 0.7):
    """Losses and gradients of one joint step, routed by the loss object's own backward plan (as lsgm.train runs it)."""
    torch.manual_seed(0)
    enc, eps_net = TinyEncoder(), TinyEps()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(seed)
    z0 = enc(x)
    jl = objective.joint(eps_net, z0, gen, single_pass=single_pass, ce_coeff=beta if one_backward else None)
    recon = z0.flatten(1).square().sum(1)  # a VAE-side term through z0
    q_loss = (recon + beta * jl.ce_elem.flatten(1).sum(1)).mean()
    p_loss = jl.p_obj.mean()
    vae_params, prior_params = list(enc.parameters()), list(eps_net.parameters())
    plan = jl.backward_terms(q_loss, p_loss, vae_params, prior_params)
    if objective.same_objective:
        assert len(plan) == 1 and plan[0].inputs is None and plan[0].loss is q_loss
    elif one_backward:
        assert len(plan) == 1 and plan[0].inputs is None and not jl.ce_elem.requires_grad
    else:
        assert [len(b.inputs) for b in plan] == [len(vae_params), len(prior_params)]
    for term in plan:
        term.loss.backward(inputs=term.inputs, retain_graph=term.retain_graph)
    return (jl.p_obj.detach(), jl.ce_elem.detach(), [p.grad.clone() for p in vae_params],
            [p.grad.clone() for p in prior_params])


@pytest.mark.parametrize("iw_sample_p", ["drop_all_iw", "drop_all_uniform", "rescale_iw", "drop_sigma2t_iw"])
@pytest.mark.parametrize("concat_forward", [True, False])
def test_single_pass_joint_gives_the_2b_paths_losses_and_gradients(iw_sample_p, concat_forward):
    obj = LSGMObjective(VPSDE(0.1, 20.0), iw_sample_p, "reweight_p_samples", time_eps=1e-2,
                        concat_forward=concat_forward)
    assert not obj.same_objective
    p2, ce2, gv2, gp2 = _grads_of_joint_step(obj, single_pass=False)
    p1, ce1, gv1, gp1 = _grads_of_joint_step(obj, single_pass=True)
    torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce1, ce2, rtol=1e-12, atol=1e-12)
    for a, b in zip(gv1 + gp1, gv2 + gp2):
        assert a.abs().max() > 0  # both routes really carry gradient
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("iw_sample_p", ["drop_all_iw", "drop_all_uniform", "rescale_iw", "drop_sigma2t_iw",
                                         "drop_sigma2t_uniform"])
@pytest.mark.parametrize("beta", [0.7, 1.0, 1e-4])
def test_one_backward_joint_gives_the_2b_paths_losses_and_gradients(iw_sample_p, beta):
    """ce_coeff=β: one unrestricted backward of q_loss + p_loss == the 2B path's restricted pair of backwards."""
    obj = LSGMObjective(VPSDE(0.1, 20.0), iw_sample_p, "reweight_p_samples", time_eps=1e-2)
    p2, ce2, gv2, gp2 = _grads_of_joint_step(obj, single_pass=False, beta=beta)
    p1, ce1, gv1, gp1 = _grads_of_joint_step(obj, single_pass=True, one_backward=True, beta=beta)
    torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce1, ce2, rtol=1e-12, atol=1e-12)
    for a, b in zip(gv1 + gp1, gv2 + gp2):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_one_backward_scales_the_encoder_gradient_by_beta_w_ll_over_w_p():
    """Without the per-sample rescaling the encoder would get p's weighting: the rescaling is what makes it q's."""
    obj = LSGMObjective(VPSDE(0.1, 20.0), "drop_all_iw", "reweight_p_samples", time_eps=1e-2)
    _, _, gv_ref, _ = _grads_of_joint_step(obj, single_pass=False, beta=0.5)
    _, _, gv_one, _ = _grads_of_joint_step(obj, single_pass=True, one_backward=True, beta=0.5)
    _, _, gv_bad, _ = _grads_of_joint_step(obj, single_pass=True, one_backward=True, beta=0.25)
    torch.testing.assert_close(gv_one[0], gv_ref[0], rtol=1e-10, atol=1e-14)
    assert not torch.allclose(gv_bad[0], gv_ref[0], rtol=1e-3)


def test_one_backward_with_a_zero_weight_sample_matches_and_stays_finite():
    """Where g² = 0 both weights vanish (w_p = w_ll = 0): the per-sample ratio is 0, no NaN, same gradients."""
    obj = LSGMObjective(VPSDE(0.1, 20.0), "drop_sigma2t_uniform", "reweight_p_samples", time_eps=1e-2)
    real = obj.sample_t

    def first_sample_weightless(mode, batch, like, generator):
        ts = real(mode, batch, like, generator)
        keep = torch.ones_like(ts.weight_p)
        keep[0] = 0.0
        return ts._replace(weight_p=ts.weight_p * keep, weight_ll=ts.weight_ll * keep)

    obj.sample_t = first_sample_weightless
    p2, ce2, gv2, gp2 = _grads_of_joint_step(obj, single_pass=False)
    p1, ce1, gv1, gp1 = _grads_of_joint_step(obj, single_pass=True, one_backward=True)
    assert p1[0] == 0
    for a, b in zip([p1, ce1, *gv1, *gp1], [p2, ce2, *gv2, *gp2]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_ce_coeff_needs_single_pass():
    obj = LSGMObjective(VPSDE(0.1, 20.0), "drop_all_iw", "reweight_p_samples", time_eps=1e-2)
    with pytest.raises(ValueError, match="ce_coeff .* needs single_pass=True"):
        obj.joint(TinyEps(), torch.randn(2, 2, 4, 4, dtype=torch.float64), ce_coeff=1.0)


def test_single_pass_without_restricted_backward_would_differ():
    """The exactness needs the caller's ``inputs=`` routing: an unrestricted p backward reaches the encoder."""
    obj = LSGMObjective(VPSDE(0.1, 20.0), "drop_all_iw", "reweight_p_samples", time_eps=1e-2)
    torch.manual_seed(0)
    enc, eps_net = TinyEncoder(), TinyEps()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    for single_pass, expect_zero in ((False, True), (True, False)):
        enc.zero_grad(set_to_none=True)
        jl = obj.joint(eps_net, enc(x), torch.Generator().manual_seed(0), single_pass=single_pass)
        jl.p_obj.mean().backward()
        encoder_grad = enc.conv.weight.grad
        assert (encoder_grad is None or encoder_grad.abs().max() == 0) == expect_zero


def test_single_pass_is_one_sgm_call_of_size_b():
    obj = LSGMObjective(VPSDE(0.1, 20.0), "drop_all_iw", "reweight_p_samples", time_eps=1e-2)
    sizes = []
    net = TinyEps()

    def counting(z, t):
        sizes.append(z.shape[0])
        return net(z, t)

    z0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    obj.joint(counting, z0, torch.Generator().manual_seed(0), single_pass=False)
    obj.joint(counting, z0, torch.Generator().manual_seed(0), single_pass=True)
    assert sizes == [6, 3]


def test_single_pass_with_the_same_objective_is_unchanged():
    obj = LSGMObjective(VPSDE(0.1, 20.0), "ll_iw", "reweight_p_samples", time_eps=1e-2)
    assert obj.same_objective
    a = _grads_of_joint_step(obj, single_pass=False)
    b = _grads_of_joint_step(obj, single_pass=True)
    for x, y in zip([a[0], a[1], *a[2], *a[3]], [b[0], b[1], *b[2], *b[3]]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("iw_sample_q", ["ll_uniform", "ll_iw"])
def test_single_pass_needs_reweight_p_samples(iw_sample_q):
    obj = LSGMObjective(VPSDE(0.1, 20.0), "drop_all_iw", iw_sample_q, time_eps=1e-2)
    with pytest.raises(ValueError, match="single_pass=True needs iw_sample_q='reweight_p_samples'"):
        obj.joint(TinyEps(), torch.randn(2, 2, 4, 4, dtype=torch.float64), single_pass=True)


def _assert_two_optimizers_agree(make_opt, steps: int = 4) -> None:
    """Run ``make_opt(params, variant)`` for variant False and True on the same gradients; same result."""
    torch.manual_seed(0)
    shapes = [(8, 4, 3, 3), (8,), (16, 8), (3,)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(steps)]
    finals = []
    for variant in (False, True):
        params = [nn.Parameter(p.clone()) for p in init]
        opt = make_opt(params, variant)
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
        finals.append([p.detach() for p in params])
    for a, b, start in zip(*finals, init):
        assert not torch.equal(a, start)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls, kwargs", [(torch.optim.Adam, {"eps": 1e-4, "weight_decay": 3e-4}),
                                         (torch.optim.Adamax, {"eps": 1e-3, "weight_decay": 3e-4})])
def test_foreach_optimizer_matches_the_per_parameter_loop(cls, kwargs):
    _assert_two_optimizers_agree(lambda params, foreach: cls(params, lr=1e-2, foreach=foreach, **kwargs))


def test_fused_adam_matches_the_foreach_kernels():
    """engine.fused_optimizer (lsgm.engine.make_adam): fused CPU kernels give the foreach update up to rounding."""
    from lsgm.engine import make_adam

    for mode in ("decoupled", "l2"):
        def make(params, fused):
            opt = make_adam(params, lr=1e-2, eps=1e-4, weight_decay=3e-4, weight_decay_mode=mode, fused=fused)
            assert bool(opt.defaults.get("fused")) == fused
            return opt

        _assert_two_optimizers_agree(make, steps=5)


def test_step_time_stats_skip_warmup_and_summarise():
    assert step_time_stats([9.0, 9.0, 9.0]) is None
    st = step_time_stats([100.0, 50.0, 20.0, 3.0, 1.0, 2.0, 4.0])
    assert st == {"median": 2.5, "min": 1.0, "max": 4.0, "steps": 4, "warmup_steps": 3}
    assert step_time_stats([5.0, 1.0, 3.0, 2.0], warmup=1)["median"] == 2.0


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_keep_cpu_heap_sets_glibc_thresholds_and_training_still_matches():
    """engine.keep_cpu_heap only changes allocation: mallopt accepts both thresholds (returns 1)."""
    import ctypes.util

    from lsgm.engine import keep_cpu_heap

    if "musl" in (ctypes.util.find_library("c") or ""):
        pytest.skip("not glibc")
    assert keep_cpu_heap() is True
    x = torch.randn(64, 256, 64)  # ~4 MB blocks: allocated and freed with the thresholds raised
    assert torch.equal(x.clone() * 2, x + x)
