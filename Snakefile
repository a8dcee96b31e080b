# LSGM pipeline. `snakemake --cores all` builds reports/ for the default experiments (params/experiments.yaml);
# `--config exps=cifar10_best_fid` (or exps=all) picks others; `--profile slurm` submits every job to Slurm.
# Stage facts (commands, inputs, outputs, params per key) live in lsgm/pipeline.py; dvc.yaml is generated there.
import os

from snakemake.utils import min_version

min_version("9.0")


configfile: "params/experiments.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/vae.smk"
include: "workflow/rules/prior.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        PIPE.find("report").outputs,
        expand("params/resolved/{exp}.yaml", exp=EXPS),


onsuccess:
    # record what Snakemake built in DVC's lock file (dvc commit), so `dvc repro` / `dvc exp run` redo nothing
    # (the claims experiments' stages only once the claims target has run: reports/claims.json exists)
    _claims_ran = any(os.path.exists(st.outputs[0]) for st in PIPE.of_kind("claims"))
    print(P.record_in_dvc(PIPE, EXPS + ([c for c in CLAIMS if c not in EXPS] if _claims_ran else []),
                          report=EXPS == default_experiments(), claims=_claims_ran and CLAIMS == matrix_claims_experiments()))
