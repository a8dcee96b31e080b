"""FID, IS and KID with torch-fidelity through its public API (docs/algorithm.md §7.2, §11 item 11, docs/algorithm.md §12 item 8).

Protocol (what changes the numbers, all written to ``fid.json``):

* Feature extractor: torch-fidelity's ``inception-v3-compat`` (the 2015 TF Inception, pool3 2048-d for FID and
  KID, unbiased logits for IS), weights from a **local file** (``eval_fid.weights_path``, default
  ``data/weights/weights-inception-2015-12-05-6726825d.pth``) whose sha256 is recorded; nothing is downloaded.
* Reference statistics: ``{'mu': float32[2048], 'sigma': float64[2048, 2048]}`` (torch-fidelity's own stat
  format) of up to ``max_reference_images`` non-binarised images of the training split (``train+valid`` for
  OMNIGLOT/CelebA), computed once by ``lsgm fid-stats`` into a DVC-tracked file and handed to torch-fidelity as a
  precomputed cache entry, so the reference images are not re-encoded for FID.
* Generated images: the uint8 samples of ``lsgm sample`` (the paper used un-quantised floats; docs/algorithm.md §7.2);
  grayscale replicated to 3 channels; torch-fidelity resizes to 299×299 inside the extractor.
* One pooled covariance (the official code averages per-GPU covariances, docs/algorithm.md §11 item 11).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from lsgm.atomic import atomic_write_json
from lsgm.checkpoint import atomic_torch_save
from lsgm.config import ExperimentConfig, config_hash, experiment_hash, set_args_text
from lsgm.headline import fid_headline, headline_layout, write_headline
from lsgm.device import resolve_device
from lsgm.provenance import git_commit, peak_rss_mb, sha256_file, sha256_or_none
from lsgm.runs import RunLayout, fid_stats_file, prepared_dir

__all__ = [
    "FEATURE_EXTRACTOR",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_SHA256",
    "INCEPTION_WEIGHTS_URL",
    "UInt8ImageDataset",
    "compute_fid_statistics",
    "compute_sample_metrics",
    "default_reference_stats_path",
    "eval_fid_experiment",
    "levels_to_uint8",
    "load_fid_statistics",
    "reference_images",
    "reference_statistics",
    "require_inception_weights",
]

FEATURE_EXTRACTOR = "inception-v3-compat"
"""torch-fidelity's port of the TF 2015 Inception used for FID/IS/KID (pytorch-fid compatible)."""

INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
"""torch-fidelity 0.4.0's ``URL_INCEPTION_V3`` (the file it downloads when no local path is given)."""

INCEPTION_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
"""sha256 of that file (95,628,359 bytes) as published by several independent projects that pin it; its first
8 hex digits are the ``6726825d`` of the file name (torch.hub naming). Not re-verified here (no network): a
mismatch is recorded in ``fid.json`` (``weights_sha256_matches_official``), not treated as an error."""

_SPLIT_TAGS = {"train": ("train",), "train+valid": ("train", "valid")}


# --------------------------------------------------------------------------------------------- files
def require_inception_weights(path: str | os.PathLike) -> Path:
    """Return ``path`` if the Inception weights file exists, else explain how to obtain and place it.

    Raises:
        FileNotFoundError: naming the expected path, the official URL and the sha256 to check.
    """
    path = Path(path)
    if path.is_file():
        return path
    raise FileNotFoundError(
        f"Inception weights for FID/IS/KID not found at {path} (eval_fid.weights_path). This machine never "
        f"downloads them. On a machine with internet access run\n"
        f"    curl -L -o {INCEPTION_WEIGHTS_FILENAME} {INCEPTION_WEIGHTS_URL}\n"
        f"    sha256sum {INCEPTION_WEIGHTS_FILENAME}   # expect {INCEPTION_WEIGHTS_SHA256}\n"
        f"then copy the file to {path} (or set eval_fid.weights_path to where it lives) and `dvc add` it. "
        f"It is torch-fidelity's {FEATURE_EXTRACTOR!r} extractor state dict (95.6 MB)."
    )


def default_reference_stats_path(cfg: ExperimentConfig, data_root: str | os.PathLike) -> Path:
    """Where ``lsgm fid-stats`` writes and ``lsgm eval-fid`` reads the reference statistics.

    ``<data_root>/../fid_stats/<dataset>-<split>.pt`` (``data/fid_stats/cifar10-train.pt``): one file per dataset
    and reference split, shared by every experiment on that dataset.
    """
    return fid_stats_file(cfg.data.dataset, cfg.data.fid_reference, data_root)


# --------------------------------------------------------------------------------------------- images
def levels_to_uint8(images: torch.Tensor, max_value: int) -> torch.Tensor:
    """Map integer levels ``0..max_value`` (16 for digits) to 8-bit ``round(255 k / max_value)``.

    Args:
        images: uint8 tensor (N, C, H, W) of levels.
        max_value: the level meaning intensity 1.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 levels, got dtype {images.dtype}")
    if not 1 <= int(max_value) <= 255:
        raise ValueError(f"max_value={max_value!r} is not allowed; allowed: 1..255")
    if max_value == 255:
        return images
    scaled = torch.round(images.to(torch.float32) * (255.0 / max_value))
    return scaled.clamp(0, 255).to(torch.uint8)


class UInt8ImageDataset(Dataset):
    """Images as torch-fidelity expects them: uint8 ``(3, H, W)`` tensors (grayscale replicated).

    Args:
        images: uint8 tensor or array (N, C, H, W) with C in {1, 3}.
    """

    def __init__(self, images: torch.Tensor | np.ndarray):
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 (N, C, H, W) with C in (1, 3), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if images.shape[0] < 2:
            raise ValueError(f"need at least 2 images for FID/KID statistics, got {images.shape[0]}")
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        img = self.images[index]
        return img.expand(3, -1, -1).contiguous() if img.shape[0] == 1 else img.contiguous()


def reference_images(cfg: ExperimentConfig, data_root: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
    """The FID reference set (docs/algorithm.md §7.2): first ``max_reference_images`` non-binarised training images.

    ``cfg.data.fid_reference`` is ``train`` (CIFAR-10, MNIST) or ``train+valid`` (OMNIGLOT, CelebA-HQ).

    Returns:
        ``(images uint8 (N, C, H, W) on the 0..255 scale, info)`` with info naming splits, count and the sha256
        of the dataset manifest.
    """
    from lsgm.data.loader import load_split

    parts = []
    for split in _SPLIT_TAGS[cfg.data.fid_reference]:
        ps = load_split(data_root, cfg.data.dataset, split)
        parts.append(levels_to_uint8(ps.images, ps.max_value))
    manifest_sha = _manifest_sha256(data_root, cfg.data.dataset)
    images = torch.cat(parts)[: cfg.eval_fid.max_reference_images].contiguous()
    info = {"dataset": cfg.data.dataset, "splits": list(_SPLIT_TAGS[cfg.data.fid_reference]),
            "num_images": int(images.shape[0]), "max_reference_images": cfg.eval_fid.max_reference_images,
            "binarized": False, "data_manifest_sha256": manifest_sha}
    return images, info


def _manifest_sha256(data_root: str | os.PathLike, dataset: str) -> Optional[str]:
    return sha256_or_none(prepared_dir(dataset, data_root) / "manifest.json")


# --------------------------------------------------------------------------------------------- torch-fidelity
def _fidelity_kwargs(*, weights_path: Optional[str | os.PathLike], feature_extractor: str, batch_size: int,
                     cuda: bool, verbose: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"feature_extractor": feature_extractor, "batch_size": int(batch_size),
                              "cuda": bool(cuda), "verbose": bool(verbose), "save_cpu_ram": True}
    if feature_extractor == FEATURE_EXTRACTOR:
        kwargs["feature_extractor_weights_path"] = str(require_inception_weights(weights_path or ""))
    return kwargs


def _fid_layer(feature_extractor: str) -> str:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"feature_extractor={feature_extractor!r} is not registered with torch-fidelity; "
                         f"allowed: {', '.join(FEATURE_EXTRACTORS_REGISTRY)}")
    return FEATURE_EXTRACTORS_REGISTRY[feature_extractor].get_default_feature_layer_for_metric("fid")


def _stat_cache_file(cache_root: Path, cache_name: str, feature_extractor: str) -> Path:
    # torch-fidelity's cache naming: {input cache name}-{extractor}-stat-fid-{layer}.pt
    return cache_root / f"{cache_name}-{feature_extractor}-stat-fid-{_fid_layer(feature_extractor)}.pt"


def compute_fid_statistics(images: torch.Tensor, *, weights_path: Optional[str | os.PathLike],
                           batch_size: int = 64, cuda: bool = False, feature_extractor: str = FEATURE_EXTRACTOR,
                           verbose: bool = False) -> dict[str, np.ndarray]:
    """FID statistics ``{'mu', 'sigma'}`` of uint8 images with torch-fidelity's own code path.

    Runs ``calculate_metrics(fid=True)`` with both inputs set to the images under one cache name, so features
    are extracted once and torch-fidelity writes the statistics into a private cache, which is read back.

    Args:
        images: uint8 (N, C, H, W), C in {1, 3}.
        weights_path: local Inception weights (required for ``inception-v3-compat``).
        batch_size: feature-extraction batch.
        cuda: run the extractor on CUDA.
        feature_extractor: torch-fidelity extractor name.
        verbose: torch-fidelity progress output.
    """
    import torch_fidelity

    data = UInt8ImageDataset(images)
    kwargs = _fidelity_kwargs(weights_path=weights_path, feature_extractor=feature_extractor,
                              batch_size=batch_size, cuda=cuda, verbose=verbose)
    with tempfile.TemporaryDirectory(prefix="lsgm-fid-") as tmp:
        torch_fidelity.calculate_metrics(input1=data, input2=data, input1_cache_name="stats",
                                         input2_cache_name="stats", cache_root=tmp, cache=True, fid=True, **kwargs)
        return load_fid_statistics(_stat_cache_file(Path(tmp), "stats", feature_extractor))


def _numpy_safe_globals() -> list:
    """The numpy reconstruction helpers a weights-only unpickler must allow to read numpy arrays."""
    core = getattr(np, "_core", None) or np.core
    names = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        names += [dtypes.Float32DType, dtypes.Float64DType]
    return names


_NUMPY_SAFE_GLOBALS = _numpy_safe_globals()


def load_fid_statistics(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a torch-fidelity statistics file ``{'mu': (F,), 'sigma': (F, F)}`` and check its shapes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no FID reference statistics; run `lsgm fid-stats EXP --out {path}`")
    with torch.serialization.safe_globals(_NUMPY_SAFE_GLOBALS):  # torch-fidelity stores numpy arrays
        stats = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(stats, dict) or set(stats) != {"mu", "sigma"}:
        raise ValueError(f"{path}: not a torch-fidelity statistics file (expected keys 'mu', 'sigma')")
    mu, sigma = np.asarray(stats["mu"]), np.asarray(stats["sigma"])
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} / sigma {sigma.shape} are not (F,) / (F, F)")
    return {"mu": mu, "sigma": sigma}


def compute_sample_metrics(samples: torch.Tensor, *, reference_stats_path: str | os.PathLike,
                           weights_path: Optional[str | os.PathLike], reference: Optional[torch.Tensor] = None,
                           isc: bool = True, kid: bool = True, kid_subset_size: int = 1000, batch_size: int = 64,
                           cuda: bool = False, feature_extractor: str = FEATURE_EXTRACTOR,
                           verbose: bool = False) -> dict[str, float]:
    """FID against precomputed reference statistics, plus IS and KID, in one torch-fidelity call.

    The statistics file is placed in a private cache under a name derived from its sha256 and passed as
    ``input2_cache_name``: torch-fidelity then reads input 2's FID statistics from it. KID needs reference
    *features*, so with ``kid=True`` the reference images must be given (they are encoded once).

    Args:
        samples: generated uint8 images (N, C, H, W).
        reference_stats_path: file written by :func:`reference_statistics`.
        weights_path: local Inception weights.
        reference: reference uint8 images (required when ``kid``).
        isc: compute the Inception score of the samples.
        kid: compute KID against ``reference``.
        kid_subset_size: KID subset size (capped at the smaller set's size).
        batch_size: feature-extraction batch.
        cuda: run on CUDA.
        feature_extractor: torch-fidelity extractor name.
        verbose: torch-fidelity progress output.

    Returns:
        ``{'fid', 'isc', 'isc_std', 'kid', 'kid_std'}`` (only the requested ones).
    """
    import torch_fidelity

    if kid and reference is None:
        raise ValueError("kid=True needs the reference images (reference=None given)")
    stats_path = Path(reference_stats_path)
    load_fid_statistics(stats_path)  # fail early with a clear message
    data = UInt8ImageDataset(samples)
    kwargs = _fidelity_kwargs(weights_path=weights_path, feature_extractor=feature_extractor,
                              batch_size=batch_size, cuda=cuda, verbose=verbose)
    cache_name = "lsgm-ref-" + sha256_file(stats_path)[:16]
    with tempfile.TemporaryDirectory(prefix="lsgm-fid-") as tmp:
        shutil.copyfile(stats_path, _stat_cache_file(Path(tmp), cache_name, feature_extractor))
        input2: Any = str(stats_path)  # never opened: the cache entry answers for it
        if kid:
            input2 = UInt8ImageDataset(reference)
            kid_subset_size = min(int(kid_subset_size), len(data), len(input2))
            kwargs.update(kid_subset_size=kid_subset_size)
        out = torch_fidelity.calculate_metrics(input1=data, input2=input2, input2_cache_name=cache_name,
                                               cache_root=tmp, cache=True, fid=True, isc=isc, kid=kid, **kwargs)
    result = {"fid": float(out["frechet_inception_distance"])}
    if isc:
        result.update(isc=float(out["inception_score_mean"]), isc_std=float(out["inception_score_std"]))
    if kid:
        result.update(kid=float(out["kernel_inception_distance_mean"]),
                      kid_std=float(out["kernel_inception_distance_std"]), kid_subset_size=kid_subset_size)
    return result


# --------------------------------------------------------------------------------------------- CLI verbs
def _use_cuda(cfg: ExperimentConfig) -> bool:
    """torch-fidelity's ``cuda`` flag from the one device rule (``engine.device: cuda`` without CUDA fails here)."""
    return resolve_device(cfg.engine.device).type == "cuda"


def reference_statistics(cfg: ExperimentConfig, *, data_root: Path, out: Path) -> Path:
    """``lsgm fid-stats``: reference FID statistics of the training split (docs/algorithm.md §7.2), written to ``out``.

    Args:
        cfg: experiment config (``data``, ``eval_fid`` sections).
        data_root: prepared datasets root (``data/prepared``).
        out: output file (torch-fidelity's ``{'mu', 'sigma'}`` format; DVC tracks it).
    """
    cuda = _use_cuda(cfg)  # the device rule first, like every stage
    weights = require_inception_weights(cfg.eval_fid.weights_path)
    images, info = reference_images(cfg, data_root)
    stats = compute_fid_statistics(images, weights_path=weights, batch_size=cfg.eval_fid.batch_size,
                                   cuda=cuda, verbose=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"mu": stats["mu"], "sigma": stats["sigma"]}, out)
    print(f"wrote {out}: {info['num_images']} images of {'+'.join(info['splits'])} ({cfg.data.dataset})")
    return out


def eval_fid_experiment(cfg: ExperimentConfig, *, run_root: Path, data_root: Path,
                        reference_stats: Optional[Path] = None, metrics_root: Optional[Path] = None) -> dict[str, Any]:
    """``lsgm eval-fid``: FID/IS/KID of ``<run_root>/<exp>/sample/samples.npz``; writes ``eval/fid.json``.

    Args:
        cfg: experiment config.
        run_root: runs root (``data/runs``).
        data_root: prepared datasets root (reference images for KID; default location of the statistics).
        reference_stats: statistics file (default :func:`default_reference_stats_path`).

    Returns:
        The dict written to ``fid.json``.
    """
    if not cfg.eval_fid.enabled:
        raise ValueError(f"eval_fid.enabled is false for experiment {cfg.name!r}; enable it in its params file")
    cuda = _use_cuda(cfg)  # the device rule first, like every stage
    layout = RunLayout(run_root, cfg.name)
    samples_path = layout.samples
    if not samples_path.is_file():
        raise FileNotFoundError(f"{samples_path}: no samples; run `lsgm sample {cfg.name}` first")
    with np.load(samples_path) as npz:
        samples = torch.from_numpy(npz["images"])
    stats_path = Path(reference_stats) if reference_stats else default_reference_stats_path(cfg, data_root)
    weights = require_inception_weights(cfg.eval_fid.weights_path)
    reference, ref_info = reference_images(cfg, data_root) if cfg.eval_fid.kid else (None, {})
    start = time.perf_counter()
    metrics = compute_sample_metrics(samples, reference_stats_path=stats_path, weights_path=weights,
                                     reference=reference, isc=cfg.eval_fid.isc, kid=cfg.eval_fid.kid,
                                     kid_subset_size=cfg.eval_fid.kid_subset_size,
                                     batch_size=cfg.eval_fid.batch_size, cuda=cuda, verbose=True)
    weights_sha = sha256_file(weights)
    sample_stats = _read_json(layout.sample_stats)
    result = {
        **metrics,
        "num_samples": int(samples.shape[0]),
        "paper_num_samples": 50000,
        "sample_dtype": "uint8",
        "reference_stats": str(stats_path),
        "reference_stats_sha256": sha256_file(stats_path),
        "reference_split": cfg.data.fid_reference,
        "max_reference_images": cfg.eval_fid.max_reference_images,
        "kid_reference_images": ref_info.get("num_images"),
        "feature_extractor": FEATURE_EXTRACTOR,
        "weights_path": str(weights),
        "weights_sha256": weights_sha,
        "weights_sha256_matches_official": weights_sha == INCEPTION_WEIGHTS_SHA256,
        "samples": str(samples_path),
        "samples_sha256": sha256_file(samples_path),
        "sampling": {k: sample_stats.get(k) for k in ("ode_eps", "tol", "temperature", "method", "seed",
                                                       "checkpoint", "use_ema", "nfe_mean")},
        "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
        "commit": git_commit(), "experiment_hash": experiment_hash(cfg),
        "params_hash": config_hash({"data": cfg.data, "vae": cfg.vae, "prior": cfg.prior, "sampling": cfg.sampling,
                                    "eval_fid": cfg.eval_fid}),
        "params_hash_covers": "data, vae, prior, sampling, eval_fid",
        "data_manifest_sha256": _manifest_sha256(data_root, cfg.data.dataset),
        "command": f"lsgm eval-fid {cfg.name} --run-root {run_root} --data-root {data_root}" + set_args_text(cfg),
    }
    out = layout.fid
    atomic_write_json(out, result)
    write_headline(headline_layout(cfg.name, run_root, metrics_root).fid, fid_headline(result))
    print(f"FID {result['fid']:.4g} ({result['num_samples']} samples) -> {out}")
    return result


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
