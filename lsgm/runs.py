"""The run layout: ONE home for every path of an experiment's run directory (torch-free).

::

    <root>/<exp>/vae/                     stage 1 (train_vae)
    <root>/<exp>/<prior stage>/           stage 2+ (train_lsgm), e.g. lsgm, frozen_vae
        model.pt  metrics.json  resolved_config.yaml  checkpoints/  dvclive/
    <root>/<exp>/sample/                  samples.npz  grid.png  sample_stats.json  resolved_config.yaml
    <root>/<exp>/eval/                    nll_lsgm.json  nll_vae.json  fid.json

Every stage that measures something also writes a small *headline* file outside the git-ignored ``data/``
(:class:`HeadlineLayout`)::

    metrics/<exp>/train_<stage>.json  sample.json  nll_lsgm.json  nll_vae.json  fid.json

numbers only (NLL nats and bits/dim with standard errors, NFE, FID, wall time), kept in git and shown by
``dvc metrics show`` / ``dvc exp show`` (the JSONs under ``data/runs`` keep the full protocol).

Training, evaluation, metrics, reports and the stage table (:mod:`lsgm.pipeline`) all ask a :class:`RunLayout`
(or :class:`HeadlineLayout`) for their paths; no other module joins run paths. The stage table builds templates from the same object
(``RunLayout("data/runs", "{exp}").model("{stage}")`` is ``data/runs/{exp}/{stage}/model.pt``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CLASSIFIERS_ROOT", "DATA_SGM_STAGE", "HEADLINE_ROOT", "HeadlineLayout", "PREPARED_ROOT",
           "RESERVED_STAGE_NAMES", "RUNS_ROOT", "VAE_STAGE", "ClassifierFiles", "RunLayout", "fid_reference_tag",
           "fid_stats_file", "prepared_dir"]

RUNS_ROOT = Path("data/runs")
HEADLINE_ROOT = Path("metrics")
PREPARED_ROOT = Path("data/prepared")
VAE_STAGE = "vae"
DATA_SGM_STAGE = "data_sgm"  # the data-space score model's training stage (its run directory)
_SAMPLE, _EVAL = "sample", "eval"
#: names a prior stage may not take: they are folders of the run directory (or of a stage directory)
RESERVED_STAGE_NAMES = (VAE_STAGE, _SAMPLE, _EVAL, "samples", "checkpoints", "dvclive", "data_sgm")


def prepared_dir(dataset: str, root: str | os.PathLike = PREPARED_ROOT) -> Path:
    """``<root>/<dataset>``: the prepared dataset folder (``lsgm prepare``)."""
    return Path(root) / dataset


CLASSIFIERS_ROOT = Path("data/classifiers")


@dataclass(frozen=True)
class ClassifierFiles:
    """The feature classifier of a dataset (lsgm/classifier.py): ``<root>/<dataset>/{model.pt,metrics.json}``."""

    dataset: str
    root: Path = CLASSIFIERS_ROOT

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.dataset

    @property
    def model(self) -> Path:
        return self.dir / "model.pt"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.json"


def fid_reference_tag(fid_reference: str) -> str:
    """File-name tag of an FID reference split: ``train`` or ``train_valid`` (for ``train+valid``)."""
    return fid_reference.replace("+", "_")


def fid_stats_file(dataset: str, fid_reference: str, prepared_root: str | os.PathLike = PREPARED_ROOT) -> Path:
    """Reference FID statistics of a dataset's reference split, one file per (dataset, split) shared by every
    experiment on it: ``<prepared_root>/../fid_stats/<dataset>-<tag>.pt`` (``data/fid_stats/cifar10-train.pt``)."""
    return Path(prepared_root).parent / "fid_stats" / f"{dataset}-{fid_reference_tag(fid_reference)}.pt"


@dataclass(frozen=True)
class _ExperimentDir:
    """``<root>/<exp>``: the shared part of the run and headline layouts."""

    root: Path
    exp: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def base(self) -> Path:
        """``<root>/<exp>``."""
        return self.root / self.exp


def _fd_name(tag: str) -> str:
    """``fd_<tag>.json``; ``fd_default.json`` for the default sampling run (empty tag)."""
    return f"fd_{tag or 'default'}.json"


@dataclass(frozen=True)
class RunLayout(_ExperimentDir):
    """Paths of one experiment's run directory ``<root>/<exp>``.

    Args:
        root: runs root (``data/runs``).
        exp: experiment name (or a ``{exp}`` template placeholder).
    """

    # ---- training stages (stage 1 is "vae")
    def stage_dir(self, stage: str) -> Path:
        return self.base / stage

    def model(self, stage: str) -> Path:
        """``model.pt`` a training stage hands on."""
        return self.stage_dir(stage) / "model.pt"

    def metrics(self, stage: str) -> Path:
        """``metrics.json`` of a training stage (losses, steps, step times)."""
        return self.stage_dir(stage) / "metrics.json"

    def checkpoints(self, stage: str) -> Path:
        return self.stage_dir(stage) / "checkpoints"

    def dvclive(self, stage: str) -> Path:
        return self.stage_dir(stage) / "dvclive"

    def stale_checkpoints(self, stage: str, config_hash: str) -> Path:
        """Where a stage's checkpoints of an earlier config are moved (kept, never resumed from)."""
        return self.stage_dir(stage) / f"checkpoints-stale-{config_hash}"

    def resolved_config(self, stage: str) -> Path:
        """``resolved_config.yaml`` of a stage directory (training stages and ``sample``)."""
        return self.stage_dir(stage) / "resolved_config.yaml"

    # ---- sampling
    @property
    def sample_dir(self) -> Path:
        return self.base / _SAMPLE

    @property
    def sample_config(self) -> Path:
        return self.resolved_config(_SAMPLE)

    @property
    def samples(self) -> Path:
        return self.sample_dir / "samples.npz"

    @property
    def grid(self) -> Path:
        return self.sample_dir / "grid.png"

    @property
    def sample_stats(self) -> Path:
        return self.sample_dir / "sample_stats.json"

    # ---- extra sampling runs (config sample_runs: another model, sampler or tolerance)
    def run_dir(self, tag: str) -> Path:
        """``samples/<tag>/`` of a sampling run; the default run (empty tag) is ``sample/``."""
        return self.sample_dir if not tag else self.base / "samples" / tag

    def run_samples(self, tag: str) -> Path:
        return self.run_dir(tag) / "samples.npz"

    def run_grid(self, tag: str) -> Path:
        return self.run_dir(tag) / "grid.png"

    def run_stats(self, tag: str) -> Path:
        return self.run_dir(tag) / "sample_stats.json"

    # ---- evaluation
    @property
    def eval_dir(self) -> Path:
        return self.base / _EVAL

    def fd(self, tag: str) -> Path:
        """``eval/fd_<tag>.json``: FD / KID in classifier features of a sampling run (``default`` for ``sample/``)."""
        return self.eval_dir / _fd_name(tag)

    def nll(self, model: str) -> Path:
        """``eval/nll_<model>.json`` (model ``lsgm`` or ``vae``)."""
        return self.eval_dir / f"nll_{model}.json"

    @property
    def fid(self) -> Path:
        return self.eval_dir / "fid.json"

    def training_stage_dirs(self) -> list[Path]:
        """Stage directories that hold DVCLive logs, in name order (existing ones only)."""
        if not self.base.is_dir():
            return []
        return sorted(p for p in self.base.iterdir() if (p / "dvclive").is_dir())


@dataclass(frozen=True)
class HeadlineLayout(_ExperimentDir):
    """Headline metric files of one experiment, ``<root>/<exp>/*.json`` (``metrics/digits/nll_lsgm.json``).

    Args:
        root: headline root (``metrics``, the directory ``dvc.yaml`` declares as metrics).
        exp: experiment name (or a ``{exp}`` template placeholder).
    """

    def train(self, stage: str) -> Path:
        """``train_<stage>.json`` of a training stage (``train_vae.json``, ``train_lsgm.json``)."""
        return self.base / f"train_{stage}.json"

    @property
    def sample(self) -> Path:
        return self.base / "sample.json"

    def sample_run(self, tag: str) -> Path:
        """``sample.json`` of the default sampling run (``tag`` empty), else ``sample_<tag>.json``."""
        return self.sample if not tag else self.base / f"sample_{tag}.json"

    def fd(self, tag: str) -> Path:
        """``fd_<tag>.json`` (``fd_default.json`` for the default sampling run): FD/KID in the dataset classifier's
        features."""
        return self.base / _fd_name(tag)

    def nll(self, model: str) -> Path:
        return self.base / f"nll_{model}.json"

    @property
    def fid(self) -> Path:
        return self.base / "fid.json"
