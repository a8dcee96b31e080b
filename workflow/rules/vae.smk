# Stage 1 (docs/algorithm.md §1.8): the VAE with a Normal prior. Checkpoints and DVCLive logs stay in the run directory
# (not declared outputs), so a job killed by a time limit or preemption resumes when resubmitted.


rule train_vae:
    """lsgm train-vae EXP (torchrun inside the job when the experiment asks for several GPUs)."""
    input:
        stage_inputs("train_vae"),
    output:
        outputs("train_vae"),
    params:
        lsgm=stage_field("train_vae", "lsgm"),
    log:
        log_path("train_vae"),
    threads: stage_threads("train_vae")
    resources:
        **stage_resources("train_vae"),
    shell:
        stage_shell("train_vae")
