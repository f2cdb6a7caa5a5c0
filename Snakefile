# equipet: equivariant-network-assisted list-mode TOF PET reconstruction.
#
#   snakemake --profile workflow/profiles/default                      # paper settings
#   snakemake --profile workflow/profiles/default --configfile config/quick.yaml
#   snakemake --report results/report.html                             # HTML report
#   snakemake brain_experiments | simulation | reconstruction | assisted   # one stage
#   snakemake ablation --configfile config/config.yaml config/ablation.yaml  # SCNN-vs-CNN study
#
# The configuration is validated against config/schema/ before any rule runs;
# every missing key is filled from the schema defaults.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/brain.smk"
include: "workflow/rules/simulation.smk"
include: "workflow/rules/reconstruction.smk"
include: "workflow/rules/assisted.smk"
include: "workflow/rules/ablation.smk"
include: "workflow/rules/aggregate.smk"


rule all:
    default_target: True
    input:
        all_targets(),


# One stage at a time (each with what it needs upstream), e.g. the brain benchmarks of
# paper III-A/B on a CPU workstation while the assisted runs wait for a GPU.
rule brain_experiments:
    input:
        brain_stage_targets(),


rule simulation:
    input:
        simulation_targets(),


rule reconstruction:
    input:
        reconstruction_targets(),


rule assisted:
    input:
        assisted_targets(),


# The pre-registered SCNN-vs-CNN ablation of the brain benchmarks (config/preregistration.md).
rule ablation:
    input:
        ablation_targets(),
