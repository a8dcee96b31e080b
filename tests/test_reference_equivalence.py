"""Our VAE, NCSN++ and joint objective compute the reference implementation's function, given the same weights.

The goldens (``config_a.pt``, ``config_b.pt``) hold random, perturbed weights mapped onto our parameter names, the
inputs and noise, and the reference LSGM implementation's float64 outputs (their README says how they were made).
They are not in the repository (about 25 MB each, and they must never be rebuilt from this project's outputs):
the test reads them from ``$LSGM_REFERENCE_GOLDENS`` or ``../shared/goldens/reference_equivalence`` beside the
checkout, and is skipped, naming both places, when neither exists.

A check passes when ``max|ours − reference| / max|reference|`` over the whole tensor is within the file's tolerance
(1e-10 by default; 1e-8 for the per-group KL, whose sum cancels about three digits).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import lsgm.objectives as objectives
import lsgm.vae.distributions as distributions
from lsgm.config import config_from_dict
from lsgm.models import build_prior, build_vae
from lsgm.objectives import LSGMObjective, sample_t

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIRS = [Path(p) for p in [os.environ.get("LSGM_REFERENCE_GOLDENS", "")] if p] + [
    ROOT.parent / "shared" / "goldens" / "reference_equivalence"]


def _golden_path(name: str) -> Path:
    for d in GOLDEN_DIRS:
        if (d / name).is_file():
            return d / name
    pytest.skip(f"reference goldens {name} not found in {', '.join(map(str, GOLDEN_DIRS))} "
                "(set LSGM_REFERENCE_GOLDENS to their folder)")


@pytest.fixture(scope="module", params=["config_a.pt", "config_b.pt"])
def golden(request):
    return torch.load(_golden_path(request.param), map_location="cpu", weights_only=True)


def _tol(g: dict, key: str) -> float:
    return float(g["tolerances"].get(key, g["tolerances"]["default"]))


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    actual, expected = torch.as_tensor(actual).detach().double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    rel = float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300))
    assert rel <= tol, f"{what}: relative error {rel:.3g} > {tol:g}"


def _models(g: dict):
    cfg = config_from_dict(g["config"])
    stage = cfg.final_prior_stage
    vae = build_vae(cfg).to(torch.float64)
    prior = build_prior(cfg, stage).to(torch.float64)
    vae.load_state_dict(g["vae_state_dict"], strict=True)
    prior.load_state_dict(g["prior_state_dict"], strict=True)
    return cfg, stage, vae, prior


class _PosteriorNoise:
    """Stands in for ``sample_normal``: the g-th call returns ``mu + exp(log_sigma) * noise[g]`` and records both."""

    def __init__(self, noise: list[torch.Tensor]):
        self.noise, self.mu, self.log_sigma = noise, [], []

    def __call__(self, mu, log_sigma, generator=None):
        g = len(self.mu)
        self.mu.append(mu)
        self.log_sigma.append(log_sigma)
        return mu + torch.exp(log_sigma) * self.noise[g].to(mu)


def test_vae_eval_matches_reference(golden, monkeypatch):
    g = golden
    cfg, _, vae, _ = _models(g)
    ins, exp = g["inputs"], g["expected"]["vae"]
    n = ins["vae_eval"]["batch"]
    x = ins["x"][:n]
    patch = _PosteriorNoise(ins["vae_eval"]["posterior_noise"])
    monkeypatch.setattr(distributions, "sample_normal", patch)
    vae.eval()
    with torch.no_grad():
        out = vae(x)
        log_px = vae.decoder_log_prob(out.decoder_params, x)
        mean = vae.decoder_mean(out.decoder_params)
    tol = _tol(g, "default")
    for i in range(len(exp["z"])):
        _close(patch.mu[i], exp["posterior_mu"][i], tol, f"posterior mu, group {i}")
        _close(patch.log_sigma[i], exp["posterior_log_sigma"][i], tol, f"posterior log sigma, group {i}")
        _close(out.z_groups[i], exp["z"][i], tol, f"z, group {i}")
        _close(out.kl_per_group[i], exp["kl_per_group"][i], _tol(g, "vae.kl_per_group"), f"KL, group {i}")
    _close(out.decoder_params, exp["decoder_params"], tol, "decoder parameters")
    _close(log_px, exp["log_px"], tol, "log p(x|z)")
    _close(mean, exp["decoder_mean"], tol, "decoder mean")


def test_score_network_eval_matches_reference(golden):
    g = golden
    _, _, _, prior = _models(g)
    ins, exp = g["inputs"]["score"], g["expected"]["score"]
    m = ins["grid_batch"]
    z_t = ins["z_t"]
    prior.eval()
    tol = _tol(g, "default")
    with torch.no_grad():
        for i, t in enumerate(ins["t_grid"].tolist()):
            tv = torch.full((m,), t, dtype=torch.float64)
            _close(prior.backbone(z_t[:m], tv), exp["raw"][i], tol, f"NCSN++ output at t={t:g}")
            _close(prior(z_t[:m], tv), exp["mixed"][i], tol, f"mixed eps-prediction at t={t:g}")
        _close(prior.backbone(z_t, ins["t_per_sample"]), exp["raw_per_sample_t"], tol, "NCSN++ with per-sample t")


def _no_dropout(*modules: nn.Module) -> None:
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.Dropout):
                sub.p = 0.0


@pytest.mark.parametrize("compat", ["exact", "official"])
@pytest.mark.parametrize("fast", [False, True], ids=["2B-path", "one-pass"])
def test_joint_objective_matches_reference(golden, compat, fast, monkeypatch):
    g = golden
    cfg, stage, vae, prior = _models(g)
    ins, exp = g["inputs"], g["expected"]["joint"]
    x, j = ins["x"], ins["joint"]
    tc, sde_cfg = cfg.prior[stage].train, cfg.prior[stage].sde
    beta = float(j["kl_coeff"])
    vae.load_state_dict(copy.deepcopy(g["vae_state_dict"]))  # train-mode BatchNorm moves running statistics
    vae.train()
    prior.train()
    _no_dropout(vae, prior)
    monkeypatch.setattr(distributions, "sample_normal", _PosteriorNoise(j["posterior_noise"]))
    draws = {"randn": j["diffusion_noise"], "rand": j["rho_t"]}
    calls: list[str] = []

    def draw(kind, shape, like, generator):
        calls.append(kind)
        value = draws[kind]
        assert tuple(value.shape) == tuple(shape), f"_draw({kind!r}) asked for {shape}, golden has {value.shape}"
        return value.to(like)

    monkeypatch.setattr(objectives, "_draw", draw)
    eps_out: list[torch.Tensor] = []

    def eps_fn(z, t):
        out = prior(z, t)
        eps_out.append(out.detach())
        return out

    objective = LSGMObjective(prior.sde, tc.iw_sample_p, tc.iw_sample_q, sde_cfg.time_eps, compat=compat)
    out = vae(x)
    recon = -vae.decoder_log_prob(out.decoder_params, x)
    if fast and tc.iw_sample_q == "reweight_p_samples":
        jl = objective.joint(eps_fn, out.z0_top, None, single_pass=True, ce_coeff=beta)
    else:
        jl = objective.joint(eps_fn, out.z0_top, None)
    assert calls == ["randn", "rand"], f"LSGMObjective.joint drew {calls}; the goldens fix ['randn', 'rand']"
    top = out.top_group_count
    log_q_top = sum(q.flatten(1).sum(1) for q in out.log_q[:top])
    kl_rest = sum((k for k in out.kl_per_group[top:]), torch.zeros_like(recon))
    ce = jl.ce_elem.flatten(1).sum(1)
    nelbo = recon + beta * (log_q_top + ce + kl_rest)

    tol = _tol(g, "default")
    ref, common = exp[compat], exp["common"]
    b = x.shape[0]
    _close(nelbo, ref["nelbo"], tol, f"NELBO ({compat})")
    _close(jl.p_obj, ref["p_objective"], tol, f"SGM objective ({compat})")
    _close(recon, common["recon"], tol, "reconstruction")
    assert abs(objective.ce_const - common["cross_entropy_const"]) <= tol * abs(common["cross_entropy_const"])
    _close(eps_out[-1][-b:], common["eps_pred"], tol, "mixed eps-prediction (q half)")
    per_group = jl.ce_elem.split(cfg.vae.num_latent_per_group, dim=1)
    for i, kl_ref in enumerate(ref["kl_per_group"]):
        kl = (out.log_q[i].flatten(1).sum(1) + per_group[i].flatten(1).sum(1)) if i < top else out.kl_per_group[i]
        _close(kl, kl_ref, _tol(g, "vae.kl_per_group"), f"KL of group {i} ({compat})")
    ts = sample_t(prior.sde, tc.iw_sample_p, j["rho_t"], sde_cfg.time_eps, compat)
    _close(ts.t, ref["t"], tol, f"t ({compat})")
    _close(ts.weight_p, ref["weight_p"], tol, f"w_p ({compat})")
    _close(ts.weight_ll, ref["weight_ll"], tol, f"w_ll ({compat})")


def test_golden_sensitivity(golden, monkeypatch):
    """The check can fail: scaling one scalar of the VAE stem by 1 + 1e-6 moves the decoder output past 1e-10."""
    g = copy.deepcopy(golden)
    key = next(k for k in g["vae_state_dict"] if k.endswith("weight") and g["vae_state_dict"][k].dim() == 4)
    g["vae_state_dict"][key].view(-1)[0] *= 1 + 1e-6
    with pytest.raises(AssertionError, match="relative error"):
        test_vae_eval_matches_reference(g, monkeypatch)
