# Brain-image experiments: denoising (paper III-A, Fig. 2) and Radon reconstruction (III-B, Fig. 3).


rule brain:
    output:
        npz="resources/brain/brain.npz",
        preview=report(
            "resources/brain/brain.png",
            caption="../report/brain.rst",
            category="Brain benchmarks",
        ),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/brain.log",
    params:
        settings=settings("brain"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "equipet-brain --settings {params.settings:q} --out {output.npz} "
        "--preview {output.preview} --log {log}"


rule train_brain:
    input:
        brain="resources/brain/brain.npz",
    output:
        metrics=f"{RESULTS}/{{experiment}}/{{model}}/seed{{seed}}/metrics.csv",
        loss=f"{RESULTS}/{{experiment}}/{{model}}/seed{{seed}}/loss.csv",
        timing=f"{RESULTS}/{{experiment}}/{{model}}/seed{{seed}}/timing.json",
        images=f"{RESULTS}/{{experiment}}/{{model}}/seed{{seed}}/eval.npz",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/{{experiment}}/{{model}}_seed{{seed}}.log",
    benchmark:
        f"{BENCH}/{{experiment}}/{{model}}_seed{{seed}}.tsv"
    params:
        settings=lambda w: settings(w.experiment, "models", "training", "evaluation"),
        command=lambda w: "equipet-denoise" if w.experiment == "denoise" else "equipet-radon-recon",
        out_dir=lambda w, output: str(Path(output.metrics).parent),
    threads: TRAINING_THREADS
    resources:
        mem_mb=4000,
        runtime=720,
        gpu=1,
    shell:
        "{params.command} --settings {params.settings:q} --brain {input.brain} "
        "--model {wildcards.model} --seed {wildcards.seed} --out-dir {params.out_dir} "
        "--log {log}"

