"""The paper's reported numbers (docs/algorithm.md §10) as data, each with its table and provenance tag.

Provenance tags (docs/algorithm.md §10): ``P`` official project page, ``A`` public leaderboards, ``T`` LSGM rows in later
papers' tables, ``S`` a third-party paper summary (not verified against the PDF), ``M`` widely quoted but not yet
checked against the PDF ("to be confirmed"). Several tags may apply (``"P, A, T"``).

``experiment`` names the entry of ``params/experiments.yaml`` whose run reproduces the number, or ``None`` where
the matrix has no such experiment (ablations, the NCSN++ baseline). ``metric`` is the key our evaluation writes
(units in the name): ``fid``, ``isc``, ``recall``, ``nll_bpd``, ``nll_nats``, ``nfe``,
``sampling_seconds_16``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["PaperResult", "PAPER", "PAPER_RESULTS", "PAPER_TABLES", "METRIC_UNITS", "SOURCE_TAGS", "paper_results_for"]

PAPER = ("Arash Vahdat, Karsten Kreis, Jan Kautz: Score-based Generative Modeling in Latent Space, NeurIPS 2021, "
         "arXiv:2106.05931")
"""The paper every ``table`` refers to (unless the table names another paper)."""

PAPER_TABLES: dict[str, str] = {
    "2": "Tab. 2 of the paper: CIFAR-10 (FID, NLL, NFE)",
    "3": "Tab. 3 of the paper: CelebA-HQ-256 (FID, NLL, NFE)",
    "4": "Tab. 4 of the paper: dynamically binarised OMNIGLOT (NLL)",
    "5": "Tab. 5 of the paper: dynamically binarised MNIST (NLL)",
    "9": "Tab. 9 of the paper: NFE and sampling time of the CIFAR-10 models",
    "Fig. 4": "Fig. 4 of the paper: FID vs ODE tolerance / NFE on CelebA-HQ-256",
    "Sec. 5.2": "Sec. 5.2 of the paper: ablations (small models)",
    "(text)": "in the paper's text around it",
    "DDGAN Tab. 1": "Tab. 1 of Xiao, Kreis, Vahdat, Tackling the Generative Learning Trilemma with Denoising Diffusion "
                    "GANs, ICLR 2022 (LSGM re-measured there)",
}
"""What the ``table`` column's entries refer to (docs/algorithm.md §10, "Table numbering used in reports")."""

SOURCE_TAGS: dict[str, str] = {
    "P": "the paper's official project page",
    "A": "public leaderboards that list results from the paper",
    "T": "LSGM rows in tables of later papers",
    "S": "a third-party summary of the paper, not verified against the PDF",
    "M": "widely quoted for the paper, not yet checked against the PDF (to be confirmed)",
}
"""Provenance tags of the paper numbers (the ``source`` column), docs/algorithm.md §10."""

METRIC_UNITS: dict[str, str] = {
    "fid": "FID",
    "isc": "IS",
    "kid": "KID",
    "recall": "recall",
    "nll_bpd": "bits/dim",
    "nll_nats": "nats",
    "nelbo_bpd": "bits/dim",
    "nfe": "evaluations",
    "sampling_seconds_16": "s",
}
"""Unit of every metric name used in reports."""


@dataclass(frozen=True)
class PaperResult:
    """One number reported for LSGM (docs/algorithm.md §10).

    Attributes:
        dataset: dataset as the paper names it.
        model: the paper's model label.
        experiment: experiment in ``params/experiments.yaml`` that reproduces it (None: not in the matrix).
        metric: our metric key (see module docstring).
        value: the reported number, in ``unit``.
        value_text: the number as the paper prints it (``"2.10"``).
        unit: unit of ``value``.
        table: where the paper reports it (``"2"``, ``"2 / 9"``, ``"Sec. 5.2"``...).
        source: provenance tags (``"P, A, T"``).
        note: protocol detail or caveat (docs/algorithm.md §10).
    """

    dataset: str
    model: str
    experiment: Optional[str]
    metric: str
    value: float
    value_text: str
    unit: str
    table: str
    source: str
    note: str = ""

    @property
    def bound(self) -> bool:
        """True for likelihood bounds (reported as "≤ value")."""
        return self.metric in ("nll_bpd", "nll_nats")


def _r(dataset: str, model: str, experiment: Optional[str], metric: str, value: str, table: str, source: str,
       note: str = "", unit: Optional[str] = None) -> PaperResult:
    return PaperResult(dataset, model, experiment, metric, float(value), value, unit or METRIC_UNITS[metric], table,
                       source, note)


PAPER_RESULTS: tuple[PaperResult, ...] = (
    # CIFAR-10, Table 2 (and Table 9 for NFE)
    _r("CIFAR-10", "LSGM (FID)", "cifar10_best_fid", "fid", "2.10", "2", "P, A, T",
       "50k samples, train-set statistics"),
    _r("CIFAR-10", "LSGM (FID)", "cifar10_best_fid", "nll_bpd", "3.43", "2", "M", "NLL upper bound"),
    _r("CIFAR-10", "LSGM (FID)", "cifar10_best_fid", "nfe", "138", "2 / 9", "P, T", "probability-flow ODE"),
    _r("CIFAR-10", "LSGM (FID)", "cifar10_best_fid", "isc", "9.87", "DDGAN Tab. 1", "T"),
    _r("CIFAR-10", "LSGM (FID)", "cifar10_best_fid", "recall", "0.61", "DDGAN Tab. 1", "T", "not computed here"),
    _r("CIFAR-10", "LSGM (NLL)", "cifar10_best_nll", "fid", "6.89", "2", "A"),
    _r("CIFAR-10", "LSGM (NLL)", "cifar10_best_nll", "nll_bpd", "2.87", "2", "S, M", "NLL upper bound"),
    _r("CIFAR-10", "LSGM (balanced)", "cifar10_balanced", "fid", "2.17", "2", "A"),
    _r("CIFAR-10", "LSGM (balanced)", "cifar10_balanced", "nll_bpd", "2.95", "2", "M", "NLL upper bound"),
    # CelebA-HQ-256, Table 3 / Fig. 4
    _r("CelebA-HQ-256", "LSGM", "celeba256_quantitative", "fid", "7.22", "3", "P, A, T", "ODE tol 1e-2"),
    _r("CelebA-HQ-256", "LSGM", "celeba256_quantitative", "nll_bpd", "0.70", "3", "A",
       "NLL upper bound on 5-bit data (paperswithcode, sotaverified)"),
    _r("CelebA-HQ-256", "LSGM", "celeba256_quantitative", "nfe", "23", "3 / Fig. 4", "P, T", "ODE tol 1e-2"),
    _r("CelebA-HQ-256", "LSGM", "celeba256_quantitative", "sampling_seconds_16", "4.15", "3 (text)", "S",
       "time for 16 images; source also says ~637x faster than NCSN++, which does not match 44.6 min / 4.15 s"),
    _r("CelebA-HQ-256", "NCSN++ (PC sampler, baseline)", None, "sampling_seconds_16", "2676", "3 (text)", "S",
       "44.6 min for 16 images, 4000 NFE"),
    _r("CelebA-HQ-256", "NCSN++ (PC sampler, baseline)", None, "nfe", "4000", "3 (text)", "S"),
    _r("CelebA-HQ-256", "NCSN++ (PC sampler, baseline)", None, "fid", "7.23", "3 (text)", "S"),
    # binarised datasets, Tables 4 and 5
    _r("OMNIGLOT (dyn. bin.)", "LSGM", "omniglot", "nll_nats", "87.79", "4", "S", "NLL upper bound, 28x28 (D=784)"),
    _r("MNIST (dyn. bin.)", "LSGM", "mnist", "nll_nats", "78.47", "5", "S", "NLL upper bound, 28x28 (D=784)"),
    # ablations, Sec. 5.2 (small models, presumably CIFAR-10): no experiment in the matrix
    _r("CIFAR-10 (ablation, small model)", "LSGM with mixed score", None, "fid", "7.60", "Sec. 5.2", "S"),
    _r("CIFAR-10 (ablation, small model)", "LSGM without mixed score", None, "fid", "34.71", "Sec. 5.2", "S",
       "larger models reportedly do not train stably without it"),
    _r("CIFAR-10 (ablation)", "end-to-end LSGM", None, "fid", "5.19", "Sec. 5.2", "S"),
    _r("CIFAR-10 (ablation)", "frozen VAE + SGM only", None, "fid", "9.00", "Sec. 5.2", "S"),
    # third-party re-measurements quoted in docs/algorithm.md §10
    _r("CIFAR-10", "LSGM (DDGAN re-timing)", None, "nfe", "147", "DDGAN Tab. 1", "T", "their hardware/batch"),
)
"""Every number of docs/algorithm.md §10's results table (plus the third-party re-measurements it quotes)."""


def paper_results_for(experiment: str) -> list[PaperResult]:
    """Paper numbers that the experiment ``experiment`` reproduces (docs/algorithm.md §10)."""
    return [r for r in PAPER_RESULTS if r.experiment == experiment]
