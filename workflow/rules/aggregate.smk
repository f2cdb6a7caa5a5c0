# Tables and figures across runs, and the list of final targets.


rule tables:
    input:
        metrics=brain_targets()
        + expand(f"{RECON}/ctr{{ctr}}/metrics.csv", ctr=RECON_CTRS)
        + assisted_metric_files(),
        timing=[f"{d}/timing.json" for d in brain_run_dirs() + assisted_run_dirs()],
    output:
        metrics=report(
            f"{RESULTS}/tables/metrics.csv",
            caption="../report/metrics.rst",
            category="Tables",
        ),
        timing=report(
            f"{RESULTS}/tables/timing.csv",
            caption="../report/timing.rst",
            category="Tables",
        ),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/tables.log",
    localrule: True
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "equipet-figures --log {log} tables --metrics {input.metrics} --timing {input.timing} "
        "--metrics-out {output.metrics} --timing-out {output.timing}"


rule brain_figure:
    input:
        lambda w: expand(
            f"{RESULTS}/{w.experiment}/{{model}}/seed{{seed}}/eval.npz", model=MODELS, seed=SEEDS
        ),
    output:
        report(
            f"{RESULTS}/figures/{{experiment}}.png",
            caption="../report/brain_figure.rst",
            category="Brain benchmarks",
            subcategory="{experiment}",
        ),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/figures/{{experiment}}.log",
    params:
        runs=lambda w, input: sorted({str(Path(p).parent) for p in input}),
    localrule: True
    resources:
        mem_mb=2000,
        runtime=5,
    shell:
        "equipet-figures --log {log} brain --experiment {wildcards.experiment} "
        "--runs {params.runs} --out {output}"


rule group_action_figure:
    input:
        "resources/brain/brain.npz",
    output:
        report(
            f"{RESULTS}/figures/group_action.png",
            caption="../report/group_action.rst",
            category="Brain benchmarks",
        ),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/figures/group_action.log",
    params:
        group=config["models"]["scnn"]["group"],
        order=config["models"]["scnn"]["order"],
        counts=config["denoise"]["counts"],
    localrule: True
    resources:
        mem_mb=2000,
        runtime=5,
    shell:
        "equipet-figures --log {log} group-action --brain {input} --group {params.group} "
        "--order {params.order} --counts {params.counts} --out {output}"


rule generalisation_figure:
    input:
        brain_targets(),
    output:
        report(
            f"{RESULTS}/figures/generalisation.png",
            caption="../report/generalisation.rst",
            category="Brain benchmarks",
        ),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/figures/generalisation.log",
    localrule: True
    resources:
        mem_mb=2000,
        runtime=5,
    shell:
        "equipet-figures --log {log} generalisation --metrics {input} --out {output}"


# With the ablation configured, the brain claims are judged over its grid and confirmation
# runs (config/preregistration.md); otherwise over the brain_experiments runs.
BRAIN_CLAIM_RUNS = ablation_run_dirs() if ABLATION_CONFS else brain_run_dirs()


rule brain_claims:
    input:
        metrics=[f"{d}/metrics.csv" for d in BRAIN_CLAIM_RUNS],
        runs=[f"{d}/{f}" for d in BRAIN_CLAIM_RUNS for f in ("loss.csv", "timing.json")],
    output:
        rules2=f"{RESULTS}/tables/paper_claims_brain_rules2.csv",
        table=report(
            f"{RESULTS}/tables/paper_claims_brain.csv",
            caption="../report/paper_claims_brain.rst",
            category="Tables",
        ),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/tables/paper_claims_brain.log",
    params:
        settings=settings("assisted"),
        runs=BRAIN_CLAIM_RUNS,
        extra="",
    localrule: True
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        CLAIMS_SHELL
