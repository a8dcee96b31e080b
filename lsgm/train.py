"""The two training stages of LSGM (paper Sec. 3, Sec. 5; docs/algorithm.md §1.8, §4): what a step computes.

* :func:`train_vae` (stage 1): the VAE with a standard-Normal prior, KL annealing and balancing, spectral
  regularisation, Adamax.
* :func:`train_lsgm` (stage 2 and later prior stages): the SGM prior on the VAE's top latents, in one of three
  modes (docs/algorithm.md §4.5), each its own step function: **joint** (encoder, decoder and SGM trained end to end
  from one objective), **disjoint** (a VAE step with the current SGM, then an SGM step from the detached latents)
  and **frozen VAE** (only a fresh SGM trains).

How a stage runs (checkpoints, resume, signals, NaN guard, data parallelism, schedules) is the engine's business
(:mod:`lsgm.engine`); where its files go is the run layout's (:mod:`lsgm.runs`).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from lsgm.config import ExperimentConfig, PriorStageConfig
from lsgm.data.loader import BatchIterator, to_model_input
from lsgm.ema import EMA
from lsgm.config import config_hash
from lsgm.engine import (StageStart, TrainLoop, adam_with_schedule, add_reg, cosine_lr, finish_stage, host_floats,
                         prepare_batchnorm, skip_finished, start_stage)
from lsgm.models import build_prior, build_vae, read_model_file
from lsgm.objectives import LSGMObjective
from lsgm.provenance import sha256_file
from lsgm.runs import PREPARED_ROOT, RUNS_ROOT, VAE_STAGE, RunLayout
from lsgm.vae.regularization import SpectralRegularizer, bn_loss, kl_balancer, kl_coeff

__all__ = ["train_lsgm", "train_vae"]

log = logging.getLogger("lsgm.train")


# --------------------------------------------------------------------------------------------- shared
def _unwrap(m: nn.Module) -> nn.Module:
    return getattr(m, "module", m)


# --------------------------------------------------------------------------------------------- stage 1
@dataclass
class _Stage1:
    """Everything a stage-1 step reads."""

    cfg: ExperimentConfig
    start: StageStart
    loop: TrainLoop
    order: BatchIterator
    vae: nn.Module
    params: list[nn.Parameter]
    reg: SpectralRegularizer
    groups_per_scale: list[int]


def _vae_step(s: _Stage1, step: int) -> dict[str, float]:
    """One stage-1 step: ``recon + β_KL Σ_l κ_l KL_l`` per image, then ``λ (Σ σ_max + Σ max|γ|)`` once."""
    tc, plan, loop, vae = s.cfg.train_vae, s.start.plan, s.loop, s.vae
    vae.train()
    beta = kl_coeff(step, s.start.total, tc.kl_anneal_portion, tc.kl_const_portion, tc.kl_const_coeff,
                    tc.kl_max_coeff)
    sums = {"recon_nats": 0.0, "kl_nats": 0.0, "nelbo_nats": 0.0, "loss": 0.0}
    kl_groups = torch.zeros(sum(s.groups_per_scale), device=s.start.ctx.device)
    for gidx, idx in plan.micro_batches(s.order, step, s.start.ctx.rank):
        x = loop.micro_batch(s.start.split, idx, step, gidx)
        with loop.autocast():
            out = vae(x, generator=loop.generators["noise"])
            recon = -vae.decoder_log_prob(out.decoder_params.float(), x)
        kl_all = [k.float() for k in out.kl_per_group]
        balanced, _, kl_vals = kl_balancer(kl_all, beta, s.groups_per_scale, balance=True)
        loss = (recon + balanced).mean() / plan.accumulation
        loop.backward(loss)
        kl = torch.stack(kl_all, 1).detach().sum(1)
        recon = recon.detach()
        sums["recon_nats"] += recon.mean() / plan.accumulation
        sums["kl_nats"] += kl.mean() / plan.accumulation
        sums["nelbo_nats"] += (recon + kl).mean() / plan.accumulation
        sums["loss"] += loss.detach()
        kl_groups += kl_vals.detach().float() / plan.accumulation
    if tc.weight_decay_norm > 0:  # regulariser once per optimiser step; skipped entirely at λ = 0
        with loop.autocast():
            reg_loss = tc.weight_decay_norm * (s.reg.loss() + bn_loss(vae))
        loop.backward(reg_loss)
        sums["reg"] = reg_loss.detach()
    sums.update({f"kl_group_{i}": v for i, v in enumerate(kl_groups.unbind())})
    sums = host_floats(sums)  # one device-to-host copy per step, before the optimiser's own sync
    sums["grad_norm"] = loop.optimizer_step("vae", s.params)
    loop.optimizers["vae"].zero_grad(set_to_none=True)
    sums["kl_coeff"] = beta
    return sums


def train_vae(cfg: ExperimentConfig, run_root: Path = RUNS_ROOT, data_root: Path = PREPARED_ROOT,
              max_steps: Optional[int] = None, retrain: bool = False, metrics_root: Optional[Path] = None) -> Path:
    """Stage 1: the VAE with a standard-Normal prior (docs/algorithm.md §1.8). Returns the path of ``model.pt``.

    Loss per image: ``recon + β_KL Σ_l κ_l KL_l`` (KL balancing while β_KL < 1), plus
    ``λ (Σ σ_max(W) + Σ max|γ|)``; Adamax, linear warm-up then cosine decay; resumes automatically; a finished
    stage is not trained again unless ``retrain``.
    """
    tc = cfg.train_vae
    start = start_stage(cfg, VAE_STAGE, tc, run_root, data_root, "train_vae")
    ctx = start.ctx
    hash_sections = (cfg.data, cfg.vae, tc)
    end = start.total if max_steps is None else min(start.total, max_steps)
    if skip_finished(cfg, VAE_STAGE, start, config_hash(hash_sections), retrain, end, metrics_root):
        return start.layout.model(VAE_STAGE)
    torch.manual_seed(tc.seed)
    vae = prepare_batchnorm(build_vae(cfg), ctx).to(ctx.device)
    if cfg.engine.channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    reg = SpectralRegularizer(vae, generator=torch.Generator().manual_seed(tc.seed)).to(ctx.device)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.Adamax(params, lr=tc.learning_rate, eps=tc.adamax_eps, weight_decay=tc.weight_decay,
                             foreach=True)  # multi-tensor kernels also on CPU (same result, fewer ops)
    lr_fn = cosine_lr(base=tc.learning_rate, minimum=tc.learning_rate_min, warmup_epochs=tc.warmup_epochs,
                      epochs=tc.epochs, iters_per_epoch=start.plan.iters_per_epoch)
    loop = TrainLoop(cfg=cfg, stage=VAE_STAGE, layout=start.layout, ctx=ctx, modules={"vae": vae},
                     optimizers={"vae": opt}, lr_fns={"vae": lr_fn}, total_steps=start.total,
                     hash_sections=hash_sections, seed=tc.seed, extra_state={"spectral": reg})
    order = BatchIterator(len(start.split), start.plan.global_batch, shuffle=True, drop_last=True, seed=tc.seed)
    s = _Stage1(cfg, start, loop, order, vae, params, reg, list(vae.groups_per_scale))
    last = loop.run(lambda step: _vae_step(s, step), max_steps=max_steps)
    return finish_stage(cfg, VAE_STAGE, start, loop, last, metrics_root, vae=_unwrap(vae), prior=None, prior_ema=None)


# --------------------------------------------------------------------------------------------- stage 2
@dataclass
class _Stage2:
    """Everything a stage-2 step reads (one prior stage of one experiment, or the data-space score model, which has
    no VAE: ``sc`` None, ``vae`` None)."""

    cfg: ExperimentConfig
    sc: Optional[PriorStageConfig]
    tc: Any  # TrainLSGMConfig, or TrainSGMConfig for the data-space model
    start: StageStart
    loop: TrainLoop
    order: BatchIterator
    vae: Optional[nn.Module]
    prior: Optional[nn.Module]  # None: N(0, I) prior (prior_kind "normal")
    eps_fn: Optional[Callable]
    objective: Optional[LSGMObjective]
    ema: Optional[EMA]
    vae_params: list[nn.Parameter]
    prior_params: list[nn.Parameter]
    reg_vae: Optional[tuple[float, SpectralRegularizer]]  # (λ, regulariser) where λ > 0
    reg_prior: Optional[tuple[float, SpectralRegularizer]]

    def beta(self, step: int) -> float:
        """KL coefficient: continued annealing (``cont_kl_anneal``, docs/algorithm.md §4.7) or 1."""
        tc = self.tc
        if not getattr(tc, "cont_kl_anneal", False):
            return 1.0
        return kl_coeff(step, self.start.total, tc.kl_anneal_portion, 0.0, tc.kl_const_coeff, tc.kl_max_coeff)

    def reg(self, which: str) -> Optional[torch.Tensor]:
        """λ (Σ σ_max + Σ max|γ|) of the VAE or the SGM, None where its λ is 0."""
        reg, module = (self.reg_vae, self.vae) if which == "vae" else (self.reg_prior, self.prior)
        return None if reg is None else reg[0] * (reg[1].loss() + bn_loss(module))

    def vae_terms(self, x: torch.Tensor):
        """Encoder sample, ``recon = −log p(x|z)``, ``Σ log q`` of the top groups and the other groups' KL."""
        out = self.vae(x, generator=self.loop.generators["noise"])
        recon = -self.vae.decoder_log_prob(out.decoder_params.float(), x)
        n_top = out.top_group_count
        log_q_top = sum(q.float().flatten(1).sum(1) for q in out.log_q[:n_top])
        kl_rest = sum((k.float() for k in out.kl_per_group[n_top:]), torch.zeros_like(recon))
        return out, recon, log_q_top, kl_rest


def _nelbo_metrics(m: dict, recon: torch.Tensor, log_q_top: torch.Tensor, ce: torch.Tensor, kl_rest: torch.Tensor,
                   acc: int) -> None:
    m["nelbo_nats"] += (recon + log_q_top + ce + kl_rest).detach().mean() / acc
    m["recon_nats"] += recon.detach().mean() / acc
    m["cross_entropy_nats"] += ce.detach().mean() / acc


def _joint_step(s: _Stage2, step: int) -> dict[str, Any]:
    """Joint training (docs/algorithm.md §4.5 joint): one objective for encoder, decoder and SGM; the loss object
    says which backward passes give each network its gradient."""
    loop, plan, tc = s.loop, s.start.plan, s.tc
    beta = s.beta(step)
    m: dict[str, Any] = {"loss": 0.0, "p_loss": 0.0, "nelbo_nats": 0.0, "recon_nats": 0.0, "cross_entropy_nats": 0.0}
    acc = plan.accumulation
    single_pass = tc.iw_sample_q == "reweight_p_samples" and tc.single_pass_joint
    one_backward = single_pass and tc.single_backward_joint
    s.prior.train()
    s.vae.train()
    for gidx, idx in plan.micro_batches(s.order, step, s.start.ctx.rank):
        x = loop.micro_batch(s.start.split, idx, step, gidx)
        with loop.autocast():
            out, recon, log_q_top, kl_rest = s.vae_terms(x)
            jl = s.objective.joint(s.eps_fn, out.z0_top, loop.generators["noise"], single_pass=single_pass,
                                   ce_coeff=beta if one_backward else None)
        ce = jl.ce_elem.float().flatten(1).sum(1)
        q_loss = (recon + beta * (log_q_top + ce + kl_rest)).mean() / acc
        p_loss = jl.p_obj.float().mean() / acc
        for term in jl.backward_terms(q_loss, p_loss, s.vae_params, s.prior_params):
            loop.backward(*term)
        m["loss"] += q_loss.detach()
        m["p_loss"] += p_loss.detach()
        _nelbo_metrics(m, recon, log_q_top, ce, kl_rest, acc)
    add_reg(loop, s.reg("vae"), s.vae_params, m, "reg_vae")
    add_reg(loop, s.reg("prior"), s.prior_params, m, "reg_prior")
    m["grad_norm_vae"] = loop.optimizer_step("vae", s.vae_params, tc.grad_clip)
    m["grad_norm_prior"] = loop.optimizer_step("prior", s.prior_params, tc.grad_clip)
    return _end_step(s, m, beta)


def _disjoint_step(s: _Stage2, step: int) -> dict[str, Any]:
    """Disjoint training (docs/algorithm.md §4.5 disjoint): a VAE step with q's own t batch (the SGM's EMA weights
    with ``update_q_ema``), then an SGM step from the detached latents."""
    loop, plan, tc = s.loop, s.start.plan, s.tc
    beta = s.beta(step)
    m: dict[str, Any] = {"loss": 0.0, "p_loss": 0.0, "nelbo_nats": 0.0, "recon_nats": 0.0, "cross_entropy_nats": 0.0}
    micro = plan.micro_batches(s.order, step, s.start.ctx.rank)
    acc = plan.accumulation
    s.prior.train()
    s.vae.train()
    latents = []
    with s.ema.swapped(s.prior) if tc.update_q_ema else nullcontext():
        for gidx, idx in micro:
            x = loop.micro_batch(s.start.split, idx, step, gidx)
            with loop.autocast():
                out, recon, log_q_top, kl_rest = s.vae_terms(x)
                ce = s.objective.q_only(s.eps_fn, out.z0_top, loop.generators["noise"]).float().flatten(1).sum(1)
            q_loss = (recon + beta * (log_q_top + ce + kl_rest)).mean() / acc
            loop.backward(q_loss, inputs=s.vae_params)
            latents.append(out.z0_top.detach())
            m["loss"] += q_loss.detach()
            _nelbo_metrics(m, recon, log_q_top, ce, kl_rest, acc)
    add_reg(loop, s.reg("vae"), s.vae_params, m, "reg_vae")
    m["grad_norm_vae"] = loop.optimizer_step("vae", s.vae_params, tc.grad_clip)
    _sgm_step(s, step, micro, latents, m)
    return _end_step(s, m, beta)


def _frozen_vae_step(s: _Stage2, step: int) -> dict[str, Any]:
    """A fresh SGM on a frozen VAE (docs/algorithm.md §4.5, CelebA-HQ stage 3): latents without gradients, from the
    VAE in eval mode (no BatchNorm running-statistics drift, docs/algorithm.md §11 item 7)."""
    loop, plan = s.loop, s.start.plan
    m: dict[str, Any] = {"p_loss": 0.0}  # only the SGM objective is computed (no NELBO to report)
    micro = plan.micro_batches(s.order, step, s.start.ctx.rank)
    s.prior.train()
    s.vae.eval()
    latents = []
    with torch.no_grad():
        for gidx, idx in micro:
            x = loop.micro_batch(s.start.split, idx, step, gidx)
            with loop.autocast():
                latents.append(s.vae(x, generator=loop.generators["noise"]).z0_top.detach())
    _sgm_step(s, step, micro, latents, m)
    return _end_step(s, m, s.beta(step))


def _sgm_step(s: _Stage2, step: int, micro: list, latents: list[torch.Tensor], m: dict) -> None:
    """SGM step from detached latents with fresh ε and p's t batch (docs/algorithm.md §4.5 disjoint step 3)."""
    loop, acc = s.loop, s.start.plan.accumulation
    for (gidx, _), z0 in zip(micro, latents):
        loop.seed_micro_batch(step, gidx, phase=1)
        with loop.autocast():
            p_loss = s.objective.p_only(s.eps_fn, z0.float(), loop.generators["noise"]).float().mean() / acc
        loop.backward(p_loss, inputs=s.prior_params)
        m["p_loss"] += p_loss.detach()
    add_reg(loop, s.reg("prior"), s.prior_params, m, "reg_prior")
    m["grad_norm_prior"] = loop.optimizer_step("prior", s.prior_params, s.tc.grad_clip)


def _normal_prior_step(s: _Stage2, step: int) -> dict[str, Any]:
    """The VAE trained further with its N(0, I) prior (``prior_kind: normal``): the joint step's q loss with the SGM's
    cross-entropy replaced by the exact ``−log N(z0; 0, I)`` (so ``log q + CE`` is each group's KL)."""
    loop, plan = s.loop, s.start.plan
    beta = s.beta(step)
    m: dict[str, Any] = {"loss": 0.0, "nelbo_nats": 0.0, "recon_nats": 0.0, "kl_nats": 0.0}
    acc = plan.accumulation
    s.vae.train()
    for gidx, idx in plan.micro_batches(s.order, step, s.start.ctx.rank):
        x = loop.micro_batch(s.start.split, idx, step, gidx)
        with loop.autocast():
            out = s.vae(x, generator=loop.generators["noise"])
            recon = -s.vae.decoder_log_prob(out.decoder_params.float(), x)
        kl = sum(k.float() for k in out.kl_per_group)
        q_loss = (recon + beta * kl).mean() / acc
        loop.backward(q_loss)
        m["loss"] += q_loss.detach()
        m["nelbo_nats"] += (recon + kl).detach().mean() / acc
        m["recon_nats"] += recon.detach().mean() / acc
        m["kl_nats"] += kl.detach().mean() / acc
    add_reg(loop, s.reg("vae"), s.vae_params, m, "reg_vae")
    m["grad_norm_vae"] = loop.optimizer_step("vae", s.vae_params, s.tc.grad_clip)
    return _end_step(s, m, beta)


def _end_step(s: _Stage2, m: dict[str, Any], beta: float) -> dict[str, float]:
    """Clear gradients, fold the SGM into its EMA, add the mixing-α statistics; one device-to-host copy."""
    for opt in s.loop.optimizers.values():
        opt.zero_grad(set_to_none=True)
    m["kl_coeff"] = beta
    if s.prior is not None:
        s.ema.update(s.prior)
        if s.prior.mixed:
            alpha = torch.sigmoid(s.prior.mixing_logit.detach().float())
            m.update({"mixing_alpha_mean": alpha.mean(), "mixing_alpha_min": alpha.min(),
                      "mixing_alpha_max": alpha.max()})
    return host_floats(m)


_STEP_FNS: dict[str, Callable[[_Stage2, int], dict[str, float]]] = {
    "joint": _joint_step, "disjoint": _disjoint_step, "frozen VAE": _frozen_vae_step,
    "VAE with its Normal prior": _normal_prior_step}


def _training_mode(sc: PriorStageConfig) -> str:
    if sc.prior_kind == "normal":
        return "VAE with its Normal prior"
    return "disjoint" if sc.train.disjoint else ("joint" if sc.train_vae else "frozen VAE")


def _inactive_channels(s: _Stage2, gen: torch.Generator) -> torch.Tensor:
    """Per-channel KL of the top scale averaged over training batches; True where ≤ threshold
    (``drop_inactive_var``, docs/algorithm.md §3.3)."""
    tc, ctx, split = s.tc, s.start.ctx, s.start.split
    s.vae.eval()
    order = BatchIterator(len(split), tc.batch_size, shuffle=True, drop_last=False, seed=tc.seed,
                          rank=ctx.rank, world_size=ctx.world_size)
    total, count = None, 0
    with torch.no_grad():
        for i, idx in enumerate(order):
            if i >= tc.inactive_max_batches:
                break
            x = to_model_input(split, idx, s.cfg.data, gen, ctx.device, channels_last=s.cfg.engine.channels_last)
            out = s.vae(x, generator=gen)
            n_top = out.top_group_count
            kl = torch.cat([q - p for q, p in zip(out.log_q[:n_top], out.log_p_normal[:n_top])], dim=1)
            kl = kl.sum(dim=(2, 3)).sum(dim=0)
            total = kl if total is None else total + kl
            count += x.shape[0]
    stats = torch.cat([total.double(), torch.tensor([float(count)], dtype=torch.float64, device=total.device)])
    if ctx.world_size > 1:
        dist.all_reduce(stats)
    per_channel = stats[:-1] / stats[-1]
    inactive = per_channel <= tc.inactive_kl_threshold
    log.info("drop_inactive_var: %d of %d latent channels inactive (KL <= %g nats): %s",
             int(inactive.sum()), inactive.numel(), tc.inactive_kl_threshold,
             [round(float(v), 3) for v in per_channel])
    return inactive


def _stage2_hash_sections(cfg: ExperimentConfig, stage: str, layout: RunLayout) -> tuple:
    """What defines a prior stage's run: data, VAE, the stage's section and the exact model it starts from."""
    init = layout.model(cfg.prior[stage].init_from)
    if not init.is_file():
        raise FileNotFoundError(f"{init}: no model file; train stage {cfg.prior[stage].init_from!r} first")
    return (cfg.data, cfg.vae, cfg.prior[stage], sha256_file(init))


def _build_stage2(cfg: ExperimentConfig, stage: str, start: StageStart) -> _Stage2:
    """Models (the VAE from ``init_from``'s model.pt, the SGM fresh or loaded), objective, optimisers, loop."""
    sc, ctx = cfg.prior[stage], start.ctx
    tc = sc.train
    init_path = start.layout.model(sc.init_from)
    torch.manual_seed(tc.seed)
    init = read_model_file(init_path)
    vae = build_vae(cfg)
    vae.load_state_dict(init["vae"])
    vae = prepare_batchnorm(vae, ctx).to(ctx.device)
    prior = eps_fn = objective = ema = None
    if sc.prior_kind == "sgm":
        prior = build_prior(cfg, stage)
        if sc.load_prior:
            prior.load_state_dict(init["prior_ema"] or init["prior"])
        prior = prior.to(ctx.device)
        if cfg.engine.compile:  # in place: parameter names (and so checkpoints) are unchanged
            prior.backbone.compile()
        eps_fn = prior
        objective = LSGMObjective(prior.sde, tc.iw_sample_p, tc.iw_sample_q, sc.sde.time_eps, compat=tc.compat)
        ema = EMA(tc.ema_decay)
    if cfg.engine.channels_last:  # NHWC kernels for the VAE only (measured: they slow NCSN++ down on CPU)
        vae = vae.to(memory_format=torch.channels_last)
        if prior is not None:
            eps_fn = lambda z, t: prior(z.contiguous(), t)  # noqa: E731
    vae_params = [p for p in vae.parameters() if p.requires_grad]
    prior_params = [p for p in prior.parameters() if p.requires_grad] if prior is not None else []
    ipe, fused = start.plan.iters_per_epoch, cfg.engine.fused_optimizer
    optimizers: dict[str, torch.optim.Optimizer] = {}
    lr_fns: dict[str, Callable[[int], float]] = {}
    if prior is not None:
        optimizers["prior"], lr_fns["prior"] = adam_with_schedule(prior_params, tc, lr=tc.learning_rate_score,
                                                          lr_min=tc.learning_rate_score_min, eps=tc.score_adam_eps,
                                                          ipe=ipe, fused=fused)
    if sc.train_vae:
        optimizers["vae"], lr_fns["vae"] = adam_with_schedule(vae_params, tc, lr=tc.learning_rate_vae,
                                                      lr_min=tc.learning_rate_vae_min, eps=tc.vae_adam_eps,
                                                      ipe=ipe, fused=fused)
    else:
        vae.requires_grad_(False)
    gen_init = torch.Generator().manual_seed(tc.seed)
    extra: dict[str, Any] = {}
    reg_vae = reg_prior = None
    if sc.train_vae and tc.weight_decay_norm_vae > 0:
        extra["spectral_vae"] = SpectralRegularizer(vae, generator=gen_init).to(ctx.device)
        reg_vae = (tc.weight_decay_norm_vae, extra["spectral_vae"])
    if prior is not None and tc.weight_decay_norm_score > 0:
        extra["spectral_prior"] = SpectralRegularizer(
            prior, include_plain_conv2d=tc.spectral_reg_score_convs, generator=gen_init).to(ctx.device)
        reg_prior = (tc.weight_decay_norm_score, extra["spectral_prior"])
    modules = {"vae": vae, **({"prior": prior} if prior is not None else {})}
    loop = TrainLoop(cfg=cfg, stage=stage, layout=start.layout, ctx=ctx, modules=modules, optimizers=optimizers,
                     lr_fns=lr_fns, total_steps=start.total, ema=ema, extra_state=extra, seed=tc.seed,
                     hash_sections=_stage2_hash_sections(cfg, stage, start.layout))
    order = BatchIterator(len(start.split), start.plan.global_batch, shuffle=True, drop_last=True, seed=tc.seed)
    return _Stage2(cfg, sc, tc, start, loop, order, vae, prior, eps_fn, objective, ema, vae_params, prior_params,
                   reg_vae, reg_prior)


def train_lsgm(cfg: ExperimentConfig, stage: str, run_root: Path = RUNS_ROOT, data_root: Path = PREPARED_ROOT,
               max_steps: Optional[int] = None, retrain: bool = False, metrics_root: Optional[Path] = None) -> Path:
    """Stage 2 (and later prior stages): VAE + SGM prior end to end, disjoint, or a fresh SGM on a frozen VAE
    (docs/algorithm.md §4.5). Starts from ``<run_root>/<exp>/<init_from>/model.pt``; writes
    ``<run_root>/<exp>/<stage>/model.pt``. Returns its path.
    """
    if stage not in cfg.prior:
        raise ValueError(f"{cfg.name}: unknown prior stage {stage!r}; allowed: {list(cfg.prior)}")
    sc = cfg.prior[stage]
    tc = sc.train
    mode = _training_mode(sc)
    start = start_stage(cfg, stage, tc, run_root, data_root, f"prior.{stage}.train",
                        f" ({mode}, p={tc.iw_sample_p}, q={tc.iw_sample_q})")
    end = start.total if max_steps is None else min(start.total, max_steps)
    run_hash = config_hash(_stage2_hash_sections(cfg, stage, start.layout))
    if skip_finished(cfg, stage, start, run_hash, retrain, end, metrics_root):
        return start.layout.model(stage)
    s = _build_stage2(cfg, stage, start)

    def on_start() -> None:
        if tc.drop_inactive_var and s.prior is not None:
            s.prior.set_inactive_channels(_inactive_channels(s, s.loop.generators["data"]))

    step_fn = _STEP_FNS[mode]
    last = s.loop.run(lambda step: step_fn(s, step), max_steps=max_steps, on_start=on_start)
    return finish_stage(cfg, stage, start, s.loop, last, metrics_root, vae=_unwrap(s.vae), prior=s.prior,
                        prior_ema=s.ema.averaged_state(s.prior) if s.ema is not None else None)
