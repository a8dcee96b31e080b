"""``lsgm report``: the paper's numbers beside ours, with the protocol that produced each of ours.

Reads, per experiment, ``<run_root>/<exp>/eval/{nll_lsgm,nll_vae,fid}.json``, ``<run_root>/<exp>/sample/`` (stats and
grid), the training stages' ``metrics.json`` and DVCLive logs, and real test images from ``<data_root>``; writes into
``out_dir`` (``reports/``). One function per section, so a new table, figure or claim is one new function:

* ``results.csv`` / ``results.md`` / ``results.html``: one row per (experiment, metric) — every number the paper
  reports (:mod:`lsgm.paper_results`) with its table and provenance tag, ours (± standard error), the difference, a
  status (``measured``, ``not run``, ``not measured``, ``no experiment``), whether it is a bound (``≤``) and the
  protocol columns (samples/images, ODE tol and eps, checkpoint, EMA, commit, experiment hash, params hash and what
  it covers, data manifest hash, command to reproduce). Sections: :func:`_section_intro`, :func:`_section_results`,
  :func:`_section_protocol`, :func:`_section_figures`.
* ``checks.md`` / ``checks.html``: the small-scale checks of each experiment with both NLL evaluations (the
  embedded default first) — NLL of the VAE alone vs LSGM (nats, standard errors, paired difference and its
  decomposition), the NFE of latent ODE sampling, wall time per stage (:func:`_checks_md`, one function per check).
  The paper's claims C1-C6 on Fashion-MNIST are ``lsgm claims`` (:mod:`lsgm.claims`), not the report.
* ``figures/<kind>/<name>.png`` and ``captions/<kind>/<name>.rst`` (:mod:`lsgm.figures`): sample grids beside real
  images, every training curve, NFE per batch; each caption also goes into ``results.md`` and the Snakemake report.
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
from lsgm.figures import Figure, figure_sequence, nfe_figure, samples_figure, training_figures
from lsgm.paper_results import METRIC_UNITS, PAPER, PAPER_RESULTS, PAPER_TABLES, SOURCE_TAGS, PaperResult
from lsgm.runs import PREPARED_ROOT, VAE_STAGE, RunLayout
from lsgm.stats import bits_per_dim

__all__ = ["CSV_COLUMNS", "PROTOCOL_COLUMNS", "ReportRow", "collect_metrics", "report_rows", "write_report"]

PROTOCOL_COLUMNS = ("samples", "ode_tol", "ode_eps", "checkpoint", "ema", "commit", "experiment_hash", "params_hash",
                    "params_hash_covers", "data_manifest_hash", "command")
CSV_COLUMNS = (
    "experiment", "dataset", "model", "metric", "unit", "bound", "paper_value", "paper_table", "paper_source", "ours",
    "ours_stderr", "difference", "status", *PROTOCOL_COLUMNS, "note",
)
_BOUND_METRICS = ("nll_nats", "nll_bpd", "vae_nll_nats", "vae_nll_bpd")  # NLL values are upper bounds (NELBO / IW)

_FILES: dict[str, Callable[[RunLayout], Path]] = {
    "nll_lsgm": lambda r: r.nll("lsgm"), "nll_vae": lambda r: r.nll("vae"), "fid": lambda r: r.fid,
    "sample": lambda r: r.sample_stats, "fd": lambda r: r.fd("")}
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

    @property
    def bound(self) -> str:
        """``≤`` for likelihood bounds (paper's and ours), else ``=``."""
        return "≤" if (self.paper.bound if self.paper else self.metric in _BOUND_METRICS) else "="

    def as_dict(self) -> dict[str, Any]:
        p, proto = self.paper, self.protocol or {}
        return {
            "experiment": self.experiment, "dataset": self.dataset, "model": self.model, "metric": self.metric,
            "unit": self.unit, "bound": self.bound, "paper_value": p.value_text if p else "",
            "paper_table": p.table if p else "", "paper_source": p.source if p else "", "ours": _num(self.ours),
            "ours_stderr": _num(self.ours_stderr), "difference": _num(self.difference), "status": self.status,
            **{k: _txt(proto.get(k)) for k in PROTOCOL_COLUMNS},
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
    """The metric files of one experiment that exist: keys ``nll_lsgm``, ``nll_vae``, ``fid``, ``sample``, ``fd``
    (FD / KID of the default samples in classifier features)."""
    layout = RunLayout(run_root, experiment)
    found = {key: _read_json(path_of(layout)) for key, path_of in _FILES.items()}
    return {k: v for k, v in found.items() if v is not None}


def _protocol(source: str, m: dict[str, Any]) -> dict[str, Any]:
    """Protocol columns for a metric read from file ``source``."""
    hashes = {"commit": m.get("commit"), "experiment_hash": m.get("experiment_hash"),
              "params_hash": m.get("params_hash"), "params_hash_covers": m.get("params_hash_covers"),
              "command": m.get("command")}
    if source.startswith("nll"):
        return {"samples": f"{m.get('num_images')} images x {m.get('binarization_draws', 1)} draws "
                           f"x K={m.get('num_iw_samples', 1)}",
                "ode_tol": m.get("tol"), "ode_eps": m.get("ode_eps"), "checkpoint": m.get("checkpoint"),
                "ema": m.get("use_ema"), "data_manifest_hash": m.get("data_manifest_sha256"), **hashes}
    if source == "fid":
        s = m.get("sampling") or {}
        return {"samples": m.get("num_samples"), "ode_tol": s.get("tol"), "ode_eps": s.get("ode_eps"),
                "checkpoint": s.get("checkpoint"), "ema": s.get("use_ema"),
                "data_manifest_hash": m.get("data_manifest_sha256"), **hashes}
    return {"samples": f"{m.get('num_samples')} (batches of {m.get('batch_size')})", "ode_tol": m.get("tol"),
            "ode_eps": m.get("ode_eps"), "checkpoint": m.get("checkpoint"), "ema": m.get("use_ema"),
            "data_manifest_hash": None, **hashes}


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


# --------------------------------------------------------------------------------------------- markdown helpers
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
    return ("≤ " if r.bound == "≤" else "") + f"{r.ours:.4g}{se}"


# --------------------------------------------------------------------------------------------- results.md sections
def _section_intro(rows: list[ReportRow]) -> list[str]:
    """Title, the paper cited, what the table, source and hash columns mean."""
    tables = sorted({r.paper.table for r in rows if r.paper}, key=lambda t: (not t[0].isdigit(), t))
    legend = []
    for t in tables:
        base, _, remark = t.partition(" (")
        parts = [PAPER_TABLES.get(k, f"{k} of the paper") for k in base.split(" / ")]
        if remark:
            parts[-1] += ", " + PAPER_TABLES.get(f"({remark}", f"({remark}")
        legend.append(f"* **{t}**: " + "; ".join(parts))
    tags = [f"**{k}** {v}" for k, v in SOURCE_TAGS.items()]
    return [
        "# LSGM: paper vs. this reimplementation", "",
        f"Paper: {PAPER}. Each paper number below is cited by the table (or section) that reports it, with a source "
        "tag saying where the value was taken from. Likelihoods are upper bounds (≤, the `bound` column of "
        "`results.csv`): the paper's and ours (NELBO, or the importance-weighted bound with K > 1). *ours* is mean ± "
        "standard error over test images (NLL) or mean ± std over batches (NFE) / splits (IS, KID). "
        "Machine-readable copy: `results.csv`.", "",
        "Tables and sections cited (column *table*):", "", *legend, "",
        "Source tags (column *source*; several may apply): " + "; ".join(tags) + ". A number tagged only S or M is "
        "not a target until it is confirmed from the paper's PDF.", "",
    ]


def _section_results(rows: list[ReportRow]) -> list[str]:
    main = [(r.experiment, r.dataset, r.model, r.metric, r.unit, _paper_cell(r),
             r.paper.table if r.paper else "", r.paper.source if r.paper else "", _ours_cell(r),
             _num(r.difference) or "—", r.status, r.as_dict()["note"]) for r in rows]
    return [_md_table(("experiment", "dataset", "model", "metric", "unit", "paper", "table", "source", "ours",
                       "ours − paper", "status", "note"), main), ""]


def _hash_notes(rows: list[ReportRow]) -> list[str]:
    """Per experiment: one experiment hash, or which stage ran under which (the config changed in between)."""
    out = []
    for exp in dict.fromkeys(r.experiment for r in rows if r.status == "measured"):
        hashes = {}
        for r in rows:
            if r.experiment == exp and r.status == "measured":
                hashes.setdefault(r.protocol.get("experiment_hash"), []).append(r.metric)
        if len(hashes) == 1:
            (h,) = hashes
            out.append(f"* `{exp}`: every number comes from one run of the whole config, experiment hash `{h}`.")
        else:
            parts = "; ".join(f"`{h}` for {', '.join(ms)}" for h, ms in hashes.items())
            out.append(f"* `{exp}`: stages ran under different configs ({parts}): the config changed between them "
                       "in sections the earlier stages do not read (their params hash is unchanged), so they were "
                       "not rerun.")
    return out


def _section_protocol(rows: list[ReportRow]) -> list[str]:
    proto = [(r.experiment, r.metric, *(r.as_dict()[k] for k in PROTOCOL_COLUMNS)) for r in rows
             if r.status == "measured"]
    if not proto:
        return ["## Protocol of our numbers", "", "No experiment has run yet.", ""]
    return ["## Protocol of our numbers", "",
            "*experiment_hash*: hash of the whole resolved config (every section, overrides merged): the same for "
            "every stage of one run. *params_hash*: hash of the sections the stage that measured the number reads "
            "(named in *params_hash_covers*), so it differs between stages by design. *command* reproduces the "
            "number (with any `--set` overrides).", "", *_hash_notes(rows), "",
            _md_table(("experiment", "metric") + PROTOCOL_COLUMNS, proto), ""]


def _section_figures(figures: Sequence[Figure], out_dir: Path) -> list[str]:
    if not figures:
        return []
    lines = ["## Figures", ""]
    for f in figures:
        lines += [f"### {f.title}", "", f"![{f.name}]({f.path.relative_to(out_dir).as_posix()})", "", f.caption, ""]
    return lines


def _results_md(rows: list[ReportRow], figures: Sequence[Figure], out_dir: Path) -> str:
    return "\n".join(_section_intro(rows) + _section_results(rows) + _section_protocol(rows)
                     + _section_figures(figures, out_dir))


# --------------------------------------------------------------------------------------------- checks.md sections
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


_CHECKS_INTRO = [
    "# Small-scale checks", "",
    "Claim: LSGM (the VAE trained end to end with a score-based prior on its top latents) has a lower NLL "
    "bound than the stage-1 VAE alone with its Normal prior; latent probability-flow ODE sampling needs "
    "few function evaluations (NFE). The diagnostic row and the decomposition below say how much of the "
    "difference the SGM prior itself contributes and how much the end-to-end-trained VAE.", ""]


def _check_nll_table(vae: dict[str, Any], lsgm: dict[str, Any]) -> list[str]:
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
    return [_md_table(("model", "NLL bound (nats)", f"bits/dim (D={d})", "test images", "checkpoint"), rows), ""]


def _check_verdict(vae: dict[str, Any], lsgm: dict[str, Any]) -> tuple[list[str], float, bool]:
    diff, se, paired = _paired_difference(vae, lsgm)
    kind = "paired over the same test images and binarisations" if paired else "unpaired"
    lower = diff < 0
    verdict = (f"**Yes: LSGM is lower** than the VAE alone by {-diff:.2f} ± {se:.2f} nats ({kind})"
               if lower else
               f"**No: LSGM is not lower** than the VAE alone (LSGM − VAE = {diff:+.2f} ± {se:.2f} nats, {kind})")
    if lower and se == se and -diff < 2 * se:
        verdict += "; the difference is within two standard errors"
    return [verdict + ".", ""], diff, lower


def _check_decomposition(vae: dict[str, Any], lsgm: dict[str, Any], diff: float) -> list[str]:
    if lsgm.get("prior_gain_over_normal_nats") is None:
        return []
    g, gse = lsgm["prior_gain_over_normal_nats"], lsgm.get("prior_gain_over_normal_nats_stderr")
    within = gse is not None and gse == gse and abs(g) < 2 * gse
    lines = [f"On LSGM's own encoder samples the SGM prior term is {'lower' if g > 0 else 'higher'} than "
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
    return lines


def _check_terms(vae: dict[str, Any], lsgm: dict[str, Any]) -> list[str]:
    return ["Terms (nats, LSGM vs VAE): " + ", ".join(
        f"{k} {lsgm['terms_nats'].get(k, float('nan')):.2f} vs {vae['terms_nats'].get(k, float('nan')):.2f}"
        for k in ("recon", "log_q", "prior_top", "prior_rest")), ""]


def _check_nll_ode(lsgm: dict[str, Any]) -> list[str]:
    return [f"ODE for the prior term: eps {lsgm.get('ode_eps')}, tol {lsgm.get('tol')}, "
            f"{lsgm.get('trace')} trace ({lsgm.get('probe')} probes x{lsgm.get('num_probes')}, "
            f"{lsgm.get('probe_mode')}), NFE {lsgm.get('nfe_mean', float('nan')):.1f} per batch.", ""]


def _check_sampling_nfe(exp: str, sample: Optional[dict[str, Any]]) -> list[str]:
    if not sample:
        return [f"Latent ODE sampling NFE: **not run** (`lsgm sample {exp}`).", ""]
    return [f"Latent ODE sampling NFE: **{sample['nfe_mean']:.1f} ± {sample['nfe_std']:.1f}** per batch "
            f"of {sample.get('batch_size')} ({sample.get('num_batches')} batches, {sample.get('num_samples')} "
            f"samples; tol {sample.get('tol')}, eps {sample.get('ode_eps')}, {sample.get('method')}); "
            f"{sample.get('seconds_mean', float('nan')):.2f} s per batch.", ""]


def _check_sample_quality(exp: str, fd: Optional[dict[str, Any]]) -> list[str]:
    """FD / KID of the default samples in the dataset classifier's features (not Inception FID)."""
    if not fd:
        return [f"Sample quality (FD in classifier features): **not run** (`lsgm eval-fd {exp}`; "
                "`eval_fd.enabled: true` puts it in the DAG).", ""]
    acc = fd.get("classifier_accuracy")
    acc_text = f"{100 * acc:.1f} % {fd.get('classifier_eval_split', 'test')} accuracy" if acc is not None else "accuracy ?"
    return [f"Sample quality: **{fd['metric']} {fd['fd']:.3g}**, KID {fd['kid']:.3g} ± {fd.get('kid_std', float('nan')):.2g} "
            f"({fd.get('num_samples', '?')} samples against the {fd.get('reference')}; classifier: {acc_text}, "
            f"{fd.get('feature_dim')} features). On {fd.get('subset_size')} samples: FD {fd.get('fd_subset', float('nan')):.3g}. "
            "A reference set against itself has FD 0; FD is biased upward at small sample sizes, so compare "
            "values at equal N.", ""]


def _check_experiment(run_root: Path, exp: str, m: dict[str, dict[str, Any]]) -> list[str]:
    lines = [f"## {exp}", ""]
    vae, lsgm = m.get("nll_vae"), m.get("nll_lsgm")
    if not (vae and lsgm):
        missing = [f"`lsgm eval-nll {exp} --model {k}`" for k, v in (("vae", vae), ("lsgm", lsgm)) if not v]
        lines += [f"**not run**: missing {', '.join(missing)}.", ""]
    else:
        verdict, diff, lower = _check_verdict(vae, lsgm)
        lines += _check_nll_table(vae, lsgm) + verdict + _check_decomposition(vae, lsgm, diff)
        if not lower:
            lines += _check_terms(vae, lsgm)
        lines += _check_nll_ode(lsgm)
    return (lines + _stage_times_md(run_root, exp) + _check_sampling_nfe(exp, m.get("sample"))
            + _check_sample_quality(exp, m.get("fd")))


def _checks_md(run_root: Path, experiments: Sequence[str]) -> str:
    lines = list(_CHECKS_INTRO)
    targets = ["digits"] + [e for e in experiments if e != "digits"]
    shown = 0
    for exp in targets:
        m = collect_metrics(run_root, exp)
        if exp != "digits" and not ("nll_vae" in m and "nll_lsgm" in m):
            continue
        shown += 1
        lines += _check_experiment(run_root, exp, m)
    if not shown:
        lines += ["No experiment has both NLL evaluations yet.", ""]
    return "\n".join(lines)


def _training_order(exp: str, dirs: Sequence[Path]) -> list[Path]:
    """Training stage folders in pipeline order: the VAE, then the prior stages as the config lists them."""
    from lsgm.config import ConfigError, load_experiment

    try:
        order = [VAE_STAGE, *load_experiment(exp).prior]
    except (ConfigError, FileNotFoundError, OSError):
        order = [VAE_STAGE]
    return sorted(dirs, key=lambda d: (order.index(d.name) if d.name in order else len(order), d.name))


def _stage_times(run_root: Path, exp: str) -> list[tuple[str, float, Optional[float]]]:
    """(stage, wall seconds, peak RSS MB) from the stages' own JSON files, the same under Snakemake, DVC or by hand."""
    layout, out = RunLayout(run_root, exp), []
    for stage_dir in _training_order(exp, layout.training_stage_dirs()):
        m = _read_json(layout.metrics(stage_dir.name)) or {}
        if m.get("seconds_total") is not None:
            out.append((f"train ({stage_dir.name})", float(m["seconds_total"]), m.get("peak_rss_mb")))
    for key, label, field_ in (("sample", "sample", "seconds_total"), ("fid", "eval_fid", "seconds")):
        m = _read_json(_FILES[key](layout)) or {}
        if m.get(field_) is not None:
            out.append((label, float(m[field_]), m.get("peak_rss_mb")))
    runs = layout.base / "samples"  # extra sampling runs (config sample_runs), then every evaluation file
    for stats in sorted(runs.glob("*/sample_stats.json")) if runs.is_dir() else []:
        m = _read_json(stats) or {}
        if m.get("seconds_total") is not None:
            out.append((f"sample_run ({stats.parent.name})", float(m["seconds_total"]), m.get("peak_rss_mb")))
    for pattern, label in (("nll_*.json", "eval_nll"), ("fd_*.json", "eval_fd")):
        for path in sorted(layout.eval_dir.glob(pattern)) if layout.eval_dir.is_dir() else []:
            m = _read_json(path) or {}
            if m.get("seconds") is not None:
                tag = path.stem.split("_", 1)[1]
                out.append((f"{label} ({tag})", float(m["seconds"]), m.get("peak_rss_mb")))
    return out


def _stage_times_md(run_root: Path, exp: str) -> list[str]:
    """Wall time and peak RSS per stage, as each stage recorded them (training across resumes; without the few
    seconds of process start-up)."""
    rows = _stage_times(run_root, exp)
    if not rows:
        return []
    total = sum(s for _, s, _ in rows)
    table = [(k, f"{s:.1f}", f"{r:.0f}" if r is not None else "—") for k, s, r in rows]
    return ["Wall time per stage (recorded by each stage; stages may overlap when run in parallel):", "",
            _md_table(("stage", "seconds", "peak RSS (MB)"), table + [("total (sum)", f"{total:.1f}", "")]), ""]


# --------------------------------------------------------------------------------------------- HTML
_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:110em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:0.5em 0}td,th{border:1px solid #bbb;padding:2px 6px;
vertical-align:top}th{background:#eee}code{font-size:90%}img{max-width:100%;border:1px solid #ddd}
h1{font-size:1.5em}h2{font-size:1.25em;margin-top:1.5em}h3{font-size:1.05em}"""


def _html_page(title: str, markdown_text: str, base_dir: Path) -> str:
    """Self-contained HTML of a Markdown page (markdown-it, tables on); images embedded as data URIs so the page
    also reads inside ``snakemake --report`` (which shows it from a data URI, where relative links break)."""
    import base64
    import html
    import re

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown_text)

    def embed(m: re.Match) -> str:
        path = base_dir / html.unescape(m.group(1))
        if not path.is_file():
            return m.group(0)
        return 'src="data:image/png;base64,' + base64.b64encode(path.read_bytes()).decode() + '"'

    body = re.sub(r'src="([^"]+\.png)"', embed, body)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}</body></html>\n")


# --------------------------------------------------------------------------------------------- figures
def _real_images(exp: str, data_root: Path, count: int) -> tuple[Optional[np.ndarray], str]:
    """The first ``count`` images of the experiment's evaluation split in display levels (0..255), and a note."""
    from lsgm.config import ConfigError, load_experiment

    try:
        cfg = load_experiment(exp)
    except (ConfigError, FileNotFoundError, OSError) as exc:
        return None, f"no config for `{exp}` ({exc})"
    try:
        from lsgm.data.loader import load_split

        split = load_split(data_root, cfg.data.dataset, cfg.data.eval_split)
    except (FileNotFoundError, ValueError, OSError):
        return None, f"`{(data_root / cfg.data.dataset).as_posix()}` is not prepared"
    levels = np.asarray(split.images[:count].numpy(), dtype=np.float64)
    images = np.round(levels * 255.0 / split.max_value).astype(np.uint8)
    scale = "" if split.max_value == 255 else f" (levels 0..{split.max_value} scaled to 0..255)"
    binar = (", intensities (the Bernoulli means of dynamic binarisation, as the decoder means on the left), not "
             "binarised" if cfg.data.binarize else "")
    return images, (f"the first {len(images)} images of the `{cfg.data.eval_split}` split of `{cfg.data.dataset}`"
                    f"{scale}{binar}.")


def _experiment_figures(run_root: Path, data_root: Path, exp: str, fig_dir: Path) -> list[Figure]:
    layout, made = RunLayout(run_root, exp), []
    metrics = collect_metrics(run_root, exp)
    if layout.grid.is_file() and "sample" in metrics:
        from PIL import Image

        stats = metrics["sample"]
        shown = min(int(stats.get("grid_size") or 8) ** 2, int(stats.get("num_samples") or 64))
        real, note = _real_images(exp, data_root, shown)  # as many real images as samples in the grid
        made.append(samples_figure(exp, np.asarray(Image.open(layout.grid)), stats,
                                   fig_dir / "samples" / f"{exp}_samples.png", real=real, real_note=note))
    for stage_dir in _training_order(exp, layout.training_stage_dirs()):
        stage = stage_dir.name
        batch = (_read_json(layout.metrics(stage)) or {}).get("global_batch")
        made += training_figures(exp, stage, layout.dvclive(stage), fig_dir / "training", batch)
    fig = nfe_figure(exp, metrics, fig_dir / "nfe" / f"{exp}_nfe.png")
    return made + ([fig] if fig else [])


def _rst_caption(f: Figure) -> str:
    """A figure's caption as reStructuredText (``snakemake --report`` includes it): Markdown `code` -> ``code``."""
    import re

    text = re.sub(r"`([^`]+)`", r"``\1``", f.caption)
    return f"**{f.title}.** {text}\n"


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


def write_report(*, run_root: Path, out_dir: Path, experiments: Optional[list[str]] = None,
                 data_root: Path = PREPARED_ROOT) -> dict[str, Path]:
    """Write ``results.{md,csv,html}``, ``checks.{md,html}``, ``figures/`` and ``captions/`` into ``out_dir``.

    Args:
        run_root: runs root (``data/runs``).
        out_dir: report directory (``reports``).
        experiments: experiments to report (default: every experiment of ``params/experiments.yaml``; paper
            experiments are always included, as "not run" when absent).
        data_root: prepared datasets (real images beside the samples).

    Returns:
        Paths written, keyed ``results_md``, ``results_csv``, ``results_html``, ``checks_md``, ``checks_html``,
        ``figures``, ``captions``.
    """
    run_root, out_dir = Path(run_root), Path(out_dir)
    names = _check_experiments(experiments) if experiments else _default_experiments(run_root)
    rows = report_rows(run_root, names)
    paths = {"results_md": out_dir / "results.md", "results_csv": out_dir / "results.csv",
             "results_html": out_dir / "results.html", "checks_md": out_dir / "checks.md",
             "checks_html": out_dir / "checks.html", "figures": out_dir / "figures", "captions": out_dir / "captions"}
    figures: list[Figure] = []
    # the new figure and caption sets replace the old ones only once complete
    with atomic_dir(paths["figures"]) as tmp_figs, atomic_dir(paths["captions"]) as tmp_caps:
        for exp in dict.fromkeys(names + [r.experiment for r in rows]):
            if RunLayout(run_root, exp).base.is_dir():
                figures += _experiment_figures(run_root, Path(data_root), exp, tmp_figs)
        figures = figure_sequence(figures)
        for f in figures:
            atomic_write_text(tmp_caps / f.kind / f"{f.name}.rst", _rst_caption(f))
    figures = [Figure(f.kind, f.name, paths["figures"] / f.path.relative_to(tmp_figs), f.title, f.caption)
               for f in figures]
    results_md = _results_md(rows, figures, out_dir)
    checks_md = _checks_md(run_root, names)
    atomic_write_text(paths["results_csv"], _csv_text(rows))
    atomic_write_text(paths["results_md"], results_md)
    atomic_write_text(paths["results_html"], _html_page("LSGM: paper vs. this reimplementation", results_md, out_dir))
    atomic_write_text(paths["checks_md"], checks_md)
    atomic_write_text(paths["checks_html"], _html_page("LSGM: small-scale checks", checks_md, out_dir))
    measured = sum(r.status == "measured" for r in rows)
    print(f"report: {len(rows)} rows ({measured} measured), {len(figures)} figures -> {out_dir}")
    return paths
