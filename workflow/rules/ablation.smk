# The pre-registered SCNN-vs-CNN ablation of the brain benchmarks (config/preregistration.md):
# the grid (every configuration x experiment x seed; its seed-`screen_seed` denoising runs are
# the screen), the selection of the best paper-consistent SCNN and CNN, their confirmation on
# fresh seeds, and the summary (ablation.csv, two figures). paper_claims_brain.csv is then
# judged over these runs (aggregate.smk). Switched on by a non-empty ablation.configurations:
#   snakemake ablation --configfile config/config.yaml config/ablation.yaml
ABLATION_RUN_FILES = ("metrics.csv", "loss.csv", "timing.json", "eval.npz", "configuration.json")


rule ablation_train:
    input:
        brain="resources/brain/brain.npz",
    output:
        **{
            f.split(".")[0]: f"{ABLATION}/grid/{{experiment}}/{{configuration}}/seed{{seed}}/{f}"
            for f in ABLATION_RUN_FILES
        },
    wildcard_constraints:
        configuration="|".join(map(re.escape, ABLATION_CONFS)) or "(?!)",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/ablation/grid/{{experiment}}/{{configuration}}_seed{{seed}}.log",
    benchmark:
        f"{BENCH}/ablation/grid/{{experiment}}/{{configuration}}_seed{{seed}}.tsv"
    params:
        settings=lambda w: ablation_settings(w.configuration, w.experiment),
        out_dir=lambda w, output: str(Path(output.metrics).parent),
    threads: TRAINING_THREADS
    resources:
        mem_mb=4000,
        runtime=720,
        gpu=1,
    shell:
        "equipet-ablation train --settings {params.settings:q} --brain {input.brain} "
        "--experiment {wildcards.experiment} --configuration {wildcards.configuration} "
        "--seed {wildcards.seed} --out-dir {params.out_dir} --log {log}"


rule ablation_select:
    input:
        [f"{d}/{f}" for d in ablation_screen_dirs() for f in ("metrics.csv", "configuration.json")],
    output:
        f"{ABLATION}/selection.json",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/ablation/selection.log",
    params:
        runs=ablation_screen_dirs(),
    localrule: True
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "equipet-ablation select --runs {params.runs} --out {output} --log {log}"


rule ablation_confirm:
    input:
        brain="resources/brain/brain.npz",
        selection=f"{ABLATION}/selection.json",
    output:
        **{
            f.split(".")[0]: f"{ABLATION}/confirm/{{experiment}}/{{model}}/seed{{seed}}/{f}"
            for f in ABLATION_RUN_FILES
        },
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/ablation/confirm/{{experiment}}/{{model}}_seed{{seed}}.log",
    benchmark:
        f"{BENCH}/ablation/confirm/{{experiment}}/{{model}}_seed{{seed}}.tsv"
    params:
        settings=lambda w: settings(w.experiment, "models", "training", "evaluation", "ablation"),
        out_dir=lambda w, output: str(Path(output.metrics).parent),
    threads: TRAINING_THREADS
    resources:
        mem_mb=4000,
        runtime=720,
        gpu=1,
    shell:
        "equipet-ablation train --settings {params.settings:q} --brain {input.brain} "
        "--experiment {wildcards.experiment} --selection {input.selection} --model {wildcards.model} "
        "--seed {wildcards.seed} --out-dir {params.out_dir} --log {log}"


rule ablation_summary:
    input:
        [f"{d}/{f}" for d in ablation_run_dirs() for f in ABLATION_RUN_FILES if f != "eval.npz"],
    output:
        table=report(
            f"{RESULTS}/tables/ablation.csv",
            caption="../report/ablation.rst",
            category="Ablation",
        ),
        metrics=f"{RESULTS}/tables/ablation_metrics.csv",
        loss=report(
            f"{RESULTS}/figures/ablation_loss.png",
            caption="../report/ablation_loss.rst",
            category="Ablation",
        ),
        quality=report(
            f"{RESULTS}/figures/ablation_quality.png",
            caption="../report/ablation_quality.rst",
            category="Ablation",
        ),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/tables/ablation.log",
    params:
        settings=settings("assisted"),
        runs=ablation_run_dirs(),
    localrule: True
    resources:
        mem_mb=4000,
        runtime=10,
    shell:
        "equipet-ablation summarise --settings {params.settings:q} --runs {params.runs} "
        "--table {output.table} --metrics {output.metrics} --loss-figure {output.loss} "
        "--quality-figure {output.quality} --log {log}"
