"""Typed experiment configuration: nested frozen dataclasses loaded from YAML with strict validation.

One experiment = one YAML file under ``params/`` (listed in ``params/experiments.yaml``). A file may name
shared fragments under ``extends:`` (merged first, in order, then the file itself on top), so that no value is
written twice. Two override layers go on top, in this order:

* ``params.yaml`` (:data:`OVERRIDES_FILE`, repo root): per-experiment overrides, ``EXP: {section: {key: value}}``.
  It is DVC's default params file, so ``dvc exp run -S '++digits.sampling.ode_tol=1e-3'`` edits it; every tool
  (Snakemake, DVC, ``lsgm`` by hand) sees the same merged config.
* ``--set KEY=VALUE`` on the command line (``lsgm VERB EXP --set sampling.ode_tol=1e-3``), for ad-hoc runs; recorded
  in the config itself (``cli_overrides``), so every resolved config and hash carries it.

Loading rejects unknown keys (with a close-match suggestion), wrong types and out-of-range values with one message
naming the file (or the override) that wrote the bad value, the key path, the bad value and what is allowed.

Spec references: §9 (per-dataset hyper-parameters), §4.6–4.7 (stage-2 optimisers, KL annealing), §1.8 (stage 1).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from lsgm.atomic import atomic_write_text
from lsgm.errors import LsgmError
from lsgm.choices import (COMPAT_MODES, DEVICES, IW_MODES, IW_Q_MODES, ODE_METHODS, PROBE_MODES, PROBES, SDE_KINDS,
                          SDE_PARAMS, TRACES, WEIGHT_DECAY_MODES, check_mode_sde)
from lsgm.stages import STAGES

__all__ = [
    "ClaimsConfig",
    "ConfigError",
    "DataSGMConfig",
    "FDEvalConfig",
    "SampleRunConfig",
    "TrainSGMConfig",
    "matrix_claims_experiments",
    "seeded_names",
    "split_seed",
    "with_seed_offset",
    "DataConfig",
    "VAEConfig",
    "TrainVAEConfig",
    "SDEConfig",
    "ScoreNetConfig",
    "TrainLSGMConfig",
    "PriorStageConfig",
    "SamplingConfig",
    "NLLEvalConfig",
    "FIDEvalConfig",
    "EngineConfig",
    "ResourceConfig",
    "ExperimentConfig",
    "DATASET_SHAPES",
    "RESOURCE_STAGES",
    "load_config",
    "load_experiment",
    "list_experiments",
    "default_experiments",
    "config_to_dict",
    "config_hash",
    "experiment_hash",
    "set_args_text",
    "dump_config",
    "write_resolved_config",
    "RESOLVED_PARAMS",
    "resolved_params_file",
    "OVERRIDES_FILE",
    "parse_set",
    "read_overrides",
]


class ConfigError(LsgmError, ValueError):
    """A params file is invalid. The message names the file, the key path, the value and what is allowed."""


def _f(default: Any = dataclasses.MISSING, *, lo: float | None = None, hi: float | None = None,
       lo_open: bool = False, hi_open: bool = False, doc: str = "") -> Any:
    """A dataclass field with an allowed numeric range (checked at load time)."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "doc": doc}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


# (channels, height, width) of the images fed to the VAE, docs/algorithm.md §8 (MNIST/OMNIGLOT padded 28 -> 32).
DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 8),
    "mnist": (1, 32, 32),
    "fashion_mnist": (1, 28, 28),
    "omniglot": (1, 32, 32),
    "cifar10": (3, 32, 32),
    "celeba256": (3, 256, 256),
}

# Keys of an experiment's `resources:` section: the pipeline's stages (lsgm/stages.py, the one list).
RESOURCE_STAGES = STAGES


# --------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Dataset and its preprocessing (docs/algorithm.md §8, §1.6)."""

    dataset: Literal[tuple(DATASET_SHAPES)]
    binarize: bool  # dynamic binarisation at load time (digits, MNIST, OMNIGLOT)
    num_x_bits: int = _f(lo=1, hi=8)  # 8 for CIFAR-10, 5 for CelebA-HQ-256
    flip: bool = False  # random horizontal flip of training images
    likelihood_crop: Optional[int] = _f(None, lo=1, doc="central crop for the Bernoulli likelihood (28 of 32)")
    eval_split: Literal["test", "valid"] = "test"  # split the NLL is reported on
    fid_reference: Literal["train", "train+valid"] = "train"  # docs/algorithm.md §7.2
    max_train_images: Optional[int] = _f(None, lo=1, doc="use only the first N training images (tests)")
    max_eval_images: Optional[int] = _f(None, lo=1, doc="evaluate on the first N images (tests)")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the VAE sees."""
        return DATASET_SHAPES[self.dataset]

    @property
    def likelihood_dims(self) -> int:
        """D used for bits/dim (docs/algorithm.md §7.1 step 4)."""
        c, h, w = self.shape
        if self.likelihood_crop is not None:
            h = w = self.likelihood_crop
        return c * h * w


@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """NVAE-style backbone (docs/algorithm.md §1). Names follow the official flags without the ``--``."""

    arch_instance: Literal["res_bnswish", "res_mbconv"]
    num_channels_enc: int = _f(lo=1)
    num_channels_dec: int = _f(lo=1)
    num_preprocess_blocks: int = _f(lo=1)
    num_preprocess_cells: int = _f(lo=1)
    num_postprocess_blocks: int = _f(lo=1)
    num_postprocess_cells: int = _f(lo=1)
    num_cell_per_cond_enc: int = _f(lo=1)
    num_cell_per_cond_dec: int = _f(lo=1)
    num_latent_scales: int = _f(lo=1)
    num_groups_per_scale: int = _f(lo=1)
    num_latent_per_group: int = _f(lo=1)
    channel_mult: tuple[int, ...] = _f()
    num_nf: int = _f(0, lo=0)
    use_se: bool = True
    decoder_dist: Literal["bin", "dml", "normal"] = "dml"
    num_mix_output: int = _f(10, lo=1)
    progressive_input: Literal["none", "input_skip"] = "none"
    log_sig_q_scale: float = _f(5.0, lo=0, lo_open=True)

    def check(self, where: str, data: DataConfig) -> None:
        """Cross-field checks that need the data section."""
        if len(self.channel_mult) != self.num_preprocess_blocks + self.num_latent_scales:
            raise ConfigError(
                f"{where}: vae.channel_mult has {len(self.channel_mult)} entries {list(self.channel_mult)}; "
                f"allowed: exactly num_preprocess_blocks + num_latent_scales = "
                f"{self.num_preprocess_blocks + self.num_latent_scales} (docs/algorithm.md §1.1)")
        size = data.shape[1]
        down = 2 ** (self.num_preprocess_blocks + self.num_latent_scales - 1)
        if size % down:
            raise ConfigError(f"{where}: image size {size} is not divisible by 2^(num_preprocess_blocks + "
                              f"num_latent_scales - 1) = {down}; allowed: fewer down-sampling stages")
        if data.binarize and self.decoder_dist != "bin":
            raise ConfigError(f"{where}: vae.decoder_dist = {self.decoder_dist!r} with data.binarize = true; "
                              "allowed: 'bin' for binarised data")

    def latent_shape(self, data: DataConfig) -> tuple[int, int, int]:
        """(C, S, S) of the top-scale latents that get the SGM prior (docs/algorithm.md §1.2)."""
        s = data.shape[1] // 2 ** (self.num_preprocess_blocks + self.num_latent_scales - 1)
        return (self.num_groups_per_scale * self.num_latent_per_group, s, s)


@dataclass(frozen=True, kw_only=True)
class TrainVAEConfig:
    """Stage 1: the VAE with a Normal prior (docs/algorithm.md §1.8)."""

    epochs: int = _f(lo=1)
    batch_size: int = _f(lo=1, doc="per-GPU (per-process) batch")
    global_batch_size: Optional[int] = _f(None, lo=1, doc="None: batch_size x processes; else reached by accumulation")
    learning_rate: float = _f(lo=0, lo_open=True)
    learning_rate_min: float = _f(lo=0)
    weight_decay: float = _f(lo=0)
    adamax_eps: float = _f(lo=0, lo_open=True)
    warmup_epochs: float = _f(lo=0)
    kl_anneal_portion: float = _f(lo=0, hi=1)
    kl_const_portion: float = _f(lo=0, hi=1)
    kl_const_coeff: float = _f(lo=0, hi=1)
    kl_max_coeff: float = _f(lo=0, hi=1)
    weight_decay_norm: float = _f(lo=0, doc="λ of spectral + BN regularisation (docs/algorithm.md §1.7)")
    seed: int = _f(lo=0)


@dataclass(frozen=True, kw_only=True)
class SDEConfig:
    """Forward SDE in latent space (docs/algorithm.md §2)."""

    kind: Literal[SDE_KINDS]
    beta_min: float = _f(0.1, lo=0, lo_open=True)
    beta_max: float = _f(20.0, lo=0, lo_open=True)
    sigma2_0: float = _f(0.0, lo=0, hi=1, hi_open=True)
    sigma2_min: float = _f(3e-5, lo=0, hi=1, lo_open=True, hi_open=True)
    sigma2_max: float = _f(0.999, lo=0, hi=1, lo_open=True, hi_open=True)
    time_eps: float = _f(lo=0, hi=1, hi_open=True)

    def check(self, where: str) -> None:
        if self.kind == "vpsde" and not self.beta_min < self.beta_max:
            raise ConfigError(f"{where}: need beta_min < beta_max, got {self.beta_min}, {self.beta_max}")
        if self.kind == "geometric" and not self.sigma2_min < self.sigma2_max:
            raise ConfigError(f"{where}: need sigma2_min < sigma2_max, got {self.sigma2_min}, {self.sigma2_max}")

    def sde_params(self) -> dict[str, float]:
        """Keyword arguments for :func:`lsgm.sde.make_sde` (the kind's parameters, lsgm.choices.SDE_PARAMS)."""
        return {name: getattr(self, name) for name in SDE_PARAMS[self.kind]}


@dataclass(frozen=True, kw_only=True)
class ScoreNetConfig:
    """NCSN++ backbone of the SGM prior and its mixed score (docs/algorithm.md §3, §5)."""

    nf: int = _f(lo=1, doc="num_channels_dae")
    num_scales: int = _f(lo=1)
    num_res_blocks: int = _f(lo=1)
    channel_mult: tuple[int, ...] = _f()
    dropout: float = _f(lo=0, hi=1, hi_open=True)
    fir: bool = False
    embedding_scale: float = _f(1000.0, lo=0, lo_open=True)
    embedding_dim: int = _f(128, lo=2)
    attn_resolutions: tuple[int, ...] = (16,)
    mixing_logit_init: float = _f(-3.0)
    mixed_score: bool = _f(True, doc="the mixed score of paper Sec. 3.2 (docs/algorithm.md §3); false: the network "
                                     "predicts ε alone (the paper's ablation; data-space models)")

    def check(self, where: str) -> None:
        if len(self.channel_mult) != self.num_scales:
            raise ConfigError(f"{where}: score_net.channel_mult has {len(self.channel_mult)} entries; "
                              f"allowed: exactly num_scales = {self.num_scales}")


@dataclass(frozen=True, kw_only=True)
class TrainLSGMConfig:
    """Stage 2 (and the CelebA qualitative stage 3): VAE + SGM prior (docs/algorithm.md §4.5–4.7)."""

    epochs: int = _f(lo=1)
    batch_size: int = _f(lo=1, doc="per-GPU (per-process) batch")
    global_batch_size: Optional[int] = _f(None, lo=1)
    learning_rate_vae: float = _f(lo=0)
    learning_rate_vae_min: float = _f(lo=0)
    vae_adam_eps: float = _f(lo=0, lo_open=True)
    learning_rate_score: float = _f(lo=0, lo_open=True)
    learning_rate_score_min: float = _f(lo=0)
    score_adam_eps: float = _f(lo=0, lo_open=True)
    weight_decay: float = _f(lo=0)
    weight_decay_mode: Literal[WEIGHT_DECAY_MODES] = _f(
        "decoupled", doc="both stage-2 Adams: decoupled (AdamW; the reference with apex's FusedAdam, its recommended "
                         "install) or l2 (torch Adam's L2 term; the reference without apex); docs/algorithm.md §12.4")
    ema_decay: float = _f(lo=0, hi=1)
    warmup_epochs: float = _f(lo=0)
    iw_sample_p: Literal[IW_MODES] = "ll_iw"
    iw_sample_q: Literal[IW_Q_MODES] = "reweight_p_samples"
    disjoint: bool = False
    update_q_ema: bool = False
    cont_kl_anneal: bool = False
    kl_const_coeff: float = _f(lo=0, hi=1)
    kl_max_coeff: float = _f(lo=0, hi=1)
    kl_anneal_portion: float = _f(lo=0, hi=1, lo_open=True)
    weight_decay_norm_vae: float = _f(lo=0)
    weight_decay_norm_score: float = _f(lo=0)
    spectral_reg_score_convs: bool = _f(doc="False reproduces --custom_conv_dae (no SR on SGM convs, docs/algorithm.md §1.7)")
    drop_inactive_var: bool = False
    inactive_kl_threshold: float = _f(0.1, lo=0)
    inactive_max_batches: int = _f(1000, lo=1)
    grad_clip: float = _f(0.0, lo=0)
    compat: Literal[COMPAT_MODES] = "exact"
    single_pass_joint: bool = _f(True, doc="one B-sized SGM pass for reweight_p_samples with different p/q "
                                           "objectives (same gradients; with dropout, p and q share one mask)")
    single_backward_joint: bool = _f(True, doc="with single_pass_joint: one backward per micro-batch, q's "
                                               "cross-entropy gradient reaching the encoder through p's graph "
                                               "rescaled per sample (same gradients up to rounding)")
    seed: int = _f(lo=0)


@dataclass(frozen=True, kw_only=True)
class PriorStageConfig:
    """One SGM-prior training stage: which VAE it starts from, whether the VAE trains, SDE, network, schedule."""

    init_from: str  # "vae" (the stage-1 model) or the name of an earlier prior stage
    train_vae: bool
    sde: SDEConfig
    score_net: ScoreNetConfig
    train: TrainLSGMConfig
    load_prior: bool = False  # also take the SGM weights from init_from (False: fresh SGM, CelebA stage 3)
    prior_kind: Literal["sgm", "normal"] = _f(
        "sgm", doc="normal: no SGM; the stage trains the VAE further with its N(0, I) prior, with the stage's "
                   "optimiser and schedule (the baseline 'VAE alone for the same total steps')")


@dataclass(frozen=True, kw_only=True)
class TrainSGMConfig:
    """Training of a data-space score model (the paper's comparison class, Song et al. 2021): the SGM objective of
    docs/algorithm.md §4.4 on dequantised images, with the stage-2 engine."""

    epochs: int = _f(lo=1)
    batch_size: int = _f(lo=1, doc="per-GPU (per-process) batch")
    global_batch_size: Optional[int] = _f(None, lo=1)
    learning_rate: float = _f(lo=0, lo_open=True)
    learning_rate_min: float = _f(lo=0)
    adam_eps: float = _f(1e-8, lo=0, lo_open=True)
    weight_decay: float = _f(0.0, lo=0)
    weight_decay_mode: Literal[WEIGHT_DECAY_MODES] = "decoupled"
    ema_decay: float = _f(lo=0, hi=1)
    warmup_epochs: float = _f(0.0, lo=0)
    iw_sample_p: Literal[IW_MODES] = _f("ll_iw", doc="ll_iw / ll_uniform: likelihood weighting (the NLL)")
    weight_decay_norm: float = _f(0.0, lo=0, doc="λ of the spectral + norm-layer regulariser (docs/algorithm.md §1.7)")
    grad_clip: float = _f(0.0, lo=0)
    compat: Literal[COMPAT_MODES] = "exact"
    seed: int = _f(lo=0)


@dataclass(frozen=True, kw_only=True)
class DataSGMConfig:
    """A score model in data space: NCSN++ + VPSDE trained directly on uniformly dequantised images, sampled and
    evaluated by the same probability-flow ODE as the latent prior (model name ``data_sgm``)."""

    sde: SDEConfig
    score_net: ScoreNetConfig
    train: TrainSGMConfig
    eval_images: Optional[int] = _f(None, lo=1, doc="test images of its NLL (None: data.max_eval_images); its ODE "
                                                    "costs far more per image than the latent prior's")


@dataclass(frozen=True, kw_only=True)
class SampleRunConfig:
    """One extra sampling run of an experiment (beyond the default ``lsgm`` ODE run of ``sampling``).

    ``model``: ``lsgm`` (the final prior stage), another prior stage's name, ``vae`` (the stage-1 VAE's N(0, I)
    prior) or ``data_sgm``; ``sampler``: ``ode`` (probability-flow ODE, ``ode_tol`` overrides ``sampling.ode_tol``)
    or ``ancestral`` (``steps`` network evaluations, docs/algorithm.md §6.3)."""

    model: str = "lsgm"
    sampler: Literal["ode", "ancestral"] = "ode"
    ode_tol: Optional[float] = _f(None, lo=0, lo_open=True)
    steps: int = _f(1000, lo=1, doc="ancestral sampler steps")
    num_samples: Optional[int] = _f(None, lo=1, doc="None: sampling.num_samples")

    @property
    def tag(self) -> str:
        """Name of the run (its folder ``samples/<tag>/``), e.g. ``lsgm-ode-tol0.001``, ``data_sgm-ancestral1000``."""
        if self.sampler == "ancestral":
            return f"{self.model}-ancestral{self.steps}"
        return f"{self.model}-ode" + (f"-tol{self.ode_tol:g}" if self.ode_tol is not None else "")


@dataclass(frozen=True, kw_only=True)
class FDEvalConfig:
    """Sample quality in the feature space of a classifier trained on the dataset (lsgm/classifier.py): FD and KID
    of every sampling run against the training images, computed by torch-fidelity."""

    enabled: bool = False
    classifier_epochs: int = _f(2, lo=1)
    classifier_width: int = _f(16, lo=1)
    classifier_batch_size: int = _f(128, lo=1)
    classifier_seed: int = _f(0, lo=0)
    max_reference_images: int = _f(10000, lo=2)
    kid_subset_size: int = _f(500, lo=2)
    batch_size: int = _f(500, lo=1)
    subset_size: int = _f(250, lo=2, doc="FD / KID are also computed on the first N samples of every run, so that runs "
                                         "with fewer samples (the costly ancestral sampler) compare at equal N")


@dataclass(frozen=True, kw_only=True)
class ClaimsConfig:
    """Which models of the experiment play which role in the paper's claims (lsgm/claims.py, docs/algorithm.md
    "Claims at small scale"); a role left empty skips the claims that need it."""

    lsgm: Optional[str] = "lsgm"  # the end-to-end LSGM (C1, C2, C3, C4, C5, C6)
    vae_alone: Optional[str] = None  # the VAE trained alone for the same total steps (C2)
    no_mixed_score: Optional[str] = None  # the LSGM without the mixed score (C3)
    frozen_vae: Optional[str] = None  # a fresh SGM on the frozen stage-1 VAE (C4)
    data_sgm: Optional[str] = None  # the data-space score model (C5)
    tolerances: tuple[float, ...] = ()  # ODE tolerances of the latent model's FD/NFE curve (C6)
    ancestral_steps: int = _f(1000, lo=1)  # the data-space ancestral sampler of C5 (b)
    ancestral_comparison_tol: Optional[float] = _f(
        None, lo=0, lo_open=True, doc="C5 (b): the latent ODE's tolerance against the ancestral sampler (fixed in "
                                      "advance; None: sampling.ode_tol); its run must be among the tolerances")
    costly_num_samples: Optional[int] = _f(None, lo=1, doc="samples of the data-space model's runs (its network "
                                                           "evaluations are the costly ones); None: sampling's")


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Probability-flow ODE sampling (docs/algorithm.md §6.1)."""

    num_samples: int = _f(lo=1)
    batch_size: int = _f(lo=1)
    ode_eps: float = _f(lo=0, lo_open=True, hi=1)
    ode_tol: float = _f(lo=0, lo_open=True)
    temperature: float = _f(1.0, lo=0, lo_open=True)
    vae_temperature: float = _f(1.0, lo=0, lo_open=True)
    method: Literal[ODE_METHODS] = "dopri5"
    vae_train_mode: bool = False  # decoder BatchNorm with batch statistics (CelebA FID, docs/algorithm.md §6.1 step 5)
    use_ema: bool = True
    seed: int = _f(0, lo=0)
    grid_size: int = _f(8, lo=1, doc="the PNG grid is grid_size x grid_size samples")


@dataclass(frozen=True, kw_only=True)
class NLLEvalConfig:
    """NLL bound on the evaluation split (docs/algorithm.md §7.1)."""

    batch_size: int = _f(lo=1)
    ode_eps: float = _f(lo=0, lo_open=True, hi=1)
    ode_tol: float = _f(lo=0, lo_open=True)
    num_iw_samples: int = _f(1, lo=1)
    trace: Literal[TRACES] = "hutchinson"
    probe: Literal[PROBES] = "gaussian"
    num_probes: int = _f(1, lo=1)
    probe_mode: Literal[PROBE_MODES] = "fixed"
    method: Literal[ODE_METHODS] = "dopri5"
    use_ema: bool = True
    binarization_draws: int = _f(1, lo=1)
    seed: int = _f(0, lo=0)


@dataclass(frozen=True, kw_only=True)
class FIDEvalConfig:
    """FID/IS/KID with torch-fidelity (docs/algorithm.md §7.2)."""

    enabled: bool = True
    isc: bool = True
    kid: bool = True
    kid_subset_size: int = _f(1000, lo=2)
    batch_size: int = _f(64, lo=1)
    weights_path: str = "data/weights/weights-inception-2015-12-05-6726825d.pth"
    max_reference_images: int = _f(50000, lo=2)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How training runs (not what it computes): checkpoints, precision, devices, NaN guard."""

    device: Literal[DEVICES] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    tf32: bool = True
    grad_scaler_init: float = _f(1024.0, lo=1)
    checkpoint_every_steps: int = _f(500, lo=1)
    checkpoint_every_minutes: float = _f(30.0, lo=0, lo_open=True)
    keep_checkpoints: int = _f(3, lo=1)
    max_nan_failures: int = _f(3, lo=1)
    nan_lr_factor: float = _f(0.5, lo=0, hi=1, lo_open=True)
    log_every_steps: int = _f(10, lo=1)
    num_threads: Optional[int] = _f(None, lo=1)
    compile: bool = _f(False, doc="torch.compile the SGM backbone in train-lsgm (GPU; measured slower on CPU, "
                                  "and the first step compiles for minutes)")
    channels_last: bool = False
    keep_cpu_heap: bool = _f(True, doc="on CPU (glibc): keep freed activation memory in the process instead of "
                                       "unmapping it every step (mallopt thresholds); allocation only")
    fused_optimizer: bool = _f(True, doc="fused Adam kernels of stage 2 (CPU and CUDA; same update up to rounding); "
                                         "False: multi-tensor foreach kernels")


@dataclass(frozen=True, kw_only=True)
class ResourceConfig:
    """What one stage asks of Slurm (and of Snakemake's local scheduler)."""

    nodes: int = _f(1, lo=1)
    gpus_per_node: int = _f(0, lo=0)
    cpus_per_task: int = _f(1, lo=1, doc="threads per process; Snakemake `threads:`")
    mem_mb: int = _f(4000, lo=1)
    runtime_min: int = _f(60, lo=1)
    partition: Optional[str] = None
    gpu_model: Optional[str] = None

    @property
    def world_size(self) -> int:
        return self.nodes * max(self.gpus_per_node, 1)


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """A whole experiment: every hyper-parameter of every stage (docs/algorithm.md §9)."""

    name: str
    description: str
    data: DataConfig
    vae: VAEConfig
    train_vae: TrainVAEConfig
    prior: dict[str, PriorStageConfig]
    sampling: SamplingConfig
    eval_nll: NLLEvalConfig
    eval_fid: FIDEvalConfig
    engine: EngineConfig = field(default_factory=EngineConfig)
    resources: dict[str, ResourceConfig] = field(default_factory=dict)
    data_sgm: Optional[DataSGMConfig] = None
    eval_fd: FDEvalConfig = field(default_factory=FDEvalConfig)
    nll_models: tuple[str, ...] = ("lsgm", "vae")
    sample_runs: tuple[SampleRunConfig, ...] = ()
    claims: ClaimsConfig = field(default_factory=ClaimsConfig)
    seed_offset: int = _f(0, lo=0, doc="added to every seed (a derived experiment NAME_seedK has K)")
    #: the ``--set KEY=VALUE`` overrides this config was loaded with (a record: already merged into the values)
    cli_overrides: tuple[str, ...] = ()

    @property
    def final_prior_stage(self) -> str:
        """Name of the prior stage whose model is sampled and evaluated as ``lsgm``."""
        return list(self.prior)[-1]

    def model_stage(self, model: str) -> str:
        """The training stage whose ``model.pt`` a model name means: ``lsgm`` -> the final prior stage."""
        return self.final_prior_stage if model == "lsgm" else model

    def claims_runs(self) -> dict[str, SampleRunConfig]:
        """The sampling runs the claims read, by purpose (lsgm/claims.py): the latent ODE at each tolerance, each
        ablation model's ODE, the data-space ODE and ancestral sampler. The default run is ``SampleRunConfig()``."""
        c, runs = self.claims, {}
        if c.lsgm is None:
            return runs
        small = c.costly_num_samples
        runs["lsgm"] = SampleRunConfig(model=c.lsgm) if c.lsgm != "lsgm" else SampleRunConfig()
        for tol in c.tolerances:
            if tol != self.sampling.ode_tol or c.lsgm != "lsgm":
                runs[f"lsgm@{tol:g}"] = SampleRunConfig(model=c.lsgm, ode_tol=tol)
        for role in ("vae_alone", "no_mixed_score", "frozen_vae", "data_sgm"):
            model = getattr(c, role)
            if model is not None:
                runs[role] = SampleRunConfig(model=model, num_samples=small if role == "data_sgm" else None)
        if c.data_sgm is not None:
            runs["data_sgm_ancestral"] = SampleRunConfig(model=c.data_sgm, sampler="ancestral",
                                                         steps=c.ancestral_steps, num_samples=small)
        return runs

    def all_sample_runs(self) -> tuple[SampleRunConfig, ...]:
        """Every extra sampling run the pipeline makes: ``sample_runs`` plus those the claims read (not the
        default run, which always exists)."""
        runs = list(self.sample_runs) + [r for r in self.claims_runs().values() if r != SampleRunConfig()]
        return tuple(dict.fromkeys(runs))

    def all_nll_models(self) -> tuple[str, ...]:
        """Every model whose NLL bound the pipeline evaluates: ``nll_models`` plus those the claims read."""
        c = self.claims
        roles = [m for m in (c.lsgm, c.vae_alone, c.no_mixed_score, c.frozen_vae, c.data_sgm) if m is not None]
        return tuple(dict.fromkeys([*self.nll_models, *roles]))

    @property
    def models(self) -> tuple[str, ...]:
        """Every model name that can be sampled or evaluated: vae, lsgm, each prior stage, data_sgm."""
        names = ("vae", "lsgm", *self.prior, *(("data_sgm",) if self.data_sgm is not None else ()))
        return tuple(dict.fromkeys(names))

    def resource(self, stage: str) -> ResourceConfig:
        return self.resources.get(stage, ResourceConfig())


# --------------------------------------------------------------------------------------------- loading
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of name -> {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _range_text(meta: dict) -> str:
    lo, hi = meta.get("lo"), meta.get("hi")
    parts = []
    if lo is not None:
        parts.append(f"{'>' if meta.get('lo_open') else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if meta.get('hi_open') else '<='} {hi}")
    return " and ".join(parts)


def _check_range(value: float, meta: dict, where: str) -> None:
    lo, hi = meta.get("lo"), meta.get("hi")
    bad = (lo is not None and (value < lo or (meta.get("lo_open") and value == lo))) or (
        hi is not None and (value > hi or (meta.get("hi_open") and value == hi)))
    if bad:
        raise ConfigError(f"{where} = {value!r} is out of range; allowed: {_range_text(meta)}")


def _convert(value: Any, tp: Any, where: str, meta: dict, drop_removed: bool = False) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where, meta, drop_removed)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where} = {value!r} is not allowed; allowed: {_type_name(tp)}{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r} has the wrong type; allowed: {_type_name(tp)}")
        (elem,) = typing.get_args(tp)[:1]
        return tuple(_convert(v, elem, f"{where}[{i}]", meta) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r} has the wrong type; allowed: {_type_name(tp)}")
        _, vt = typing.get_args(tp)
        return {str(k): _convert(v, vt, f"{where}.{k}", meta, drop_removed) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, drop_removed=drop_removed)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r} has the wrong type; allowed: true/false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r} has the wrong type; allowed: an integer "
                              f"{_range_text(meta)}".rstrip())
        _check_range(value, meta, where)
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r} has the wrong type; allowed: a number "
                              f"{_range_text(meta)}".rstrip())
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where} = {value!r} is not a finite number; allowed: a finite number "
                              f"{_range_text(meta)}".rstrip())
        _check_range(value, meta, where)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r} has the wrong type; allowed: a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")


#: Keys removed because nothing read them, per section class. Stored configs (checkpoints, model files) may still
#: carry them and are read without them (:func:`config_from_dict`); a params file that sets one gets this reason.
REMOVED_KEYS: dict[str, dict[str, str]] = {
    "TrainLSGMConfig": {
        "train_ode_eps": "removed key: nothing read it (the reference uses it for ODE evaluations during training; "
                         "here sampling.ode_eps and eval_nll.ode_eps set the ODE of the separate stages); delete it",
        "train_ode_tol": "removed key: nothing read it (the reference uses it for ODE evaluations during training; "
                         "here sampling.ode_tol and eval_nll.ode_tol set the ODE of the separate stages); delete it",
    },
}


def _build(cls: type, raw: Any, where: str, *, drop_removed: bool = False) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} = {raw!r} has the wrong type; allowed: {_type_name(cls)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    removed = REMOVED_KEYS.get(cls.__name__, {})
    if drop_removed:
        raw = {k: v for k, v in raw.items() if k not in removed}
    for key in raw:
        if key in removed:
            raise ConfigError(f"{where}.{key}: {removed[key]}")
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}.{key}: unknown key {key!r}{hint} "
                              f"(allowed keys: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], f"{where}.{name}", dict(f.metadata), drop_removed)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name}: required key is missing; allowed: {_type_name(hints[name])}")
    return cls(**kwargs)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _resolve_raw(path: Path, seen: tuple[Path, ...] = (), sources: dict[str, str] | None = None) -> dict:
    """Merge a file's ``extends:`` fragments (paths relative to the file) under the file's own keys.

    ``sources`` (if given) records, for every dotted key path, the file that sets it last (the one that wins)."""
    path = Path(path)
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular 'extends' chain: {' -> '.join(str(p) for p in seen)}")
    raw = _read_yaml(path)
    parents = raw.pop("extends", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list):
        raise ConfigError(f"{path}: 'extends' must be a list of file paths, got {parents!r}")
    merged: dict = {}
    for parent in parents:
        ppath = path.parent / parent
        if not ppath.exists():
            raise ConfigError(f"{path}: extends {parent!r}, but {ppath} does not exist")
        merged = _deep_merge(merged, _resolve_raw(ppath, seen + (path.resolve(),), sources))
    if sources is not None:
        sources.update({key: str(path) for key in _key_paths(raw)})
    return _deep_merge(merged, raw)


def _key_paths(raw: dict, prefix: str = "") -> list[str]:
    """Every dotted key path of a nested mapping (mappings and leaves)."""
    out = []
    for k, v in raw.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, dict):
            out += _key_paths(v, key + ".")
    return out


def _apply_prior_defaults(raw: dict, where: str, sources: dict[str, str] | None = None) -> None:
    """``prior_defaults:`` (from a fragment) is merged beneath every stage under ``prior:``."""
    defaults = raw.pop("prior_defaults", None)
    if defaults is None:
        return
    if not isinstance(defaults, dict):
        raise ConfigError(f"{where}: prior_defaults must be a mapping, got {defaults!r}")
    prior = raw.get("prior")
    if isinstance(prior, dict):
        raw["prior"] = {k: _deep_merge(defaults, v) if isinstance(v, dict) else v for k, v in prior.items()}
        if sources is not None:
            for stage in prior:
                for key in _key_paths(defaults):
                    sources.setdefault(f"prior.{stage}.{key}", sources.get(f"prior_defaults.{key}", where))


def _source_of(key_msg: str, sources: dict[str, str]) -> str | None:
    """The file that wrote the key a ``section.key ...`` message is about (longest key prefix set by a file)."""
    m = re.match(r"[A-Za-z0-9_.]+", key_msg)
    parts = m.group(0).rstrip(".").split(".") if m else []
    for n in range(len(parts), 0, -1):
        src = sources.get(".".join(parts[:n]))
        if src is not None:
            return src
    return None


def load_config(path: str | os.PathLike, name: str | None = None,
                overrides: typing.Sequence[tuple[str, dict]] = ()) -> ExperimentConfig:
    """Load, merge and validate one experiment file.

    Args:
        path: the experiment's YAML file (e.g. ``params/cifar10_best_fid.yaml``).
        name: experiment name; default: the file's stem.
        overrides: ``(source, nested mapping)`` layers merged on top of the file, in order (``params.yaml``'s entry
            of the experiment, then each ``--set``); an error in a value they set names ``source``.

    Raises:
        ConfigError: naming the file (or override) that wrote the bad value, key path, value and what is allowed.
    """
    path = Path(path)
    sources: dict[str, str] = {}
    raw = _resolve_raw(path, sources=sources)
    for source, layer in overrides:
        if "name" in layer:
            source = source.replace(_OVERRIDE_ENTRY, ": ")
            raise ConfigError(f"{source}: name: cannot be overridden (it names the run directory); allowed: any other "
                              "key of the experiment's config")
        sources.update({key: source for key in _key_paths(layer)})
        raw = _deep_merge(raw, layer)
    _apply_prior_defaults(raw, str(path), sources)
    raw.setdefault("name", name or path.stem)
    raw.setdefault("description", "")
    cli = [src[len(_SET_PREFIX):] for src, _ in overrides if src.startswith(_SET_PREFIX)]
    if cli:
        raw["cli_overrides"] = list(raw.get("cli_overrides") or []) + cli
    where = str(path)
    try:
        cfg = _build(ExperimentConfig, raw, where)
        _cross_check(cfg, where)
    except ConfigError as exc:
        raise ConfigError(_name_the_source(str(exc), where, sources)) from None
    return cfg


def _name_the_source(msg: str, where: str, sources: dict[str, str]) -> str:
    """``<file>.section.key ...`` / ``<file>: section.key ...`` -> the same message led by the file (fragment,
    ``params.yaml`` entry or ``--set``) that wrote the value, and which experiment file it applies to."""
    for sep in (".", ": "):
        if msg.startswith(where + sep):
            break
    else:
        return msg
    key_msg = msg[len(where) + len(sep):]
    source = _source_of(key_msg, sources)
    if source is None:
        return f"{where}: {key_msg}"
    if source.startswith(_SET_PREFIX):
        return f"{source}: {key_msg} (overriding {where})"
    if _OVERRIDE_ENTRY in source:  # params.yaml: name the key as it is spelt there (EXP.section.key)
        file, exp = source.split(_OVERRIDE_ENTRY)
        return f"{file}: {exp}.{key_msg} (overriding {where})"
    if source == where:
        return f"{where}: {key_msg}"
    return f"{source}: {key_msg} (inherited by {where})"


def _cross_check(cfg: ExperimentConfig, where: str) -> None:
    cfg.vae.check(where, cfg.data)
    if not cfg.prior:
        raise ConfigError(f"{where}: prior: at least one prior stage is required")
    seen = ["vae"]
    for stage, p in cfg.prior.items():
        w = f"{where}: prior.{stage}"
        p.sde.check(w + ".sde")
        p.score_net.check(w + ".score_net")
        if p.init_from not in seen:
            raise ConfigError(f"{w}.init_from = {p.init_from!r}; allowed: one of {seen} (an earlier stage)")
        try:
            check_mode_sde(p.train.iw_sample_p, p.sde.kind, "train.iw_sample_p")
        except ValueError as exc:
            raise ConfigError(f"{w}.{exc} (docs/algorithm.md §4.3)") from None
        if p.train.disjoint and p.train.iw_sample_q == "reweight_p_samples":
            raise ConfigError(f"{w}.train.iw_sample_q = 'reweight_p_samples' with disjoint = true; "
                              "allowed: 'll_uniform' or 'll_iw' (docs/algorithm.md §4.5)")
        if p.train.disjoint and not p.train_vae:
            raise ConfigError(f"{w}.train.disjoint = true needs train_vae = true (docs/algorithm.md §4.5)")
        if p.load_prior and p.init_from == "vae":
            raise ConfigError(f"{w}.load_prior = true needs init_from to name an earlier prior stage")
        seen.append(stage)
    _check_models(cfg, where)
    for stage in cfg.resources:
        if stage not in RESOURCE_STAGES:
            close = difflib.get_close_matches(stage, RESOURCE_STAGES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: resources.{stage}: unknown stage{hint} (allowed: {', '.join(RESOURCE_STAGES)})")


def _check_models(cfg: ExperimentConfig, where: str) -> None:
    """The data-space model, model names in nll_models / sample_runs / claims."""
    if cfg.data_sgm is not None:
        w = f"{where}: data_sgm"
        if cfg.data.binarize:
            raise ConfigError(f"{w}: a data-space score model needs dequantisable levels; allowed: data.binarize = "
                              "false (8-bit or bit-reduced data)")
        cfg.data_sgm.sde.check(w + ".sde")
        cfg.data_sgm.score_net.check(w + ".score_net")
        try:
            check_mode_sde(cfg.data_sgm.train.iw_sample_p, cfg.data_sgm.sde.kind, "train.iw_sample_p")
        except ValueError as exc:
            raise ConfigError(f"{w}.{exc} (docs/algorithm.md §4.3)") from None
    models = cfg.models
    refs = [(f"nll_models[{i}]", m) for i, m in enumerate(cfg.nll_models)]
    refs += [(f"sample_runs[{i}].model", r.model) for i, r in enumerate(cfg.sample_runs)]
    refs += [(f"claims.{f.name}", getattr(cfg.claims, f.name)) for f in dataclasses.fields(ClaimsConfig)
             if f.type in ("Optional[str]",) or isinstance(getattr(cfg.claims, f.name), str)]
    for key, model in refs:
        if model is not None and model not in models:
            raise ConfigError(f"{where}: {key} = {model!r} is not a model of this experiment; allowed: "
                              f"{', '.join(models)}")
    c = cfg.claims
    if c.ancestral_comparison_tol is not None and c.ancestral_comparison_tol not in (*c.tolerances,
                                                                                     cfg.sampling.ode_tol):
        raise ConfigError(f"{where}: claims.ancestral_comparison_tol = {c.ancestral_comparison_tol!r}; allowed: one "
                          f"of claims.tolerances {list(c.tolerances)} (its sampling run must exist)")
    tags = [r.tag for r in cfg.sample_runs]
    dup = sorted({t for t in tags if tags.count(t) > 1})
    if dup:
        raise ConfigError(f"{where}: sample_runs repeats {dup}; allowed: each (model, sampler, tol/steps) once")


# --------------------------------------------------------------------------------------------- matrix
def _repo_root() -> Path:
    env = os.environ.get("LSGM_ROOT")
    return Path(env) if env else Path.cwd()


def _matrix(root: Path | None = None) -> tuple[Path, dict]:
    root = root or _repo_root()
    path = root / "params" / "experiments.yaml"
    raw = _read_yaml(path)
    exps = raw.get("experiments")
    if not isinstance(exps, dict) or not exps:
        raise ConfigError(f"{path}: 'experiments' must be a non-empty mapping of name -> {{params, default}}")
    return path, exps


def list_experiments(root: Path | None = None) -> list[str]:
    """All experiment names in ``params/experiments.yaml``, in file order."""
    return list(_matrix(root)[1])


def seeded_names(name: str, seeds: list[int]) -> list[str]:
    """Experiment instances of ``name`` for ``seeds``: seed 0 is ``name`` itself, seed K is ``name_seedK``."""
    return [name if k == 0 else f"{name}_seed{k}" for k in seeds]


def matrix_claims_experiments(root: Path | None = None, seeds: list[int] | None = None) -> list[str]:
    """The instances the ``claims`` target reads: every matrix entry with ``claims: true``, once per seed
    (``seeds`` overrides the entry's ``seeds: [0, 1, ...]``; default [0])."""
    path, exps = _matrix(root)
    out = []
    for name, entry in exps.items():
        if not (isinstance(entry, dict) and entry.get("claims", False)):
            continue
        these = seeds if seeds is not None else entry.get("seeds", [0])
        if not isinstance(these, list) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0
                                                  for k in these):
            raise ConfigError(f"{path}: experiments.{name}.seeds = {these!r}; allowed: a list of integers >= 0")
        out += seeded_names(name, these)
    return out


def default_experiments(root: Path | None = None) -> list[str]:
    """Experiments that the default pipeline target runs."""
    return [k for k, v in _matrix(root)[1].items() if isinstance(v, dict) and v.get("default", False)]


_SEED_SUFFIX = re.compile(r"^(?P<base>.+)_seed(?P<k>[0-9]+)$")


def split_seed(name: str, root: Path | None = None) -> tuple[str, int]:
    """``NAME_seedK`` (NAME in the matrix) -> (NAME, K); any other name -> (name, 0).

    A derived experiment ``NAME_seedK`` is NAME's config with every seed (training stages, sampling, NLL
    evaluation) increased by K: the same experiment repeated with other random numbers (claims across seeds)."""
    m = _SEED_SUFFIX.match(name)
    if m and m.group("base") in _matrix(root)[1]:
        return m.group("base"), int(m.group("k"))
    return name, 0


def with_seed_offset(cfg: ExperimentConfig, k: int) -> ExperimentConfig:
    """``cfg`` with every seed increased by ``k`` (and ``seed_offset`` recording it)."""
    if k == 0:
        return cfg
    bump = lambda section: dataclasses.replace(section, seed=section.seed + k)  # noqa: E731
    prior = {name: dataclasses.replace(st, train=bump(st.train)) for name, st in cfg.prior.items()}
    data_sgm = None if cfg.data_sgm is None else dataclasses.replace(cfg.data_sgm, train=bump(cfg.data_sgm.train))
    return dataclasses.replace(cfg, train_vae=bump(cfg.train_vae), prior=prior, data_sgm=data_sgm,
                               sampling=bump(cfg.sampling), eval_nll=bump(cfg.eval_nll), seed_offset=k)


def experiment_file(name: str, root: Path | None = None) -> Path:
    """Path of an experiment's params file (a derived ``NAME_seedK`` uses NAME's file)."""
    root = root or _repo_root()
    path, exps = _matrix(root)
    name = split_seed(name, root)[0]
    if name not in exps:
        close = difflib.get_close_matches(name, list(exps), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{path}: unknown experiment {name!r}{hint} (allowed: {', '.join(exps)})")
    entry = exps[name]
    rel = entry.get("params") if isinstance(entry, dict) else None
    if not isinstance(rel, str):
        raise ConfigError(f"{path}: experiments.{name}.params must be the path of the experiment's file")
    return root / rel


#: per-experiment overrides (repo-relative): DVC's default params file, so ``dvc exp run -S '++EXP.KEY=VALUE'`` edits it
OVERRIDES_FILE = "params.yaml"
_SET_PREFIX = "--set "
_OVERRIDE_ENTRY = " :: "  # source label of a params.yaml entry: "<file> :: <experiment>"


def parse_set(text: str) -> tuple[str, dict]:
    """One ``--set KEY=VALUE`` -> ``(source, nested mapping)``; VALUE is read as YAML (``1e-3``, ``true``, ``[1, 2]``).

    Raises:
        ConfigError: not ``KEY=VALUE`` with a dotted key path, or a VALUE that is not YAML.
    """
    key, sep, value = text.partition("=")
    source = f"{_SET_PREFIX}{text}"
    parts = key.strip().split(".")
    if not sep or not all(re.fullmatch(r"[A-Za-z0-9_]+", p) for p in parts):
        raise ConfigError(f"{source}: allowed: KEY=VALUE with KEY a dotted path into the experiment's config, "
                          "e.g. --set sampling.ode_tol=1e-3 (see `lsgm config show EXP`)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: VALUE is not valid YAML ({exc.problem}); allowed: a number, true/false, a "
                          "string or a [list]") from None
    layer: Any = parsed
    for part in reversed(parts):
        layer = {part: layer}
    return source, layer


def read_overrides(root: Path | None = None) -> dict[str, dict]:
    """``params.yaml`` (:data:`OVERRIDES_FILE`): experiment -> its override mapping (``{}`` when none; the file may
    be absent). Every top-level key must name an experiment of the matrix."""
    root = root or _repo_root()
    path = root / OVERRIDES_FILE
    if not path.is_file():
        return {}
    raw = _read_yaml(path)
    names = list(_matrix(root)[1])
    out: dict[str, dict] = {}
    for exp, layer in raw.items():
        if exp not in names:
            close = difflib.get_close_matches(str(exp), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}: {exp}: unknown experiment {exp!r}{hint} (allowed: {', '.join(names)})")
        if layer is None:
            layer = {}
        if not isinstance(layer, dict):
            raise ConfigError(f"{path}: {exp} = {layer!r} has the wrong type; allowed: a mapping of config keys "
                              "(e.g. {sampling: {ode_tol: 0.001}}) or {}")
        out[str(exp)] = layer
    return out


def load_experiment(name_or_path: str, root: Path | None = None, set_args: typing.Sequence[str] = ()) -> ExperimentConfig:
    """Load an experiment by name (looked up in the matrix) or by the path of a YAML file.

    Args:
        name_or_path: experiment name from ``params/experiments.yaml`` or the path of a params YAML file.
        root: repository root (default: ``$LSGM_ROOT`` or the working directory).
        set_args: ``KEY=VALUE`` overrides (``--set``), applied last.

    A named experiment also gets its entry of ``params.yaml`` (:data:`OVERRIDES_FILE`), before ``set_args``.
    """
    layers = [parse_set(a) for a in set_args]
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return load_config(p, overrides=layers)
    base, k = split_seed(name_or_path, root)
    path = experiment_file(base, root)
    file_layer = read_overrides(root).get(base) or {}  # a derived NAME_seedK shares NAME's entry
    if file_layer:
        label = f"{(root or _repo_root()) / OVERRIDES_FILE}{_OVERRIDE_ENTRY}{base}"
        layers = [(label, file_layer)] + layers
    cfg = load_config(path, name=name_or_path, overrides=layers)
    if k and cfg.seed_offset:
        raise ConfigError(f"{path}: seed_offset is set in the file; a derived experiment "
                          f"{name_or_path!r} cannot add another; allowed: leave seed_offset out")
    return with_seed_offset(cfg, k)


#: where ``lsgm resolve-config EXP`` writes the fully merged config that DVC reads params from (repo-relative)
RESOLVED_PARAMS = "params/resolved"


def resolved_params_file(name: str, root: Path | None = None) -> Path:
    """``params/resolved/<name>.yaml`` under the repository root."""
    return (root or _repo_root()) / RESOLVED_PARAMS / f"{name}.yaml"


# --------------------------------------------------------------------------------------------- output
def config_to_dict(cfg: Any) -> Any:
    """Plain nested dict/list view (tuples as lists) suitable for YAML/JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    return cfg


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML text (keys in declaration order)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False, width=110)


def config_hash(section: Any) -> str:
    """Short stable hash of a config (section), for provenance columns."""
    blob = json.dumps(config_to_dict(section), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def experiment_hash(cfg: ExperimentConfig) -> str:
    """ONE hash per run: :func:`config_hash` of the whole resolved config (every section, overrides merged; the
    description and the record of ``--set`` left out). Every output JSON of every stage carries the same value,
    beside ``params_hash`` (the sections that stage reads)."""
    return config_hash({k: v for k, v in config_to_dict(cfg).items() if k not in ("description", "cli_overrides")})


def set_args_text(cfg: ExperimentConfig) -> str:
    """`` --set K=V ...`` of a config loaded with ``--set`` (empty otherwise): appended to the ``command`` that
    output JSONs record, so the command reproduces the run."""
    import shlex

    return "".join(f" --set {shlex.quote(a)}" for a in cfg.cli_overrides)


def write_resolved_config(cfg: ExperimentConfig, path: str | os.PathLike) -> Path:
    """Save the resolved config (YAML) atomically at ``path`` (a stage's ``resolved_config.yaml``,
    :meth:`lsgm.runs.RunLayout.resolved_config`)."""
    path = Path(path)
    atomic_write_text(path, dump_config(cfg))
    return path


def config_from_dict(raw: dict, where: str = "<checkpoint>") -> ExperimentConfig:
    """Rebuild a config from :func:`config_to_dict` output (e.g. stored in a checkpoint); keys of
    :data:`REMOVED_KEYS` that older files carry are dropped."""
    cfg = _build(ExperimentConfig, raw, where, drop_removed=True)
    _cross_check(cfg, where)
    return cfg
