# Phantom, GATE macros and the simulated acquisition of each CTR (paper II-B, Fig. 1).
#
# One description (config sections scanner, phantom, acquisition) feeds the GATE macros,
# the embedded simulator (backend: builtin, default) and the reconstruction. With
# acquisition.backend: gate the split jobs run real GATE 9.3+ on the macros instead;
# both backends write GATE's ROOT Coincidences tree, merged per CTR.


rule phantom_truth:
    output:
        activity=f"{RESULTS}/phantom/activity.nii.gz",
        mu=f"{RESULTS}/phantom/mu.nii.gz",
        rods=f"{RESULTS}/phantom/rods.csv",
        fig1=report(
            f"{RESULTS}/figures/fig1_phantom.png",
            caption="../report/fig1_phantom.rst",
            category="Simulation",
        ),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/phantom_truth.log",
    params:
        settings=settings("phantom"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=5,
    shell:
        "equipet-phantom --settings {params.settings:q} --activity {output.activity} "
        "--mu {output.mu} --rods {output.rods} --fig {output.fig1} --log {log}"


rule gate_macros:
    output:
        directory(f"{SIM}/ctr{{ctr}}/gate"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/sim/gate_macros_ctr{{ctr}}.log",
    params:
        settings=settings("scanner", "phantom", "acquisition"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "equipet-gate-macros --settings {params.settings:q} --ctr-ps {wildcards.ctr} "
        "--out-dir {output} --log {log}"


if SIM_BACKEND == "builtin":

    rule simulate_job:
        output:
            temp(f"{SIM}/ctr{{ctr}}/parts/job{{job}}.root"),
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/sim/ctr{{ctr}}_job{{job}}.log",
        benchmark:
            f"{BENCH}/sim/ctr{{ctr}}_job{{job}}.tsv"
        params:
            settings=settings("scanner", "phantom", "acquisition"),
        threads: 1
        resources:
            mem_mb=3000,
            runtime=60,
        shell:
            "equipet-simulate --settings {params.settings:q} --ctr-ps {wildcards.ctr} "
            "--job {wildcards.job} --out {output} --log {log}"

else:

    rule gate_job:
        input:
            macros=f"{SIM}/ctr{{ctr}}/gate",
        output:
            temp(f"{SIM}/ctr{{ctr}}/parts/job{{job}}.root"),
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/sim/ctr{{ctr}}_job{{job}}.log",
        benchmark:
            f"{BENCH}/sim/ctr{{ctr}}_job{{job}}.tsv"
        params:
            settings=settings("acquisition"),
        threads: 1
        resources:
            mem_mb=4000,
            runtime=24 * 60,
        shell:
            "equipet-gate-run --settings {params.settings:q} --macro-dir {input.macros} "
            "--job {wildcards.job} --out {output} --log {log}"


rule merge_sim:
    input:
        expand(f"{SIM}/ctr{{{{ctr}}}}/parts/job{{job}}.root", job=SIM_JOBS),
    output:
        root=f"{SIM}/ctr{{ctr}}/coincidences.root",
        counts=f"{SIM}/ctr{{ctr}}/counts.json",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/sim/merge_ctr{{ctr}}.log",
    benchmark:
        f"{BENCH}/sim/merge_ctr{{ctr}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "equipet-merge-root {input} --out {output.root} --counts {output.counts} --log {log}"


rule counts_table:
    input:
        expand(f"{SIM}/ctr{{ctr}}/counts.json", ctr=SIM_CTRS),
    output:
        report(
            f"{RESULTS}/tables/counts.csv",
            caption="../report/counts.rst",
            category="Simulation",
        ),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/sim/counts_table.log",
    params:
        ctrs=SIM_CTRS,
    localrule: True
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "equipet-counts-table {input} --ctrs {params.ctrs} --out {output} --log {log}"
