# Shared by every rule: the experiment matrix, the stage table (lsgm/pipeline.py: the one home of each
# stage's command, inputs, outputs and params) and small adapters from it to rule directives.
import posixpath
import sys

import lsgm.pipeline as P
from lsgm.config import ConfigError, default_experiments, list_experiments, matrix_claims_experiments

ALL_EXPERIMENTS = list_experiments()


def _selected_experiments():
    """`--config exps=a,b` (or `exps=all`) picks experiments; default: the matrix's default ones."""
    raw = config.get("exps")
    if raw is None:
        return default_experiments()
    names = ALL_EXPERIMENTS if raw == "all" else [e for e in str(raw).split(",") if e]
    unknown = [e for e in names if e not in ALL_EXPERIMENTS]
    if unknown:
        raise ValueError(f"--config exps={raw}: unknown {unknown}; allowed: {ALL_EXPERIMENTS} or 'all'")
    return names


def _claims_experiments():
    """The claims target's experiment instances: `claims: true` entries of the matrix, once per seed
    (`--config seeds=0,1,2` overrides each entry's `seeds:`)."""
    raw = config.get("seeds")
    seeds = None if raw is None else [int(s) for s in str(raw).split(",") if s != ""]
    return matrix_claims_experiments(seeds=seeds)


EXPS = _selected_experiments()
CLAIMS = _claims_experiments()
try:  # a broken params file stops only the experiments that use it (named below); a selected one stops the run
    PIPE = P.build_pipeline(ALL_EXPERIMENTS, report_experiments=EXPS, skip_broken=True, claims_experiments=CLAIMS)
except ConfigError as exc:
    sys.exit(f"lsgm: config error: {exc}")
for _name, _error in PIPE.broken.items():
    print(f"lsgm: skipping experiment {_name} (not selected): {_error}", file=sys.stderr)
# the config values each stage reads, one file per stage, rewritten only when they change: Snakemake's mtimes then
# rerun exactly the stages DVC reruns (lsgm.pipeline.write_stage_params; `lsgm resolve-config` writes them too)
P.write_stage_params(PIPE)

wildcard_constraints:
    exp="|".join(PIPE.configs),
    stage="|".join(sorted({s for c in PIPE.configs.values() for s in c.prior})),
    dataset="[a-z0-9_]+",
    split="train|train_valid",
    model="[A-Za-z0-9_]+",
    run="[A-Za-z0-9_.+-]+",


def _stage(kind, wc):
    return PIPE.find(kind, **{w: wc[w] for w in P.KINDS[kind].wildcards})


def stage_inputs(kind):
    """Input function: the stage's deps (upstream outputs, params files, the lsgm modules it runs) and the file of
    the config values it reads (params/resolved/stages/STAGE.json), so only a change to those reruns it."""
    return lambda wc: list(_stage(kind, wc).snakemake_inputs)


def stage_field(kind, name):
    """Params function: a derived field of the stage (e.g. the owning experiment, the launcher)."""
    return lambda wc: _stage(kind, wc).fields.get(name, _stage(kind, wc).exp)


def stage_threads(kind):
    return lambda wc: P.slurm_resources(PIPE.resources(_stage(kind, wc)))["cpus_per_task"]


def stage_resources(kind):
    """`resources:` of a rule: one function per key of P.slurm_resources (same keys for every stage)."""
    keys = P.slurm_resources(P.ResourceConfig())
    return {k: (lambda wc, k=k: P.slurm_resources(PIPE.resources(_stage(kind, wc)))[k]) for k in keys}


def stage_shell(kind):
    """The stage's command from the table, wildcards/params filled by Snakemake, plus the log redirect."""
    k = P.KINDS[kind]
    names = {n: ("{wildcards.%s}" % n if n in k.wildcards else "{params.%s}" % n) for n in P._template_fields(k.cmd)}
    return k.cmd.format(**names) + k.log_redirect


def outputs(kind, shown=None):
    """Output patterns of a kind (wildcards left in), in the table's order. A path without a suffix is a
    directory; `shown` maps a file or directory name to the keyword arguments of `report()` (caption, category,
    patterns for a directory) for `snakemake --report`."""
    k = P.KINDS[kind]
    out = []
    for t in k.outs + k.outs_git + k.headline:
        path = t.format(**{n: "{%s}" % n for n in P._template_fields(t)})
        name = path.rsplit("/", 1)[-1]
        is_dir = "." not in name
        if is_dir:
            path = directory(path)
        if shown and name in shown:
            path = report(path, **shown[name])
        out.append(path)
    return out


def _per_job(base, kind, suffix):
    return posixpath.join(base, *["{%s}" % w for w in P.KINDS[kind].wildcards], kind + suffix)


def log_path(kind):
    return _per_job(P.LOG_DIR, kind, ".log")

