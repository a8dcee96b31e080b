"""The data-space score-model baseline (the paper's comparison class: NCSN++ + VPSDE on pixels, Song et al. 2021):
its training stage, built from the same engine, SDE, t-sampling, SGM objective and network code as the latent prior
(docs/algorithm.md "Claims at small scale"). Sampling and the ODE likelihood are :mod:`lsgm.evaluate`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from lsgm.config import ExperimentConfig, config_hash
from lsgm.data.loader import BatchIterator
from lsgm.ema import EMA
from lsgm.engine import TrainLoop, adam_with_schedule, finish_stage, skip_finished, start_stage
from lsgm.models import build_data_sgm
from lsgm.objectives import LSGMObjective
from lsgm.runs import DATA_SGM_STAGE, PREPARED_ROOT, RUNS_ROOT
from lsgm.train import _end_step, _sgm_step, _Stage2
from lsgm.vae.regularization import SpectralRegularizer

__all__ = ["train_data_sgm"]


def _data_sgm_step(s: _Stage2, step: int) -> dict[str, Any]:
    """The data-space score model: the SGM objective on uniformly dequantised images (the latent prior's own SGM
    step, with images in place of latents)."""
    micro = s.start.plan.micro_batches(s.order, step, s.start.ctx.rank)
    s.prior.train()
    images = [s.loop.micro_batch(s.start.split, idx, step, gidx, dequantize=True) for gidx, idx in micro]
    m: dict[str, Any] = {"p_loss": 0.0}
    _sgm_step(s, step, micro, images, m)
    return _end_step(s, m, 1.0)


def train_data_sgm(cfg: ExperimentConfig, run_root: Path = RUNS_ROOT, data_root: Path = PREPARED_ROOT,
                   max_steps: Optional[int] = None, retrain: bool = False, metrics_root: Optional[Path] = None) -> Path:
    """The data-space score model (the paper's comparison class: NCSN++ + VPSDE on pixels, Song et al. 2021): the
    SGM objective of docs/algorithm.md §4.4 on uniformly dequantised images in [−1, 1], with the same engine, SDE,
    t-sampling and network code as the latent prior. Writes ``<run_root>/<exp>/data_sgm/model.pt``."""
    if cfg.data_sgm is None:
        raise ValueError(f"{cfg.name}: no data_sgm section; add one to train a data-space score model")
    dc = cfg.data_sgm
    tc = dc.train
    start = start_stage(cfg, DATA_SGM_STAGE, tc, run_root, data_root, "data_sgm.train",
                        f" (data space, p={tc.iw_sample_p})")
    ctx, hash_sections = start.ctx, (cfg.data, dc)
    end = start.total if max_steps is None else min(start.total, max_steps)
    if skip_finished(cfg, DATA_SGM_STAGE, start, config_hash(hash_sections), retrain, end, metrics_root):
        return start.layout.model(DATA_SGM_STAGE)
    torch.manual_seed(tc.seed)
    prior = build_data_sgm(cfg).to(ctx.device)
    params = [p for p in prior.parameters() if p.requires_grad]
    opt, lr_fn = adam_with_schedule(params, tc, lr=tc.learning_rate, lr_min=tc.learning_rate_min, eps=tc.adam_eps,
                            ipe=start.plan.iters_per_epoch, fused=cfg.engine.fused_optimizer)
    extra: dict[str, Any] = {}
    reg = None
    if tc.weight_decay_norm > 0:
        extra["spectral_prior"] = SpectralRegularizer(prior, include_plain_conv2d=True,
                                                      generator=torch.Generator().manual_seed(tc.seed))
        reg = (tc.weight_decay_norm, extra["spectral_prior"].to(ctx.device))
    ema = EMA(tc.ema_decay)
    loop = TrainLoop(cfg=cfg, stage=DATA_SGM_STAGE, layout=start.layout, ctx=ctx, modules={"prior": prior},
                     optimizers={"prior": opt}, lr_fns={"prior": lr_fn}, total_steps=start.total, ema=ema,
                     extra_state=extra, seed=tc.seed, hash_sections=hash_sections)
    order = BatchIterator(len(start.split), start.plan.global_batch, shuffle=True, drop_last=True, seed=tc.seed)
    objective = LSGMObjective(prior.sde, tc.iw_sample_p, "reweight_p_samples", dc.sde.time_eps, compat=tc.compat)
    s = _Stage2(cfg, None, tc, start, loop, order, None, prior, prior, objective, ema, [], params, None, reg)
    last = loop.run(lambda step: _data_sgm_step(s, step), max_steps=max_steps)
    return finish_stage(cfg, DATA_SGM_STAGE, start, loop, last, metrics_root, vae=None, prior=prior,
                        prior_ema=ema.averaged_state(prior))
