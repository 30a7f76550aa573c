"""Snakemake script of rule mlflow_study_outputs: the finished study's summary, figures, claims,
notebooks and per-variant metrics go into its MLflow parent run (simflow.analysis.report,
simflow.tracking.log_run_outputs). Writes a record of what was logged; the record, not the
MLflow store, is the rule's output, so MLflow's state never re-triggers a job."""

import contextlib
import json
import logging
from pathlib import Path

from simflow.analysis.report import parent_run_outputs
from simflow.io import write_text
from simflow.tracking import log_run_outputs, resolve_tracking_uri

sm = snakemake  # noqa: F821 (injected by Snakemake)
with open(sm.log[0], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    logging.basicConfig(stream=log, level=logging.INFO)
    study_dir = Path(sm.input.summary).parent  # <results_root>/<study>
    outputs = parent_run_outputs(study_dir, figures=list(sm.input.figures),
                                 notebooks=list(sm.input.notebooks))
    run_id = None
    if sm.params.enabled:
        uri = resolve_tracking_uri(sm.params.tracking_uri, study_dir.parent)
        run_id = log_run_outputs(uri, Path(sm.input.parent), outputs["artifacts"], outputs["metrics"],
                                 outputs["tags"], outputs["description"])
    record = {"run_id": run_id,
              "artifacts": {k: [str(p) for p in v] for k, v in outputs["artifacts"].items()},
              "metrics": outputs["metrics"], "tags": outputs["tags"]}
    write_text(sm.output.record, json.dumps(record, indent=2) + "\n")
    print(f"parent run {run_id or '(tracking disabled)'}: {sum(map(len, record['artifacts'].values()))} "
          f"artifacts, {len(record['metrics'])} metrics")

# The log is closed and the outputs written: end without tearing MLflow down (about 1 CPU-s).
from simflow.fastexit import exit_now  # noqa: E402

exit_now(0)
