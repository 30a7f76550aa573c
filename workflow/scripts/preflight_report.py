"""Snakemake script of rule preflight_report: the study's preflight report from every rehearsal's
row, written as Markdown and JSON, attached to the study's MLflow parent run, and printed."""

import json
import sys
from pathlib import Path

from simflow import preflight
from simflow.tracking import resolve_tracking_uri

terminal = sys.stdout
with open(snakemake.log[0], "w") as log_file:  # noqa: F821 (snakemake is injected)
    sys.stderr = sys.stdout = log_file
    params = snakemake.params  # noqa: F821
    rows = [json.loads(open(path).read()) for path in snakemake.input.rows]  # noqa: F821
    report = preflight.build_report(rows, params.plan, params.study, params.steps, params.cpu_overrides)
    text = preflight.write_report(report, snakemake.output.markdown, snakemake.output.json)  # noqa: F821
    # the store's default place is <results_root>/mlflow.db, next to <results_root>/<study>/
    results_root = Path(snakemake.input.parent).parent.parent  # noqa: F821
    uri = resolve_tracking_uri(str(params.tracking_uri) or None, results_root)
    run_id = preflight.log_report([snakemake.output.markdown, snakemake.output.json], uri,  # noqa: F821
                                  snakemake.input.parent, report)  # noqa: F821
    print(f"report attached to MLflow parent run {run_id}" if run_id else "tracking disabled")
    print(text)
    terminal.write(text)  # the report is also the last thing `snakemake preflight` prints
