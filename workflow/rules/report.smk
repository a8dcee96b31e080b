# reports/: results table, small-scale checks and figures for the selected experiments. The HTML copies, the figures and
# their captions (reports/captions/KIND/NAME.rst, written by `lsgm report`) go into `snakemake --report`.


rule report:
    """lsgm report --experiments EXPS."""
    input:
        PIPE.find("report").deps,
    output:
        outputs(
            "report",
            shown={
                "results.html": dict(caption="../report/results.rst", category="1. Results"),
                "checks.html": dict(caption="../report/checks.rst", category="2. Checks"),
                "figures": dict(
                    caption="../report/figure.rst",
                    category="3. Figures",
                    subcategory="{kind}",
                    patterns=["{kind}/{name}.png"],
                    labels={"figure": "{name}"},
                ),
            },
        ),
    params:
        experiments=" ".join(EXPS),
    log:
        log_path("report"),
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
            outputs(
                "claims",
                shown={
                    "claims.md": dict(caption="../report/claims.rst", category="4. Claims"),
                    "claims_c6.png": dict(caption="../report/claims.rst", category="4. Claims"),
                },
            ),
        params:
            experiments=" ".join(CLAIMS),
        log:
            log_path("claims"),
        threads: 1
        resources:
            **P.slurm_resources(PIPE.resources(PIPE.find("claims"))),
        shell:
            stage_shell("claims")
