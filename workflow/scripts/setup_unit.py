"""Snakemake script of rule setup_unit: write a unit's resolved config and create its MLflow run."""

import logging
import sys

from simflow.study import setup_unit, unit_run_name

with open(snakemake.log[0], "w") as log_file:  # noqa: F821 (snakemake is injected)
    sys.stderr = sys.stdout = log_file
    logging.basicConfig(stream=log_file, level=logging.INFO)
    run_id = setup_unit(
        snakemake.params.config,  # noqa: F821
        snakemake.output.config,  # noqa: F821
        snakemake.output.run_id,  # noqa: F821
        snakemake.input.parent,  # noqa: F821
        run_name=unit_run_name(snakemake.wildcards.unit),  # noqa: F821
        tags=snakemake.params.tags,  # noqa: F821
    )
    print(f"{snakemake.wildcards.unit}: config {snakemake.output.config}, MLflow run {run_id}")  # noqa: F821

# The log is closed and the outputs written: end without tearing MLflow down (about 1 CPU-s).
from simflow.fastexit import exit_now  # noqa: E402

exit_now(0)
