"""Sampling and the NLL bound with a written protocol (docs/algorithm.md §6.1, §7.1, §11).

* :func:`sample_experiment` (``lsgm sample``): probability-flow ODE samples of the final prior stage, decoded to
  the decoder mean, saved as uint8 ``samples.npz`` + ``grid.png`` + ``sample_stats.json`` (NFE/time per batch).
* :func:`eval_nll_experiment` (``lsgm eval-nll``): per test image
  ``NELBO = −log p(x|z) + Σ log q(z|x) − log p(z0_top) − log N(z_rest; 0, I)`` (nats), where ``−log p(z0_top)``
  is the ODE prior term (``--model lsgm``) or the analytic ``−log N(z0_top; 0, I)`` of the stage-1 VAE
  (``--model vae``). With ``num_iw_samples = K > 1`` also ``−log mean_k exp(−NELBO_k)``. Binarised data is
  re-binarised ``binarization_draws`` times. Random streams are separate and seeded (binarisation, encoder
  noise, Hutchinson probes), so the VAE and LSGM evaluations see identical images and encoder samples and their
  per-image values can be compared pairwise.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsgm.atomic import atomic_path, atomic_write_json
from lsgm.config import (ExperimentConfig, SampleRunConfig, config_hash, experiment_hash, set_args_text,
                         write_resolved_config)
from lsgm.device import resolve_device
from lsgm.headline import headline_layout, nll_headline, sample_headline, write_headline
from lsgm.progress import progress
from lsgm.provenance import git_commit, peak_rss_mb, sha256_or_none
from lsgm.runs import DATA_SGM_STAGE, RunLayout, prepared_dir
from lsgm.stats import bits_per_dim, mean_and_stderr

__all__ = [
    "eval_nll_experiment",
    "image_nelbo_terms",
    "model_path",
    "sample_experiment",
    "save_image_grid",
    "solver_method",
    "to_uint8_images",
]

_SOLVER_METHODS = {"dopri5": "dopri5", "scipy_rk45": "scipy_solver", "scipy_solver": "scipy_solver"}


# --------------------------------------------------------------------------------------------- small helpers
def solver_method(name: str) -> str:
    """Map a config ODE method (``dopri5`` | ``scipy_rk45``) to the solver name of :mod:`lsgm.sampling`."""
    if name not in _SOLVER_METHODS:
        raise ValueError(f"ODE method={name!r} is not allowed; allowed: dopri5, scipy_rk45")
    return _SOLVER_METHODS[name]


def model_path(cfg: ExperimentConfig, run_root: str | os.PathLike, model: str) -> Path:
    """``model.pt`` of a model: ``vae`` (stage 1), ``lsgm`` (the final prior stage), a prior stage's name, or
    ``data_sgm`` (the data-space score model)."""
    if model not in cfg.models:
        raise ValueError(f"model={model!r} is not allowed for {cfg.name}; allowed: {', '.join(cfg.models)}")
    return RunLayout(run_root, cfg.name).model(cfg.model_stage(model))


# --------------------------------------------------------------------------------------------- images
def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """Decoder means in [−1, 1] → uint8 levels ``round(255 (x + 1)/2)`` (docs/algorithm.md §1.6: [−1,1] → [0,1])."""
    x01 = ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return torch.round(x01 * 255.0).to(torch.uint8)


def save_image_grid(images: np.ndarray | torch.Tensor, path: str | os.PathLike, nrow: int, pad: int = 1) -> Path:
    """Save up to ``nrow²`` uint8 images (N, C, H, W) as a PNG grid (white padding; :func:`lsgm.figures.image_grid`).

    Args:
        images: uint8 (N, C, H, W), C in {1, 3}.
        path: output ``.png``.
        nrow: images per row (and rows).
        pad: pixels between images.
    """
    from PIL import Image

    from lsgm.figures import image_grid

    grid = image_grid(np.asarray(images), nrow=nrow, pad=pad)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid).save(tmp, format="PNG")
    return path


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


# --------------------------------------------------------------------------------------------- sampling
def _load(cfg: ExperimentConfig, run_root: Path, model: str, device: torch.device, use_ema: bool):
    from lsgm.models import load_model

    path = model_path(cfg, run_root, model)
    loaded = load_model(path, device=device, use_ema=use_ema)
    stage = cfg.model_stage(model)
    wants_sgm = stage == DATA_SGM_STAGE or (stage in cfg.prior and cfg.prior[stage].prior_kind == "sgm")
    if wants_sgm and loaded.prior is None:
        raise ValueError(f"{path}: has no SGM prior (stage {loaded.stage!r}); expected a prior-stage model")
    return path, loaded


def _sample_batch(m, run: SampleRunConfig, shape: tuple[int, ...], sc, tol: float, generator: torch.Generator,
                  device: torch.device, on_step=None):
    """One batch of ``shape`` from a model's prior: the probability-flow ODE or the ancestral sampler of its SGM
    (``on_step(1)`` after each of its steps), or ``temperature · N(0, I)`` for a Normal prior (stage 1,
    ``prior_kind: normal``)."""
    from lsgm.sampling import SampleResult, sample_ancestral, sample_ode

    if m.prior is None:
        z = sc.temperature * torch.randn(shape, generator=generator, device=generator.device).to(device)
        return SampleResult(z, 0, 0.0)
    if run.sampler == "ancestral":
        return sample_ancestral(m.prior, m.sde, shape, steps=run.steps, temperature=sc.temperature,
                                clamp=None if m.vae is None else 3.0, generator=generator, device=device,
                                callback=on_step)
    return sample_ode(m.prior, m.sde, shape, ode_eps=sc.ode_eps, tol=tol, temperature=sc.temperature,
                      method=solver_method(sc.method), generator=generator, device=device)


def data_to_uint8(y: torch.Tensor, max_value: int = 255) -> torch.Tensor:
    """Data-space samples y in [−1, 1] -> levels ``floor((y + 1)/2 · L)`` (L = max_value + 1, the inverse of the
    uniform dequantisation), clamped to 0..max_value, on the 0..255 scale."""
    levels = torch.floor((y.float() + 1.0) / 2.0 * (max_value + 1)).clamp(0, max_value)
    return torch.round(levels * (255.0 / max_value)).to(torch.uint8)


def sample_experiment(cfg: ExperimentConfig, *, run_root: Path, num_samples: int | None = None,
                      run: SampleRunConfig | None = None, metrics_root: Path | None = None) -> dict[str, Any]:
    """``lsgm sample``: samples of one sampling run (docs/algorithm.md §6): by default the final prior stage's
    probability-flow ODE (``sampling``); ``run`` picks another model, the ancestral sampler or another tolerance.

    Writes ``samples.npz`` (uint8), ``grid.png``, ``sample_stats.json`` (NFE and time per batch) and the resolved
    config into ``<run_root>/<exp>/sample/`` (default run) or ``samples/<tag>/``.

    Args:
        cfg: experiment config (``sampling`` section: N, batch, ``ode_eps``, tolerance, temperatures, seed).
        run_root: runs root (``data/runs``).
        num_samples: override ``sampling.num_samples``.
        run: the sampling run (default: ``SampleRunConfig()``, the final prior stage's ODE).
        metrics_root: where the headline file goes (:func:`lsgm.headline.headline_root`).

    Returns:
        The dict written to ``sample_stats.json`` (its headline numbers also to ``metrics/<exp>/sample.json``).
    """
    sc = cfg.sampling
    run = run or SampleRunConfig()
    tag = "" if run == SampleRunConfig() else run.tag
    tol = run.ode_tol if run.ode_tol is not None else sc.ode_tol
    n = int(num_samples) if num_samples is not None else (run.num_samples or sc.num_samples)
    if n < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
    t_start = time.perf_counter()
    device = resolve_device(cfg.engine.device)
    path, m = _load(cfg, Path(run_root), run.model, device, sc.use_ema)
    generator = torch.Generator(device=device).manual_seed(sc.seed)
    data_space = m.vae is None
    shape = tuple(cfg.data.shape) if data_space else tuple(m.vae.latent_shape)
    images, nfes, seconds = [], [], []
    if not data_space:
        m.vae.train(sc.vae_train_mode)  # CelebA FID decodes with batch statistics (docs/algorithm.md §6.1 step 5)
    # the ancestral chain's length is known: its progress counts steps (1,000 per batch), the ODE's counts images
    by_step = run.sampler == "ancestral" and m.prior is not None
    total = math.ceil(n / sc.batch_size) * run.steps if by_step else n
    with progress(total, f"sample {cfg.name}" + (f" ({tag})" if tag else ""), unit="step" if by_step else "img") as bar:
        while len(images) * sc.batch_size < n:
            b = min(sc.batch_size, n - len(images) * sc.batch_size)
            res = _sample_batch(m, run, (b, *shape), sc, tol, generator, device,
                                on_step=bar.update if by_step else None)
            with torch.no_grad():
                if data_space:
                    images.append(data_to_uint8(res.z).cpu())
                else:
                    params = m.vae.decode(res.z, temperature_rest=sc.vae_temperature, generator=generator)
                    images.append(to_uint8_images(m.vae.decoder_mean(params)).cpu())
            nfes.append(int(res.nfe))
            seconds.append(float(res.seconds))
            bar.set_postfix(nfe=res.nfe, refresh=False)
            if not by_step:
                bar.update(b)
    if not data_space:
        m.vae.eval()
    samples = torch.cat(images).numpy()
    layout = RunLayout(run_root, cfg.name)
    _save_npz(layout.run_samples(tag), images=samples)
    save_image_grid(samples, layout.run_grid(tag), nrow=sc.grid_size)
    write_resolved_config(cfg, layout.run_dir(tag) / layout.sample_config.name)
    nfe_mean, nfe_std = float(np.mean(nfes)), float(np.std(nfes))
    stats = {
        "num_samples": n, "batch_size": sc.batch_size, "num_batches": len(nfes), "shape": list(samples.shape[1:]),
        "nfe_mean": nfe_mean, "nfe_std": nfe_std, "nfe_per_batch": nfes,
        "seconds_mean": float(np.mean(seconds)), "seconds_std": float(np.std(seconds)),
        "seconds_per_batch": seconds, "seconds_meaning": "solve time per batch (excludes decoding)",
        "model": run.model, "sampler": "normal prior" if m.prior is None else run.sampler, "run": tag or "default",
        "steps": run.steps if run.sampler == "ancestral" else None,
        "ode_eps": sc.ode_eps, "tol": tol, "temperature": sc.temperature,
        "vae_temperature": sc.vae_temperature, "method": sc.method, "vae_train_mode": sc.vae_train_mode,
        "seed": sc.seed, "grid_size": sc.grid_size, "checkpoint": str(path), "checkpoint_step": m.step,
        "stage": m.stage, "use_ema": sc.use_ema, "device": str(device), "dtype": "float32",
        "commit": git_commit(), "experiment_hash": experiment_hash(cfg),
        "params_hash": config_hash({"sampling": sc, "vae": cfg.vae, "prior": cfg.prior}),
        "params_hash_covers": "sampling, vae, prior",
        "command": f"lsgm sample {cfg.name} --run-root {run_root}"
                   + (f" --run {tag}" if tag else "") + (f" --num-samples {n}" if num_samples is not None else "")
                   + set_args_text(cfg),
        "seconds_total": time.perf_counter() - t_start,
        "seconds_total_meaning": "wall time of the stage: model loading, every ODE solve, decoding",
        "peak_rss_mb": peak_rss_mb(),
    }
    atomic_write_json(layout.run_stats(tag), stats)
    write_headline(headline_layout(cfg.name, run_root, metrics_root).sample_run(tag), sample_headline(stats))
    print(f"{n} samples, NFE {nfe_mean:.1f} ± {nfe_std:.1f} per batch -> {layout.run_dir(tag)}")
    return stats


# --------------------------------------------------------------------------------------------- NLL
def image_nelbo_terms(vae: torch.nn.Module, x: torch.Tensor, *, prior_nll_fn=None,
                      generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Per-image terms of the NLL bound for one encoder sample (docs/algorithm.md §7.1 steps 1–3), in nats.

    ``nelbo = recon + log_q − log_p_rest + prior_top`` with ``recon = −log p(x|z)``, ``log_q = Σ log q(z|x)``
    (all groups, flows included), ``log_p_rest = Σ log N(z_rest; 0, I)`` (finer scales) and ``prior_top`` the
    prior NLL of the top-scale latents: ``prior_nll_fn(z0_top) -> ((B,), nfe)`` (SGM, ODE) or, when None,
    the analytic ``−log N(z0_top; 0, I)`` (the stage-1 VAE's Normal prior).

    Args:
        vae: the NVAE (eval mode).
        x: images in [−1, 1], (B, C, H, W).
        prior_nll_fn: SGM prior term, or None for the Normal prior.
        generator: RNG of the encoder noise.

    Returns:
        ``({'nelbo', 'recon', 'log_q', 'prior_top', 'prior_rest', 'prior_top_normal', 'nelbo_normal'}, nfe)``
        with (B,) float64 tensors; ``*_normal`` use ``N(0, I)`` for the top latents of the same sample (a
        paired diagnostic: how much the SGM prior gains over the Normal prior on this very encoder).
    """
    with torch.no_grad():
        out = vae(x, generator=generator)
        top = out.top_group_count
        recon = -vae.decoder_log_prob(out.decoder_params, x)
        log_q = sum(g.flatten(1).sum(1) for g in out.log_q)
        prior_rest = -sum((g.flatten(1).sum(1) for g in out.log_p_normal[top:]), torch.zeros_like(recon))
        z0_top = out.z0_top
        prior_top_normal = -sum(g.flatten(1).sum(1) for g in out.log_p_normal[:top])
    nfe = 0
    if prior_nll_fn is None:
        prior_top = prior_top_normal
    else:
        prior_top, nfe = prior_nll_fn(z0_top)
    terms = {"recon": recon, "log_q": log_q, "prior_top": prior_top, "prior_rest": prior_rest,
             "prior_top_normal": prior_top_normal}
    terms = {k: v.detach().double().cpu() for k, v in terms.items()}
    vae_terms = terms["recon"] + terms["log_q"] + terms["prior_rest"]
    terms["nelbo"] = vae_terms + terms["prior_top"]
    terms["nelbo_normal"] = vae_terms + terms["prior_top_normal"]
    return terms, int(nfe)


def _eval_images(cfg: ExperimentConfig, data_root: Path):
    from lsgm.data.loader import load_split

    split = load_split(data_root, cfg.data.dataset, cfg.data.eval_split)
    n = len(split) if cfg.data.max_eval_images is None else min(len(split), cfg.data.max_eval_images)
    return split, n


def eval_nll_experiment(cfg: ExperimentConfig, *, run_root: Path, data_root: Path, model: str,
                        metrics_root: Path | None = None) -> dict[str, Any]:
    """``lsgm eval-nll``: the NLL bound on the evaluation split (docs/algorithm.md §7.1); writes ``eval/nll_<model>.json``.

    Args:
        cfg: experiment config (``eval_nll`` section: batch, ODE eps/tol, probes, K, draws, seed).
        run_root: runs root (``data/runs``).
        data_root: prepared datasets root (``data/prepared``).
        model: ``"lsgm"`` (final prior stage, ODE prior term), ``"vae"`` (stage-1 model, Normal prior), another prior
            stage's name (its SGM by the ODE; a ``prior_kind: normal`` stage with its Normal prior), or
            ``"data_sgm"`` (the data-space score model: ODE likelihood of dequantised images, see
            :func:`data_sgm_nll_terms`).
        metrics_root: where the headline file goes (:func:`lsgm.headline.headline_root`).

    Returns:
        The dict written to the JSON file (its headline numbers also to ``metrics/<exp>/nll_<model>.json``).
    """
    from lsgm.data.loader import to_model_input
    from lsgm.likelihood import ode_nll

    ec = cfg.eval_nll
    device = resolve_device(cfg.engine.device)
    path, m = _load(cfg, Path(run_root), model, device, ec.use_ema)
    split, n = _eval_images(cfg, Path(data_root))
    if m.vae is None:
        if cfg.data_sgm is not None and cfg.data_sgm.eval_images is not None:
            n = min(n, cfg.data_sgm.eval_images)
        return _eval_nll_data_sgm(cfg, run_root=Path(run_root), data_root=Path(data_root), model=model, path=path,
                                  m=m, split=split, n=n, device=device, metrics_root=metrics_root)
    data_gen = torch.Generator().manual_seed(ec.seed)  # binarisation draws (CPU, like the uint8 images)
    enc_gen = torch.Generator(device=device).manual_seed(ec.seed + 1)  # encoder noise
    probe_gen = torch.Generator(device=device).manual_seed(ec.seed + 2)  # Hutchinson probes
    nfes: list[int] = []

    def sgm_prior_nll(z0: torch.Tensor):
        res = ode_nll(m.prior, m.sde, z0, ode_eps=ec.ode_eps, tol=ec.ode_tol, trace=ec.trace, probe=ec.probe,
                      num_probes=ec.num_probes, probe_mode=ec.probe_mode, method=solver_method(ec.method),
                      generator=probe_gen)
        return res.nll_nats, res.nfe

    prior_fn = sgm_prior_nll if m.prior is not None else None
    draws, k_iw = ec.binarization_draws if cfg.data.binarize else 1, ec.num_iw_samples
    terms_all: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    batches = [torch.arange(i, min(i + ec.batch_size, n)) for i in range(0, n, ec.batch_size)]
    with progress(draws * n * k_iw, f"eval-nll {cfg.name} ({model})", unit="img") as bar:
        for d in range(draws):
            for idx in batches:
                x = to_model_input(split, idx, cfg.data, data_gen, device, flip=False)
                for k in range(k_iw):
                    terms, nfe = image_nelbo_terms(m.vae, x, prior_nll_fn=prior_fn, generator=enc_gen)
                    if prior_fn is not None:
                        nfes.append(nfe)
                    for key, val in terms.items():
                        terms_all.setdefault(key, np.zeros((draws, n, k_iw)))[d, idx.numpy(), k] = val.numpy()
                    if nfes:
                        bar.set_postfix(nfe=nfes[-1], refresh=False)
                    bar.update(len(idx))
    result = _summarise_nll(cfg, terms_all, k_iw)
    result.update(_nll_protocol(cfg, model, path, m, Path(run_root), Path(data_root), n, draws, nfes, device))
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = peak_rss_mb()
    out = RunLayout(run_root, cfg.name).nll(model)
    atomic_write_json(out, result)
    write_headline(headline_layout(cfg.name, run_root, metrics_root).nll(model), nll_headline(result))
    print(f"{model} NLL {result['nll_nats']:.3f} ± {result['nll_nats_stderr'] or float('nan'):.3f} nats "
          f"({result['bits_per_dim']:.4f} bits/dim, D={result['num_dims']}) -> {out}")
    return result


def _summarise_nll(cfg: ExperimentConfig, terms: dict[str, np.ndarray], k_iw: int) -> dict[str, Any]:
    """Headline numbers from per-(draw, image, k) terms: NELBO, IW bound, bits/dim, standard errors."""
    nelbo = terms["nelbo"]  # (draws, N, K)
    per_image_nelbo = nelbo.mean(axis=(0, 2))
    lse = np.logaddexp.reduce(-nelbo, axis=2) - math.log(k_iw)  # log mean_k exp(-NELBO_k)
    per_image_iw = (-lse).mean(axis=0)
    per_image = per_image_iw if k_iw > 1 else per_image_nelbo
    d = cfg.data.likelihood_dims
    mean, se = mean_and_stderr(per_image)
    nelbo_mean, nelbo_se = mean_and_stderr(per_image_nelbo)
    out: dict[str, Any] = {
        "nll_nats": mean, "nll_nats_stderr": se,
        "bits_per_dim": float(bits_per_dim(mean, d)), "bits_per_dim_stderr": float(bits_per_dim(se, d)),
        "num_dims": d,
        "estimator": "importance-weighted bound" if k_iw > 1 else "NELBO (single encoder sample)",
        "nelbo_nats": nelbo_mean, "nelbo_nats_stderr": nelbo_se,
        "nelbo_bpd": float(bits_per_dim(nelbo_mean, d)),
        "terms_nats": {k: float(v.mean()) for k, v in terms.items() if not k.startswith("nelbo")},
        "per_draw_nll_nats": [float(v) for v in nelbo.mean(axis=(1, 2))],
        "per_image_nll_nats": [float(v) for v in per_image],
    }
    gain = (terms["nelbo_normal"] - nelbo).mean(axis=(0, 2))  # > 0: the SGM prior beats N(0, I)
    out["normal_prior_nelbo_nats"], out["normal_prior_nelbo_nats_stderr"] = mean_and_stderr(
        terms["nelbo_normal"].mean(axis=(0, 2)))
    out["prior_gain_over_normal_nats"], out["prior_gain_over_normal_nats_stderr"] = mean_and_stderr(gain)
    out["terms_nats"]["kl"] = out["terms_nats"]["log_q"] + out["terms_nats"]["prior_top"] \
        + out["terms_nats"]["prior_rest"]
    # a standard error of one image is undefined: None in the JSON (metrics files never hold NaN)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) and k.endswith("_stderr") else v)
            for k, v in out.items()}


def _nll_protocol(cfg: ExperimentConfig, model: str, path: Path, m, run_root: Path, data_root: Path, n: int,
                  draws: int, nfes: list[int], device: torch.device) -> dict[str, Any]:
    """Everything that changes the NLL number (docs/algorithm.md §7.1), for ``nll_<model>.json``."""
    ec = cfg.eval_nll
    sections: dict[str, Any] = {"data": cfg.data, "vae": cfg.vae, "train_vae": cfg.train_vae, "eval_nll": ec}
    if m.prior is not None:
        sections["prior"] = cfg.prior
    proto: dict[str, Any] = {
        "model": model, "prior": "SGM (probability-flow ODE)" if m.prior is not None else "standard Normal (analytic)",
        "num_images": n, "split": cfg.data.eval_split, "dataset": cfg.data.dataset,
        "binarized": cfg.data.binarize, "binarization_draws": draws, "num_iw_samples": ec.num_iw_samples,
        "batch_size": ec.batch_size, "seed": ec.seed,
        "checkpoint": str(path), "checkpoint_step": m.step, "stage": m.stage,
        "use_ema": bool(ec.use_ema and m.prior is not None), "device": str(device), "dtype": "float32",
        "commit": git_commit(), "experiment_hash": experiment_hash(cfg), "params_hash": config_hash(sections),
        "params_hash_covers": ", ".join(sections),
        "data_manifest_sha256": sha256_or_none(prepared_dir(cfg.data.dataset, data_root) / "manifest.json"),
        "command": f"lsgm eval-nll {cfg.name} --model {model} --run-root {run_root} --data-root {data_root}"
                   + set_args_text(cfg),
    }
    if m.prior is not None:
        proto.update(ode_eps=ec.ode_eps, tol=ec.ode_tol, method=ec.method, trace=ec.trace, probe=ec.probe,
                     num_probes=ec.num_probes, probe_mode=ec.probe_mode,
                     nfe_mean=float(np.mean(nfes)), nfe_std=float(np.std(nfes)), nfe_per_batch=nfes)
    else:
        proto.update(ode_eps=None, tol=None, method=None, trace=None, probe=None, num_probes=None,
                     probe_mode=None, nfe_mean=0.0, nfe_std=0.0, nfe_per_batch=[])
    return proto


# --------------------------------------------------------------------------------------------- data-space NLL
def data_sgm_nll_terms(prior, sde, y: torch.Tensor, ec, *, levels: int, generator: torch.Generator):
    """Per-image NLL bound of the data-space score model on dequantised images ``y ∈ [−1, 1]``, in nats.

    With uniform dequantisation ``v = (k + u)/L`` and ``y = 2v − 1``, Jensen's inequality gives
    ``−log P(k) ≤ E_u[−log p(y)] + D log(L/2)`` (``D log 128`` for 8-bit data); ``−log p(y)`` is the probability-flow
    ODE likelihood (docs/algorithm.md §7.1) of the same solver and probes as the latent prior's.

    Returns:
        ``({"nelbo": bound, "ode_nll": −log p(y), "dequantization": D log(L/2)}, nfe)``, (B,) float64 tensors.
    """
    from lsgm.likelihood import ode_nll

    res = ode_nll(prior, sde, y, ode_eps=ec.ode_eps, tol=ec.ode_tol, trace=ec.trace, probe=ec.probe,
                  num_probes=ec.num_probes, probe_mode=ec.probe_mode, method=solver_method(ec.method),
                  generator=generator)
    d = y[0].numel()
    ode = res.nll_nats.detach().double().cpu()
    deq = torch.full_like(ode, d * math.log(levels / 2.0))
    return {"nelbo": ode + deq, "ode_nll": ode, "dequantization": deq}, int(res.nfe)


def _eval_nll_data_sgm(cfg: ExperimentConfig, *, run_root: Path, data_root: Path, model: str, path: Path, m,
                       split, n: int, device: torch.device, metrics_root: Path | None) -> dict[str, Any]:
    """``lsgm eval-nll EXP --model data_sgm``: the dequantisation bound of :func:`data_sgm_nll_terms` per test image."""
    from lsgm.data.loader import to_model_input

    ec = cfg.eval_nll
    data_gen = torch.Generator().manual_seed(ec.seed)  # dequantisation noise (CPU, like the uint8 images)
    probe_gen = torch.Generator(device=device).manual_seed(ec.seed + 2)
    per_image, ode, nfes = np.zeros(n), np.zeros(n), []
    start = time.perf_counter()
    with progress(n, f"eval-nll {cfg.name} ({model})", unit="img") as bar:
        for i in range(0, n, ec.batch_size):
            idx = torch.arange(i, min(i + ec.batch_size, n))
            y = to_model_input(split, idx, cfg.data, data_gen, device, flip=False, dequantize=True)
            terms, nfe = data_sgm_nll_terms(m.prior, m.sde, y, ec, levels=split.max_value + 1, generator=probe_gen)
            per_image[idx.numpy()], ode[idx.numpy()] = terms["nelbo"].numpy(), terms["ode_nll"].numpy()
            nfes.append(nfe)
            bar.set_postfix(nfe=nfe, refresh=False)
            bar.update(len(idx))
    d = cfg.data.likelihood_dims
    mean, se = mean_and_stderr(per_image)
    result: dict[str, Any] = {
        "nll_nats": mean, "nll_nats_stderr": se if math.isfinite(se) else None,
        "bits_per_dim": float(bits_per_dim(mean, d)),
        "bits_per_dim_stderr": float(bits_per_dim(se, d)) if math.isfinite(se) else None, "num_dims": d,
        "estimator": "uniform dequantisation bound: E_u[-log p(y)] + D log(L/2) (probability-flow ODE)",
        "terms_nats": {"ode_nll": float(ode.mean()), "dequantization": float(d * math.log((split.max_value + 1) / 2))},
        "per_image_nll_nats": [float(v) for v in per_image],
        "model": model, "prior": "data-space SGM (probability-flow ODE)", "num_images": n,
        "split": cfg.data.eval_split, "dataset": cfg.data.dataset, "binarized": False, "binarization_draws": 1,
        "num_iw_samples": 1, "batch_size": ec.batch_size, "seed": ec.seed, "checkpoint": str(path),
        "checkpoint_step": m.step, "stage": m.stage, "use_ema": bool(ec.use_ema), "device": str(device),
        "dtype": "float32", "commit": git_commit(), "experiment_hash": experiment_hash(cfg),
        "params_hash": config_hash({"data": cfg.data, "data_sgm": cfg.data_sgm, "eval_nll": ec}),
        "params_hash_covers": "data, data_sgm, eval_nll",
        "data_manifest_sha256": sha256_or_none(prepared_dir(cfg.data.dataset, data_root) / "manifest.json"),
        "command": f"lsgm eval-nll {cfg.name} --model {model} --run-root {run_root} --data-root {data_root}"
                   + set_args_text(cfg),
        "ode_eps": ec.ode_eps, "tol": ec.ode_tol, "method": ec.method, "trace": ec.trace, "probe": ec.probe,
        "num_probes": ec.num_probes, "probe_mode": ec.probe_mode, "nfe_mean": float(np.mean(nfes)),
        "nfe_std": float(np.std(nfes)), "nfe_per_batch": nfes, "seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }
    out = RunLayout(run_root, cfg.name).nll(model)
    atomic_write_json(out, result)
    write_headline(headline_layout(cfg.name, run_root, metrics_root).nll(model), nll_headline(result))
    print(f"{model} NLL {mean:.3f} nats ({result['bits_per_dim']:.4f} bits/dim, D={d}) -> {out}")
    return result
