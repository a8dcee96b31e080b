"""The report's figures (``reports/figures/<kind>/<name>.png``), each with a caption that states what it shows.

One function per kind of figure; each returns :class:`Figure` s (the file and its caption), and ``lsgm report``
writes every caption beside its figure for ``results.md`` and ``snakemake --report``:

* :func:`samples_figure` (kind ``samples``): the ODE sample grid beside real test images, both upscaled with
  nearest-neighbour interpolation to at least :data:`MIN_GRID_PX` pixels, the sampling protocol (solver, tolerance,
  eps, NFE, temperatures, EMA, checkpoint and its step, seed) in the caption.
* :func:`training_figures` (kind ``training``): every metric the training stage logged to DVCLive, x = optimiser
  step (with the samples seen per step), y labelled with its unit, a smoothed curve over the faint raw one; as
  many pages of :data:`PANELS_PER_PAGE` panels as needed (nothing is dropped).
* :func:`nfe_figure` (kind ``nfe``): function evaluations per batch of the sampling and NLL ODE solves.

Images are arranged by :func:`image_grid` (also used for ``grid.png``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from lsgm.atomic import atomic_path

__all__ = ["Figure", "MIN_GRID_PX", "PANELS_PER_PAGE", "figure_sequence", "image_grid", "metric_label",
           "samples_figure", "training_figures", "nfe_figure", "read_history"]

MIN_GRID_PX = 256  # each image grid of a samples figure is upscaled to at least this many pixels (width and height)
PANELS_PER_PAGE = 6  # training-curve panels per figure page (3 x 2)


@dataclass(frozen=True)
class Figure:
    """One figure file and its caption (Markdown: ``code`` in backticks; converted for reST captions).

    Attributes:
        kind: ``samples``, ``training`` or ``nfe`` (the sub-folder of ``reports/figures``).
        name: file stem (``digits``, ``digits_lsgm_1``).
        path: the PNG.
        title: one line.
        caption: what it shows and how it was made.
    """

    kind: str
    name: str
    path: Path
    title: str
    caption: str


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, dpi: int = 110) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    _plt().close(fig)
    return path


# --------------------------------------------------------------------------------------------- images
def image_grid(images: np.ndarray, nrow: int, pad: int = 1) -> np.ndarray:
    """Up to ``nrow²`` uint8 images (N, C, H, W), C in {1, 3}, as one (H', W', C) uint8 grid with white padding."""
    imgs = np.asarray(images)
    if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, C, H, W) with C in (1, 3), got {imgs.dtype} {imgs.shape}")
    imgs = imgs[: nrow * nrow]
    n, c, h, w = imgs.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(imgs):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = img.transpose(1, 2, 0)
    return grid


def _upscale(grid: np.ndarray, min_px: int = MIN_GRID_PX) -> tuple[np.ndarray, int]:
    """Nearest-neighbour upscaling (pixel repetition) by the smallest integer factor that makes the long side at
    least ``min_px``."""
    k = max(1, math.ceil(min_px / max(grid.shape[:2])))
    return np.repeat(np.repeat(grid, k, axis=0), k, axis=1), k


def samples_figure(exp: str, samples_grid: np.ndarray, stats: Mapping[str, Any], out: Path,
                   real: Optional[np.ndarray] = None, real_note: str = "") -> Figure:
    """ODE samples (left) beside real test images (right), same grid layout, upscaled without smoothing.

    Args:
        exp: experiment name.
        samples_grid: the sample grid as written to ``grid.png`` (H, W[, C]) uint8.
        stats: ``sample_stats.json`` (protocol of the samples).
        out: output PNG.
        real: real images (N, C, H, W) uint8 in display levels, or None (then the caption says why).
        real_note: how the real images were chosen and scaled.
    """
    plt = _plt()
    panels = [("ODE samples", samples_grid if samples_grid.ndim == 3 else samples_grid[..., None])]
    nrow = int(stats.get("grid_size") or round(math.sqrt(stats.get("num_samples") or 64)))
    if real is not None:
        panels.append(("test images", image_grid(real, nrow=nrow)))
    scaled = [(t, *_upscale(g)) for t, g in panels]
    dpi = 100
    width = sum(g.shape[1] for _, g, _ in scaled) + 60 * len(scaled)
    height = max(g.shape[0] for _, g, _ in scaled) + 90
    fig, axes = plt.subplots(1, len(scaled), figsize=(width / dpi, height / dpi), squeeze=False)
    for ax, (title, g, k) in zip(axes[0], scaled):
        ax.imshow(g[..., 0] if g.shape[2] == 1 else g, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{title} ({g.shape[1] // k} x {g.shape[0] // k} px, shown x{k})", fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"{exp}: ODE samples beside real images", fontsize=10)
    fig.tight_layout()
    path = _save(fig, out, dpi=dpi)
    proto = (f"probability-flow ODE ({stats.get('method')}) from t = 1 to eps = {stats.get('ode_eps')}, "
             f"rtol = atol = {stats.get('tol')}, NFE {_f(stats.get('nfe_mean'), 1)} ± {_f(stats.get('nfe_std'), 1)} "
             f"per batch of {stats.get('batch_size')}, prior temperature {stats.get('temperature')}, VAE temperature "
             f"{stats.get('vae_temperature')}, {'EMA' if stats.get('use_ema') else 'raw'} prior weights, checkpoint "
             f"`{stats.get('checkpoint')}` (step {stats.get('checkpoint_step')}), seed {stats.get('seed')}; the "
             f"image is the decoder mean. First {min(nrow * nrow, stats.get('num_samples') or 0)} of "
             f"{stats.get('num_samples')} samples.")
    right = (f" Right: {real_note}" if real is not None else
             f" Real images not shown: {real_note or 'the prepared dataset is not available'}.")
    return Figure("samples", path.stem, path, f"{exp}: ODE samples beside real images",
                  f"Left: samples of `{exp}`, {proto}{right}")


def _f(x: Any, digits: int) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "?"


# --------------------------------------------------------------------------------------------- training curves
_LABELS: tuple[tuple[str, str], ...] = (  # (regex on the metric name, y label); first match wins
    (r"^lr_(\w+)$", "learning rate of {0}"),
    (r"^lr_factor$", "learning-rate factor (NaN guard)"),
    (r"^grad_norm(?:_(\w+))?$", "gradient L2 norm{0}"),
    (r"^kl_coeff$", "KL weight beta_KL (no unit)"),
    (r"^kl_group_(\d+)$", "KL of latent group {0} (nats per image)"),
    (r"^mixing_alpha_(\w+)$", "mixing weight alpha, {0} over channels"),
    (r"^reg(?:_(\w+))?$", "spectral + BN regulariser{0} (weighted)"),
    (r"^p_loss$", "SGM loss (weighted DSM, nats per image)"),
    (r"^loss$", "training loss (nats per image)"),
    (r"^nan_rollback_to_step$", "rolled back to step"),
    (r"^(\w+)_nats$", "{0} (nats per image)"),
    (r"^(\w+)_bpd$", "{0} (bits/dim)"),
)


_SCHEDULES = r"^(lr_\w+|kl_coeff|lr_factor)$"  # values the schedule sets (drawn as they are, not smoothed)


def metric_label(name: str) -> str:
    """y-axis label with unit for a logged metric name (units in names: ``*_nats`` per image, ``*_bpd``)."""
    for pattern, label in _LABELS:
        m = re.match(pattern, name)
        if m:
            part = m.group(1) if m.groups() else None
            if "{0}" in label and label.startswith(("gradient", "spectral")):
                return label.format(f" ({part})" if part else "")
            return label.format(part.replace("_", " ") if part else "")
    return f"{name} (as logged)"


def read_history(tsv: Path):
    """A DVCLive history file -> (steps, values) sorted by step, one value per step (the last logged wins: rows of a
    run resumed from an earlier checkpoint replace the old ones)."""
    import pandas as pd

    df = pd.read_csv(tsv, sep="\t")
    value_cols = [c for c in df.columns if c not in ("step", "timestamp")]
    if "step" not in df or not value_cols:
        return np.zeros(0), np.zeros(0)
    df = df[["step", value_cols[0]]].apply(pd.to_numeric, errors="coerce").dropna()
    df = df.drop_duplicates("step", keep="last").sort_values("step")
    return df["step"].to_numpy(dtype=float), df[value_cols[0]].to_numpy(dtype=float)


def _smooth(values: np.ndarray) -> np.ndarray:
    """Exponential moving average (pandas ``ewm``, bias-corrected) over about a tenth of the points."""
    import pandas as pd

    span = max(2, len(values) // 10)
    return pd.Series(values).ewm(span=span, adjust=True).mean().to_numpy()


def training_figures(exp: str, stage: str, live_dir: Path, out_dir: Path, global_batch: Optional[int]) -> list[Figure]:
    """Every metric in ``<live_dir>/plots/metrics/**.tsv``, :data:`PANELS_PER_PAGE` panels per page."""
    series = []
    for tsv in sorted((live_dir / "plots" / "metrics").rglob("*.tsv")):
        steps, vals = read_history(tsv)
        if steps.size:
            series.append((tsv.relative_to(live_dir / "plots" / "metrics").with_suffix("").as_posix(), steps, vals))
    if not series:
        return []
    plt = _plt()
    pages = [series[i:i + PANELS_PER_PAGE] for i in range(0, len(series), PANELS_PER_PAGE)]
    per_step = f"; 1 step = {global_batch} images" if global_batch else ""
    figures = []
    for n, page in enumerate(pages, 1):
        cols = min(3, len(page))
        rows = math.ceil(len(page) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows + 0.5), squeeze=False)
        for ax, (name, steps, vals) in zip(axes.flat, page):
            schedule = re.match(_SCHEDULES, name.rsplit("/", 1)[-1]) is not None  # set, not measured: no smoothing
            ax.plot(steps, vals, lw=1.2 if schedule else 0.8, alpha=1.0 if schedule else 0.3, color="C0",
                    label="schedule" if schedule else "raw", marker="o" if vals.size < 30 else None, ms=3)
            if vals.size > 2 and not schedule:
                ax.plot(steps, _smooth(vals), lw=1.6, color="C0", label="smoothed (EMA)")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel(f"optimiser step{per_step}", fontsize=8)
            ax.set_ylabel(metric_label(name.rsplit("/", 1)[-1]), fontsize=8)
            ax.tick_params(labelsize=7)
            if global_batch:
                top = ax.secondary_xaxis("top", functions=(lambda s, g=global_batch: s * g,
                                                           lambda x, g=global_batch: x / g))
                top.set_xlabel("samples seen", fontsize=7)
                top.tick_params(labelsize=6)
        for ax in list(axes.flat)[len(page):]:
            ax.set_axis_off()
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"{exp} / {stage}: training curves (DVCLive), page {n} of {len(pages)}", fontsize=10)
        fig.tight_layout()
        path = _save(fig, out_dir / f"{exp}_{stage}_training_{n}.png")
        names = ", ".join(f"`{s[0]}`" for s in page)
        last = int(max(s[1][-1] for s in page))
        figures.append(Figure("training", path.stem, path, f"{exp} / {stage}: training curves, page {n}/{len(pages)}",
                              f"Training stage `{stage}` of `{exp}`, every metric logged to DVCLive "
                              f"(`{live_dir.as_posix()}`), page {n} of {len(pages)} ({len(series)} metrics in all): "
                              f"{names}. x: optimiser step up to {last}{per_step} (top axis: samples seen); "
                              "faint: each logged value, solid: exponential moving average over about a tenth "
                              "of the points (schedules such as learning rates and the KL weight: as set, not "
                              "smoothed). Losses and KL terms are per training image, on the training batch."))
    return figures


# --------------------------------------------------------------------------------------------- NFE
def nfe_figure(exp: str, metrics: Mapping[str, Mapping[str, Any]], out: Path) -> Optional[Figure]:
    """NFE per batch of the sampling ODE (``sample``) and of the NLL ODE (``nll_lsgm``), if measured."""
    series = [(label, metrics[k].get("nfe_per_batch") or [], metrics[k]) for k, label in
              (("sample", "sampling (t: 1 → eps)"), ("nll_lsgm", "NLL prior term (t: eps → 1)")) if k in metrics]
    series = [s for s in series if s[1]]
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for label, s, _ in series:
        ax.plot(np.arange(1, len(s) + 1), s, marker="o", ms=3, lw=1, label=f"{label}: mean {np.mean(s):.1f}")
    ax.set_xlabel("batch")
    ax.set_ylabel("NFE (drift evaluations per batch)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"{exp}: function evaluations of the ODE solves", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = _save(fig, out)
    parts = []
    for label, s, m in series:
        parts.append(f"{label}: {len(s)} batches of {m.get('batch_size')}, {m.get('method')} with tolerance "
                     f"{m.get('tol')}, eps {m.get('ode_eps')}")
    return Figure("nfe", path.stem, path, f"{exp}: NFE per batch",
                  f"Function evaluations (drift evaluations of the probability-flow ODE) per batch of `{exp}`; "
                  + "; ".join(parts) + ".")


def figure_sequence(figures: Sequence[Figure]) -> list[Figure]:
    """Figures in report order: samples, training, NFE; by name within a kind."""
    order = {"samples": 0, "training": 1, "nfe": 2}
    return sorted(figures, key=lambda f: (order.get(f.kind, 9), f.name))
