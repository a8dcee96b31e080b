# reports/: results table, claims check and figures for the selected experiments.


rule report:
    """lsgm report --experiments EXPS."""
    input:
        PIPE.find("report").deps,
    output:
        outputs("report", shown={"results.csv": "Results", "results.md": "Results"}),
    params:
        experiments=" ".join(EXPS),
    log:
        log_path("report"),
    benchmark:
        benchmark_path("report")
    threads: P.slurm_resources(PIPE.resources(PIPE.find("report")))["cpus_per_task"]
    resources:
        **P.slurm_resources(PIPE.resources(PIPE.find("report"))),
    shell:
        stage_shell("report")


if PIPE.of_kind("claims"):  # the matrix has claims experiments (`claims: true`)

    rule claims:
        """lsgm claims: reports/claims.json and claims.md (`snakemake --cores all claims [--config seeds=0,1]`)."""
        input:
            PIPE.find("claims").deps,
        output:
            outputs("claims", shown={"claims.md": "Claims"}),
        params:
            experiments=" ".join(CLAIMS),
        log:
            log_path("claims"),
        benchmark:
            benchmark_path("claims")
        threads: 1
        resources:
            **P.slurm_resources(PIPE.resources(PIPE.find("claims"))),
        shell:
            stage_shell("claims")
