# SCNN- and CNN-assisted reconstruction of the central slice (paper III-C, Fig. 4-5), its
# metrics against the phantom truth next to MLEM-only baselines, and the paper-claims table.
#
#   central_slice:   per CTR, the early-MLEM central slice, its truth, every MLEM iteration's
#                    slice, the list-mode events crossing it (+ out-of-slice term), the MLEM
#                    baselines' metrics (baselines.csv) and the slice's stored system matrix
#                    (system.pt, reused by every model and seed of the poisson method)
#   assisted_train:  per CTR, method, model and seed (GPU when there is one); with
#                    assisted.group_runs: ctr, assisted_train_ctr trains a CTR's runs together
#   assisted_figure / assisted_crc_figure / assisted_summary / paper_claims: aggregation
#
# Needs the rules of workflow/rules/reconstruction.smk (mlem, sensitivity) and of
# simulation.smk (coincidences.root); include this file after them.

rule central_slice:
    input:
        images=expand(
            f"{RESULTS}/recon/ctr{{{{ctr}}}}/mlem_it{{n}}.nii.gz", n=ASSISTED_MLEM_ITERATIONS
        ),
        sensitivity=f"{RESULTS}/recon/sensitivity.nii.gz",
        root=f"{RESULTS}/sim/ctr{{ctr}}/coincidences.root",
        additive=f"{RESULTS}/recon/ctr{{ctr}}/additive.npz",
    output:
        slice=f"{ASSISTED}/ctr{{ctr}}/slice.npz",
        baselines=f"{ASSISTED}/ctr{{ctr}}/baselines.csv",
        system=f"{ASSISTED}/ctr{{ctr}}/system.pt",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/assisted/central_slice_ctr{{ctr}}.log",
    benchmark:
        f"{BENCH}/assisted/central_slice_ctr{{ctr}}.tsv"
    params:
        settings=slice_settings(),
        mlem_dir=lambda w, input: str(Path(input.images[0]).parent),
    threads: 2
    resources:
        mem_mb=16000,
        runtime=60,
    shell:
        "equipet-central-slice --settings {params.settings:q} --mlem-dir {params.mlem_dir} "
        "--sensitivity {input.sensitivity} --coincidences {input.root} --ctr-ps {wildcards.ctr} "
        "--additive {input.additive} --out {output.slice} --baselines-out {output.baselines} "
        "--system-out {output.system} --log {log}"


if config["assisted"]["group_runs"] == "run":

    rule assisted_train:
        input:
            slice=f"{ASSISTED}/ctr{{ctr}}/slice.npz",
            system=f"{ASSISTED}/ctr{{ctr}}/system.pt",
        output:
            metrics=f"{ASSISTED}/ctr{{ctr}}/{{method}}/{{model}}/seed{{seed}}/metrics.csv",
            loss=f"{ASSISTED}/ctr{{ctr}}/{{method}}/{{model}}/seed{{seed}}/loss.csv",
            timing=f"{ASSISTED}/ctr{{ctr}}/{{method}}/{{model}}/seed{{seed}}/timing.json",
            images=f"{ASSISTED}/ctr{{ctr}}/{{method}}/{{model}}/seed{{seed}}/eval.npz",
            summary=f"{ASSISTED}/ctr{{ctr}}/{{method}}/{{model}}/seed{{seed}}/summary.json",
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/assisted/ctr{{ctr}}_{{method}}_{{model}}_seed{{seed}}.log",
        benchmark:
            f"{BENCH}/assisted/ctr{{ctr}}_{{method}}_{{model}}_seed{{seed}}.tsv"
        params:
            settings=settings("assisted", "models", "training", "phantom", "mlem"),
            out_dir=lambda w, output: str(Path(output.metrics).parent),
        threads: TRAINING_THREADS
        resources:
            mem_mb=8000,
            runtime=720,
            gpu=1,
        shell:
            "equipet-assisted --settings {params.settings:q} --slice {input.slice} --system {input.system} "
            "--method {wildcards.method} --model {wildcards.model} --seed {wildcards.seed} "
            "--out-dir {params.out_dir} --log {log}"

else:

    # assisted.group_runs: ctr -- every run of a CTR in one job, trained together
    rule assisted_train_ctr:
        input:
            slice=f"{ASSISTED}/ctr{{ctr}}/slice.npz",
            system=f"{ASSISTED}/ctr{{ctr}}/system.pt",
        output:
            [
                f"{ASSISTED}/ctr{{ctr}}/{m}/{model}/seed{seed}/{f}"
                for m in ASSISTED_METHODS
                for model in MODELS
                for seed in SEEDS
                for f in ("metrics.csv", "loss.csv", "timing.json", "eval.npz", "summary.json")
            ],
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/assisted/ctr{{ctr}}_group.log",
        benchmark:
            f"{BENCH}/assisted/ctr{{ctr}}_group.tsv"
        params:
            settings=settings("assisted", "models", "training", "phantom", "mlem"),
            out_root=f"{ASSISTED}/ctr{{ctr}}",
            methods=" ".join(ASSISTED_METHODS),
            models=" ".join(MODELS),
            seeds=" ".join(str(s) for s in SEEDS),
        threads: TRAINING_THREADS
        resources:
            mem_mb=16000,
            runtime=1440,
            gpu=1,
        shell:
            "equipet-assisted --settings {params.settings:q} --slice {input.slice} --system {input.system} "
            "--method {params.methods} --model {params.models} --seed {params.seeds} "
            "--out-root {params.out_root} --log {log}"


rule assisted_figure:
    input:
        slice=f"{ASSISTED}/ctr{{ctr}}/slice.npz",
        runs=lambda w: [
            f"{d}/{f}" for d in assisted_run_dirs(w.ctr, w.method) for f in ("eval.npz", "loss.csv")
        ],
    output:
        report(
            f"{RESULTS}/figures/assisted_ctr{{ctr}}_{{method}}.png",
            caption="../report/assisted_figure.rst",
            category="Assisted reconstruction",
            subcategory="CTR {ctr} ps, method {method}",
        ),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/figures/assisted_ctr{{ctr}}_{{method}}.log",
    params:
        settings=settings("phantom"),
        runs=lambda w: assisted_run_dirs(w.ctr, w.method),
    localrule: True
    resources:
        mem_mb=2000,
        runtime=5,
    shell:
        "equipet-recon-figures assisted --settings {params.settings:q} --slice {input.slice} "
        "--runs {params.runs} --out {output} --log {log}"


rule assisted_crc_figure:
    input:
        assisted_metric_files(),
    output:
        report(
            f"{RESULTS}/figures/assisted_crc_{{method}}.png",
            caption="../report/assisted_crc.rst",
            category="Assisted reconstruction",
        ),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/figures/assisted_crc_{{method}}.log",
    localrule: True
    resources:
        mem_mb=2000,
        runtime=5,
    shell:
        "equipet-recon-figures crc --metrics {input} --method {wildcards.method} --out {output} --log {log}"


rule assisted_summary:
    input:
        lambda w: [f"{d}/metrics.csv" for d in assisted_run_dirs(w.ctr, w.method)]
        + [f"{ASSISTED}/ctr{w.ctr}/baselines.csv"],
    output:
        report(
            f"{RESULTS}/tables/assisted_summary_ctr{{ctr}}_{{method}}.csv",
            caption="../report/assisted_summary.rst",
            category="Assisted reconstruction",
            subcategory="CTR {ctr} ps, method {method}",
        ),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/tables/assisted_summary_ctr{{ctr}}_{{method}}.log",
    localrule: True
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "equipet-recon-figures summary --metrics {input} --ctr-ps {wildcards.ctr} --method {wildcards.method} "
        "--out {output} --log {log}"


rule paper_claims:
    input:
        metrics=assisted_metric_files(),
        runs=[f"{d}/{f}" for d in brain_run_dirs() + assisted_run_dirs() for f in ("loss.csv", "timing.json")],
        mlem_timing=expand(f"{RESULTS}/recon/ctr{{ctr}}/timing.json", ctr=ASSISTED_CTRS),
    output:
        rules2=f"{RESULTS}/tables/paper_claims_rules2.csv",
        table=report(
            f"{RESULTS}/tables/paper_claims.csv",
            caption="../report/paper_claims.rst",
            category="Tables",
        ),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/tables/paper_claims.log",
    params:
        settings=settings("assisted"),
        runs=brain_run_dirs() + assisted_run_dirs(),
        extra="--mlem-timing "
        + " ".join(expand(f"{RESULTS}/recon/ctr{{ctr}}/timing.json", ctr=ASSISTED_CTRS)),
    localrule: True
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        CLAIMS_SHELL
