# Stage 2+ (docs/algorithm.md §4): VAE + SGM prior. One job per prior stage of the experiment (CelebA qualitative has a
# third stage, `frozen_vae`, initialised from `lsgm`); each starts from its `init_from` stage's model.


rule train_lsgm:
    """lsgm train-lsgm EXP --stage STAGE (resumes from data/runs/EXP/STAGE/checkpoints)."""
    input:
        stage_inputs("train_lsgm"),
    output:
        outputs("train_lsgm"),
    params:
        lsgm=stage_field("train_lsgm", "lsgm"),
    log:
        log_path("train_lsgm"),
    threads: stage_threads("train_lsgm")
    resources:
        **stage_resources("train_lsgm"),
    shell:
        stage_shell("train_lsgm")


rule train_data_sgm:
    """lsgm train-data-sgm EXP: the data-space score model (NCSN++ + VPSDE on dequantised pixels; baseline)."""
    input:
        stage_inputs("train_data_sgm"),
    output:
        outputs("train_data_sgm"),
    params:
        lsgm=stage_field("train_data_sgm", "lsgm"),
    log:
        log_path("train_data_sgm"),
    threads: stage_threads("train_data_sgm")
    resources:
        **stage_resources("train_data_sgm"),
    shell:
        stage_shell("train_data_sgm")
