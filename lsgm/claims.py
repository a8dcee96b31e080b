"""The paper's claims at small scale, computed from the metric files of the DAG (``lsgm claims``;
``snakemake --cores all claims``; docs/algorithm.md "Claims at small scale").

Each claim has an id, the paper's statement and number, our value with its standard error, a unit, a rule and a
verdict: ``holds`` / ``does not hold`` for the claims with a rule (C1, C5), ``reported`` for the comparisons whose
numbers are shown whatever they are (C2, C3, C4, C6). With several seeds (experiments ``NAME``, ``NAME_seed1``, ...)
every claim is computed per seed and summarised as the mean ± sd across seeds beside the per-seed standard errors;
a rule holds overall only if it holds on every seed.

* **C1 prior hole** (paper Tab. 5, small-VAE experiment): on the LSGM's own encoder and decoder, the NLL bound with the
  SGM prior minus the bound with N(0, I), paired per test image (``prior_gain_over_normal_nats`` of
  ``nll_lsgm.json``). Rule: ≤ −1 nat (binarised data) / ≤ −0.01 bits/dim (8-bit data) and at least 3 paired SEs.
* **C2** LSGM vs the VAE trained alone for the same total number of steps: paired difference of NLL bounds.
* **C3** mixed score (Sec. 5.2) vs the network predicting ε alone, same budget: NLL difference and FD of each.
* **C4** end-to-end vs a fresh SGM on the frozen VAE (Sec. 5.2: FID 5.19 vs 9.00): NLL difference and FD of each.
* **C5** sampling cost (abstract; Tab. 3): (a) NFE of the latent ODE vs the data-space model's ODE at the same tolerance
  and ``ode_eps``; (b) the latent ODE's NFE vs 1,000 ancestral steps of the data-space model, at an FD no worse.
  Rule: (a) fewer NFE; (b) steps / NFE ≥ 10 and FD(latent) ≤ FD(ancestral).
* **C6** (Fig. 4): FD and NFE of the latent model against the ODE tolerance.

FD is always "FD in <dataset>-classifier features" (lsgm/classifier.py), never FID.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from lsgm.atomic import atomic_write_json, atomic_write_text
from lsgm.config import ExperimentConfig, SampleRunConfig, load_experiment, split_seed
from lsgm.provenance import git_commit
from lsgm.report import _stage_times_md
from lsgm.runs import RunLayout
from lsgm.stats import bits_per_dim

__all__ = ["Claim", "compute_claims", "verdict_c1", "verdict_c5", "write_claims"]

HOLDS, FAILS, REPORTED, MISSING = "holds", "does not hold", "reported", "not run"
C1_NATS, C1_BPD, C1_SES = -1.0, -0.01, 3.0  # the rule of C1 (fixed by the issue; never tuned)
C5_RATIO = 10.0


@dataclass
class Claim:
    """One claim on one seed (or the summary across seeds): the fields of ``claims.json``."""

    id: str
    statement: str
    paper: str
    ours: Optional[float]
    se: Optional[float]
    unit: str
    rule: str
    verdict: str
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "statement": self.statement, "paper": self.paper, "ours": self.ours, "se": self.se,
                "unit": self.unit, "rule": self.rule, "verdict": self.verdict, **self.details}


# --------------------------------------------------------------------------------------------- the rules
def verdict_c1(diff: float, se: Optional[float], *, unit: str) -> str:
    """C1: the SGM-minus-Normal bound difference is ≤ −1 nat (≤ −0.01 bits/dim on 8-bit data) and ≥ 3 paired SEs."""
    threshold = C1_NATS if unit == "nats" else C1_BPD
    if se is None or not math.isfinite(se):
        return FAILS
    return HOLDS if diff <= threshold and -diff >= C1_SES * se else FAILS


def verdict_c5(nfe_latent: float, nfe_data_ode: float, ancestral_steps: int, fd_latent: float,
               fd_ancestral: float, nfe_latent_b: Optional[float] = None) -> str:
    """C5: (a) the latent ODE needs fewer NFE than the data-space ODE at the same tolerance; (b) ancestral steps /
    latent NFE ≥ 10 (the latent ODE at the comparison tolerance: ``nfe_latent_b``, default ``nfe_latent``) at an FD
    no worse than the ancestral sampler's (``fd_latent`` is that run's FD)."""
    nfe_b = nfe_latent if nfe_latent_b is None else nfe_latent_b
    ok = nfe_latent < nfe_data_ode and ancestral_steps / nfe_b >= C5_RATIO and fd_latent <= fd_ancestral
    return HOLDS if ok else FAILS


# --------------------------------------------------------------------------------------------- reading
def _read(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); re-run the stage that writes it") from None


class _Runs:
    """The metric files of one experiment instance (one seed)."""

    def __init__(self, cfg: ExperimentConfig, run_root: Path):
        self.cfg, self.layout = cfg, RunLayout(run_root, cfg.name)
        self.runs = cfg.claims_runs()
        self.binarized = cfg.data.binarize
        self.unit = "nats" if self.binarized else "bits/dim"
        self.dims = cfg.data.likelihood_dims

    def nll(self, model: Optional[str]) -> Optional[dict]:
        return None if model is None else _read(self.layout.nll(model))

    def _tag(self, key: str) -> Optional[str]:
        run = self.runs.get(key)
        return None if run is None else ("" if run == SampleRunConfig() else run.tag)

    def stats(self, key: str) -> Optional[dict]:
        tag = self._tag(key)
        return None if tag is None else _read(self.layout.run_stats(tag))

    def fd(self, key: str) -> Optional[dict]:
        tag = self._tag(key)
        return None if tag is None else _read(self.layout.fd(tag))

    def to_unit(self, nats: float) -> float:
        return nats if self.binarized else float(bits_per_dim(nats, self.dims))


def _paired(a: dict, b: dict) -> tuple[float, Optional[float]]:
    """mean and SE of b − a per image (paired when both saw the same images), else the unpaired difference."""
    pa, pb = a.get("per_image_nll_nats"), b.get("per_image_nll_nats")
    if pa is not None and pb is not None and len(pa) == len(pb) > 1:
        d = np.asarray(pb, dtype=np.float64) - np.asarray(pa, dtype=np.float64)
        return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))
    se = [x.get("nll_nats_stderr") for x in (a, b)]
    return b["nll_nats"] - a["nll_nats"], (math.hypot(*se) if None not in se else None)


# --------------------------------------------------------------------------------------------- the claims
def _c1(r: _Runs) -> Claim:
    c = Claim("C1", "the SGM prior fills the Normal prior's hole: on the same trained encoder and decoder the NLL "
                    "bound with the SGM prior is lower than with N(0, I)",
              "Tab. 5 and the small-VAE experiment on binarised MNIST: the SGM prior improves the VAE's bound",
              None, None, r.unit, f"<= {C1_NATS:g} nats (binarised) / <= {C1_BPD:g} bits/dim (8-bit), and >= "
                                  f"{C1_SES:g} paired SEs", MISSING)
    m = r.nll(r.cfg.claims.lsgm)
    if m is None or m.get("prior_gain_over_normal_nats") is None:
        return c
    diff, se = -m["prior_gain_over_normal_nats"], m.get("prior_gain_over_normal_nats_stderr")
    c.ours, c.se = r.to_unit(diff), (r.to_unit(se) if se is not None else None)
    c.verdict = verdict_c1(c.ours, c.se, unit=r.unit)
    c.details = {"sgm_prior_nll_nats": m["nll_nats"], "normal_prior_nll_nats": m.get("normal_prior_nelbo_nats"),
                 "difference_nats": diff, "difference_nats_se": se, "num_images": m.get("num_images")}
    return c


def _nll_diff_claim(r: _Runs, cid: str, statement: str, paper: str, a_model: Optional[str],
                    b_model: Optional[str], fd_keys: tuple[str, str] | None = None) -> Claim:
    """A reported comparison: NLL(b) − NLL(a) paired per image (and the FD of each where sampled)."""
    c = Claim(cid, statement, paper, None, None, r.unit, "reported (no rule): the numbers, whatever they show",
              MISSING)
    a, b = r.nll(a_model), r.nll(b_model)
    if a is None or b is None:
        return c
    diff, se = _paired(a, b)
    c.ours, c.se, c.verdict = r.to_unit(diff), (r.to_unit(se) if se is not None else None), REPORTED
    c.details = {f"nll_{a_model}_nats": a["nll_nats"], f"nll_{b_model}_nats": b["nll_nats"], "difference_nats": diff,
                 "difference_nats_se": se, "lower": b_model if diff < 0 else a_model}
    if fd_keys:
        for key, model in zip(fd_keys, (a_model, b_model)):
            fd = r.fd(key)
            c.details[f"fd_{model}"] = fd["fd"] if fd else None
            c.details[f"kid_{model}"] = fd["kid"] if fd else None
    return c


def _c5(r: _Runs) -> Claim:
    steps = r.cfg.claims.ancestral_steps
    c = Claim("C5", "latent score models sample with fewer network evaluations: the latent ODE needs fewer NFE than "
                    "the data-space model's ODE, and >= 10x fewer than the data-space ancestral sampler's steps at an "
                    "FD no worse",
              "abstract; Tab. 3: 23 NFE against 4,000 for NCSN++'s predictor-corrector sampler (CelebA-HQ-256)",
              None, None, "NFE ratio", f"(a) NFE(latent ODE) < NFE(data ODE) at the same tolerance; (b) {steps} / "
                                       f"NFE(latent ODE at tol {r.cfg.claims.ancestral_comparison_tol or 'of sampling'}) "
                                       f">= {C5_RATIO:g} and its FD <= FD(data ancestral)", MISSING)
    lat, data, anc = r.stats("lsgm"), r.stats("data_sgm"), r.stats("data_sgm_ancestral")
    fd_lat, fd_data, fd_anc = r.fd("lsgm"), r.fd("data_sgm"), r.fd("data_sgm_ancestral")
    tol_b = r.cfg.claims.ancestral_comparison_tol
    key_b = "lsgm" if tol_b is None or tol_b == r.cfg.sampling.ode_tol else f"lsgm@{tol_b:g}"
    lat_b, fd_b = r.stats(key_b), r.fd(key_b)
    if None in (lat, data, anc, fd_lat, fd_anc, lat_b, fd_b):
        return c
    c.ours, c.se = data["nfe_mean"] / lat["nfe_mean"], None
    # (a) both ODEs at the same tolerance and ode_eps; (b) the latent ODE at the tolerance fixed in advance
    # (claims.ancestral_comparison_tol) against the ancestral sampler; FD at the same number of samples
    # for every sampler (the first eval_fd.subset_size of each run)
    c.verdict = verdict_c5(lat["nfe_mean"], data["nfe_mean"], steps, fd_b["fd_subset"], fd_anc["fd_subset"],
                           nfe_latent_b=lat_b["nfe_mean"])
    c.details = {
        "nfe_latent_ode": lat["nfe_mean"], "nfe_data_ode": data["nfe_mean"], "ancestral_steps": steps,
        "ratio_data_ode_over_latent": data["nfe_mean"] / lat["nfe_mean"],
        "b_latent_ode_tol": lat_b["tol"], "nfe_latent_ode_b": lat_b["nfe_mean"],
        "ratio_ancestral_over_latent": steps / lat_b["nfe_mean"],
        "ratio_ancestral_over_latent_at_sampling_tol": steps / lat["nfe_mean"],
        "fd_num_samples": fd_lat["subset_size"], "fd_latent_ode_b": fd_b["fd_subset"],
        "fd_latent_ode": fd_lat["fd_subset"], "fd_data_ode": fd_data["fd_subset"] if fd_data else None,
        "fd_data_ancestral": fd_anc["fd_subset"], "kid_latent_ode_b": fd_b["kid_subset"],
        "kid_data_ancestral": fd_anc["kid_subset"],
        "seconds_per_batch": {"latent_ode": lat["seconds_mean"], "data_ode": data["seconds_mean"],
                              "data_ancestral": anc["seconds_mean"]},
        "batch_size": {"latent_ode": lat["batch_size"], "data_ode": data["batch_size"],
                       "data_ancestral": anc["batch_size"]},
        "ode_tol": lat["tol"], "ode_eps": lat["ode_eps"],
    }
    return c


def _c6(r: _Runs) -> Claim:
    c = Claim("C6", "FD and NFE of the latent model against the ODE tolerance", "Fig. 4 (CelebA-HQ-256): a looser "
              "tolerance needs far fewer NFE at a similar (even better) FID", None, None, "FD",
              "reported (no rule): the curve", MISSING)
    tols = sorted(r.cfg.claims.tolerances, reverse=True)
    points = []
    for tol in tols:
        key = "lsgm" if tol == r.cfg.sampling.ode_tol and r.cfg.claims.lsgm == "lsgm" else f"lsgm@{tol:g}"
        st, fd = r.stats(key), r.fd(key)
        if st is not None and fd is not None:
            points.append({"tol": tol, "nfe": st["nfe_mean"], "fd": fd["fd"], "kid": fd["kid"],
                           "seconds_per_batch": st["seconds_mean"]})
    if points:
        c.verdict, c.ours = REPORTED, points[-1]["fd"]
        c.details = {"curve": points}
    return c


def claims_for(cfg: ExperimentConfig, run_root: Path) -> list[Claim]:
    """Every claim of one experiment instance (one seed)."""
    r, k = _Runs(cfg, run_root), cfg.claims
    return [
        _c1(r),
        _nll_diff_claim(r, "C2", "LSGM has a lower NLL bound than the VAE trained alone for the same total number of "
                                 "steps (LSGM − VAE alone)", "Tab. 2–5: LSGM's bounds are below its VAE's (NVAE)",
                        k.vae_alone, k.lsgm),
        _nll_diff_claim(r, "C3", "the mixed score helps: NLL bound with the mixed score minus without (the network "
                                 "predicting ε alone), same budget; FD of each",
                        "Sec. 5.2: FID 7.60 with vs 34.71 without the mixed score (small CIFAR-10 model)",
                        k.no_mixed_score, k.lsgm, ("no_mixed_score", "lsgm")),
        _nll_diff_claim(r, "C4", "end-to-end training helps: NLL bound of LSGM minus a fresh SGM on the frozen "
                                 "stage-1 VAE, same budget; FD of each",
                        "Sec. 5.2: FID 5.19 end to end vs 9.00 with the VAE frozen", k.frozen_vae, k.lsgm,
                        ("frozen_vae", "lsgm")),
        _c5(r),
        _c6(r),
    ]


# --------------------------------------------------------------------------------------------- across seeds
def _summary(per_seed: list[tuple[int, Claim]]) -> Claim:
    first = per_seed[0][1]
    values = [c.ours for _, c in per_seed if c.ours is not None]
    verdicts = [c.verdict for _, c in per_seed]
    if MISSING in verdicts:
        verdict = MISSING
    elif first.verdict in (HOLDS, FAILS):
        verdict = HOLDS if all(v == HOLDS for v in verdicts) else FAILS
    else:
        verdict = REPORTED
    ses = [c.se for _, c in per_seed if c.se is not None]
    out = Claim(first.id, first.statement, first.paper, float(np.mean(values)) if values else None,
                (math.sqrt(sum(s * s for s in ses)) / len(ses)) if len(ses) == len(per_seed) and ses else None,
                first.unit, first.rule, verdict)
    out.details = {"sd_across_seeds": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                   "per_seed": [{"seed": s, "ours": c.ours, "se": c.se, "verdict": c.verdict, **c.details}
                                for s, c in per_seed]}
    return out


def compute_claims(experiments: Sequence[str], run_root: Path) -> dict[str, Any]:
    """``claims.json`` for the experiment instances (one per seed, ``NAME`` and ``NAME_seedK``) of ONE base
    experiment; a list with several base experiments gets one entry per base under ``experiments``."""
    groups: dict[str, list[tuple[int, ExperimentConfig]]] = {}
    for name in experiments:
        base, k = split_seed(name)
        groups.setdefault(base, []).append((k, load_experiment(name)))
    doc: dict[str, Any] = {"commit": git_commit(), "experiments": {}}
    for base, members in groups.items():
        members.sort(key=lambda kc: kc[0])
        per_claim: dict[str, list[tuple[int, Claim]]] = {}
        for seed, cfg in members:
            for claim in claims_for(cfg, run_root):
                per_claim.setdefault(claim.id, []).append((seed, claim))
        doc["experiments"][base] = {"seeds": [s for s, _ in members],
                                    "dataset": members[0][1].data.dataset,
                                    "claims": [_summary(v).as_dict() for v in per_claim.values()]}
    first = next(iter(doc["experiments"].values()), {"seeds": [], "claims": []})
    doc["seeds"], doc["claims"] = first["seeds"], first["claims"]  # the schema's top level: the first experiment
    return doc


def _fmt(x: Optional[float], digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


def claims_markdown(doc: dict[str, Any], run_root: Path) -> str:
    """``claims.md``: one table per experiment (claim, paper, ours ± SE, mean ± sd across seeds, verdict) and the
    per-seed numbers."""
    lines = ["# The paper's claims at small scale", "",
             "Computed by `lsgm claims` from the DAG's metric files (`snakemake --cores all claims`). FD is the "
             "Fréchet distance in the features of a classifier trained on the dataset (not Inception FID). "
             "Verdicts: `holds` / `does not hold` for claims with a rule (fixed in advance, never tuned), "
             "`reported` for comparisons shown whatever they show, `not run` where a metric file is missing. "
             f"Commit `{doc.get('commit')}`.", ""]
    for base, exp in doc["experiments"].items():
        lines += [f"## {base} ({exp['dataset']}; seeds {', '.join(map(str, exp['seeds']))})", "",
                  "| claim | statement | paper | ours (mean over seeds) | per-seed value ± SE | rule | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for c in exp["claims"]:
            per = "; ".join(f"s{p['seed']}: {_fmt(p['ours'])} ± {_fmt(p['se'], 2)} ({p['verdict']})"
                            for p in c["per_seed"])
            sd = f" (sd {_fmt(c['sd_across_seeds'], 2)})" if c.get("sd_across_seeds") is not None else ""
            lines.append(f"| {c['id']} | {c['statement']} | {c['paper']} | {_fmt(c['ours'])} {c['unit']}{sd} | "
                         f"{per} | {c['rule']} | **{c['verdict']}** |")
        lines += ["", "Details (per seed):", ""]
        for c in exp["claims"]:
            for p in c["per_seed"]:
                extra = {k: v for k, v in p.items() if k not in ("seed", "ours", "se", "verdict")}
                if extra:
                    lines.append(f"- {c['id']}, seed {p['seed']}: " + ", ".join(
                        f"{k} = {_fmt(v) if isinstance(v, float) else v}" for k, v in extra.items()))
        lines.append("")
        for seed in exp["seeds"]:
            lines += _stage_times_md(run_root, base if seed == 0 else f"{base}_seed{seed}")
    return "\n".join(lines)


def tolerance_figure(doc: dict[str, Any], path: Path) -> Path:
    """C6 as a figure: FD (in classifier features) and NFE of the latent ODE against the tolerance, one line per
    seed (paper Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fd, ax_nfe) = plt.subplots(1, 2, figsize=(9, 3.4))
    for base, exp in doc["experiments"].items():
        c6 = next((c for c in exp["claims"] if c["id"] == "C6"), None)
        for p in (c6 or {}).get("per_seed", []):
            curve = p.get("curve") or []
            if not curve:
                continue
            tols = [q["tol"] for q in curve]
            label = f"{base} seed {p['seed']}"
            ax_fd.plot(tols, [q["fd"] for q in curve], marker="o", label=label)
            ax_nfe.plot(tols, [q["nfe"] for q in curve], marker="o", label=label)
    for ax, ylabel in ((ax_fd, "FD in classifier features (lower is better)"), (ax_nfe, "NFE per batch")):
        ax.set_xscale("log")
        ax.set_xlabel("ODE tolerance (atol = rtol)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_nfe.legend(fontsize=7)
    fig.suptitle("C6: the latent model's sample quality and cost against the ODE tolerance (paper Fig. 4)", fontsize=9)
    fig.tight_layout()
    from lsgm.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def write_claims(*, experiments: Sequence[str], run_root: Path, out_dir: Path) -> dict[str, Path]:
    """``lsgm claims``: write ``claims.json``, ``claims.md`` and the C6 figure ``claims_c6.png`` into ``out_dir``."""
    doc = compute_claims(experiments, Path(run_root))
    paths = {"json": Path(out_dir) / "claims.json", "md": Path(out_dir) / "claims.md",
             "c6": Path(out_dir) / "claims_c6.png"}
    atomic_write_json(paths["json"], doc)
    atomic_write_text(paths["md"], claims_markdown(doc, Path(run_root)) + "\n![C6: FD and NFE against the ODE tolerance](claims_c6.png)\n")
    tolerance_figure(doc, paths["c6"])
    for c in doc["claims"]:
        print(f"{c['id']}: {c['verdict']} (ours {_fmt(c['ours'])} {c['unit']})")
    for base, exp in doc["experiments"].items():  # the wall time of every stage of the DAG, as the claims need it
        for seed in exp["seeds"]:
            print("\n".join(_stage_times_md(Path(run_root), base if seed == 0 else f"{base}_seed{seed}")))
    return paths
