"""The stage table: ONE home for the pipeline's facts, read by Snakemake and written out as ``dvc.yaml``.

Each pipeline stage (``prepare`` -> ``fid_stats`` -> ``train_vae`` -> ``train_lsgm`` -> ``sample`` ->
``eval_nll`` / ``eval_fid`` -> ``report``, plus ``resolve_config``) is a :class:`Kind`: its wildcards, its
``lsgm`` command, its inputs, outputs, metrics, plots, persistent run-directory state, the config keys it
reads and the library module it runs. :func:`build_pipeline` expands the kinds over the experiment matrix
(``params/experiments.yaml``) into concrete :class:`Stage` s.

* The Snakemake rules (``workflow/rules/*.smk``) take inputs, params, resources and the shell command from
  here (output patterns too), so a rule cannot drift from its DVC stage.
* ``dvc.yaml`` (default experiments) and ``workflow/dvc.yaml`` (the rest of the matrix) are generated from
  here by ``python -m lsgm.pipeline write`` and checked in; ``python -m lsgm.pipeline check`` (and
  ``tests/test_workflow.py``) fail when they are stale.
* Params per key. Snakemake gets the config sections a stage reads as a ``params:`` value (so a change to
  ``sampling.ode_tol`` reruns only sample, eval_fid and report). DVC lists the same keys from
  ``params/resolved/EXP.yaml``: the fully merged config (``extends:`` fragments applied) written by the
  ``resolve_config`` stage, so a value inherited from a fragment is tracked too.
* ``persist`` paths (checkpoints, DVCLive logs) are declared to DVC with ``persist: true`` and are NOT
  Snakemake outputs: Snakemake deletes declared outputs before a rerun, which would defeat resuming.

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

from lsgm.config import (RESOLVED_PARAMS, ConfigError, ExperimentConfig, ResourceConfig, config_to_dict,
                         default_experiments, dump_config, experiment_file, list_experiments, load_experiment,
                         matrix_claims_experiments)
from lsgm.runs import (DATA_SGM_STAGE, RESERVED_STAGE_NAMES, RUNS_ROOT, VAE_STAGE, ClassifierFiles, RunLayout,
                       fid_reference_tag, fid_stats_file, prepared_dir)
from lsgm.stages import STAGES

__all__ = ["Kind", "Stage", "Pipeline", "KINDS", "build_pipeline", "launcher", "slurm_resources",
           "module_deps", "section_values", "dvc_documents", "expected_files", "main"]

LOG_DIR = "logs"
BENCHMARK_DIR = "benchmarks/out"
_RUN = RunLayout(RUNS_ROOT, "{exp}")  # the run layout with the experiment left as a template field


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
    metrics: tuple[str, ...] = ()  # JSON, DVC cache: false
    plots: tuple[str, ...] = ()  # images, DVC cache: false
    persist: tuple[str, ...] = ()  # resumable run-directory state: DVC persist, never a Snakemake output
    params: tuple[str, ...] = ()  # dotted config keys (templates), e.g. "prior.{stage}"
    module: str = ""  # library module the CLI verb runs (its lsgm imports become deps)
    log_redirect: str = " > {log} 2>&1"


_PREPARED = _p(prepared_dir("{dataset}"))
_FID_STATS = _p(fid_stats_file("{dataset}", "{split}"))

KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("resolve_config", ("exp",), "lsgm resolve-config {exp}",
         deps=("{params_file}", "params/fragments"), outs_git=(RESOLVED_PARAMS + "/{exp}.yaml",),
         module="lsgm.config"),
    Kind("prepare", ("dataset",), "lsgm prepare {dataset}", outs=(_PREPARED,), module="lsgm.data.prepare"),
    Kind("fid_stats", ("dataset", "split"), "lsgm fid-stats {exp} --out " + _FID_STATS,
         deps=(_PREPARED,), outs=(_FID_STATS,), params=("data", "eval_fid"), module="lsgm.metrics"),
    Kind("train_classifier", ("dataset",), "lsgm train-classifier {exp}", deps=(_PREPARED,),
         outs=(_p(ClassifierFiles("{dataset}").model),), metrics=(_p(ClassifierFiles("{dataset}").metrics),),
         params=("data", "eval_fd"), module="lsgm.classifier"),
    Kind("train_vae", ("exp",), "{lsgm} train-vae {exp}", deps=(_PREPARED,),
         outs=(_p(_RUN.model(VAE_STAGE)),), metrics=(_p(_RUN.metrics(VAE_STAGE)),),
         persist=(_p(_RUN.checkpoints(VAE_STAGE)), _p(_RUN.dvclive(VAE_STAGE))),
         params=("data", "vae", "train_vae", "engine.precision"), module="lsgm.train"),
    Kind("train_lsgm", ("exp", "stage"), "{lsgm} train-lsgm {exp} --stage {stage}",
         deps=(_PREPARED, _p(_RUN.model("{init_from}"))),
         outs=(_p(_RUN.model("{stage}")),), metrics=(_p(_RUN.metrics("{stage}")),),
         persist=(_p(_RUN.checkpoints("{stage}")), _p(_RUN.dvclive("{stage}"))),
         params=("data", "vae", "prior.{stage}", "engine.precision"), module="lsgm.train"),
    Kind("train_data_sgm", ("exp",), "{lsgm} train-data-sgm {exp}", deps=(_PREPARED,),
         outs=(_p(_RUN.model(DATA_SGM_STAGE)),), metrics=(_p(_RUN.metrics(DATA_SGM_STAGE)),),
         persist=(_p(_RUN.checkpoints(DATA_SGM_STAGE)), _p(_RUN.dvclive(DATA_SGM_STAGE))),
         params=("data", "data_sgm", "engine.precision"), module="lsgm.baseline"),
    Kind("sample", ("exp",), "lsgm sample {exp}", deps=(_p(_RUN.model("{final}")),),
         outs=(_p(_RUN.samples),), metrics=(_p(_RUN.sample_stats),), plots=(_p(_RUN.grid),),
         params=("sampling",), module="lsgm.evaluate"),
    Kind("sample_run", ("exp", "run"), "lsgm sample-run {exp} {run}", deps=(_p(_RUN.model("{model_dir}")),),
         outs=(_p(_RUN.run_samples("{run}")),), metrics=(_p(_RUN.run_stats("{run}")),),
         plots=(_p(_RUN.run_grid("{run}")),), params=("sampling", "sample_runs", "claims"),
         module="lsgm.evaluate"),
    Kind("eval_nll", ("exp", "model"), "lsgm eval-nll {exp} --model {model}",
         deps=(_PREPARED, _p(_RUN.model("{model_dir}"))), metrics=(_p(_RUN.nll("{model}")),),
         params=("data", "eval_nll"), module="lsgm.evaluate"),
    Kind("eval_fid", ("exp",), "lsgm eval-fid {exp}", deps=(_p(_RUN.samples), _FID_STATS),
         metrics=(_p(_RUN.fid),), params=("eval_fid",), module="lsgm.metrics"),
    Kind("eval_fd", ("exp", "run"), "lsgm eval-fd {exp} --run {run}",
         deps=("{run_samples}", _p(ClassifierFiles("{dataset}").model), _PREPARED), metrics=(_p(_RUN.fd("{run}")),),
         params=("eval_fd",), module="lsgm.classifier"),
    Kind("report", (), "lsgm report --experiments {experiments}",
         outs_git=("reports/results.md", "reports/results.csv", "reports/figures"), module="lsgm.report"),
    Kind("claims", (), "lsgm claims --experiments {experiments}",
         outs_git=("reports/claims.json", "reports/claims.md", "reports/claims_c6.png"), module="lsgm.claims"),
]}
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
    metrics: tuple[str, ...]
    plots: tuple[str, ...]
    persist: tuple[str, ...]

    @property
    def outputs(self) -> tuple[str, ...]:
        """What Snakemake declares (everything but the persistent run-directory state)."""
        return self.outs + self.outs_git + self.metrics + self.plots

    @property
    def dvc_name(self) -> str:
        return f"{self.kind}@{self.key}" if self.key else self.kind


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
                 outs=_render(kind.outs, f), outs_git=_render(kind.outs_git, f), metrics=_render(kind.metrics, f),
                 plots=_render(kind.plots, f), persist=_render(kind.persist, f))


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
    if report:
        deps = [p for s in pipe.stages if s.exp in report and s.kind not in ("resolve_config", "prepare", "fid_stats")
                for p in s.metrics + s.plots]
        pipe.stages.append(_make_stage(KINDS["report"], {"experiments": " ".join(report)}, report[0], root, deps))
    claims = [n for n in claims if n in pipe.configs]
    if claims:
        deps = [p for s in pipe.stages if s.exp in claims and s.kind in ("sample", "sample_run", "eval_nll", "eval_fd")
                for p in s.metrics]
        pipe.stages.append(_make_stage(KINDS["claims"], {"experiments": " ".join(claims)}, claims[0], root, deps))
    return pipe


# ------------------------------------------------------------------------------------------- dvc.yaml
def _dvc_item_template(kind: Kind) -> dict[str, str]:
    """``{field}`` -> ``${item.field}`` for every field the kind's templates use."""
    names = {n for t in (kind.cmd, *kind.deps, *kind.outs, *kind.outs_git, *kind.metrics, *kind.plots,
                         *kind.persist, *kind.params) for n in _template_fields(t)}
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
    if kind.params and params_file:
        body["params"] = [{params_file: list(_render(kind.params, f))}]
    outs: list[Any] = list(_render(kind.outs, f))
    outs += [{p: {"cache": False}} for p in _render(kind.outs_git, f)]
    outs += [{p: {"cache": False, "persist": True}} for p in _render(kind.persist, f)]
    if outs:
        body["outs"] = outs
    if kind.metrics:
        body["metrics"] = [{p: {"cache": False}} for p in _render(kind.metrics, f)]
    if kind.plots:
        body["plots"] = [{p: {"cache": False}} for p in _render(kind.plots, f)]
    return body


def _dvc_stages(pipe: Pipeline, stages: Sequence[Stage], wdir: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in KINDS.values():
        group = [s for s in stages if s.kind == kind.name]
        if not group:
            continue
        code = module_deps(kind.module, pipe.root) if kind.module else []
        if kind.name == "report":
            (st,) = group
            extra = [d for d in st.deps if d not in code]
            out["report"] = _dvc_stage_body(kind, st.fields, code, extra, None, wdir)
            continue
        tmpl = _dvc_item_template(kind)
        foreach = {s.key: {k: s.fields[k] for k in sorted(tmpl) if k != "exp"} | {"exp": s.exp} for s in group}
        out[kind.name] = {"foreach": foreach,
                          "do": _dvc_stage_body(kind, tmpl, code, (), "params/resolved/${item.exp}.yaml", wdir)}
    return out


def dvc_documents(root: Path | str = ".") -> dict[str, str]:
    """Text of the generated DVC files: ``dvc.yaml`` (default experiments + report: what a bare
    ``dvc repro`` runs) and ``workflow/dvc.yaml`` (every other experiment; ``dvc repro workflow/dvc.yaml``
    or ``dvc repro -P``). Each stage lives in exactly one file (DVC forbids an output in two)."""
    pipe = build_pipeline(root=root)
    defaults = set(pipe.report_experiments)
    main_stages = [s for s in pipe.stages if s.exp in defaults]
    rest = [s for s in pipe.stages if s.exp not in defaults]
    head = ("# GENERATED by `python -m lsgm.pipeline write` from lsgm/pipeline.py (the stage table) and\n"
            "# params/experiments.yaml. Do not edit; tests/test_workflow.py checks that it is current.\n")
    docs = {"dvc.yaml": head + "# Default experiments; the rest of the matrix is in workflow/dvc.yaml.\n"
            + _dump({"stages": _dvc_stages(pipe, main_stages, None)})}
    docs["workflow/dvc.yaml"] = head + ("# Non-default experiments (run: dvc repro workflow/dvc.yaml, or one stage:\n"
                                        "# dvc repro workflow/dvc.yaml:train_vae@cifar10_best_fid).\n"
                                        + _dump({"stages": _dvc_stages(pipe, rest, "..")}))
    return docs


def _dump(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=120)


def expected_files(root: Path | str = ".") -> dict[str, str]:
    """Every generated, checked-in file: the DVC files and ``params/resolved/EXP.yaml`` per experiment."""
    root = Path(root).resolve()
    files = dvc_documents(root)
    for name in list_experiments(root):
        files[f"params/resolved/{name}.yaml"] = dump_config(load_experiment(name, root))
    return files


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
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    verb = "wrote" if args.action == "write" else "stale"
    for rel in stale:
        print(f"{verb}: {rel}")
    return 1 if (stale and args.action == "check") else 0


if __name__ == "__main__":
    sys.exit(main())
