# NLL bounds of LSGM and of the VAE alone (docs/algorithm.md §7.1), FID/IS/KID of the samples (docs/algorithm.md §7.2).


rule eval_nll:
    """lsgm eval-nll EXP --model lsgm|vae."""
    input:
        stage_inputs("eval_nll"),
    output:
        outputs("eval_nll"),
    log:
        log_path("eval_nll"),
    threads: stage_threads("eval_nll")
    resources:
        **stage_resources("eval_nll"),
    shell:
        stage_shell("eval_nll")


rule eval_fid:
    """lsgm eval-fid EXP (only where eval_fid.enabled)."""
    input:
        stage_inputs("eval_fid"),
    output:
        outputs("eval_fid"),
    log:
        log_path("eval_fid"),
    threads: stage_threads("eval_fid")
    resources:
        **stage_resources("eval_fid"),
    shell:
        stage_shell("eval_fid")


rule train_classifier:
    """lsgm train-classifier EXP: the dataset's feature classifier (FD / KID of samples in its features)."""
    input:
        stage_inputs("train_classifier"),
    output:
        outputs("train_classifier"),
    params:
        exp=stage_field("train_classifier", "exp"),
    log:
        log_path("train_classifier"),
    threads: stage_threads("train_classifier")
    resources:
        **stage_resources("train_classifier"),
    shell:
        stage_shell("train_classifier")


rule eval_fd:
    """lsgm eval-fd EXP --run RUN: FD / KID in dataset-classifier features (only where eval_fd.enabled)."""
    input:
        stage_inputs("eval_fd"),
    output:
        outputs("eval_fd"),
    log:
        log_path("eval_fd"),
    threads: stage_threads("eval_fd")
    resources:
        **stage_resources("eval_fd"),
    shell:
        stage_shell("eval_fd")
