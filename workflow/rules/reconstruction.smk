# List-mode TOF MLEM of the simulated acquisitions (paper II-C), its sensitivity image and metrics.
#
#   sensitivity: one per scanner + phantom mu-map + image grid (shared by every CTR; its JSON
#                sidecar records the settings hash, equipet-mlem refuses a stale one)
#   mlem:        per CTR, one NIfTI per iteration 1..mlem.iterations (the early ones feed training)
#                and additive.npz, the per-event randoms + scatter term the central slice reuses
#   recon_metrics: per CTR, CRC per rod size and background COV per iteration (tidy CSV)
#   psf:         per CTR, point sources at the centre and the rods' radius simulated and
#                reconstructed like the acquisition; fitted FWHM (x, y, z) in JSON
#   crc_blurred_truth: CRC of the truth blurred with each PSF, per rod size and CTR, next to MLEM's


#   normalisation: crystal-pair efficiency components from a simulated blank scan (one per
#                scanner + image grid + mlem.normalisation; skipped when disabled)

NORMALISATION_ON = bool(config["mlem"]["normalisation"]["enabled"])


rule normalisation:
    output:
        f"{RECON}/normalisation.json",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/recon/normalisation.log",
    benchmark:
        f"{BENCH}/recon/normalisation.tsv"
    params:
        settings=settings("scanner", "acquisition", "mlem"),
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "equipet-normalisation --settings {params.settings:q} --out {output} --threads {threads} --log {log}"


rule sensitivity:
    input:
        normalisation=[f"{RECON}/normalisation.json"] if NORMALISATION_ON else [],
    output:
        nii=f"{RECON}/sensitivity.nii.gz",
        meta=f"{RECON}/sensitivity.json",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/recon/sensitivity.log",
    benchmark:
        f"{BENCH}/recon/sensitivity.tsv"
    params:
        settings=settings("scanner", "phantom", "mlem"),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=1,
    shell:
        "equipet-sensitivity --settings {params.settings:q} --out {output.nii} --threads {threads} "
        + ("--normalisation {input.normalisation} " if NORMALISATION_ON else "")
        + "--log {log}"


rule mlem:
    input:
        root=f"{RESULTS}/sim/ctr{{ctr}}/coincidences.root",
        sensitivity=rules.sensitivity.output.nii,
        normalisation=rules.sensitivity.input.normalisation,
    output:
        images=expand(f"{RECON}/ctr{{{{ctr}}}}/mlem_it{{n}}.nii.gz", n=MLEM_ITERATIONS),
        timing=f"{RECON}/ctr{{ctr}}/timing.json",
        additive=f"{RECON}/ctr{{ctr}}/additive.npz",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/recon/mlem_ctr{{ctr}}.log",
    benchmark:
        f"{BENCH}/recon/mlem_ctr{{ctr}}.tsv"
    params:
        settings=settings("scanner", "phantom", "mlem", "acquisition"),
        out_dir=lambda w, output: str(Path(output.timing).parent),
    threads: 2
    resources:
        mem_mb=16000,
        runtime=24 * 60,
        gpu=1,
    shell:
        "equipet-mlem --settings {params.settings:q} --coincidences {input.root} "
        "--sensitivity {input.sensitivity} --ctr-ps {wildcards.ctr} --out-dir {params.out_dir} "
        + ("--normalisation {input.normalisation} " if NORMALISATION_ON else "")
        + "--threads {threads} --log {log}"


rule recon_metrics:
    input:
        images=expand(f"{RECON}/ctr{{{{ctr}}}}/mlem_it{{n}}.nii.gz", n=MLEM_ITERATIONS),
    output:
        csv=f"{RECON}/ctr{{ctr}}/metrics.csv",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/recon/metrics_ctr{{ctr}}.log",
    params:
        settings=settings("phantom", "mlem", "acquisition"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "equipet-recon-metrics --settings {params.settings:q} --images {input.images} "
        "--ctr-ps {wildcards.ctr} --out {output.csv} --log {log}"


rule psf:
    input:
        sensitivity=rules.sensitivity.output.nii,
    output:
        f"{RECON}/ctr{{ctr}}/psf.json",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/recon/psf_ctr{{ctr}}.log",
    benchmark:
        f"{BENCH}/recon/psf_ctr{{ctr}}.tsv"
    params:
        settings=settings("scanner", "phantom", "mlem", "acquisition"),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    shell:
        "equipet-psf --settings {params.settings:q} --sensitivity {input.sensitivity} "
        "--ctr-ps {wildcards.ctr} --out {output} --threads {threads} --log {log}"


rule crc_blurred_truth:
    input:
        psf=expand(f"{RECON}/ctr{{ctr}}/psf.json", ctr=RECON_CTRS),
        metrics=expand(f"{RECON}/ctr{{ctr}}/metrics.csv", ctr=RECON_CTRS),
    output:
        f"{RESULTS}/tables/crc_blurred_truth.csv",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/recon/crc_blurred_truth.log",
    params:
        settings=settings("phantom", "mlem"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "equipet-crc-blurred-truth --settings {params.settings:q} --psf {input.psf} --metrics {input.metrics} "
        "--out {output} --log {log}"
