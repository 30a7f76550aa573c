"""Snakemake script of rule report_summary: summary.md (+ every column of summary.csv) as the
HTML page that `snakemake --report` shows beside the figures (simflow.analysis.report)."""

import contextlib
from pathlib import Path

import pandas as pd

from simflow.analysis.report import summary_html
from simflow.io import write_text

sm = snakemake  # noqa: F821 (injected by Snakemake)
with open(sm.log[0], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    page = summary_html(Path(sm.input.markdown).read_text(), pd.read_csv(sm.input.summary),
                        title=f"Study {sm.params.study}: summary")
    print(f"wrote {write_text(sm.output.html, page)}")
