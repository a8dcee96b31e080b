"""Build the VAE and the SGM prior from the typed config, and save/load the `model.pt` files stages hand on.

`model.pt` (written by every training stage, read by the next stage, sampling and evaluation) is a plain dict of
tensors and primitives, loadable with ``torch.load(path, weights_only=True)``:

    {"format": "lsgm-model/1", "experiment": str, "stage": "vae" | <prior stage name>,
     "config": <config_to_dict(cfg)>, "vae": state_dict,
     "prior": state_dict | None, "prior_ema": state_dict | None,   # MixedScore (NCSN++ + mixing logit + mask)
     "step": int, "epoch": int, "run_hash": str | None}   # config hash of the training run that wrote it
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lsgm.config import ExperimentConfig, config_from_dict, config_to_dict
from lsgm.errors import ModelFileError
from lsgm.runs import DATA_SGM_STAGE

MODEL_FORMAT = "lsgm-model/1"


def build_vae(cfg: ExperimentConfig) -> nn.Module:
    """The NVAE backbone of docs/algorithm.md §1 with the sizes of ``cfg.vae`` and the data shape of ``cfg.data``."""
    from lsgm.vae.nvae import NVAE

    v, d = cfg.vae, cfg.data
    c, h, _ = d.shape
    return NVAE(
        in_channels=c, image_size=h, arch_instance=v.arch_instance,
        num_channels_enc=v.num_channels_enc, num_channels_dec=v.num_channels_dec,
        num_preprocess_blocks=v.num_preprocess_blocks, num_preprocess_cells=v.num_preprocess_cells,
        num_postprocess_blocks=v.num_postprocess_blocks, num_postprocess_cells=v.num_postprocess_cells,
        num_cell_per_cond_enc=v.num_cell_per_cond_enc, num_cell_per_cond_dec=v.num_cell_per_cond_dec,
        num_latent_scales=v.num_latent_scales, num_groups_per_scale=v.num_groups_per_scale,
        num_latent_per_group=v.num_latent_per_group, channel_mult=tuple(v.channel_mult), num_nf=v.num_nf,
        use_se=v.use_se, decoder_dist=v.decoder_dist, num_mix_output=v.num_mix_output,
        num_x_bits=d.num_x_bits, progressive_input=v.progressive_input, log_sig_q_scale=v.log_sig_q_scale,
        crop_output=d.likelihood_crop,
    )


def build_sde(cfg: ExperimentConfig, stage: str):
    """The forward SDE of prior stage ``stage`` (docs/algorithm.md §2)."""
    from lsgm.sde import make_sde

    s = cfg.prior[stage].sde
    return make_sde(s.kind, **s.sde_params())


def build_prior(cfg: ExperimentConfig, stage: str) -> nn.Module:
    """NCSN++ (docs/algorithm.md §5) wrapped in the mixed score (docs/algorithm.md §3) for prior stage ``stage``."""
    from lsgm.nets.ncsnpp import NCSNpp
    from lsgm.score import MixedScore

    sn = cfg.prior[stage].score_net
    c, s, _ = cfg.vae.latent_shape(cfg.data)
    backbone = NCSNpp(in_channels=c, image_size=s, nf=sn.nf, num_scales=sn.num_scales,
                      num_res_blocks=sn.num_res_blocks, channel_mult=tuple(sn.channel_mult), dropout=sn.dropout,
                      fir=sn.fir, embedding_scale=sn.embedding_scale, embedding_dim=sn.embedding_dim,
                      attn_resolutions=tuple(sn.attn_resolutions))
    return MixedScore(backbone, build_sde(cfg, stage), c, sn.mixing_logit_init, mixed=sn.mixed_score)


def build_data_sgm(cfg: ExperimentConfig) -> nn.Module:
    """The data-space score model: NCSN++ on images (C, H, W) of ``cfg.data`` with ``cfg.data_sgm``'s sizes and SDE,
    predicting ε directly (``score_net.mixed_score: false``) or with the mixed score."""
    from lsgm.nets.ncsnpp import NCSNpp
    from lsgm.score import MixedScore
    from lsgm.sde import make_sde

    if cfg.data_sgm is None:
        raise ValueError(f"{cfg.name}: no data_sgm section; add one to train a data-space score model")
    ds, (c, h, _) = cfg.data_sgm, cfg.data.shape
    sn = ds.score_net
    backbone = NCSNpp(in_channels=c, image_size=h, nf=sn.nf, num_scales=sn.num_scales,
                      num_res_blocks=sn.num_res_blocks, channel_mult=tuple(sn.channel_mult), dropout=sn.dropout,
                      fir=sn.fir, embedding_scale=sn.embedding_scale, embedding_dim=sn.embedding_dim,
                      attn_resolutions=tuple(sn.attn_resolutions))
    return MixedScore(backbone, make_sde(ds.sde.kind, **ds.sde.sde_params()), c, sn.mixing_logit_init,
                      mixed=sn.mixed_score)


@dataclass
class LoadedModel:
    """A trained model ready for sampling/evaluation."""

    cfg: ExperimentConfig
    stage: str
    vae: Optional[nn.Module]  # None for the data-space score model
    prior: Optional[nn.Module]  # MixedScore, EMA weights if requested and present; None: N(0, I) prior (stage 1,
    # or a prior_kind "normal" stage)
    sde: Any
    step: int


def save_model(path: str | os.PathLike, *, cfg: ExperimentConfig, stage: str, vae: Optional[nn.Module],
               prior: Optional[nn.Module], prior_ema: Optional[dict], step: int, epoch: int,
               run_hash: Optional[str] = None) -> None:
    """Write `model.pt` atomically (temp file + fsync + rename); refuses non-finite weights.

    ``run_hash`` is the training run's config hash: a rerun of a finished stage with the same config recognises
    its own output and keeps it."""
    from lsgm.checkpoint import atomic_torch_save

    payload = {
        "format": MODEL_FORMAT, "experiment": cfg.name, "stage": stage, "config": config_to_dict(cfg),
        "vae": None if vae is None else {k: v.detach().cpu() for k, v in vae.state_dict().items()},
        "prior": None if prior is None else {k: v.detach().cpu() for k, v in prior.state_dict().items()},
        "prior_ema": None if prior_ema is None else {k: v.detach().cpu() for k, v in prior_ema.items()},
        "step": int(step), "epoch": int(epoch), "run_hash": run_hash,
    }
    atomic_torch_save(payload, path)


def read_model_file(path: str | os.PathLike) -> dict:
    """Load a `model.pt` payload safely, with a one-line error for a missing, truncated, corrupt or foreign file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no model file; run the training stage that writes it first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: truncated zip, bit flips, not a torch file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFileError(f"{path}: cannot be read ({type(exc).__name__}: {reason[:200]}); the file is truncated "
                             "or corrupt: rerun the stage that writes it, or restore it with `dvc checkout`") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path}: not an lsgm model file (expected format {MODEL_FORMAT!r})")
    return payload


def load_model(path: str | os.PathLike, *, device: torch.device | str = "cpu", use_ema: bool = True,
               cfg: ExperimentConfig | None = None) -> LoadedModel:
    """Rebuild the VAE (and prior, if the file has one) from `model.pt`.

    Args:
        path: the model file.
        device: where to put the modules.
        use_ema: take the prior's EMA weights (docs/algorithm.md §4.6: evaluation uses EMA) when present.
        cfg: the config to build with; default the one stored in the file.
    """
    payload = read_model_file(path)
    stored = config_from_dict(payload["config"], where=f"{path}:config")
    cfg = cfg or stored
    stage = payload["stage"]
    vae = None
    if payload.get("vae") is not None:
        vae = build_vae(stored)
        vae.load_state_dict(payload["vae"])
        vae.to(device).eval()
    prior = sde = None
    if payload.get("prior") is not None:
        prior = build_data_sgm(stored) if stage == DATA_SGM_STAGE else build_prior(stored, stage)
        state = payload["prior_ema"] if use_ema and payload.get("prior_ema") is not None else payload["prior"]
        prior.load_state_dict(state)
        prior.to(device).eval()
        sde = prior.sde
    return LoadedModel(cfg=cfg, stage=stage, vae=vae, prior=prior, sde=sde, step=int(payload["step"]))
