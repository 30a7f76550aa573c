# The analysis notebooks (analysis/*.ipynb), executed with papermill on the study's fresh results
# at the very end of the DAG, so that their executed copies can never be stale. Outputs, per
# notebook: results/<study>/notebooks/<notebook>.ipynb (executed, with figures) and .html.
#
# Needs from common.smk: STUDY, SD, LOGS, ENV. The root Snakefile includes this file after
# analysis.smk, and rule all requests NOTEBOOK_TARGETS.
import os

NOTEBOOKS = ["latent_space", "variants"]

# analysis/ of this checkout (this file is workflow/rules/notebooks.smk), relative to the working
# directory when it lies below it, so that paths in logs stay short.
_NOTEBOOK_DIR = os.path.normpath(os.path.join(str(workflow.current_basedir), "..", "..", "analysis"))
if not os.path.relpath(_NOTEBOOK_DIR).startswith(".."):
    _NOTEBOOK_DIR = os.path.relpath(_NOTEBOOK_DIR)

NOTEBOOK_TARGETS = [f"{SD}/notebooks/{nb}.{ext}" for nb in NOTEBOOKS for ext in ("ipynb", "html")]


rule analysis_notebook:
    input:
        notebook=f"{_NOTEBOOK_DIR}/{{notebook}}.ipynb",
        # The summary rule's tables: the notebook runs after it, i.e. after every stage.
        summary=f"{SD}/summary.csv",
        per_seed=f"{SD}/summary_per_seed.csv",
        latent_stats=f"{SD}/latent_stats.csv",
        noise=f"{SD}/noise_robustness.csv",
    output:
        ipynb=f"{SD}/notebooks/{{notebook}}.ipynb",
        html=report(f"{SD}/notebooks/{{notebook}}.html", category="Notebooks",
                    labels={"notebook": "{notebook}"}),
    params:
        # papermill parameters of the notebooks. tracking_uri "default" resolves in the kernel
        # as the stages resolve it; None (tracking disabled) skips the MLflow sections.
        parameters={
            "results_dir": STUDY.results_root,
            "study": STUDY.name,
            "tracking_uri": (STUDY.tracking.get("tracking_uri") or "default")
            if STUDY.tracking.get("enabled", True)
            else None,
            "analysis": STUDY.analysis,
        },
    log:
        f"{LOGS}/notebooks/{{notebook}}.log",
    wildcard_constraints:
        notebook="|".join(NOTEBOOKS),
    localrule: True
    conda:
        ENV
    script:
        "../scripts/run_notebook.py"
