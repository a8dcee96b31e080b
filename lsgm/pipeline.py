"""The stage table: ONE home for the pipeline's facts, read by Snakemake and written out as ``dvc.yaml``.

Each pipeline stage (``prepare`` -> ``fid_stats`` -> ``train_vae`` -> ``train_lsgm`` -> ``sample`` ->
``eval_nll`` / ``eval_fid`` -> ``report``, plus ``resolve_config``) is a :class:`Kind`: its wildcards, its
``lsgm`` command, its inputs, outputs, headline metric files, persistent run-directory state, the config keys it
reads and the library module it runs. :func:`build_pipeline` expands the kinds over the experiment matrix
(``params/experiments.yaml``) into concrete :class:`Stage` s.

* The Snakemake rules (``workflow/rules/*.smk``) take inputs, params, resources and the shell command from
  here (output patterns too), so a rule cannot drift from its DVC stage.
* ``dvc.yaml`` (default experiments) and ``workflow/dvc.yaml`` (the rest of the matrix) are generated from
  here by ``python -m lsgm.pipeline write`` and checked in; ``python -m lsgm.pipeline check`` (and
  ``tests/test_workflow.py``) fail when they are stale.
* Params per key. DVC lists the config keys a stage reads from ``params/resolved/EXP.yaml``: the fully merged
  config (``extends:`` fragments and ``params.yaml`` overrides applied) written by the ``resolve_config`` stage, so
  a value inherited from a fragment is tracked too. Snakemake reads the same values from a per-stage file
  ``params/resolved/stages/<stage>.json`` (:func:`write_stage_params`), an input rewritten only when its values
  change (by the Snakefile when it loads, and by ``lsgm resolve-config``): Snakemake's modification times then
  decide, not its own records, which DVC cannot update. A change to ``sampling.ode_tol`` reruns only sample,
  eval_fid and report in both tools.
* Outputs under ``data/`` are cached by DVC (copies: ``.dvc/config``); the headline files under ``metrics/``
  (:mod:`lsgm.headline`) and the resolved configs are kept in git (``cache: false``); ``dvc.yaml`` declares
  ``metrics/`` as DVC metrics and the DVCLive logs of the default experiments as DVC plots (x = optimiser step).
* ``persist`` paths (checkpoints; DVCLive logs, cached) are declared to DVC with ``persist: true`` and are NOT
  Snakemake outputs: Snakemake deletes declared outputs before a rerun, which would defeat resuming.
* After a Snakemake run the Snakefile records what it built in DVC (:func:`record_in_dvc`: ``dvc commit``), so
  ``dvc status`` / ``dvc repro`` has nothing to redo; after ``dvc repro``, ``snakemake -n`` has nothing to do.

Model code never imports this module; it only describes how the ``lsgm`` CLI verbs chain.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from lsgm.atomic import atomic_write_text
from lsgm.config import (OVERRIDES_FILE, RESOLVED_PARAMS, ConfigError, ExperimentConfig, ResourceConfig, config_to_dict,
                         default_experiments, dump_config, experiment_file, list_experiments, load_experiment,
                         matrix_claims_experiments)
from lsgm.progress import PREFIX as PROGRESS_PREFIX
from lsgm.runs import (DATA_SGM_STAGE, HEADLINE_ROOT, RESERVED_STAGE_NAMES, RUNS_ROOT, VAE_STAGE, ClassifierFiles,
                       HeadlineLayout, RunLayout,
                       fid_reference_tag, fid_stats_file, prepared_dir)
from lsgm.stages import STAGES

__all__ = ["Kind", "Stage", "Pipeline", "KINDS", "SNAKEMAKE_LOG", "STAGE_PARAMS", "build_pipeline", "launcher",
           "slurm_resources", "module_deps", "section_values", "stage_params_text", "write_stage_params",
           "record_in_dvc", "dvc_documents", "overrides_text", "expected_files", "main"]

LOG_DIR = "logs"
STAGE_PARAMS = RESOLVED_PARAMS + "/stages"  # per-stage config values, Snakemake's params inputs (git-ignored)
_RUN = RunLayout(RUNS_ROOT, "{exp}")  # the run layout with the experiment left as a template field
_HEAD = HeadlineLayout(HEADLINE_ROOT, "{exp}")
#: Snakemake's shell suffix: the whole output to the job's log, its progress lines (lsgm.progress) and one-line errors
#: also to the terminal (Snakemake's bash runs with pipefail: the stage's exit status is kept)
SNAKEMAKE_LOG = (" 2>&1 | tee {log} | {{ grep --line-buffered -E '^(%s|lsgm: )' || true; }}"
                 % PROGRESS_PREFIX.rstrip())


def _p(path: Path) -> str:
    return path.as_posix()


@dataclass(frozen=True)
class Kind:
    """One pipeline stage kind (= one Snakemake rule = one DVC ``foreach`` stage).

    Templates use ``{field}`` placeholders filled from the instance's fields (wildcards plus derived values
    such as ``dataset`` or ``init_from``).
    """

    name: str
    wildcards: tuple[str, ...]
    cmd: str
    deps: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()  # cached by DVC
    outs_git: tuple[str, ...] = ()  # small files kept in git (DVC cache: false)
    headline: tuple[str, ...] = ()  # headline metric files under metrics/ (git, DVC cache: false; lsgm.headline)
    persist: tuple[str, ...] = ()  # resumable run-directory state: DVC persist, never a Snakemake output
    live: tuple[str, ...] = ()  # DVCLive folders: DVC persist + cached (plots of other revisions), not Snakemake outputs
    params: tuple[str, ...] = ()  # dotted config keys (templates), e.g. "prior.{stage}"
    overrides: bool = False  # reads the experiment's entry of params.yaml (DVC params dep; Snakemake input)
    report_reads: tuple[str, ...] = ()  # outputs the report stage reads (JSON summaries, images)
    module: str = ""  # library module the CLI verb runs (its lsgm imports become deps)
    log_redirect: str = SNAKEMAKE_LOG


_PREPARED = _p(prepared_dir("{dataset}"))
_FID_STATS = _p(fid_stats_file("{dataset}", "{split}"))

_REPORT_FILES = ("reports/results.md", "reports/results.csv", "reports/results.html", "reports/checks.md",
                 "reports/checks.html", "reports/figures", "reports/captions")

KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("resolve_config", ("exp",), "lsgm resolve-config {exp}",
         deps=("{params_file}", "params/fragments"), outs_git=(RESOLVED_PARAMS + "/{exp}.yaml",), overrides=True,
         module="lsgm.pipeline"),
    Kind("prepare", ("dataset",), "lsgm prepare {dataset}", outs=(_PREPARED,), module="lsgm.data.prepare"),
    Kind("fid_stats", ("dataset", "split"), "lsgm fid-stats {exp} --out " + _FID_STATS,
         deps=(_PREPARED,), outs=(_FID_STATS,), params=("data", "eval_fid"), module="lsgm.metrics"),
    Kind("train_classifier", ("dataset",), "lsgm train-classifier {exp}", deps=(_PREPARED,),
         outs=(_p(ClassifierFiles("{dataset}").model), _p(ClassifierFiles("{dataset}").metrics)),
         params=("data", "eval_fd"), report_reads=(_p(ClassifierFiles("{dataset}").metrics),),
         module="lsgm.classifier"),
    Kind("train_vae", ("exp",), "{lsgm} train-vae {exp}", deps=(_PREPARED,),
         outs=(_p(_RUN.model(VAE_STAGE)), _p(_RUN.metrics(VAE_STAGE))), headline=(_p(_HEAD.train(VAE_STAGE)),),
         persist=(_p(_RUN.checkpoints(VAE_STAGE)),), live=(_p(_RUN.dvclive(VAE_STAGE)),),
         params=("data", "vae", "train_vae", "engine.precision"), report_reads=(_p(_RUN.metrics(VAE_STAGE)),),
         module="lsgm.train"),
    Kind("train_lsgm", ("exp", "stage"), "{lsgm} train-lsgm {exp} --stage {stage}",
         deps=(_PREPARED, _p(_RUN.model("{init_from}"))),
         outs=(_p(_RUN.model("{stage}")), _p(_RUN.metrics("{stage}"))), headline=(_p(_HEAD.train("{stage}")),),
         persist=(_p(_RUN.checkpoints("{stage}")),), live=(_p(_RUN.dvclive("{stage}")),),
         params=("data", "vae", "prior.{stage}", "engine.precision"), report_reads=(_p(_RUN.metrics("{stage}")),),
         module="lsgm.train"),
    Kind("train_data_sgm", ("exp",), "{lsgm} train-data-sgm {exp}", deps=(_PREPARED,),
         outs=(_p(_RUN.model(DATA_SGM_STAGE)), _p(_RUN.metrics(DATA_SGM_STAGE))),
         headline=(_p(_HEAD.train(DATA_SGM_STAGE)),), persist=(_p(_RUN.checkpoints(DATA_SGM_STAGE)),),
         live=(_p(_RUN.dvclive(DATA_SGM_STAGE)),), params=("data", "data_sgm", "engine.precision"),
         report_reads=(_p(_RUN.metrics(DATA_SGM_STAGE)),), module="lsgm.baseline"),
    Kind("sample", ("exp",), "lsgm sample {exp}", deps=(_p(_RUN.model("{final}")),),
         outs=(_p(_RUN.samples), _p(_RUN.grid), _p(_RUN.sample_stats)), headline=(_p(_HEAD.sample),),
         params=("sampling",), report_reads=(_p(_RUN.sample_stats), _p(_RUN.grid)), module="lsgm.evaluate"),
    Kind("sample_run", ("exp", "run"), "lsgm sample-run {exp} {run}", deps=(_p(_RUN.model("{model_dir}")),),
         outs=(_p(_RUN.run_samples("{run}")), _p(_RUN.run_grid("{run}")), _p(_RUN.run_stats("{run}"))),
         headline=(_p(_HEAD.sample_run("{run}")),), params=("sampling", "sample_runs", "claims"),
         report_reads=(_p(_RUN.run_stats("{run}")),), module="lsgm.evaluate"),
    Kind("eval_nll", ("exp", "model"), "lsgm eval-nll {exp} --model {model}",
         deps=(_PREPARED, _p(_RUN.model("{model_dir}"))), outs=(_p(_RUN.nll("{model}")),),
         headline=(_p(_HEAD.nll("{model}")),), params=("data", "eval_nll"), report_reads=(_p(_RUN.nll("{model}")),),
         module="lsgm.evaluate"),
    Kind("eval_fid", ("exp",), "lsgm eval-fid {exp}", deps=(_p(_RUN.samples), _FID_STATS),
         outs=(_p(_RUN.fid),), headline=(_p(_HEAD.fid),), params=("eval_fid",), report_reads=(_p(_RUN.fid),),
         module="lsgm.metrics"),
    Kind("eval_fd", ("exp", "run"), "lsgm eval-fd {exp} --run {run}",
         deps=("{run_samples}", _p(ClassifierFiles("{dataset}").model), _PREPARED), outs=(_p(_RUN.fd("{run}")),),
         headline=(_p(_HEAD.fd("{run}")),), params=("eval_fd",), report_reads=(_p(_RUN.fd("{run}")),),
         module="lsgm.classifier"),
    Kind("report", (), "lsgm report --experiments {experiments}", outs=_REPORT_FILES, module="lsgm.report"),
    Kind("claims", (), "lsgm claims --experiments {experiments}",
         outs_git=("reports/claims.json", "reports/claims.md", "reports/claims_c6.png"), module="lsgm.claims"),
]}
#: stage kinds whose JSON the claims stage reads (its inputs)
_CLAIMS_READ = ("train_classifier", "train_vae", "train_lsgm", "train_data_sgm", "sample", "sample_run", "eval_nll",
                "eval_fd")
if tuple(KINDS) != STAGES:  # the stage list (lsgm/stages.py) is the one home of stage names and their order
    raise RuntimeError(f"lsgm.pipeline.KINDS {list(KINDS)} != lsgm.stages.STAGES {list(STAGES)}")


@dataclass(frozen=True)
class Stage:
    """A concrete stage instance (one Snakemake job / one expanded DVC stage)."""

    kind: str
    key: str  # DVC foreach key ("" for the single report stage)
    fields: Mapping[str, str]
    exp: str  # experiment whose config (params, resources) the stage uses
    cmd: str
    deps: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[str, ...]
    outs_git: tuple[str, ...]
    headline: tuple[str, ...]
    persist: tuple[str, ...]
    live: tuple[str, ...]
    report_reads: tuple[str, ...]

    @property
    def outputs(self) -> tuple[str, ...]:
        """What Snakemake declares (everything but the persistent run-directory state)."""
        return self.outs + self.outs_git + self.headline

    @property
    def dvc_name(self) -> str:
        return f"{self.kind}@{self.key}" if self.key else self.kind

    @property
    def params_file(self) -> str | None:
        """``params/resolved/stages/<dvc name>.json``: the config values the stage reads (None: it reads none)."""
        return f"{STAGE_PARAMS}/{self.dvc_name}.json" if self.params else None

    @property
    def snakemake_inputs(self) -> tuple[str, ...]:
        """Snakemake's inputs: DVC's deps, plus the stage's params file (DVC reads the same values per key from
        ``params/resolved/EXP.yaml``) and ``params.yaml`` for ``resolve_config`` (a DVC params dependency)."""
        extra = (self.params_file,) if self.params_file else ()
        if KINDS[self.kind].overrides:
            extra += (OVERRIDES_FILE,)
        return self.deps + extra


# ------------------------------------------------------------------------------------------- helpers
def launcher(res: ResourceConfig) -> str:
    """Command that starts ``lsgm`` for a stage's resources: plain ``lsgm`` for one process, else ``lsgm launch``.

    ``lsgm launch`` (lsgm/launch.py) resolves the layout inside the job: ``torchrun --standalone`` on one node, or
    one ``torchrun`` per node under ``srun`` with c10d rendezvous on the allocation's first host (Snakemake's
    ``mpi`` resource makes the Slurm jobstep run the command in the batch step, so ``srun`` sees every node).
    """
    return "lsgm" if res.world_size == 1 else "lsgm launch"


def slurm_resources(res: ResourceConfig) -> dict[str, Any]:
    """Snakemake ``resources:`` for snakemake-executor-plugin-slurm (same keys for every stage).

    ``gres`` asks for GPUs per node (``--gres=gpu[:model]:N``; empty: no GPU). ``cpus_per_task`` covers every
    process of the job's one task per node (``torchrun`` starts one process per GPU). ``mpi`` is set for
    multi-node jobs only (plugin: a falsy value skips its MPI checks); ``tasks_per_gpu: 0`` stops the plugin
    from turning ``tasks`` into ``--ntasks-per-gpu``.
    """
    gres = ""
    if res.gpus_per_node > 0:
        gres = f"gpu:{res.gpu_model}:{res.gpus_per_node}" if res.gpu_model else f"gpu:{res.gpus_per_node}"
    return {
        "mem_mb": res.mem_mb,
        "runtime": res.runtime_min,
        "cpus_per_task": res.cpus_per_task * max(res.gpus_per_node, 1),
        "nodes": res.nodes,
        "tasks": res.nodes,
        "tasks_per_gpu": 0,
        "gres": gres,
        "mpi": "srun" if res.nodes > 1 else None,
        "slurm_partition": res.partition,
    }


def module_deps(module: str, root: Path) -> list[str]:
    """Repo-relative files of ``module`` and every ``lsgm`` module it imports (transitively, incl. packages).

    Modules that do not exist (yet) are skipped: the stage then depends on what exists.
    """
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # a module imports its parent packages' __init__ too
            todo_name = ".".join(parts[:i])
            if todo_name in seen:
                continue
            base = root.joinpath(*parts[:i])
            path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
            if not path.is_file():
                break
            seen[todo_name] = path
            todo.extend(_lsgm_imports(path, todo_name, is_pkg=path.name == "__init__.py"))
    return sorted(str(p.relative_to(root)) for p in seen.values())


def _lsgm_imports(path: Path, name: str, is_pkg: bool) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if is_pkg else name.rpartition(".")[0]
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "lsgm"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "lsgm":
                continue
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]  # `from lsgm.vae import cells` (skipped if absent)
    return out


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            raise ValueError(f"config key {dotted!r} does not exist; allowed: a dotted path into the config")
        d = d[part]
    return d


def section_values(cfg: ExperimentConfig, keys: Sequence[str]) -> str:
    """The config values a stage reads, as canonical JSON (Snakemake reruns a job when this changes)."""
    raw = config_to_dict(cfg)
    return json.dumps({k: _get(raw, k) for k in keys}, sort_keys=True)


# ------------------------------------------------------------------------------------------- expansion
@dataclass
class Pipeline:
    """All concrete stages over a set of experiments, with lookups for the Snakemake rules."""

    root: Path
    configs: dict[str, ExperimentConfig]
    report_experiments: list[str]
    stages: list[Stage] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)  # experiment -> its config error (skip_broken=True)

    def find(self, kind: str, **wildcards: str) -> Stage:
        """The stage of ``kind`` whose wildcards match (Snakemake input/params functions call this)."""
        for st in self.stages:
            if st.kind == kind and all(st.fields.get(k) == v for k, v in wildcards.items()):
                return st
        raise ValueError(f"no {kind} stage with wildcards {wildcards}; known: "
                         f"{[dict(s.fields) for s in self.stages if s.kind == kind]}")

    def of_kind(self, kind: str) -> list[Stage]:
        return [s for s in self.stages if s.kind == kind]

    def config(self, stage: Stage) -> ExperimentConfig:
        return self.configs[stage.exp]

    def resources(self, stage: Stage) -> ResourceConfig:
        return self.config(stage).resource(stage.kind)


def _fields_per_instance(cfg: ExperimentConfig, root: Path) -> list[tuple[str, dict[str, str]]]:
    exp = cfg.name
    ds = cfg.data.dataset
    split = fid_reference_tag(cfg.data.fid_reference)
    final = cfg.final_prior_stage
    base = {"exp": exp, "dataset": ds, "split": split, "final": final}
    for stage in cfg.prior:
        if stage in RESERVED_STAGE_NAMES:
            raise ValueError(f"{exp}: prior stage name {stage!r} is reserved; allowed: any name but "
                             f"{', '.join(RESERVED_STAGE_NAMES)}")
    out = [("resolve_config", {**base, "params_file": str(experiment_file(exp, root).relative_to(root))}),
           ("prepare", base)]
    if cfg.eval_fid.enabled:
        out.append(("fid_stats", base))
    out.append(("train_vae", {**base, "lsgm": launcher(cfg.resource("train_vae"))}))
    for stage, p in cfg.prior.items():
        out.append(("train_lsgm", {**base, "stage": stage, "init_from": p.init_from,
                                   "lsgm": launcher(cfg.resource("train_lsgm"))}))
    if cfg.data_sgm is not None:
        out.append(("train_data_sgm", {**base, "lsgm": launcher(cfg.resource("train_data_sgm"))}))
    out.append(("sample", base))
    runs = [("default", "")] + [(r.tag, r.tag) for r in cfg.all_sample_runs()]
    for r in cfg.all_sample_runs():
        out.append(("sample_run", {**base, "run": r.tag, "model_dir": cfg.model_stage(r.model)}))
    for model in cfg.all_nll_models():
        out.append(("eval_nll", {**base, "model": model, "model_dir": cfg.model_stage(model)}))
    if cfg.eval_fid.enabled:
        out.append(("eval_fid", base))
    if cfg.eval_fd.enabled:
        out.insert(2, ("train_classifier", base))
        layout = RunLayout(RUNS_ROOT, exp)
        for name, tag in runs:
            out.append(("eval_fd", {**base, "run": name, "run_samples": _p(layout.run_samples(tag))}))
    return out


def _instance_key(kind: Kind, f: Mapping[str, str]) -> str:
    return "-".join(f[w] for w in kind.wildcards)


def _render(templates: Sequence[str], f: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(t.format(**f) for t in templates)


def _make_stage(kind: Kind, f: dict[str, str], exp: str, root: Path, extra_deps: Sequence[str] = ()) -> Stage:
    code = module_deps(kind.module, root) if kind.module else []
    return Stage(kind=kind.name, key=_instance_key(kind, f), fields=f, exp=exp, cmd=kind.cmd.format(**f),
                 deps=_render(kind.deps, f) + tuple(extra_deps) + tuple(code), params=_render(kind.params, f),
                 outs=_render(kind.outs, f), outs_git=_render(kind.outs_git, f), headline=_render(kind.headline, f),
                 persist=_render(kind.persist, f), live=_render(kind.live, f), report_reads=_render(kind.report_reads, f))


def build_pipeline(experiments: Sequence[str] | None = None, report_experiments: Sequence[str] | None = None,
                   root: Path | str = ".", *, skip_broken: bool = False,
                   claims_experiments: Sequence[str] | None = None) -> Pipeline:
    """Expand the stage kinds over ``experiments`` (default: the whole matrix).

    Shared stages (``prepare`` per dataset, ``fid_stats`` per dataset and reference split) appear once and
    take their config from the first experiment (in matrix order) that needs them.

    Args:
        experiments: experiment names from ``params/experiments.yaml``.
        report_experiments: experiments the ``report`` stage covers (default: the default experiments).
        root: repository root.
        claims_experiments: experiment instances (``NAME``, ``NAME_seedK``) the ``claims`` stage reads (default:
            the matrix's claims experiments with their seeds, :func:`lsgm.config.claims_experiments`); they are
            added to ``experiments``.
        skip_broken: an experiment whose params file does not load is left out and its error kept in
            ``Pipeline.broken`` (the others still run); otherwise its ConfigError propagates. A broken experiment
            that ``report_experiments`` asks for always raises.
    """
    root = Path(root).resolve()
    names = list(experiments) if experiments is not None else list_experiments(root)
    report = list(report_experiments) if report_experiments is not None else default_experiments(root)
    claims = list(claims_experiments) if claims_experiments is not None else matrix_claims_experiments(root)
    names += [n for n in claims if n not in names]
    unknown = [n for n in report if n not in names]
    if unknown:
        raise ValueError(f"report_experiments {unknown} are not among experiments {names}")
    configs, broken = {}, {}
    for n in names:
        try:
            configs[n] = load_experiment(n, root)
        except ConfigError as exc:
            if not skip_broken or n in report:
                raise
            broken[n] = str(exc)
    names = [n for n in names if n in configs]
    pipe = Pipeline(root=root, configs=configs, report_experiments=report, broken=broken)
    seen: set[tuple[str, str]] = set()
    for name in names:
        for kind_name, f in _fields_per_instance(pipe.configs[name], root):
            kind = KINDS[kind_name]
            ident = (kind_name, _instance_key(kind, f))
            if ident in seen:
                continue
            seen.add(ident)
            pipe.stages.append(_make_stage(kind, f, name, root))
    if report:  # the report reads the stages' JSON summaries and images, and real images of each dataset
        deps = [p for s in pipe.stages if s.exp in report for p in s.report_reads]
        deps += list(dict.fromkeys(_p(prepared_dir(pipe.configs[e].data.dataset)) for e in report))
        pipe.stages.append(_make_stage(KINDS["report"], {"experiments": " ".join(report)}, report[0], root, deps))
    claims = [n for n in claims if n in pipe.configs]
    if claims:
        deps = [p for s in pipe.stages if s.exp in claims and s.kind in _CLAIMS_READ for p in s.report_reads]
        pipe.stages.append(_make_stage(KINDS["claims"], {"experiments": " ".join(claims)}, claims[0], root, deps))
    return pipe


# ------------------------------------------------------------------------------------------- stage params
def stage_params_text(pipe: Pipeline, stage: Stage) -> str:
    """Content of a stage's params file: the config values it reads (canonical JSON, one line)."""
    return section_values(pipe.config(stage), stage.params) + "\n"


def write_stage_params(pipe: Pipeline, experiments: Sequence[str] | None = None) -> list[str]:
    """Write ``params/resolved/stages/<stage>.json`` of every stage (of ``experiments``) whose values changed.

    A file is rewritten only when its text changes, so its modification time moves exactly when a value the stage
    reads moves: Snakemake (mtimes) then reruns the same stages as DVC (per-key params). Returns the files written.
    """
    written = []
    for st in pipe.stages:
        if st.params_file is None or (experiments is not None and st.exp not in experiments):
            continue
        path = pipe.root / st.params_file
        text = stage_params_text(pipe, st)
        try:
            same = path.read_text() == text
        except OSError:
            same = False
        if not same:
            atomic_write_text(path, text)
            written.append(st.params_file)
    return written


# ------------------------------------------------------------------------------------------- dvc.yaml
def _dvc_item_template(kind: Kind) -> dict[str, str]:
    """``{field}`` -> ``${item.field}`` for every field the kind's templates use."""
    names = {n for t in (kind.cmd, *kind.deps, *kind.outs, *kind.outs_git, *kind.headline, *kind.persist, *kind.live,
                         *kind.params) for n in _template_fields(t)} | ({"exp"} if kind.overrides else set())
    return {n: "${item.%s}" % n for n in names}


def _template_fields(template: str) -> list[str]:
    import string
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _dvc_stage_body(kind: Kind, f: Mapping[str, str], code: Sequence[str], extra_deps: Sequence[str],
                    params_file: str | None, wdir: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if wdir:
        body["wdir"] = wdir
    body["cmd"] = kind.cmd.format(**f)
    deps = list(_render(kind.deps, f)) + list(extra_deps) + list(code)
    if deps:
        body["deps"] = deps
    params: list[Any] = []
    if kind.overrides:  # the experiment's entry of params.yaml (what `dvc exp run -S '++EXP.KEY=VALUE'` edits)
        params.append({OVERRIDES_FILE: [f["exp"]]})
    if kind.params and params_file:
        params.append({params_file: list(_render(kind.params, f))})
    if params:
        body["params"] = params
    outs: list[Any] = list(_render(kind.outs, f))
    outs += [{p: {"cache": False}} for p in _render(kind.outs_git + kind.headline, f)]
    outs += [{p: {"cache": False, "persist": True}} for p in _render(kind.persist, f)]
    outs += [{p: {"persist": True}} for p in _render(kind.live, f)]
    if outs:
        body["outs"] = outs
    return body


def _dvc_stages(pipe: Pipeline, stages: Sequence[Stage], wdir: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in KINDS.values():
        group = [s for s in stages if s.kind == kind.name]
        if not group:
            continue
        code = module_deps(kind.module, pipe.root) if kind.module else []
        if not kind.wildcards:  # one stage over several experiments (report, claims)
            (st,) = group
            extra = [d for d in st.deps if d not in code]
            out[kind.name] = _dvc_stage_body(kind, st.fields, code, extra, None, wdir)
            continue
        tmpl = _dvc_item_template(kind)
        foreach = {s.key: {k: s.fields[k] for k in sorted(tmpl) if k != "exp"} | {"exp": s.exp} for s in group}
        out[kind.name] = {"foreach": foreach,
                          "do": _dvc_stage_body(kind, tmpl, code, (), "params/resolved/${item.exp}.yaml", wdir)}
    return out


def _global_batch(batch_size: int, global_batch_size: int | None, res: ResourceConfig) -> int:
    """Images per optimiser step (lsgm.engine.BatchPlan: the configured global batch, else per-process x processes)."""
    return global_batch_size or batch_size * res.world_size


def _dvc_plots(pipe: Pipeline, stages: Sequence[Stage]) -> list[Any]:
    """Top-level ``plots:``: every training stage's DVCLive curves (x = optimiser step, the global batch stated) and
    the report's figures. Only default experiments: a declared plot that does not exist makes ``dvc plots show``
    report an error, and the others have not run here."""
    out: list[Any] = []
    for st in stages:
        if not st.live:
            continue
        cfg = pipe.config(st)
        if st.kind == "train_vae":
            tc, res, stage = cfg.train_vae, cfg.resource("train_vae"), VAE_STAGE
        elif st.kind == "train_data_sgm":
            tc, res, stage = cfg.data_sgm.train, cfg.resource("train_data_sgm"), DATA_SGM_STAGE
        else:
            tc, res, stage = cfg.prior[st.fields["stage"]].train, cfg.resource("train_lsgm"), st.fields["stage"]
        batch = _global_batch(tc.batch_size, tc.global_batch_size, res)
        (live,) = st.live
        out.append({f"{live}/plots/metrics": {
            "x": "step", "x_label": f"optimiser step (global batch {batch}: samples seen = {batch} x step)",
            "title": f"{st.exp} / {stage}: training (DVCLive)"}})
    if any(s.kind == "report" for s in stages):
        out.append({"reports/figures": {}})
    return out


_HEAD_NOTE = ("# GENERATED by `python -m lsgm.pipeline write` from lsgm/pipeline.py (the stage table) and\n"
              "# params/experiments.yaml. Do not edit; tests/test_workflow.py checks that it is current.\n")


def dvc_documents(root: Path | str = ".") -> dict[str, str]:
    """Text of the generated DVC files: ``dvc.yaml`` (default experiments + report: what a bare
    ``dvc repro`` runs; top-level ``metrics:`` = the folder ``metrics/`` of every experiment's headline files, and
    ``plots:``) and ``workflow/dvc.yaml`` (every other experiment; ``dvc repro workflow/dvc.yaml`` or
    ``dvc repro -P``). Each stage lives in exactly one file (DVC forbids an output in two)."""
    pipe = build_pipeline(root=root)
    defaults = set(pipe.report_experiments)
    main_stages = [s for s in pipe.stages if s.exp in defaults]
    rest = [s for s in pipe.stages if s.exp not in defaults]
    main_doc = {"metrics": [_p(HEADLINE_ROOT)], "plots": _dvc_plots(pipe, main_stages),
                "stages": _dvc_stages(pipe, main_stages, None)}
    docs = {"dvc.yaml": _HEAD_NOTE + "# Default experiments; the rest of the matrix is in workflow/dvc.yaml.\n"
            + _dump(main_doc)}
    docs["workflow/dvc.yaml"] = _HEAD_NOTE + ("# Non-default experiments (run: dvc repro workflow/dvc.yaml, or one stage:\n"
                                              "# dvc repro workflow/dvc.yaml:train_vae@cifar10_best_fid).\n"
                                              + _dump({"stages": _dvc_stages(pipe, rest, "..")}))
    return docs


def _dump(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=120)


_OVERRIDES_HEAD = """\
# Per-experiment overrides, merged on top of params/EXP.yaml (and its fragments) by every tool: `lsgm VERB EXP`,
# Snakemake and DVC. `{}` = the params file as written. This is DVC's default params file, so
#     dvc exp run -S '++digits.sampling.ode_tol=1e-3'
# changes exactly that value for one experiment (README, "Running with DVC"); by hand, write nested keys:
#     digits:
#       sampling:
#         ode_tol: 0.001
# Keep block style: DVC rewrites [flow, lists] under an experiment it changes. `python -m lsgm.pipeline write` adds
# an entry for every experiment of params/experiments.yaml (DVC needs each key it tracks to exist).
"""


def overrides_text(root: Path | str = ".") -> str:
    """``params.yaml`` with an entry for every experiment: the existing file, unchanged, plus ``NAME: {}`` lines for
    experiments it lacks (the whole file, with its header, when there is none)."""
    root = Path(root)
    path = root / OVERRIDES_FILE
    text = path.read_text() if path.is_file() else _OVERRIDES_HEAD
    present = yaml.safe_load(text) or {}
    missing = [n for n in list_experiments(root) if n not in present]
    if missing and text and not text.endswith("\n"):
        text += "\n"
    return text + "".join(f"{n}: {{}}\n" for n in missing)


def expected_files(root: Path | str = ".") -> dict[str, str]:
    """Every generated, checked-in file: the DVC files, ``params/resolved/EXP.yaml`` per experiment and the
    experiments' entries of ``params.yaml`` (its other content is the user's)."""
    root = Path(root).resolve()
    files = dvc_documents(root)
    for name in list_experiments(root):
        files[f"{RESOLVED_PARAMS}/{name}.yaml"] = dump_config(load_experiment(name, root))
    files[OVERRIDES_FILE] = overrides_text(root)
    return files


# ------------------------------------------------------------------------------------------- DVC after Snakemake
def record_in_dvc(pipe: Pipeline, experiments: Sequence[str], *, report: bool, claims: bool = False,
                  timeout: float = 600) -> str:
    """After a successful Snakemake run: ``dvc commit`` the stages Snakemake can have built (those of
    ``experiments`` whose outputs all exist; the report when it covered the default experiments; the claims stage
    when ``claims``, i.e. it read the generated files' claims experiments), so DVC's lock file knows them and
    ``dvc status`` / ``dvc repro`` / ``dvc exp run`` redo nothing. Only stages the generated DVC files declare are
    recorded (a seed added with ``--config seeds=...`` has none). Returns what it did, for the log; never raises
    (Snakemake's work is done either way): outside a DVC checkout, or without ``dvc``, it says so.
    """
    import shutil
    import subprocess

    root = pipe.root
    if not (root / ".dvc").is_dir():
        return "lsgm: not a DVC checkout (no .dvc/): nothing recorded for DVC"
    dvc = shutil.which("dvc")
    if dvc is None:
        return "lsgm: `dvc` not on PATH: outputs not recorded for DVC (run `dvc commit -f` to record them)"
    defaults = set(default_experiments(root))  # their stages live in dvc.yaml, the others' in workflow/dvc.yaml
    declared = set(list_experiments(root))  # derived seeds (NAME_seedK) have no DVC stages
    single = {"report": report, "claims": claims}
    targets = []
    for st in pipe.stages:
        if st.kind in single:
            if not single[st.kind]:
                continue
        elif st.exp not in experiments or st.exp not in declared:
            continue
        if not all((root / o).exists() for o in st.outputs + st.live):
            continue
        in_main = st.kind == "report" or st.exp in defaults
        targets.append(st.dvc_name if in_main else f"workflow/dvc.yaml:{st.dvc_name}")
    if not targets:
        return "lsgm: nothing to record for DVC"
    cmd = [dvc, "commit", "--force", "--quiet", *targets]
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"lsgm: `dvc commit` failed ({exc}); run `dvc commit -f` to record Snakemake's outputs for DVC"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return ("lsgm: `dvc commit` failed; run `dvc commit -f` to record Snakemake's outputs for DVC: "
                + " | ".join(tail))
    return (f"lsgm: recorded {len(targets)} stages in dvc.lock (`dvc commit`): DVC has nothing to redo; "
            "skip with `snakemake --no-hooks`")


def main(argv: list[str] | None = None) -> int:
    """``python -m lsgm.pipeline write|check [--root .]``."""
    ap = argparse.ArgumentParser(prog="python -m lsgm.pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["write", "check"])
    ap.add_argument("--root", default=".")
    args = ap.parse_args(argv)
    root = Path(args.root)
    stale = []
    for rel, text in expected_files(root).items():
        path = root / rel
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(rel)
        if args.action == "write":
            atomic_write_text(path, text)
    verb = "wrote" if args.action == "write" else "stale"
    for rel in stale:
        print(f"{verb}: {rel}")
    return 1 if (stale and args.action == "check") else 0


if __name__ == "__main__":
    sys.exit(main())
