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
