"""Headline metric files: a few numbers per stage outside the git-ignored ``data/``, for DVC and git (torch-free).

Each measuring stage writes, beside its full JSON under ``data/runs`` (every protocol setting, commit, hashes,
command), a small file under ``metrics/<exp>/`` (:class:`lsgm.runs.HeadlineLayout`) with numbers only:

=====================  =====================================================================================
``train_<stage>.json``  ``steps``, ``samples_seen``, ``wall_seconds``, ``train_nelbo_nats`` (last logged batch)
``sample.json``         ``nfe_mean``, ``nfe_std`` (probability-flow ODE, per batch), ``num_samples``, ``wall_seconds``
``sample_<tag>.json``   the same for a configured sampling run (another model, the ancestral sampler, a tolerance)
``nll_<model>.json``    ``nll_nats``, ``nll_nats_se``, ``nll_bpd``, ``nll_bpd_se`` (standard errors over test
                        images), ``nfe_mean`` (ODE of the prior term; LSGM only), ``num_images``, ``wall_seconds``
``fid.json``            ``fid``, ``isc``, ``kid``, ``num_samples``, ``wall_seconds``
``fd_<tag>.json``       ``fd``, ``kid`` (dataset-classifier features), ``fd_subset`` (first N samples),
                        ``num_samples``, ``wall_seconds``
=====================  =====================================================================================

``dvc.yaml`` declares the folder ``metrics`` as DVC metrics, so ``dvc metrics show`` lists exactly the experiments
that ran (one row per file) and ``dvc exp show`` / ``dvc metrics diff`` compare them across experiments.
A value that is not defined (the standard error of one image) is left out, never written as NaN.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from lsgm.atomic import atomic_write_json
from lsgm.runs import HEADLINE_ROOT, RUNS_ROOT, HeadlineLayout

__all__ = ["headline_layout", "headline_root", "write_headline", "training_headline", "sample_headline",
           "nll_headline", "fid_headline", "fd_headline"]


def headline_root(run_root: str | os.PathLike, metrics_root: str | os.PathLike | None = None) -> Path:
    """Where headline files go: ``metrics_root`` if given; ``metrics`` for the default runs root ``data/runs``;
    else ``<run_root>/../metrics`` (a run root elsewhere, e.g. in a test, keeps its headline files beside it)."""
    if metrics_root is not None:
        return Path(metrics_root)
    return HEADLINE_ROOT if Path(run_root) == RUNS_ROOT else Path(run_root).parent / HEADLINE_ROOT.name


def headline_layout(exp: str, run_root: str | os.PathLike,
                    metrics_root: str | os.PathLike | None = None) -> HeadlineLayout:
    return HeadlineLayout(headline_root(run_root, metrics_root), exp)


def _number(v: Any) -> Optional[float | int]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v if math.isfinite(v) else None


def write_headline(path: str | os.PathLike, values: Mapping[str, Any]) -> dict[str, float | int]:
    """Write the finite numbers of ``values`` (rounded to 6 significant digits) to ``path`` atomically."""
    out: dict[str, float | int] = {}
    for k, v in values.items():
        n = _number(v)
        if n is not None:
            out[k] = n if isinstance(n, int) else float(f"{n:.6g}")
    atomic_write_json(path, out)
    return out


def training_headline(summary: Mapping[str, Any]) -> dict[str, Any]:
    """From a training stage's ``metrics.json``."""
    steps = summary.get("steps")
    batch = summary.get("global_batch")
    return {"steps": steps, "samples_seen": steps * batch if isinstance(steps, int) and isinstance(batch, int) else None,
            "wall_seconds": summary.get("seconds_total"),
            "train_nelbo_nats": (summary.get("final") or {}).get("nelbo_nats")}


def sample_headline(stats: Mapping[str, Any]) -> dict[str, Any]:
    """From ``sample_stats.json``."""
    return {"nfe_mean": stats.get("nfe_mean"), "nfe_std": stats.get("nfe_std"), "num_samples": stats.get("num_samples"),
            "wall_seconds": stats.get("seconds_total")}


def nll_headline(result: Mapping[str, Any]) -> dict[str, Any]:
    """From ``nll_<model>.json``."""
    out = {"nll_nats": result.get("nll_nats"), "nll_nats_se": result.get("nll_nats_stderr"),
           "nll_bpd": result.get("bits_per_dim"), "nll_bpd_se": result.get("bits_per_dim_stderr")}
    if result.get("model") in ("lsgm", "data_sgm"):
        out["nfe_mean"] = result.get("nfe_mean")
    return {**out, "num_images": result.get("num_images"), "wall_seconds": result.get("seconds")}


def fid_headline(result: Mapping[str, Any]) -> dict[str, Any]:
    """From ``fid.json``."""
    return {"fid": result.get("fid"), "isc": result.get("isc"), "kid": result.get("kid"),
            "num_samples": result.get("num_samples"), "wall_seconds": result.get("seconds")}


def fd_headline(result: Mapping[str, Any]) -> dict[str, Any]:
    """From ``fd_<tag>.json`` (:func:`lsgm.classifier.eval_fd_experiment`)."""
    return {"fd": result.get("fd"), "kid": result.get("kid"), "fd_subset": result.get("fd_subset"),
            "num_samples": result.get("num_samples"), "wall_seconds": result.get("seconds")}
