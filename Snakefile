# equipet: equivariant-network-assisted list-mode TOF PET reconstruction.
#
#   snakemake --profile workflow/profiles/default                      # paper settings
#   snakemake --profile workflow/profiles/default --configfile config/quick.yaml
#   snakemake --report results/report.html                             # HTML report
#
# The configuration is validated against config/schema/ before any rule runs;
# every missing key is filled from the schema defaults.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/brain.smk"
include: "workflow/rules/simulation.smk"
include: "workflow/rules/reconstruction.smk"
include: "workflow/rules/assisted.smk"
include: "workflow/rules/aggregate.smk"


rule all:
    default_target: True
    input:
        all_targets(),
