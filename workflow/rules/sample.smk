# Probability-flow ODE samples (docs/algorithm.md §6.1) from the experiment's final prior stage.


rule sample:
    """lsgm sample EXP: samples.npz, grid.png, sample_stats.json."""
    input:
        stage_inputs("sample"),
    output:
        outputs("sample"),
    log:
        log_path("sample"),
    threads: stage_threads("sample")
    resources:
        **stage_resources("sample"),
    shell:
        stage_shell("sample")


rule sample_run:
    """lsgm sample-run EXP RUN: another model, the ancestral sampler or another ODE tolerance (samples/RUN/)."""
    input:
        stage_inputs("sample_run"),
    output:
        outputs("sample_run"),
    log:
        log_path("sample_run"),
    threads: stage_threads("sample_run")
    resources:
        **stage_resources("sample_run"),
    shell:
        stage_shell("sample_run")
