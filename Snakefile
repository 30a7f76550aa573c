# SimFlow reproduction study as one Snakemake DAG.
#
#   snakemake -c2 --configfile config/demo.yaml     # the demo on a laptop (CPU, in-process)
#   snakemake --profile slurm all                   # the paper study on SLURM (see slurm/config.yaml)
#   snakemake -n                                    # what would run (config/config.yaml)
#   snakemake --profile slurm preflight             # rehearse every training run first (report in
#                                                   # results/<study>/preflight/)
#
# Rules: workflow/rules/*.smk; keys of the study config: config/README.md.
from snakemake.utils import min_version, validate

min_version("9.0")


# Without --configfile the paper study is used. With --configfile, only that file (plus
# --config) is used: Snakemake would otherwise merge it into config/config.yaml, mixing the
# variants of both studies.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# common.smk loads the study with simflow.study, whose errors name the variant and the key;
# the JSON schema then checks the structure once more (and documents it). Defaults are not
# filled in (set_default=False): units keep their explicit configs, which feed the params trigger.
include: "workflow/rules/common.smk"


validate(config, "workflow/schemas/config.schema.yaml", set_default=False)


include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/notebooks.smk"
include: "workflow/rules/preflight.smk"


rule all:
    default_target: True
    input:
        all_targets(),
        NOTEBOOK_TARGETS,
