"""``lsgm report``: the paper's numbers (docs/algorithm.md §10) beside ours, with the protocol that produced each of ours.

Reads, per experiment, ``<run_root>/<exp>/eval/{nll_lsgm,nll_vae,fid}.json`` and
``<run_root>/<exp>/sample/sample_stats.json`` and writes into ``out_dir`` (``reports/``):

* ``results.csv`` / ``results.md``: one row per (experiment, metric) — every number of docs/algorithm.md §10 with its table and
  provenance tag, ours (± standard error), the difference, a status (``measured``, ``not run``,
  ``not measured``, ``no experiment``) and the protocol columns (samples/images, ODE tol and eps, checkpoint, EMA,
  commit, params hash, data manifest hash, command to reproduce);
* a "Small-scale checks" section of ``results.md``: NLL of the VAE alone vs LSGM (nats, standard errors, paired
  difference, the SGM prior's own share); the paper's claims C1-C6 are ``lsgm claims`` (lsgm/claims.py)
  and the NFE of latent ODE sampling;
* ``figures/``: sample grids, training curves from DVCLive logs (``<exp>/<stage>/dvclive/plots/metrics/**.tsv``),
  NFE per batch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from lsgm.atomic import atomic_dir, atomic_write_text
from lsgm.paper_results import METRIC_UNITS, PAPER_RESULTS, PaperResult
from lsgm.runs import RunLayout
from lsgm.stats import bits_per_dim

__all__ = ["CSV_COLUMNS", "ReportRow", "collect_metrics", "report_rows", "write_report"]

CSV_COLUMNS = (
    "experiment", "dataset", "model", "metric", "unit", "paper_value", "paper_table", "paper_source", "ours",
    "ours_stderr", "difference", "status", "samples", "ode_tol", "ode_eps", "checkpoint", "ema", "commit",
    "params_hash", "data_manifest_hash", "command", "note",
)

_FILES: dict[str, Callable[[RunLayout], Path]] = {
    "nll_lsgm": lambda r: r.nll("lsgm"), "nll_vae": lambda r: r.nll("vae"), "fid": lambda r: r.fid,
    "sample": lambda r: r.sample_stats}
# metric -> (source file, value key, stderr key); "vae_*" rows are the stage-1 VAE with its Normal prior
_METRIC_SOURCES = {
    "nll_nats": ("nll_lsgm", "nll_nats", "nll_nats_stderr"),
    "nll_bpd": ("nll_lsgm", "bits_per_dim", "bits_per_dim_stderr"),
    "vae_nll_nats": ("nll_vae", "nll_nats", "nll_nats_stderr"),
    "vae_nll_bpd": ("nll_vae", "bits_per_dim", "bits_per_dim_stderr"),
    "fid": ("fid", "fid", None),
    "isc": ("fid", "isc", "isc_std"),
    "kid": ("fid", "kid", "kid_std"),
    "nfe": ("sample", "nfe_mean", "nfe_std"),
    "sampling_seconds_16": ("sample", None, None),
    "recall": (None, None, None),
}
_UNITS = {**METRIC_UNITS, "vae_nll_nats": "nats", "vae_nll_bpd": "bits/dim"}


@dataclass
class ReportRow:
    """One (experiment, metric) row of ``results.csv`` (columns :data:`CSV_COLUMNS`)."""

    experiment: str
    dataset: str
    model: str
    metric: str
    unit: str
    paper: Optional[PaperResult] = None
    ours: Optional[float] = None
    ours_stderr: Optional[float] = None
    status: str = "not run"
    protocol: Optional[dict[str, Any]] = None
    note: str = ""

    @property
    def difference(self) -> Optional[float]:
        """ours − paper (same unit), when both exist."""
        return None if self.ours is None or self.paper is None else self.ours - self.paper.value

    def as_dict(self) -> dict[str, Any]:
        p, proto = self.paper, self.protocol or {}
        return {
            "experiment": self.experiment, "dataset": self.dataset, "model": self.model, "metric": self.metric,
            "unit": self.unit, "paper_value": p.value_text if p else "", "paper_table": p.table if p else "",
            "paper_source": p.source if p else "", "ours": _num(self.ours), "ours_stderr": _num(self.ours_stderr),
            "difference": _num(self.difference), "status": self.status, **{k: _txt(proto.get(k)) for k in
                                                                             CSV_COLUMNS[12:21]},
            "note": "; ".join(x for x in (p.note if p else "", self.note) if x),
        }


def _num(x: Optional[float]) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.6g}"


def _txt(x: Any) -> str:
    return "" if x is None else str(x)


# --------------------------------------------------------------------------------------------- collecting
def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); re-run the stage that writes it") from None


def collect_metrics(run_root: str | os.PathLike, experiment: str) -> dict[str, dict[str, Any]]:
    """The metric files of one experiment that exist: keys ``nll_lsgm``, ``nll_vae``, ``fid``, ``sample``."""
    layout = RunLayout(run_root, experiment)
    found = {key: _read_json(path_of(layout)) for key, path_of in _FILES.items()}
    return {k: v for k, v in found.items() if v is not None}


def _protocol(source: str, m: dict[str, Any]) -> dict[str, Any]:
    """Protocol columns for a metric read from file ``source``."""
    if source.startswith("nll"):
        return {"samples": f"{m.get('num_images')} images x {m.get('binarization_draws', 1)} draws "
                           f"x K={m.get('num_iw_samples', 1)}",
                "ode_tol": m.get("tol"), "ode_eps": m.get("ode_eps"), "checkpoint": m.get("checkpoint"),
                "ema": m.get("use_ema"), "commit": m.get("commit"), "params_hash": m.get("params_hash"),
                "data_manifest_hash": m.get("data_manifest_sha256"), "command": m.get("command")}
    if source == "fid":
        s = m.get("sampling") or {}
        return {"samples": m.get("num_samples"), "ode_tol": s.get("tol"), "ode_eps": s.get("ode_eps"),
                "checkpoint": s.get("checkpoint"), "ema": s.get("use_ema"), "commit": m.get("commit"),
                "params_hash": m.get("params_hash"), "data_manifest_hash": m.get("data_manifest_sha256"),
                "command": m.get("command")}
    return {"samples": f"{m.get('num_samples')} (batches of {m.get('batch_size')})", "ode_tol": m.get("tol"),
            "ode_eps": m.get("ode_eps"), "checkpoint": m.get("checkpoint"), "ema": m.get("use_ema"),
            "commit": m.get("commit"), "params_hash": m.get("params_hash"), "data_manifest_hash": None,
            "command": m.get("command")}


def _fill(row: ReportRow, metrics: dict[str, dict[str, Any]]) -> ReportRow:
    source, key, se_key = _METRIC_SOURCES.get(row.metric, (None, None, None))
    if not metrics:
        row.status = "not run"
        return row
    m = metrics.get(source) if source else None
    if m is None:
        row.status = "not run" if source else "not measured"
        return row
    if row.metric == "sampling_seconds_16":
        if m.get("batch_size") != 16:
            row.status, row.note = "not measured", f"sampling batch is {m.get('batch_size')}, paper times 16 images"
            return row
        key = "seconds_mean"
    if m.get(key) is None:
        row.status = "not measured"
        return row
    row.ours = float(m[key])
    row.ours_stderr = float(m[se_key]) if se_key and m.get(se_key) is not None else None
    row.status, row.protocol = "measured", _protocol(source, m)
    return row


def _measured_metrics(metrics: dict[str, dict[str, Any]]) -> list[str]:
    """Our metrics worth a row even without a paper number (nats for binarised data, bits/dim otherwise)."""
    out: list[str] = []
    for src, prefix in (("nll_lsgm", ""), ("nll_vae", "vae_")):
        if src in metrics:
            unit = "nats" if metrics[src].get("binarized") else "bpd"
            out.append(f"{prefix}nll_{unit}")
    if "sample" in metrics:
        out.append("nfe")
    if "fid" in metrics:
        out += [k for k in ("fid", "isc", "kid") if metrics["fid"].get(k) is not None]
    return out


def report_rows(run_root: str | os.PathLike, experiments: Sequence[str]) -> list[ReportRow]:
    """All rows: every paper number of docs/algorithm.md §10 (with ours where run) plus our other measured metrics.

    Args:
        run_root: runs root (``data/runs``).
        experiments: experiments to report (paper experiments not listed are added).
    """
    names = list(dict.fromkeys(list(experiments) + [r.experiment for r in PAPER_RESULTS if r.experiment]))
    rows: list[ReportRow] = []
    for exp in names:
        metrics = collect_metrics(run_root, exp)
        dataset = next((m["dataset"] for m in metrics.values() if m.get("dataset")), "")
        papers = [r for r in PAPER_RESULTS if r.experiment == exp]
        for p in papers:
            rows.append(_fill(ReportRow(exp, p.dataset, p.model, p.metric, p.unit, paper=p), metrics))
        covered = {p.metric for p in papers}
        for metric in _measured_metrics(metrics):
            if metric not in covered:
                model = "VAE alone (Normal prior)" if metric.startswith("vae_") else "LSGM"
                rows.append(_fill(ReportRow(exp, dataset or (papers[0].dataset if papers else ""), model, metric,
                                            _UNITS[metric]), metrics))
        if not papers and not metrics:
            rows.append(ReportRow(exp, "", "LSGM", "all", "", status="not run"))
    for p in PAPER_RESULTS:
        if p.experiment is None:
            rows.append(ReportRow("—", p.dataset, p.model, p.metric, p.unit, paper=p, status="no experiment"))
    return rows


# --------------------------------------------------------------------------------------------- writing
def _csv_text(rows: list[ReportRow]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(r.as_dict())
    return buf.getvalue()


def _md_escape(x: str) -> str:
    return x.replace("|", "\\|")


def _md_table(header: Sequence[str], lines: list[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_md_escape(str(c)) for c in line) + " |" for line in lines]
    return "\n".join(out)


def _paper_cell(r: ReportRow) -> str:
    if r.paper is None:
        return "—"
    return ("≤ " if r.paper.bound else "") + r.paper.value_text


def _ours_cell(r: ReportRow) -> str:
    if r.ours is None:
        return r.status
    se = f" ± {r.ours_stderr:.3g}" if r.ours_stderr is not None and not math.isnan(r.ours_stderr) else ""
    return f"{r.ours:.4g}{se}"


def _results_md(rows: list[ReportRow], figures: list[Path], out_dir: Path) -> str:
    main = [(r.experiment, r.dataset, r.model, r.metric, r.unit, _paper_cell(r),
             r.paper.table if r.paper else "", r.paper.source if r.paper else "", _ours_cell(r),
             _num(r.difference) or "—", r.status, r.as_dict()["note"]) for r in rows]
    proto = [(r.experiment, r.metric, *(r.as_dict()[k] for k in CSV_COLUMNS[12:21])) for r in rows
             if r.status == "measured"]
    parts = [
        "# LSGM: paper vs. this reimplementation", "",
        "Paper numbers from docs/algorithm.md §10 with provenance tags: **P** project page, **A** public leaderboards, "
        "**T** tables of later papers, **S** third-party paper summary (unverified), **M** widely quoted, "
        "not yet checked against the PDF. Likelihoods are upper bounds (≤). *ours* is mean ± standard error "
        "over test images (NLL) or mean ± std over batches (NFE) / splits (IS, KID). Machine-readable copy: "
        "`results.csv`.", "",
        _md_table(("experiment", "dataset", "model", "metric", "unit", "paper", "table", "source", "ours",
                   "ours − paper", "status", "note"), main), "",
        "## Protocol of our numbers", "",
        _md_table(("experiment", "metric") + CSV_COLUMNS[12:21], proto) if proto else "No experiment has run yet.",
        "",
    ]
    if figures:
        parts += ["## Figures", ""] + [f"![{f.stem}]({f.relative_to(out_dir).as_posix()})" for f in figures] + [""]
    return "\n".join(parts)


def _fmt_pm(mean: float, se: Optional[float], digits: int = 2) -> str:
    if se is None or (isinstance(se, float) and math.isnan(se)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def _paired_difference(vae: dict[str, Any], lsgm: dict[str, Any]) -> tuple[float, Optional[float], bool]:
    """LSGM − VAE NLL (nats) with its standard error; paired per image when both saw the same images."""
    a, b = vae.get("per_image_nll_nats"), lsgm.get("per_image_nll_nats")
    paired = (a is not None and b is not None and len(a) == len(b) > 1 and vae.get("seed") == lsgm.get("seed")
              and vae.get("binarization_draws") == lsgm.get("binarization_draws"))
    if paired:
        d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
        return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)), True
    diff = lsgm["nll_nats"] - vae["nll_nats"]
    se = math.sqrt(vae.get("nll_nats_stderr", float("nan")) ** 2 + lsgm.get("nll_nats_stderr", float("nan")) ** 2)
    return float(diff), se, False


def _claims_md(run_root: Path, experiments: Sequence[str]) -> str:
    lines = ["## Small-scale checks", "",
             "Claim: LSGM (the VAE trained end to end with a score-based prior on its top latents) has a lower NLL "
             "bound than the stage-1 VAE alone with its Normal prior; latent probability-flow ODE sampling needs "
             "few function evaluations (NFE). The diagnostic row and the decomposition below say how much of the "
             "difference the SGM prior itself contributes and how much the end-to-end-trained VAE.", ""]
    targets = ["digits"] + [e for e in experiments if e != "digits"]
    shown = 0
    for exp in targets:
        m = collect_metrics(run_root, exp)
        if exp != "digits" and not ("nll_vae" in m and "nll_lsgm" in m):
            continue
        shown += 1
        lines += [f"## {exp}", ""]
        vae, lsgm, sample = m.get("nll_vae"), m.get("nll_lsgm"), m.get("sample")
        if not (vae and lsgm):
            missing = [f"`lsgm eval-nll {exp} --model {k}`" for k, v in (("vae", vae), ("lsgm", lsgm)) if not v]
            lines += [f"**not run**: missing {', '.join(missing)}.", ""]
        else:
            diff, se, paired = _paired_difference(vae, lsgm)
            d = lsgm.get("num_dims")
            rows = [("VAE alone (Normal prior)", _fmt_pm(vae["nll_nats"], vae.get("nll_nats_stderr")),
                     _fmt_pm(vae["bits_per_dim"], vae.get("bits_per_dim_stderr"), 4), vae.get("num_images"),
                     vae.get("checkpoint")),
                    ("LSGM (SGM prior, ODE)", _fmt_pm(lsgm["nll_nats"], lsgm.get("nll_nats_stderr")),
                     _fmt_pm(lsgm["bits_per_dim"], lsgm.get("bits_per_dim_stderr"), 4), lsgm.get("num_images"),
                     lsgm.get("checkpoint"))]
            if lsgm.get("normal_prior_nelbo_nats") is not None:
                nn_, nse = lsgm["normal_prior_nelbo_nats"], lsgm.get("normal_prior_nelbo_nats_stderr")
                rows.append(("LSGM's VAE with a Normal prior (diagnostic)", _fmt_pm(nn_, nse),
                             _fmt_pm(bits_per_dim(nn_, d), bits_per_dim(nse, d) if nse else None, 4),
                             lsgm.get("num_images"), lsgm.get("checkpoint")))
            lines += [_md_table(("model", "NLL bound (nats)", f"bits/dim (D={d})", "test images", "checkpoint"),
                                rows), ""]
            kind = "paired over the same test images and binarisations" if paired else "unpaired"
            lower = diff < 0
            verdict = (f"**Yes: LSGM is lower** than the VAE alone by {-diff:.2f} ± {se:.2f} nats ({kind})"
                       if lower else
                       f"**No: LSGM is not lower** than the VAE alone (LSGM − VAE = {diff:+.2f} ± {se:.2f} nats, "
                       f"{kind})")
            if lower and se == se and -diff < 2 * se:
                verdict += "; the difference is within two standard errors"
            lines += [verdict + ".", ""]
            if lsgm.get("prior_gain_over_normal_nats") is not None:
                g, gse = lsgm["prior_gain_over_normal_nats"], lsgm.get("prior_gain_over_normal_nats_stderr")
                within = gse is not None and gse == gse and abs(g) < 2 * gse
                lines += [f"On LSGM's own encoder samples the SGM prior term is {'lower' if g > 0 else 'higher'} than "
                          f"the Normal prior's by {abs(g):.2f} ± {gse:.2f} nats (paired, exact same latents): "
                          + ("no significant difference (within two standard errors): the aggregate posterior is "
                             "close to N(0, I) and the SGM adds little on its own." if within else
                             "the prior helps." if g > 0 else "the SGM prior itself is worse than N(0, I) here "
                             "(undertrained prior?)."), ""]
                if lsgm.get("normal_prior_nelbo_nats") is not None:
                    joint_part = lsgm["normal_prior_nelbo_nats"] - vae["nll_nats"]
                    lines += [f"Decomposition of LSGM − VAE ({diff:+.2f} nats): {joint_part:+.2f} from the end-to-end "
                              f"trained VAE (its bound with a Normal prior minus the stage-1 VAE's), {-g:+.2f} from "
                              "replacing the Normal prior by the SGM prior.", ""]
            if not lower:
                lines += ["Terms (nats, LSGM vs VAE): " + ", ".join(
                    f"{k} {lsgm['terms_nats'].get(k, float('nan')):.2f} vs {vae['terms_nats'].get(k, float('nan')):.2f}"
                    for k in ("recon", "log_q", "prior_top", "prior_rest")), ""]
            lines += [f"ODE for the prior term: eps {lsgm.get('ode_eps')}, tol {lsgm.get('tol')}, "
                      f"{lsgm.get('trace')} trace ({lsgm.get('probe')} probes x{lsgm.get('num_probes')}, "
                      f"{lsgm.get('probe_mode')}), NFE {lsgm.get('nfe_mean', float('nan')):.1f} per batch.", ""]
        lines += _stage_times_md(exp)
        if sample:
            lines += [f"Latent ODE sampling NFE: **{sample['nfe_mean']:.1f} ± {sample['nfe_std']:.1f}** per batch "
                      f"of {sample.get('batch_size')} ({sample.get('num_batches')} batches, "
                      f"{sample.get('num_samples')} "
                      f"samples; tol {sample.get('tol')}, eps {sample.get('ode_eps')}, {sample.get('method')}); "
                      f"{sample.get('seconds_mean', float('nan')):.2f} s per batch.", ""]
        else:
            lines += [f"Latent ODE sampling NFE: **not run** (`lsgm sample {exp}`).", ""]
    if not shown:
        lines += ["No experiment has both NLL evaluations yet.", ""]
    return "\n".join(lines)


def _stage_times_md(exp: str, bench_root: Path = Path("benchmarks/out")) -> list[str]:
    """Wall time and peak RSS per pipeline stage from Snakemake's ``benchmark:`` files (if the DAG ran)."""
    rows = []
    for tsv in sorted((bench_root / exp).rglob("*.tsv")):
        try:
            header, values = tsv.read_text().splitlines()[:2]
        except ValueError:
            continue
        rec = dict(zip(header.split("\t"), values.split("\t")))
        stage = "/".join(tsv.relative_to(bench_root / exp).with_suffix("").parts)
        rows.append((stage, f"{float(rec.get('s', 'nan')):.1f}", f"{float(rec.get('max_rss', 'nan')):.0f}"))
    if not rows:
        return []
    total = sum(float(r[1]) for r in rows)
    return ["Wall time per stage (Snakemake benchmark files; stages may overlap when run in parallel):", "",
            _md_table(("stage", "seconds", "peak RSS (MB)"), rows + [("total (sum)", f"{total:.1f}", "")]), ""]


# --------------------------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_samples(grid: Path, out: Path, title: str) -> Path:
    from PIL import Image

    plt = _plt()
    img = np.asarray(Image.open(grid))
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest", vmin=0, vmax=255)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def _read_tsv(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        cols = [c for c in (reader.fieldnames or []) if c not in ("timestamp", "step")]
        steps, vals = [], []
        for rec in reader:
            try:
                steps.append(float(rec["step"]))
                vals.append(float(rec[cols[0]]))
            except (KeyError, ValueError, IndexError, TypeError):
                continue
    return np.asarray(steps), np.asarray(vals), cols[0] if cols else path.stem


def _figure_training(live_dir: Path, out: Path, title: str, max_panels: int = 12) -> Optional[Path]:
    tsvs = sorted((live_dir / "plots" / "metrics").rglob("*.tsv"))[:max_panels]
    series = [s for s in (_read_tsv(p) for p in tsvs) if s[0].size]
    if not series:
        return None
    plt = _plt()
    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (steps, vals, name) in zip(axes.flat, series):
        ax.plot(steps, vals, lw=1)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(series):]:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _figure_nfe(metrics: dict[str, dict[str, Any]], out: Path, title: str) -> Optional[Path]:
    series = [(label, metrics[k].get("nfe_per_batch") or []) for k, label in
              (("sample", "sampling (t: 1 → eps)"), ("nll_lsgm", "NLL (t: eps → 1)")) if k in metrics]
    series = [(label, s) for label, s in series if s]
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    for label, s in series:
        ax.plot(np.arange(1, len(s) + 1), s, marker="o", ms=3, lw=1, label=f"{label}: mean {np.mean(s):.1f}")
    ax.set_xlabel("batch")
    ax.set_ylabel("NFE")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _figures(run_root: Path, experiments: Sequence[str], fig_dir: Path) -> list[Path]:
    made: list[Path] = []
    for exp in experiments:
        layout = RunLayout(run_root, exp)
        if not layout.base.is_dir():
            continue
        fig_dir.mkdir(parents=True, exist_ok=True)
        if layout.grid.is_file():
            made.append(_figure_samples(layout.grid, fig_dir / f"{exp}_samples.png", f"{exp}: ODE samples"))
        for stage_dir in layout.training_stage_dirs():
            fig = _figure_training(layout.dvclive(stage_dir.name), fig_dir / f"{exp}_{stage_dir.name}_training.png",
                                   f"{exp} / {stage_dir.name}: training curves (DVCLive)")
            made += [fig] if fig else []
        fig = _figure_nfe(collect_metrics(run_root, exp), fig_dir / f"{exp}_nfe.png", f"{exp}: NFE per batch")
        made += [fig] if fig else []
    return made


# --------------------------------------------------------------------------------------------- entry point
def _default_experiments(run_root: Path) -> list[str]:
    from lsgm.config import ConfigError, list_experiments

    try:
        return list_experiments()
    except (ConfigError, FileNotFoundError, OSError):
        return sorted(p.name for p in run_root.iterdir() if p.is_dir()) if run_root.is_dir() else []


def _check_experiments(experiments: Sequence[str]) -> list[str]:
    """The requested experiments, each of which must be in ``params/experiments.yaml`` (else one clear error)."""
    from lsgm.config import ConfigError, experiment_file

    for name in experiments:
        try:
            experiment_file(name)
        except ConfigError as exc:
            raise ConfigError(f"lsgm report --experiments: {exc}") from None
    return list(experiments)


def write_report(*, run_root: Path, out_dir: Path, experiments: Optional[list[str]] = None) -> dict[str, Path]:
    """Write ``results.{md,csv}`` (with the small-scale checks) and ``figures/`` into ``out_dir``.

    Args:
        run_root: runs root (``data/runs``).
        out_dir: report directory (``reports``).
        experiments: experiments to report (default: every experiment of ``params/experiments.yaml``; paper
            experiments are always included, as "not run" when absent).

    Returns:
        Paths written, keyed ``results_md``, ``results_csv``, ``figures``.
    """
    run_root, out_dir = Path(run_root), Path(out_dir)
    names = _check_experiments(experiments) if experiments else _default_experiments(run_root)
    rows = report_rows(run_root, names)
    fig_dir = out_dir / "figures"
    with atomic_dir(fig_dir) as tmp_figs:  # replaces the old figures only once the new set is complete
        figures = _figures(run_root, list(dict.fromkeys(names + [r.experiment for r in rows])), tmp_figs)
        figures = [fig_dir / f.relative_to(tmp_figs) for f in figures]
    paths = {"results_md": out_dir / "results.md", "results_csv": out_dir / "results.csv",
             "figures": fig_dir}
    atomic_write_text(paths["results_csv"], _csv_text(rows))
    atomic_write_text(paths["results_md"], _results_md(rows, figures, out_dir) + "\n" + _claims_md(run_root, names))
    measured = sum(r.status == "measured" for r in rows)
    print(f"report: {len(rows)} rows ({measured} measured) -> {out_dir}")
    return paths
