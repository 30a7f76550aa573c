# The finished study for its readers: the summary page of `snakemake --report` (which embeds it
# with the figures and the executed notebooks in one HTML file), and the study's MLflow parent run
# filled with the summary, the figures, the claims, the notebooks and one metric per variant.
#
# Needs from common.smk: STUDY, SD, LOGS, ENV, FIGURES; from notebooks.smk: NOTEBOOK_TARGETS.
# The root Snakefile includes this file last, and rule all requests OUTPUT_TARGETS.

OUTPUT_TARGETS = [f"{SD}/summary.html", f"{SD}/mlflow_study_outputs.json"]


rule report_summary:
    input:
        markdown=f"{SD}/summary.md",
        summary=f"{SD}/summary.csv",
    output:
        html=report(f"{SD}/summary.html", category="Summary",
                    labels={"what": "results table and the paper's claims"}),
    params:
        study=STUDY.name,
    log:
        f"{LOGS}/report_summary.log",
    localrule: True
    conda:
        ENV
    script:
        "../scripts/report_summary.py"


# The parent run id is ancient(): re-creating the parent run does not re-run this rule, and the
# rule's output is a local record of what was logged, never the MLflow store itself.
rule mlflow_study_outputs:
    input:
        parent=ancient(STUDY.parent_run_id_file),
        summary=f"{SD}/summary.csv",
        markdown=f"{SD}/summary.md",
        claims=f"{SD}/claims.json",
        page=f"{SD}/summary.html",
        figures=[f"{SD}/figures/{name}.png" for name in FIGURES],
        notebooks=NOTEBOOK_TARGETS,
    output:
        record=f"{SD}/mlflow_study_outputs.json",
    params:
        # results/<study> and results/ are the folders of input.summary (paths are not params)
        tracking_uri=STUDY.tracking["tracking_uri"],
        enabled=STUDY.tracking["enabled"],
    log:
        f"{LOGS}/mlflow_study_outputs.log",
    localrule: True
    conda:
        ENV
    script:
        "../scripts/mlflow_study_outputs.py"
