"""A finished study's outputs for readers: the summary page of ``snakemake --report`` and what the
study's MLflow parent run holds.

* :func:`summary_html`: ``summary.md`` (results table and the paper's claims) as a standalone
  HTML page, with every column of ``summary.csv`` below it (the workflow's ``report_summary``
  rule; Snakemake's report embeds it with the figures and the executed notebooks).
* :func:`parent_run_outputs`: the artifacts, per-variant metrics, claim tags and description
  that the workflow's ``mlflow_study_outputs`` rule logs into the parent run
  (:func:`simflow.tracking.log_run_outputs`), so that studies can be compared in the MLflow UI.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mistune  # a dependency of nbconvert
import pandas as pd

from simflow.analysis.summary import claim_status

__all__ = [
    "PARENT_RUN_METRICS",
    "claim_tags",
    "parent_run_outputs",
    "run_description",
    "summary_html",
    "variant_metrics",
]

#: summary.csv column -> metric name prefix on the parent run: one value per variant (the seed
#: mean), e.g. ``gfid/simflow``; MLflow's UI groups metrics by the prefix before "/".
PARENT_RUN_METRICS: dict[str, str] = {"kid": "gkid", "fid": "gfid", "rfid": "rfid", "nll_bpd": "nll_bpd"}

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; line-height: 1.45; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin: 0.8em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }}
th {{ background: #f3f3f3; }}
td:first-child, th:first-child {{ text-align: left; }}
code {{ background: #f3f3f3; padding: 0 0.2em; }}
details {{ margin-top: 1.5em; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


def _markdown_to_html(text: str) -> str:
    return mistune.create_markdown(plugins=["table"])(text)


def summary_html(markdown: str, summary: Any | None = None, title: str = "Study summary") -> str:
    """A standalone HTML page of the Markdown ``markdown`` (tables rendered), followed, when
    ``summary`` (a DataFrame, e.g. summary.csv) is given, by all of its columns in a
    collapsible table."""
    body = _markdown_to_html(markdown)
    if summary is not None and len(summary):
        table = summary.to_html(index=False, na_rep="–", float_format=lambda v: f"{v:.4g}",
                                border=0)
        body += ("\n<details><summary>All columns of <code>summary.csv</code> (seed means; "
                 "<code>*_std</code>: spread over seeds)</summary>\n" + table + "\n</details>\n")
    return _PAGE.format(title=html.escape(title), body=body)


def variant_metrics(summary: Any, columns: Mapping[str, str] = PARENT_RUN_METRICS) -> dict[str, float]:
    """``{"<prefix>/<variant>": value}`` from summary.csv (one row per variant) for each column
    of ``columns`` that the table has; missing and non-finite values are left out (pixel-space
    variants have no rFID)."""
    out: dict[str, float] = {}
    for _, row in summary.iterrows():
        for column, prefix in columns.items():
            if column not in summary.columns:
                continue
            try:
                value = float(row[column])
            except (TypeError, ValueError):
                continue
            if math.isfinite(value):
                out[f"{prefix}/{row['variant']}"] = value
    return out


def claim_tags(claims: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """``{"claim.<id>": <verdict>}`` of claims.json (:func:`~simflow.analysis.summary.claim_status`:
    reproduced, refuted, inconclusive, point estimate (one seed) or invalid)."""
    return {f"claim.{c['id']}": claim_status(c) for c in claims}


def run_description(markdown: str, limit: int = 5000) -> str:
    """The run description (Markdown, shown on the run's page): ``markdown`` whole when it fits in
    ``limit`` characters, else cut at a line boundary with a pointer to the full artifact."""
    if len(markdown) <= limit:
        return markdown
    note = "\n\n… (cut here: the whole text is the artifact summary/summary.md)\n"
    cut = markdown.rfind("\n", 0, limit - len(note))
    return markdown[: cut if cut > 0 else limit - len(note)] + note


def parent_run_outputs(study_dir: str | Path, figures: Sequence[str | Path] = (),
                       notebooks: Sequence[str | Path] = ()) -> dict[str, Any]:
    """What the study's MLflow parent run gets from the finished study in ``study_dir``
    (results/<study>): ``artifacts`` (folder -> files: the summary tables, claims and summary
    page under ``summary/``, ``figures`` under ``figures/``, ``notebooks`` under ``notebooks/``),
    ``metrics`` (:func:`variant_metrics`), ``tags`` (:func:`claim_tags` plus the variant and
    seed counts) and ``description`` (:func:`run_description` of summary.md)."""
    study_dir = Path(study_dir)
    tables = ["summary.md", "summary.html", "summary.csv", "summary_per_seed.csv", "claims.json",
              "latent_stats.csv", "noise_robustness.csv"]
    summary = pd.read_csv(study_dir / "summary.csv")
    claims_path = study_dir / "claims.json"
    claims = json.loads(claims_path.read_text()) if claims_path.is_file() else []
    markdown_path = study_dir / "summary.md"
    markdown = markdown_path.read_text() if markdown_path.is_file() else ""
    tags = {**claim_tags(claims), "variants": str(len(summary))}
    if "n_seeds" in summary.columns and len(summary):
        tags["seeds"] = str(int(summary["n_seeds"].max()))
    return {
        "artifacts": {"summary": [study_dir / t for t in tables if (study_dir / t).is_file()],
                      "figures": [Path(f) for f in figures],
                      "notebooks": [Path(n) for n in notebooks]},
        "metrics": variant_metrics(summary),
        "tags": tags,
        "description": run_description(markdown) if markdown else None,
    }
