"""The pipeline's stages: ONE list, from which every other list of stages derives (torch-free).

Each stage is a Snakemake rule, a DVC stage, an ``lsgm`` CLI verb (the name with ``-`` for ``_``) and a key of an
experiment's ``resources:`` section. :mod:`lsgm.pipeline` describes each stage's command, inputs and outputs;
:mod:`lsgm.launch` starts the launchable ones with the process layout their resources ask for; :mod:`lsgm.config`
validates ``resources:`` keys against :data:`STAGES`.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["STAGES", "LAUNCHABLE", "StageInfo", "STAGE_INFO", "verb_of", "stage_of_verb"]


class StageInfo(NamedTuple):
    """One stage: its name (rule, DVC stage, ``resources:`` key) and whether ``lsgm launch`` can start it on
    several processes (``torchrun``)."""

    name: str
    launchable: bool
    doc: str


STAGE_INFO: tuple[StageInfo, ...] = (
    StageInfo("resolve_config", False, "write the merged, validated config to params/resolved/EXP.yaml"),
    StageInfo("prepare", False, "download (if needed), verify and convert a dataset"),
    StageInfo("fid_stats", True, "Inception reference statistics of the FID reference split"),
    StageInfo("train_classifier", False, "the dataset's feature classifier (FD / KID in its features)"),
    StageInfo("train_vae", True, "stage 1: the VAE with a Normal prior"),
    StageInfo("train_lsgm", True, "stage 2 (and later): VAE + SGM prior"),
    StageInfo("train_data_sgm", True, "the data-space score model (baseline)"),
    StageInfo("sample", True, "probability-flow ODE samples of the final prior stage"),
    StageInfo("sample_run", True, "samples of another model, sampler or ODE tolerance"),
    StageInfo("eval_nll", True, "NLL bound on the evaluation split"),
    StageInfo("eval_fid", True, "FID / IS / KID of the samples"),
    StageInfo("eval_fd", False, "FD / KID in dataset-classifier features of a sampling run"),
    StageInfo("report", False, "reports/: results, small-scale checks, figures and captions"),
    StageInfo("claims", False, "reports/claims.json and claims.md: the paper's claims at small scale"),
)
STAGES: tuple[str, ...] = tuple(s.name for s in STAGE_INFO)
LAUNCHABLE: tuple[str, ...] = tuple(s.name for s in STAGE_INFO if s.launchable)


def verb_of(stage: str) -> str:
    """CLI verb of a stage: ``train_vae`` -> ``train-vae``."""
    if stage not in STAGES:
        raise ValueError(f"stage = {stage!r} is not a pipeline stage; allowed: {', '.join(STAGES)}")
    return stage.replace("_", "-")


def stage_of_verb(name: str) -> str:
    """Stage of a verb or stage spelling: ``train-vae`` or ``train_vae`` -> ``train_vae``."""
    stage = name.replace("-", "_")
    if stage not in STAGES:
        raise ValueError(f"stage = {name!r} is not a pipeline stage; allowed: {', '.join(STAGES)}")
    return stage
