# SimFlow reproduction study as one Snakemake DAG.
#
#   snakemake -c2 --configfile config/demo.yaml     # the demo on a laptop (CPU, in-process)
#   snakemake --profile slurm all                   # the paper study on SLURM (see slurm/config.yaml)
#   snakemake -n                                    # what would run (config/config.yaml)
#   snakemake --configfile config/demo.yaml --report report.html   # figures + summary, one HTML file
#   snakemake --profile slurm preflight             # rehearse every training run first (report in
#                                                   # results/<study>/preflight/); the target goes
#                                                   # before --configfile, which takes every word after it
#
# Rules: workflow/rules/*.smk; keys of the study config: config/README.md.
from snakemake.utils import min_version

min_version("9.0")


# Without --configfile the paper study is used. With --configfile, only that file (plus
# --config) is used: Snakemake would otherwise merge it into config/config.yaml, mixing the
# variants of both studies.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# common.smk loads the study with simflow.study.load_study, the one validation of a study (its
# errors name the variant and the key), before anything else reads the config. The JSON schema
# workflow/schemas/config.schema.yaml is generated from the same typed sections, for editors and
# CI checks of study files; the workflow does not check it a second time.
include: "workflow/rules/common.smk"
include: "workflow/rules/stage.smk"


include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/notebooks.smk"
include: "workflow/rules/outputs.smk"


# `snakemake --report report.html`: one self-contained page with the figures, the summary and
# the executed notebooks (the outputs marked report(...) in the rules), described by this file.
report: "workflow/report/workflow.rst"


# The study's MLflow parent run spans the study: every invocation that has work to do marks it
# RUNNING and ends it FINISHED or FAILED (Snakemake runs these handlers only then: not for dry
# runs, --report or "Nothing to be done"). First the store is checked, before the first job: a
# server that does not answer, or a file that is not an MLflow store, stops the run in seconds.
# The stage server (simflow.stage_server: torch and MLflow imported once for the local stages)
# lives from onstart to onsuccess/onerror.
onstart:
    check_study_store()
    set_study_run_status("RUNNING")
    start_stage_server()


onsuccess:
    stop_stage_server()
    set_study_run_status("FINISHED")


onerror:
    stop_stage_server()
    set_study_run_status("FAILED")


include: "workflow/rules/preflight.smk"


rule all:
    default_target: True
    input:
        all_targets(),
        NOTEBOOK_TARGETS,
        OUTPUT_TARGETS,
