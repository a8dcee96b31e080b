# Inputs: the experiment params and downloads. Outputs: resolved configs and prepared datasets.


rule resolve_config:
    """Write the merged, validated config of an experiment (DVC reads its params per key from it)."""
    input:
        stage_inputs("resolve_config"),
    output:
        outputs("resolve_config"),
    log:
        log_path("resolve_config"),
    threads: stage_threads("resolve_config")
    resources:
        **stage_resources("resolve_config"),
    shell:
        stage_shell("resolve_config")


rule prepare:
    """Download (if needed), verify and convert a dataset to data/prepared/DATASET."""
    input:
        stage_inputs("prepare"),
    output:
        outputs("prepare"),
    log:
        log_path("prepare"),
    threads: stage_threads("prepare")
    resources:
        **stage_resources("prepare"),
    shell:
        stage_shell("prepare")


rule fid_stats:
    """Inception reference statistics of a dataset's FID reference split (only where eval_fid.enabled)."""
    input:
        stage_inputs("fid_stats"),
    output:
        outputs("fid_stats"),
    params:
        exp=stage_field("fid_stats", "exp"),
    log:
        log_path("fid_stats"),
    threads: stage_threads("fid_stats")
    resources:
        **stage_resources("fid_stats"),
    shell:
        stage_shell("fid_stats")
